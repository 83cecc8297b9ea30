"""The engine directory: what `python -m engines.trt.build` writes and TrtBackbone reads.

    DIR/engines.json      what the engines were built for (below); written last, so a failed build
                          leaves no usable-looking directory
    DIR/<graph>.engine    one serialized plan per backbone graph: audio, text, prefill (unless --no-prefill)
    DIR/timing.cache      TensorRT's timing cache, reused by later builds

engines.json holds the TensorRT version, the GPU and its compute capability, the precision and the
ONNX dtype, max_batch and max_len, per graph its file and optimization profiles, and the artifacts'
fingerprint (manifest hash, size + mtime of the weights and backbone graphs). A plan only loads in the
TensorRT version and on the compute capability that built it, and only fits the export it was built
from, so `engine_mismatches` names every reason a directory cannot serve a request, each with its fix,
before anything is handed to TensorRT.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

from ..manifest import BACKBONE_GRAPHS, MANIFEST_FILE, WEIGHTS_FILE, Manifest

ENGINES_JSON = "engines.json"
ENGINES_FORMAT = 1
TIMING_CACHE = "timing.cache"
PRECISION_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # --precision -> the ONNX dtype it needs
REBUILD = "rebuild: make engine (python -m engines.trt.build)"


class EngineMismatch(RuntimeError):
    """The engines in a directory cannot serve these artifacts on this machine; the message says why and how to fix."""


def engine_file(graph: str) -> str:
    """The plan file of backbone graph `graph` in an engine directory."""
    return f"{graph}.engine"


def artifacts_fingerprint(manifest: Manifest) -> dict:
    """What ties engines to the export they were built from: the manifest's hash, and size + mtime of
    the shared weights and of every backbone graph (a re-export rewrites them)."""
    root = manifest.root
    files = [WEIGHTS_FILE] + [manifest.graphs[g]["file"] for g in BACKBONE_GRAPHS if g in manifest.graphs]
    stats = {name: [(root / name).stat().st_size, int((root / name).stat().st_mtime)] for name in files}
    return {"manifest_sha256": hashlib.sha256((root / MANIFEST_FILE).read_bytes()).hexdigest(), "files": stats}


def engines_meta(
    manifest: Manifest,
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    precision: str,
    max_batch: int,
    max_len: int,
    graphs: dict,
) -> dict:
    """engines.json of a finished build; `graphs` maps each graph to its file, size, build time and profiles."""
    return {
        "format": ENGINES_FORMAT,
        "tensorrt_version": tensorrt_version,
        "gpu": {"name": gpu_name, "compute_capability": compute_capability},
        "precision": precision,
        "onnx_dtype": manifest.dtype,
        "max_batch": max_batch,
        "max_len": max_len,
        "artifacts_dir": str(manifest.root.resolve()),
        "artifacts": artifacts_fingerprint(manifest),
        "graphs": graphs,
        "timing_cache": TIMING_CACHE,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def load_engines_meta(engines_dir: str | Path) -> dict:
    path = Path(engines_dir) / ENGINES_JSON
    if not path.is_file():
        raise EngineMismatch(f"{path} not found: build engines first (make engine ARTIFACTS=... ENGINES={engines_dir})")
    meta = json.loads(path.read_text())
    if meta.get("format") != ENGINES_FORMAT:
        raise EngineMismatch(f"{path}: format {meta.get('format')!r}, this version reads {ENGINES_FORMAT}; rebuild with make engine")
    return meta


def engine_mismatches(
    meta: dict,
    *,
    tensorrt_version: str,
    compute_capability: str,
    fingerprint: dict,
    dtype: str,
    max_batch: int,
    max_len: int,
) -> list[str]:
    """Every reason the engines described by `meta` cannot serve this request (empty: they can)."""
    problems = []
    if meta["tensorrt_version"] != tensorrt_version:
        problems.append(
            f"built with TensorRT {meta['tensorrt_version']}, this is TensorRT {tensorrt_version} "
            f"(plans only load in the exact version that built them); {REBUILD}"
        )
    if meta["gpu"]["compute_capability"] != compute_capability:
        problems.append(
            f"built for compute capability {meta['gpu']['compute_capability']} ({meta['gpu']['name']}), "
            f"this GPU is {compute_capability}; {REBUILD} on this machine"
        )
    if meta["onnx_dtype"] != dtype:
        problems.append(f"built from {meta['onnx_dtype']} graphs, the artifacts are now {dtype}; {REBUILD}")
    if meta["artifacts"]["manifest_sha256"] != fingerprint["manifest_sha256"]:
        problems.append(f"manifest.json changed since the build (re-exported?); {REBUILD}")
    for name, (size, mtime) in fingerprint["files"].items():
        built = meta["artifacts"]["files"].get(name)
        if built is None:
            problems.append(f"{name} was not part of the build; {REBUILD}")
        elif built != [size, mtime]:
            problems.append(
                f"{name} changed since the build (size {built[0]} -> {size}, mtime {built[1]} -> {mtime}); "
                f"{REBUILD} (copy artifacts with their mtimes, e.g. cp -p / rsync -t, to keep engines valid)"
            )
    if max_batch > meta["max_batch"]:
        problems.append(f"max_batch {max_batch} is beyond the built profiles (max {meta['max_batch']}); rebuild with --max-batch {max_batch}")
    if max_len > meta["max_len"]:
        problems.append(
            f"max_len {max_len} is beyond the engines' static KV cache length {meta['max_len']}; "
            f"rebuild with --max-len {max_len} or ask for at most {meta['max_len']}"
        )
    return problems
