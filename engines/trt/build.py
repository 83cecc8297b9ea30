"""`make engine`: TensorRT engines for the backbone graphs of an artifacts directory.

    python -m engines.trt.build --artifacts DIR --precision fp16|bf16|fp32 --max-batch N --max-len L --out DIR [--no-prefill]

One engine per graph (audio, text and, unless --no-prefill, prefill), a timing cache reused across
builds, and `engines.json` describing what they were built for (engine_dir.py; TrtBackbone checks it).
TensorRT 10+ networks are strongly typed, so the ONNX dtype *is* the precision: fp16 needs `make export
DTYPE=float16`, bf16 `DTYPE=bfloat16`, fp32 `DTYPE=float32`.

Each graph is parsed from the copy static_cache.py writes next to weights.bin (KV cache length fixed
to L, attention inputs as TensorRT reads them), by path, without loading the weights.
Profiles: decode (T = 1, batch 1..N, tuned for N) on text and audio; prefill (batch 1, T 1..L-1) on
all three, since a split prefill runs text and audio graphs over whole prompt runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

from ..logs import setup_logging
from ..manifest import Manifest, ManifestError
from .device import Cuda, MissingDependency, import_tensorrt
from .engine_dir import ENGINES_JSON, PRECISION_DTYPES, TIMING_CACHE, engine_file, engines_meta
from .runtime import cache_buffer_bytes
from .static_cache import static_cache_graph

PREFILL_OPT = 256  # prompt length the prefill profile is tuned for

log = logging.getLogger("engines.trt.build")  # not __name__, which is "__main__" under python -m


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
    """An IProgressMonitor logging top-level phases and, at most every 10 s, the innermost step."""

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
                    log.info("  %s%s (%d steps)", "  " * depth, phase_name, num_steps)

        def step_complete(self, phase_name, step):
            with self._lock:
                now = time.monotonic()
                if now - self._last_step >= 10 and phase_name in self._phases:
                    self._last_step = now
                    log.info("    ... %s: step %d/%d", phase_name, step + 1, self._phases[phase_name][1])
            return True

        def phase_finish(self, phase_name):
            with self._lock:
                depth, _, started = self._phases.pop(phase_name, (9, 0, time.monotonic()))
                if depth <= 1:
                    log.info("  %s%s done in %.1fs", "  " * depth, phase_name, time.monotonic() - started)

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
        log.info("  parsing %s (KV cache length fixed to %d)", manifest.graph_path(graph).name, args.max_len)
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
    checkpoint = manifest.source.get("checkpoint") or "CHECKPOINT_DIR"
    codec = f" CODEC={manifest.source['codec']}" if manifest.source.get("codec") else ""
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
    parser = argparse.ArgumentParser(prog="python -m engines.trt.build", description=__doc__.splitlines()[0])
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
    setup_logging()
    try:
        trt = import_tensorrt()
        cuda = Cuda()
        manifest = Manifest.load(args.artifacts)
    except (MissingDependency, ManifestError) as error:
        log.error("error: %s", error)
        return 2
    problem = check_precision(manifest, args.precision)
    if problem:
        log.error("error: %s", problem)
        return 2
    gpu_name, capability = cuda.device()
    graphs = ["audio", "text"] + ([] if args.no_prefill else ["prefill"])
    log.info("TensorRT %s on %s (compute capability %s); %s, max_batch %d, max_len %d; graphs: %s",
             trt.__version__, gpu_name, capability, args.precision, args.max_batch, args.max_len, ", ".join(graphs))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ENGINES_JSON).unlink(missing_ok=True)  # a failed or interrupted build leaves no usable-looking directory
    logger = trt.Logger(trt.Logger.VERBOSE if args.verbose else trt.Logger.WARNING)
    cache_path = args.out / TIMING_CACHE
    builder = trt.Builder(logger)
    cache_config = builder.create_builder_config()  # the timing cache comes from a config; keep it for the run
    timing_cache = cache_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    log.info("timing cache %s (%s)", cache_path, "reused" if cache_path.is_file() else "new")
    monitor = progress_monitor(trt)
    entries, started_all = {}, time.monotonic()
    for graph in graphs:
        started = time.monotonic()
        log.info("building %s", graph)
        try:
            plan, profiles = build_graph(trt, builder, logger, manifest, graph, args, timing_cache, monitor)
        except BuildError as error:
            log.error("error: %s", error)
            return 1
        path = args.out / engine_file(graph)
        with open(path, "wb") as f:
            f.write(plan)
        cache_path.write_bytes(bytes(timing_cache.serialize()))  # kept even if a later graph fails
        seconds, size = time.monotonic() - started, path.stat().st_size
        del plan
        entries[graph] = {"file": path.name, "bytes": size, "build_seconds": round(seconds, 1), "profiles": profiles}
        log.info("%s built in %.1fs (%s)", graph, seconds, human(size))
    meta = engines_meta(manifest, tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability,
                        precision=args.precision, max_batch=args.max_batch, max_len=args.max_len, graphs=entries)
    (args.out / ENGINES_JSON).write_text(json.dumps(meta, indent=2))
    kv = 2 * manifest.model.num_layers * cache_buffer_bytes(manifest.model, manifest.dtype, args.max_batch, args.max_len)
    log.info("done in %.1fs; sizes:", time.monotonic() - started_all)
    for entry in entries.values():
        log.info("  %-16s %10s", entry["file"], human(entry["bytes"]))
    log.info("  %-16s %10s", TIMING_CACHE, human(cache_path.stat().st_size))
    log.info("  KV cache the runtime allocates at max_batch %d: %s", args.max_batch, human(kv))
    log.info("wrote %s", args.out / ENGINES_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
