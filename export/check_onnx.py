"""`make check-onnx`: polygraphy compares every exported graph on ONNX Runtime with the torch reference.

    python -m export.check_onnx --artifacts DIR [--checkpoint DIR] [--codec DIR]

For each graph it writes polygraphy inputs (a prefill-shaped and a decode-shaped feed) and the torch
outputs for them, then runs `polygraphy run GRAPH --onnxrt --load-inputs ... --load-outputs ...`
(printed, so it can be re-run by hand). Checkpoints default to the ones recorded in manifest.json.

The torch reference holds its embeddings, final norm and heads, and one decoder layer at a time, read
just before the layer runs (`reference_backbone`): a 3B's float32 reference is 23 GB whole.

Quantized graphs (make export DTYPE=int4|int8) are checked against their own float32 reference: the
torch model holding the very weights the graphs store, dequantized (export.quantize.DequantizedWeights:
weight products and embedding tables), within export.quantize.QUANTIZED_RTOL x max |reference| per output.
That catches a broken graph (a weight or table packed into the wrong place), not the quantization error,
which is then reported against the float32 graphs they were made from (export.quantize.agreement: numbers,
no gate).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from polygraphy.comparator import RunResults
from polygraphy.comparator.struct import IterationResult
from polygraphy.json import save_json

from engines.manifest import CODEC_DECODER, Manifest, ManifestError

from .checkpoint import CheckpointError, expected_shapes, tensor_loaders
from .config import ConfigError, HiggsConfig, load_config
from .llm import HiggsAudioBackbone, Mode
from .onnx_export import DTYPES
from .quantize import QUANTIZED_RTOL, DequantizedWeights, distance_report, scheme
from .streamed import GRAPH_MODES

ATOL = {"float32": 1e-4, "float16": 1e-2}  # README: fp16 graphs vs the float32 reference


def _backbone_feeds(config, mode: Mode, dtype: np.dtype, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """A 2-row prefill (different cache lengths) and a 3-row single-token step over a random cache."""
    feeds = []
    for batch, length, max_len in ((2, 9, 24), (3, 1, 24)):
        feed = {
            "input_ids": rng.integers(0, config.vocab_size, (batch, length)),
            "audio_codes": rng.integers(0, config.codebook_stride, (batch, length, config.num_codebooks)),
            "audio_mask": rng.random((batch, length)) < 0.5,
            "cache_lengths": rng.integers(0, max_len - length, batch),
            "last_index": rng.integers(0, length, batch),
        }
        if mode is Mode.TEXT:
            del feed["audio_codes"], feed["audio_mask"]
        elif mode is Mode.AUDIO:
            del feed["input_ids"], feed["audio_mask"]
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        for layer in range(config.num_layers):
            for kind in ("key", "value"):
                feed[f"past_{kind}_{layer}"] = rng.standard_normal(shape).astype(dtype)
        feeds.append({k: (v.astype(np.int64) if v.dtype.kind in "iu" else v) for k, v in feed.items()})
    return feeds


def _backbone_outputs(model, mode: Mode, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tensors = {k: torch.from_numpy(v.copy()) for k, v in feed.items()}
    past = [(tensors[f"past_key_{i}"], tensors[f"past_value_{i}"]) for i in range(model.config.num_layers)]
    text, audio, present = model(
        mode, tensors.get("input_ids"), tensors.get("audio_codes"), tensors.get("audio_mask"),
        tensors["cache_lengths"], tensors["last_index"], past,
    )
    outputs = {}
    if text is not None:
        outputs["text_logits"] = text.numpy()
    if audio is not None:
        outputs["audio_logits"] = audio.numpy()
    for i, (k, v) in enumerate(present):
        outputs[f"present_key_{i}"], outputs[f"present_value_{i}"] = k.float().numpy(), v.float().numpy()
    return outputs


def _codec_feeds(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    return [{"codes": rng.integers(0, 1024, (b, 8, t)).astype(np.int64)} for b, t in ((1, 1), (2, 7), (1, 50))]


def _weight_sources(checkpoint: Path, config: HiggsConfig, artifacts: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Checkpoint tensor name -> a loader of the values the graphs in `artifacts` compute with: the checkpoint's
    (read one tensor at a time), or for quantized graphs the dequantized weights they store. Parameters of equal
    values (a tied text head and embedding) all get the dequantized values of the one tensor a float32 export
    stores for them (quantizing equal rows gives equal codes, so this holds for a streamed export's two copies
    too); only a weight the graphs do not name is hashed to find its twin, so a streamed export hashes nothing."""
    loaders = tensor_loaders(checkpoint, config)
    if not scheme(artifacts):
        return loaders
    dequantized = DequantizedWeights(artifacts)
    shapes = expected_shapes(config)
    for name in dequantized:
        if shapes.get(name) != dequantized.shape(name):
            # the float32 export names bytes no parameter holds after the exporter's initializer: what
            # export.quantize made of such a tensor cannot be mapped back onto the model's parameters
            raise ValueError(f"{artifacts}: quantized weight {name!r} is not a model parameter of that shape (quantized "
                             "by python -m export.quantize from a float32 export with shared tensors); re-export with "
                             "make export DTYPE=int4|int8, which names every weight after its checkpoint tensor")
    digest = functools.cache(lambda name: hashlib.sha256(loaders[name]().float().numpy()).digest())
    sources = dict(loaders)
    for name, shape in shapes.items():
        stored = name if name in dequantized else next(
            (other for other in dequantized if dequantized.shape(other) == shape and digest(other) == digest(name)), None)
        if stored is not None:
            sources[name] = lambda stored=stored: torch.from_numpy(dequantized[stored])
    return sources


def reference_backbone(checkpoint: Path, dtype: torch.dtype, artifacts: Path) -> HiggsAudioBackbone:
    """The torch reference of the graphs in `artifacts`, computing exactly what `load_backbone` with their weights
    (`_weight_sources`) computes, while holding only the embeddings, final norm and heads: each decoder layer is
    built on the meta device, gets its weights just before it runs and drops them right after (forward hooks).
    All of a 3B in float32 is 23 GB; this way its int4 gate peaks at 8 GB RSS. The price: every forward call (two
    per graph checked) reads each layer's weights once more (a 3B int4 layer dequantizes in ~0.8 s)."""
    config = load_config(checkpoint)
    sources = _weight_sources(checkpoint, config, artifacts)
    with torch.device("meta"):
        model = HiggsAudioBackbone(config).eval().requires_grad_(False)

    def load(module: nn.Module, prefix: str) -> None:
        module.load_state_dict({name: sources[prefix + name]().to(dtype) for name, _ in module.named_parameters()}, assign=True)

    def release(layer: nn.Module, args, output) -> None:  # None: a forward hook's return value replaces the output
        layer.to_empty(device="meta")

    for name, child in model.named_children():
        if child is not model.layers:
            load(child, f"{name}.")
    for index, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda layer, args, prefix=f"layers.{index}.": load(layer, prefix))
        layer.register_forward_hook(release)
    return model


def _quantized_atol(outputs: list[dict]) -> dict[str, float]:
    return {name: QUANTIZED_RTOL * max(float(np.abs(o[name]).max()) for o in outputs) for name in outputs[0]}


def _polygraphy(graph: Path, feeds: list[dict], outputs: list[dict], atol: float | dict[str, float], work: Path) -> bool:
    inputs, reference = work / f"{graph.stem}.inputs.json", work / f"{graph.stem}.torch.json"
    save_json(feeds, str(inputs))
    results = [IterationResult({k: np.asarray(v) for k, v in o.items()}, runner_name="torch") for o in outputs]
    RunResults([("torch", results)]).save(str(reference))
    command = [
        str(Path(sys.executable).parent / "polygraphy"), "run", str(graph), "--onnxrt",
        "--load-inputs", str(inputs), "--load-outputs", str(reference), "--rtol", "0",
        "--atol", *([f"{name}:{value:.3g}" for name, value in atol.items()] if isinstance(atol, dict) else [str(atol)]),
    ]
    print("$ polygraphy " + " ".join(command[1:]), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    summary = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if "PASSED" in line or "FAILED" in line]
    print("\n".join(summary[-3:]) or result.stderr[-2000:], flush=True)
    return result.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.check_onnx", description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, help="LLM checkpoint (default: the one in manifest.json)")
    parser.add_argument("--codec", type=Path, help="codec checkpoint (default: the one in manifest.json)")
    parser.add_argument("--graphs", nargs="+", choices=[*GRAPH_MODES, CODEC_DECODER], default=[*GRAPH_MODES, CODEC_DECODER],
                        help="check only these graphs (default: all)")
    args = parser.parse_args(argv)
    try:
        manifest = Manifest.load(args.artifacts)
    except ManifestError as error:
        parser.error(str(error))
    checkpoint = args.checkpoint or Path(manifest.source["checkpoint"])
    codec_dir = args.codec or (Path(manifest.source["codec"]) if manifest.source.get("codec") else None)
    if manifest.dtype == "bfloat16":
        parser.error("bfloat16 graphs do not run on ONNX Runtime CPU; check them on TensorRT with make check-engine")
    dtype = DTYPES[manifest.dtype]
    quantization = scheme(args.artifacts)
    if quantization:
        print(f"check-onnx: int{quantization['bits']} graphs against the float32 model holding their dequantized weights")
    try:
        model = reference_backbone(checkpoint, dtype, args.artifacts)
    except (ConfigError, CheckpointError) as error:
        parser.error(f"{error}; pass the checkpoint these graphs were exported from: --checkpoint DIR (make check-onnx CHECKPOINT=DIR)")
    except ValueError as error:
        parser.error(str(error))
    rng = np.random.default_rng(0)
    checks = []  # (graph, feeds, torch outputs, atol)
    for key, mode in GRAPH_MODES.items():
        if key in args.graphs:
            feeds = _backbone_feeds(model.config, mode, torch.empty(0, dtype=dtype).numpy().dtype, rng)
            outputs = [_backbone_outputs(model, mode, feed) for feed in feeds]
            checks.append((manifest.graph_path(key), feeds, outputs, _quantized_atol(outputs) if quantization else ATOL[manifest.dtype]))
    del model  # before ONNX Runtime loads the graphs in polygraphy's process
    if codec_dir is not None and manifest.has(CODEC_DECODER) and CODEC_DECODER in args.graphs:
        from .codec import load_codec

        codec = load_codec(codec_dir)
        feeds = _codec_feeds(rng)
        with torch.no_grad():
            outputs = [{"audio": codec.decode(torch.from_numpy(f["codes"])).numpy()} for f in feeds]
        checks.append((manifest.graph_path(CODEC_DECODER), feeds, outputs, 1e-5))
    with tempfile.TemporaryDirectory() as tmp:
        ok = all([_polygraphy(*check, Path(tmp)) for check in checks])  # every graph's result, not just the first failure
    if quantization:
        print("check-onnx: " + distance_report(args.artifacts), flush=True)
    print("check-onnx: " + ("all graphs match the torch reference" if ok else "MISMATCH (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
