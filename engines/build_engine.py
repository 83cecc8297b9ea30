"""`make engine`: TensorRT engines for the backbone graphs of an artifacts directory.

    python -m engines.build_engine --artifacts DIR --precision fp16|bf16|fp32 --max-batch N --max-len L --out DIR [--no-prefill]

One engine per graph (audio, text and, unless --no-prefill, prefill), a timing cache reused across
builds, and `engines.json` describing what they were built for (TrtBackbone checks it). TensorRT 10+
networks are strongly typed, so the ONNX dtype *is* the precision: fp16 needs `make export
DTYPE=float16`, bf16 `DTYPE=bfloat16`, fp32 `DTYPE=float32`.

The KV cache update layer that TensorRT makes of ONNX TensorScatter needs a static sequence length,
so every past_*/present_* dimension `max_len` is fixed to L in a copy of the graph proto (weights
stay in weights.bin: the copy is written next to it and parsed by path, without loading them).
Profiles: decode (T = 1, batch 1..N, tuned for N) on text and audio; prefill (batch 1, T 1..L-1) on
all three, since a split prefill runs text and audio graphs over whole prompt runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import threading
import time
from pathlib import Path

from .graph_edit import NONPAD_INPUT, attention_nodes, edited_graph
from .manifest import Manifest, ManifestError
from .trt_runtime import (
    CACHE_ITEMSIZE,
    ENGINES_FORMAT,
    ENGINES_JSON,
    PRECISION_DTYPES,
    Cuda,
    MissingDependency,
    artifacts_fingerprint,
    import_tensorrt,
)

TIMING_CACHE = "timing.cache"
PREFILL_OPT = 256  # prompt length the prefill profile is tuned for
CACHE_PREFIXES = ("past_", "present_")


def log(message: str) -> None:
    print(f"[engine] {message}", flush=True)


# --- ONNX: static KV cache length ---------------------------------------------------------------


def fix_cache_dims(model, max_len: int) -> list[str]:
    """Give dim 2 (the sequence) of every past_*/present_* tensor the static length max_len, in place.

    The symbol the export used for it is replaced everywhere it appears (inputs, outputs, value_info),
    so shapes inside the graph stay consistent. Returns the names of the cache tensors changed."""
    graph = model.graph
    caches = [v for v in [*graph.input, *graph.output] if v.name.startswith(CACHE_PREFIXES)]
    if not caches:
        raise ValueError("the graph has no past_*/present_* tensors: not a backbone graph of this exporter")
    symbols = {v.type.tensor_type.shape.dim[2].dim_param for v in caches} - {""}
    for value in caches:
        value.type.tensor_type.shape.dim[2].dim_value = max_len  # clears dim_param (a oneof)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_value = max_len
    return [v.name for v in caches]


def drop_nonpad_kv_seqlen(model) -> int:
    """Remove `nonpad_kv_seqlen` from every Attention node, in place; returns how many nodes.

    The exported mask (`key <= position`) already excludes every key at or past
    `nonpad_kv_seqlen`, so the result is the same model. TensorRT's importer builds its IAttention
    from Q, K, V and the mask alone and never reads input 6 (onnx-tensorrt onnxOpImporters.cpp,
    `DEFINE_BUILTIN_OP_IMPORTER(Attention)`): the graph it is given says exactly what it computes."""
    nodes = attention_nodes(model)
    for node in nodes:
        del node.input[NONPAD_INPUT:]
        while node.input and not node.input[-1]:  # trailing empty optional inputs (past_key / past_value)
            del node.input[-1]
    return len(nodes)


def mark_decomposable(model) -> None:
    """Set `TRT_decomposable=1` on every Attention node, in place. Without it the importer asks for
    a fused IAttention kernel and the build fails wherever none exists for the shapes / precision
    (onnxOpImporters.cpp: `attrs.get<int64_t>("TRT_decomposable", 0)` -> `IAttention::setDecomposable`).
    The attribute is TensorRT's own: onnx.checker and onnxruntime reject the marked graph."""
    import onnx

    for node in attention_nodes(model):
        kept = [a for a in node.attribute if a.name != "TRT_decomposable"]
        del node.attribute[:]
        node.attribute.extend(kept + [onnx.helper.make_attribute("TRT_decomposable", 1)])


def tensorrt_graph(model, max_len: int, decomposable: bool = True) -> None:
    """The edits TensorRT needs, in place: static cache length, no nonpad_kv_seqlen and (unless
    `decomposable` is False, which leaves a graph ONNX Runtime can still run) decomposable attention."""
    fix_cache_dims(model, max_len)
    drop_nonpad_kv_seqlen(model)
    if decomposable:
        mark_decomposable(model)


def static_cache_graph(path: Path, max_len: int, decomposable: bool = True):
    """A copy of the graph at `path` prepared by `tensorrt_graph`, next to weights.bin (so its
    relative external data references resolve), removed when the `with` block ends."""
    return edited_graph(path, lambda model: tensorrt_graph(model, max_len, decomposable), f"max_len{max_len}")


# --- profiles -----------------------------------------------------------------------------------


def profile_ranges(max_batch: int, max_len: int) -> dict[str, dict[str, list[int]]]:
    """(min, opt, max) of the batch and sequence dims per profile kind."""
    longest = max_len - 1  # the last cache row is the passengers' scratch row
    return {
        "decode": {"batch": [1, max_batch, max_batch], "seq": [1, 1, 1]},
        "prefill": {"batch": [1, 1, 1], "seq": [1, min(PREFILL_OPT, longest), longest]},
    }


def profile_shapes(shape: list, ranges: dict[str, list[int]], max_len: int) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of one input from its manifest shape (symbols batch / seq / max_len, or ints)."""
    dims = {"batch": ranges["batch"], "seq": ranges["seq"], "max_len": [max_len] * 3}
    unknown = {d for d in shape if isinstance(d, str) and d not in dims}
    if unknown:
        raise ValueError(f"input shape {shape} has dimensions {sorted(unknown)} this builder has no profile for")
    return tuple(tuple(dims[d][i] if isinstance(d, str) else int(d) for d in shape) for i in range(3))


def graph_profiles(graph: str) -> list[str]:
    """Profile kinds per graph, in engine profile index order (decode first: index 0 is the default)."""
    return ["prefill"] if graph == "prefill" else ["decode", "prefill"]


# --- TensorRT -----------------------------------------------------------------------------------


def progress_monitor(trt):
    """An IProgressMonitor printing top-level phases and, at most every 10 s, the innermost step."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._phases: dict[str, tuple[int, int, float]] = {}  # name -> (depth, steps, started)
            self._last_step = time.monotonic()

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                depth = self._phases[parent_phase][0] + 1 if parent_phase in self._phases else 0
                self._phases[phase_name] = (depth, num_steps, time.monotonic())
                if depth <= 1:
                    log(f"  {'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            with self._lock:
                now = time.monotonic()
                if now - self._last_step >= 10 and phase_name in self._phases:
                    self._last_step = now
                    log(f"    ... {phase_name}: step {step + 1}/{self._phases[phase_name][1]}")
            return True

        def phase_finish(self, phase_name):
            with self._lock:
                depth, _, started = self._phases.pop(phase_name, (9, 0, time.monotonic()))
                if depth <= 1:
                    log(f"  {'  ' * depth}{phase_name} done in {time.monotonic() - started:.1f}s")

    return Monitor()


def network_flags(trt) -> int:
    """Strongly typed: TensorRT 10 needs the flag; 11 builds nothing else and may not define it."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


class BuildError(RuntimeError):
    pass


def build_graph(trt, builder, logger, manifest: Manifest, graph: str, args, timing_cache, monitor):
    """Parse the static-cache copy of one graph, add its profiles, build; returns (plan, profiles entry)."""
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)  # owns the weights: keep it alive until the build is done
    with static_cache_graph(manifest.graph_path(graph), args.max_len) as static:
        log(f"  parsing {manifest.graph_path(graph).name} (KV cache length fixed to {args.max_len})")
        if not parser.parse_from_file(str(static)):
            errors = "\n    ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BuildError(f"TensorRT could not parse {graph}:\n    {errors}")
        config = builder.create_builder_config()
        config.progress_monitor = monitor
        config.set_timing_cache(timing_cache, False)
        ranges, profiles = profile_ranges(args.max_batch, args.max_len), {}
        for index, kind in enumerate(graph_profiles(graph)):
            profile = builder.create_optimization_profile()
            for value in manifest.graphs[graph]["inputs"]:
                profile.set_shape(value["name"], *profile_shapes(value["shape"], ranges[kind], args.max_len))
            config.add_optimization_profile(profile)
            profiles[kind] = {"index": index, **ranges[kind]}
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT could not build {graph} (see the log above; --verbose shows the builder's)")
    return plan, profiles


def check_precision(manifest: Manifest, precision: str) -> str | None:
    """None if the export dtype matches the precision, else the error with the re-export command."""
    want = PRECISION_DTYPES[precision]
    if manifest.dtype == want:
        return None
    with open(manifest.root / "manifest.json") as f:
        source = json.load(f).get("source") or {}
    checkpoint = source.get("checkpoint") or "CHECKPOINT_DIR"
    codec = f" CODEC={source['codec']}" if source.get("codec") else ""
    have = {v: k for k, v in PRECISION_DTYPES.items()}[manifest.dtype]
    return (
        f"{manifest.root} holds {manifest.dtype} graphs but --precision {precision} needs {want}: TensorRT 10+ "
        f"builds strongly typed networks, so the ONNX dtype is the engine precision. Re-export with\n"
        f"  make export CHECKPOINT={checkpoint}{codec} OUT={manifest.root} DTYPE={want}\n"
        f"or build these graphs with --precision {have}."
    )


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engines.build_engine", description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="directory written by make export")
    parser.add_argument("--precision", choices=sorted(PRECISION_DTYPES), required=True)
    parser.add_argument("--max-batch", type=int, required=True, help="most sequences per decode step (slots)")
    parser.add_argument("--max-len", type=int, required=True, help="KV cache rows per slot (static in the engines)")
    parser.add_argument("--out", type=Path, required=True, help="engine directory (TrtBackbone's default: ARTIFACTS/engines)")
    parser.add_argument("--no-prefill", action="store_true", help="skip the mixed prefill engine (saves its GPU memory; prompts then run split)")
    parser.add_argument("--verbose", action="store_true", help="TensorRT's verbose builder log")
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error("--max-batch must be at least 1")
    if args.max_len < 2:
        parser.error("--max-len must be at least 2 (one prompt row plus the scratch row)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        trt = import_tensorrt()
        cuda = Cuda()
    except MissingDependency as error:
        print(f"[engine] error: {error}", file=sys.stderr)
        return 2
    try:
        manifest = Manifest.load(args.artifacts)
    except ManifestError as error:
        print(f"[engine] error: {error}", file=sys.stderr)
        return 2
    problem = check_precision(manifest, args.precision)
    if problem:
        print(f"[engine] error: {problem}", file=sys.stderr)
        return 2
    gpu_name, capability = cuda.device()
    graphs = ["audio", "text"] + ([] if args.no_prefill else ["prefill"])
    log(f"TensorRT {trt.__version__} on {gpu_name} (compute capability {capability}); {args.precision}, "
        f"max_batch {args.max_batch}, max_len {args.max_len}; graphs: {', '.join(graphs)}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ENGINES_JSON).unlink(missing_ok=True)  # a failed or interrupted build leaves no usable-looking directory
    logger = trt.Logger(trt.Logger.VERBOSE if args.verbose else trt.Logger.WARNING)
    cache_path = args.out / TIMING_CACHE
    builder = trt.Builder(logger)
    cache_config = builder.create_builder_config()  # the timing cache comes from a config; keep it for the run
    timing_cache = cache_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    log(f"timing cache {cache_path} ({'reused' if cache_path.is_file() else 'new'})")
    monitor = progress_monitor(trt)
    entries, started_all = {}, time.monotonic()
    for graph in graphs:
        started = time.monotonic()
        log(f"building {graph}")
        try:
            plan, profiles = build_graph(trt, builder, logger, manifest, graph, args, timing_cache, monitor)
        except BuildError as error:
            print(f"[engine] error: {error}", file=sys.stderr)
            return 1
        path = args.out / f"{graph}.engine"
        with open(path, "wb") as f:
            f.write(plan)
        cache_path.write_bytes(bytes(timing_cache.serialize()))  # kept even if a later graph fails
        seconds, size = time.monotonic() - started, path.stat().st_size
        del plan
        entries[graph] = {"file": path.name, "bytes": size, "build_seconds": round(seconds, 1), "profiles": profiles}
        log(f"{graph} built in {seconds:.1f}s ({human(size)})")
    meta = {
        "format": ENGINES_FORMAT,
        "tensorrt_version": trt.__version__,
        "gpu": {"name": gpu_name, "compute_capability": capability},
        "precision": args.precision,
        "onnx_dtype": manifest.dtype,
        "max_batch": args.max_batch,
        "max_len": args.max_len,
        "artifacts_dir": str(args.artifacts.resolve()),
        "artifacts": artifacts_fingerprint(manifest),
        "graphs": entries,
        "timing_cache": TIMING_CACHE,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (args.out / ENGINES_JSON).write_text(json.dumps(meta, indent=2))
    spec = manifest.model
    kv = 2 * spec.num_layers * args.max_batch * spec.num_kv_heads * args.max_len * spec.head_dim * CACHE_ITEMSIZE[manifest.dtype]
    log(f"done in {time.monotonic() - started_all:.1f}s; sizes:")
    for graph, entry in entries.items():
        log(f"  {entry['file']:<16} {human(entry['bytes']):>10}")
    log(f"  {TIMING_CACHE:<16} {human(cache_path.stat().st_size):>10}")
    log(f"  KV cache the runtime allocates at max_batch {args.max_batch}: {human(kv)}")
    log(f"wrote {args.out / ENGINES_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
