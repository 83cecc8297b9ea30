"""`make check-engine`: every TensorRT engine against ONNX Runtime on the same inputs (polygraphy).

    python -m engines.trt.check --artifacts DIR --engines DIR [--batch 4] [--ort-device auto|cpu|cuda] [--rtol R --atol A]

The inputs are real: a voice-cloning prompt rendered with the artifacts' tokenizer (text runs and
an assistant audio clip), and KV caches that ONNX Runtime's prefill graph computed for it. Per graph:
a prompt chunk from an empty cache, a chunk on top of a cached prefix, and a batch of decode steps
whose rows see different cache lengths (so masking of cached rows beyond a row's length is checked);
the decode feed runs twice, the second time replaying the captured CUDA graph. Logits and the full
present_* caches are compared.

polygraphy's own TensorRT runner cannot run these engines (it allocates present_* apart from
past_*, and TensorRT's KV cache update layer requires them to share memory), so the TensorRT side is
a polygraphy runner around TrtBackbone, which binds them exactly as serving does.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..gpu_env import GpuUnavailable
from ..logs import setup_logging
from ..manifest import Manifest, ManifestError
from ..ort_runtime import CUDA_EP, provider_name, providers_for
from .device import MissingDependency, import_cudart, import_tensorrt
from .engine_dir import EngineMismatch, load_engines_meta
from .runtime import TrtBackbone

# (rtol, atol) on logits and caches: fp32 engines may use TF32 matmuls (TensorRT's default on Ampere+);
# fp16 engines accumulate over 16-bit activations through every layer.
TOLERANCES = {"fp32": (1e-2, 1e-2), "fp16": (5e-2, 1e-1)}
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest."
REFERENCE_TEXT = "A short reference sentence for the voice."

log = logging.getLogger("engines.trt.check")  # not __name__, which is "__main__" under python -m


def import_polygraphy():
    try:
        from polygraphy.backend.base import BaseRunner
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.common import TensorMetadata
        from polygraphy.comparator import Comparator
        from polygraphy.comparator.compare import SimpleCompareFunc
    except ImportError as error:
        raise MissingDependency(f"polygraphy is not installed ({error}): pip install '.[gpu,trt]'") from None
    return BaseRunner, OnnxrtRunner, SessionFromOnnx, TensorMetadata, Comparator, SimpleCompareFunc


# --- inputs -------------------------------------------------------------------------------------


def render_prompt(manifest: Manifest, cache_len: int, batch: int):
    """The expanded voice-cloning prompt (text, one assistant audio clip, text); it must leave room
    for `batch` decode rows and the scratch row in a cache of cache_len rows."""
    from ..prompt import PromptRenderer, expand_prompt, tts_messages

    if manifest.tokenizer is None:
        raise ValueError(f"{manifest.root} has no tokenizer.json: the check renders a real prompt with it")
    spec = manifest.model
    codes = np.random.default_rng(0).integers(0, spec.codebook_size, (spec.num_codebooks, 24))
    rendered = PromptRenderer(manifest.tokenizer, spec.num_codebooks).render(
        tts_messages(PROMPT_TEXT, references=[(REFERENCE_TEXT, codes)])
    )
    prompt = expand_prompt(rendered.ids, rendered.audio_segments, spec.audio_out_token_id, spec.num_codebooks)
    need = len(prompt.input_ids) + batch + 1
    if need > cache_len:
        raise ValueError(f"the check prompt has {len(prompt.input_ids)} positions: it needs engines with max_len >= {need}")
    return prompt


def zero_caches(manifest: Manifest, rows: int, cache_len: int) -> list[np.ndarray]:
    spec = manifest.model
    shape = (rows, spec.num_kv_heads, cache_len, spec.head_dim)
    return [np.zeros(shape, np.dtype(manifest.dtype)) for _ in range(2 * spec.num_layers)]


def cache_feed(caches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """[k0, v0, k1, v1, ...] as past_* inputs."""
    return {f"past_{('key', 'value')[i % 2]}_{i // 2}": c for i, c in enumerate(caches)}


def prompt_caches(session, manifest: Manifest, prompt, stop: int, cache_len: int) -> list[np.ndarray]:
    """KV caches (1 row) after ONNX Runtime's prefill graph read prompt positions [0, stop)."""
    feed = {
        "input_ids": prompt.input_ids[None, :stop],
        "audio_codes": prompt.audio_codes[None, :stop],
        "audio_mask": prompt.audio_mask[None, :stop],
        "cache_lengths": np.array([0], np.int64),
        "last_index": np.array([stop - 1], np.int64),
        **cache_feed(zero_caches(manifest, 1, cache_len)),
    }
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, feed)))
    return [outputs[f"present_{kind}_{i}"] for i in range(manifest.model.num_layers) for kind in ("key", "value")]


def graph_feeds(graph: str, manifest: Manifest, prompt, caches_at: dict[int, list[np.ndarray]], cache_len: int, batch: int):
    """The feed dicts for one graph (see the module docstring)."""
    length = len(prompt.input_ids)
    start = int(np.flatnonzero(prompt.audio_mask)[0])  # first audio position; everything before is text
    text_after = np.flatnonzero(~prompt.audio_mask[start:])
    stop = start + int(text_after[0]) if text_after.size else length  # end of the first audio run

    def chunk(lo: int, hi: int, caches, kinds):
        feed = {
            "input_ids": prompt.input_ids[None, lo:hi],
            "audio_codes": prompt.audio_codes[None, lo:hi],
            "audio_mask": prompt.audio_mask[None, lo:hi],
        }
        feed = {k: v for k, v in feed.items() if k in kinds}
        feed.update(cache_lengths=np.array([lo], np.int64), last_index=np.array([hi - lo - 1], np.int64))
        return OrderedDict(feed, **cache_feed(caches))

    rows = np.arange(batch)
    decode_caches = [np.repeat(c, batch, axis=0) for c in caches_at[length]]
    decode = OrderedDict(cache_lengths=length - rows.astype(np.int64), last_index=np.zeros(batch, np.int64))
    if graph == "prefill":
        kinds = ("input_ids", "audio_codes", "audio_mask")
        return [chunk(0, length, zero_caches(manifest, 1, cache_len), kinds), chunk(start, length, caches_at[start], kinds)]
    if graph == "text":
        decode = OrderedDict(input_ids=prompt.input_ids[length - 1 - rows, None], **decode, **cache_feed(decode_caches))
        return [chunk(0, start, zero_caches(manifest, 1, cache_len), ("input_ids",)), decode, decode]
    history = prompt.audio_history.T  # (columns, N)
    decode = OrderedDict(audio_codes=history[len(history) - 1 - rows, None], **decode, **cache_feed(decode_caches))
    return [chunk(start, stop, caches_at[start], ("audio_codes",)), decode, decode]


# --- the TensorRT side ---------------------------------------------------------------------------


def trt_runner_class(BaseRunner, TensorMetadata):
    class TrtBackboneRunner(BaseRunner):
        """Runs one graph through TrtBackbone from slot 0: caches uploaded, run, caches downloaded."""

        def __init__(self, backbone: TrtBackbone, graph: str):
            super().__init__(name=f"tensorrt-{graph}")
            self.backbone, self.graph = backbone, graph
            self.inference_time = None

        def activate_impl(self):
            pass

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for value in self.backbone.manifest.graphs[self.graph]["inputs"]:
                shape = [self.backbone.cache_len if d == "max_len" else None if isinstance(d, str) else d for d in value["shape"]]
                meta.add(value["name"], np.dtype(value["dtype"]), shape)
            return meta

        def infer_impl(self, feed_dict):
            layers = self.backbone.spec.num_layers
            caches = [feed_dict[f"past_{kind}_{i}"] for i in range(layers) for kind in ("key", "value")]
            rows = len(feed_dict["cache_lengths"])
            started = time.perf_counter()
            self.backbone.upload_cache(0, caches)
            plain = {k: v for k, v in feed_dict.items() if not k.startswith("past_")}
            outputs = OrderedDict((k, v.copy()) for k, v in self.backbone.run(self.graph, 0, plain).items())
            present = self.backbone.download_cache(0, rows)
            self.inference_time = time.perf_counter() - started
            for i, array in enumerate(present):
                outputs[f"present_{('key', 'value')[i % 2]}_{i // 2}"] = array
            return outputs

        def deactivate_impl(self):
            pass

    return TrtBackboneRunner


# --- command line --------------------------------------------------------------------------------


def ort_providers(device: str) -> list:
    """The reference's providers, as the serving runtime builds them (driver check, CUDA libraries preloaded)."""
    import onnxruntime as ort

    has_cuda = CUDA_EP in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise MissingDependency("--ort-device cuda needs onnxruntime-gpu: make setup-gpu (pip install '.[gpu]')")
    try:
        return providers_for("cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu")
    except GpuUnavailable as error:
        raise MissingDependency(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.trt.check", description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--engines", type=Path, required=True, help="directory written by make engine")
    parser.add_argument("--batch", type=int, default=4, help="rows of the decode feeds (capped at the engines' max_batch)")
    parser.add_argument("--ort-device", choices=["auto", "cpu", "cuda"], default="auto", help="where ONNX Runtime runs the reference")
    parser.add_argument("--rtol", type=float, help="override the precision's relative tolerance")
    parser.add_argument("--atol", type=float, help="override the precision's absolute tolerance")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        import_tensorrt()
        import_cudart()
        BaseRunner, OnnxrtRunner, SessionFromOnnx, TensorMetadata, Comparator, SimpleCompareFunc = import_polygraphy()
        providers = ort_providers(args.ort_device)
        manifest = Manifest.load(args.artifacts)
        meta = load_engines_meta(args.engines)
    except (MissingDependency, ManifestError, EngineMismatch) as error:
        log.error("error: %s", error)
        return 2
    if meta["precision"] not in TOLERANCES:
        log.error(
            "error: %s engines have no ONNX Runtime reference here (numpy has no bfloat16 and ONNX Runtime's CPU kernels "
            "none either): check a float16 export's engines, and these end to end with make verify", meta["precision"],
        )
        return 2
    rtol, atol = TOLERANCES[meta["precision"]]
    rtol, atol = args.rtol if args.rtol is not None else rtol, args.atol if args.atol is not None else atol
    cache_len, batch = meta["max_len"], max(1, min(args.batch, meta["max_batch"]))
    log.info("%s engines (%s, built on %s) vs ONNX Runtime %s", meta["precision"], meta["tensorrt_version"], meta["gpu"]["name"],
             provider_name(providers[0]))
    log.info("tolerances: rtol %s, atol %s (|trt - ort| <= atol + rtol * |ort|, every element of logits and caches)", rtol, atol)
    try:
        prompt = render_prompt(manifest, cache_len, batch)
        start, length = int(np.flatnonzero(prompt.audio_mask)[0]), len(prompt.input_ids)
        log.info("prompt: %d positions (audio from %d); reference caches from ONNX Runtime's prefill graph", length, start)
        session = SessionFromOnnx(str(manifest.graph_path("prefill")), providers=providers)()
        caches_at = {stop: prompt_caches(session, manifest, prompt, stop, cache_len) for stop in (start, length)}
        del session
        backbone = TrtBackbone(manifest, max_batch=batch, max_len=cache_len, engines_dir=args.engines)
    except (ValueError, EngineMismatch) as error:
        log.error("error: %s", error)
        return 2
    runner_class = trt_runner_class(BaseRunner, TensorMetadata)
    failed = []
    try:
        for graph in meta["graphs"]:
            log.info("%s: comparing", graph)
            feeds = graph_feeds(graph, manifest, prompt, caches_at, cache_len, batch)
            ort_runner = OnnxrtRunner(SessionFromOnnx(str(manifest.graph_path(graph)), providers=providers), name=f"onnxruntime-{graph}")
            results = Comparator.run([ort_runner, runner_class(backbone, graph)], data_loader=feeds)
            passed = bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(rtol=rtol, atol=atol, check_shapes=True)))
            log.info("%s: %s (%d feeds)", graph, "PASSED" if passed else "FAILED", len(feeds))
            if not passed:
                failed.append(graph)
        graphs_note = "CUDA graphs replayed" if backbone.cuda_graphs else f"CUDA graphs off: {backbone.graph_failure}"
    finally:
        backbone.close()
    log.info("%s (%s)", "FAILED: " + ", ".join(failed) if failed else "all engines match ONNX Runtime", graphs_note)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
