"""`python -m bench.gpu`: audio-step throughput on an NVIDIA GPU, TensorRT vs ONNX Runtime CUDA vs torch eager.

    python -m bench.gpu [--sizes v2.5-1b,v2-3b] [--batches 1,8,32,64] [--runtimes tensorrt,ort-cuda,torch]
                        [--context 512] [--prompt 256] [--max-len 1024] [--steps 40] [--budget-min 20]
                        [--work build/bench-gpu] [--no-doc]

Per size: a random checkpoint (`export.tiny --no-codec`), exported in float16 (the one dtype all three
runtimes take, so they run the same weights), TensorRT engines (audio + text, --no-prefill), all
cached in --work for the next run. Per runtime: steps/s of batched audio steps with every stream
attending --context positions (the logits copied to the host, as the decode loop needs them), audio
seconds per second (steps/s x batch / 25 frames/s), and time to first audio at batch 1: a --prompt
token text prefill plus the num_codebooks audio steps until the first delayed frame is complete
(codec excluded). Each throughput is set against the memory-bandwidth floor: the bytes one audio step
has to read (the audio graph's weights, manifest graphs.audio.weight_bytes, plus every stream's K and
V at the context) over the device-to-device copy bandwidth measured at the start. The table is printed
last and written to the GPU section of docs/benchmarks.md. Missing runtimes and whatever the time
budget leaves out are skipped, with the reason in the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from engines.manifest import MANIFEST_FILE, Manifest, ModelSpec

from .common import AUDIO_FRAME_RATE, format_table, today, write_doc_section

SIZES = ("v2.5-1b", "v2-3b")  # the default run; tiny / mid are export.tiny's smoke-test sizes
ALL_SIZES = ("tiny", "mid", *SIZES)
RUNTIMES = ("tensorrt", "ort-cuda", "torch")
DTYPE = "float16"
GPU_HEADING = "## GPU (TensorRT, ONNX Runtime CUDA, torch)"
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADERS = ["model", "runtime", "batch", "steps/s", "audio s/s", "MiB read/step", "floor steps/s", "% of floor", "TTFA ms", "note"]


# --- pure parts (unit-tested without a GPU) ---------------------------------------------------------


def _csv(kind, choices=None):
    def parse(text: str):
        items = [kind(part.strip()) for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        bad = [i for i in items if choices is not None and i not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {list(choices)}")
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=_csv(str, ALL_SIZES), default=list(SIZES), help="export.tiny sizes, in run order")
    parser.add_argument("--batches", type=_csv(int), default=[1, 8, 32, 64], help="streams per audio step")
    parser.add_argument("--runtimes", type=_csv(str, RUNTIMES), default=list(RUNTIMES))
    parser.add_argument("--context", type=int, default=512, help="positions every stream attends during the timed steps")
    parser.add_argument("--prompt", type=int, default=256, help="text tokens of the time-to-first-audio prompt")
    parser.add_argument("--max-len", type=int, default=1024, help="KV cache rows per stream (static in the TensorRT engines)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round (3 rounds, median)")
    parser.add_argument("--budget-min", type=float, default=20.0, help="stop starting new work after this many minutes")
    parser.add_argument("--work", type=Path, default=Path("build/bench-gpu"), help="checkpoints, exports and engines (kept for reruns)")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or args.steps < 1 or args.context < 1 or args.prompt < 1:
        parser.error("batches, --steps, --context and --prompt must be positive")
    if args.context >= args.max_len - 1 or args.prompt + 16 >= args.max_len - 1:
        parser.error(f"--max-len {args.max_len} leaves no room for --context {args.context} / --prompt {args.prompt} (+ the audio steps)")
    return args


def kv_bytes_read(spec: ModelSpec, itemsize: int, batch: int, context: int) -> int:
    """K and V of every layer that `batch` streams attending `context` positions read in one step."""
    return 2 * spec.num_layers * batch * spec.num_kv_heads * context * spec.head_dim * itemsize


def audio_step_bytes(manifest: Manifest, batch: int, context: int) -> int:
    """Bytes one batched audio step must read at least: the audio graph's weights once, plus the KV cache."""
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}[manifest.dtype]
    return int(manifest.graphs["audio"]["weight_bytes"]) + kv_bytes_read(manifest.model, itemsize, batch, context)


@dataclasses.dataclass
class Row:
    model: str
    runtime: str
    batch: int
    steps_per_s: float | None = None
    bytes_per_step: int | None = None
    ttfa_s: float | None = None
    note: str = ""


def table_rows(rows: list[Row], bandwidth: float | None) -> list[list[object]]:
    """HEADERS-ordered cells: audio s/s = steps/s x batch / 25; floor = bandwidth / bytes per step."""
    out = []
    for r in rows:
        floor = bandwidth / r.bytes_per_step if bandwidth and r.bytes_per_step else None
        out.append(
            [
                r.model,
                r.runtime,
                r.batch,
                None if r.steps_per_s is None else f"{r.steps_per_s:.1f}",
                None if r.steps_per_s is None else f"{r.steps_per_s * r.batch / AUDIO_FRAME_RATE:.1f}",
                None if r.bytes_per_step is None else f"{r.bytes_per_step / 2**20:.0f}",
                None if floor is None else f"{floor:.1f}",
                None if floor is None or r.steps_per_s is None else f"{100 * r.steps_per_s / floor:.0f}%",
                None if r.ttfa_s is None else f"{r.ttfa_s * 1e3:.1f}",
                r.note,
            ]
        )
    return out


def doc_body(rows: list[Row], bandwidth: float | None, args: argparse.Namespace, header: list[str], command: str) -> str:
    lines = [
        "Written by `python -m bench.gpu` (bench/gpu.py); every number below comes from one run of that command. "
        "Random float16 weights at the real shapes, so only speed means anything here.",
        "",
        *[f"- {line}" for line in header],
        f"- command: `{command}`",
        "",
        format_table(HEADERS, table_rows(rows, bandwidth), markdown=True),
        "",
        f"- steps/s: batched audio steps (one graph call each, logits copied to the host) with every stream attending "
        f"{args.context} positions; median of 3 rounds of {args.steps} steps after warm-up (TensorRT: CUDA graphs replayed).",
        f"- audio s/s: seconds of audio produced per wall-clock second, steps/s x batch / {AUDIO_FRAME_RATE}.",
        "- floor steps/s: device-to-device copy bandwidth / bytes read per step (audio graph weights + K and V at the context); "
        "no runtime can beat it, % of floor says how close one gets.",
        f"- TTFA: batch 1, a {args.prompt}-token text prefill plus the audio steps until the first delayed frame is complete; "
        "codec decode excluded.",
    ]
    return "\n".join(lines) + "\n"


# --- GPU measurements -------------------------------------------------------------------------------


class Skip(Exception):
    """A runtime or size that cannot be measured here; the message goes into the table."""


def log(message: str) -> None:
    print(f"[bench.gpu] {message}", flush=True)


def run_logged(command: list[str]) -> None:
    log("$ " + " ".join(shlex.quote(c) for c in command))
    started = time.monotonic()
    result = subprocess.run(command)
    if result.returncode != 0:
        raise Skip(f"`{' '.join(command[2:4])}` failed (exit {result.returncode}, see the log)")
    log(f"  done in {time.monotonic() - started:.0f}s")


def prepare_artifacts(size: str, work: Path) -> Path:
    """Random checkpoint + float16 export for `size`, reused when already there."""
    root = work / size
    artifacts, generated = root / f"onnx-{DTYPE}", root / "llm.done"
    if not generated.is_file():  # a marker: an interrupted run leaves a partial checkpoint behind
        run_logged([sys.executable, "-m", "export.tiny", "--out", str(root), "--size", size, "--no-codec"])
        generated.touch()
    if not (artifacts / MANIFEST_FILE).is_file():  # export writes the manifest last
        run_logged([sys.executable, "-m", "export", "--checkpoint", str(root / "llm"), "--out", str(artifacts), "--dtype", DTYPE])
    return artifacts


def copy_bandwidth(cuda, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device cudaMemcpy bandwidth in bytes/s, counting read + write (as bandwidthTest does)."""
    rt = cuda.rt
    src, dst = cuda.malloc(nbytes), cuda.malloc(nbytes)
    stream = cuda.check(rt.cudaStreamCreate())
    start, stop = cuda.check(rt.cudaEventCreate()), cuda.check(rt.cudaEventCreate())
    try:
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        cuda.copy_async(dst, src, nbytes, kind, stream)
        cuda.check(rt.cudaEventRecord(start, stream))
        for _ in range(repeats):
            cuda.copy_async(dst, src, nbytes, kind, stream)
        cuda.check(rt.cudaEventRecord(stop, stream))
        cuda.check(rt.cudaEventSynchronize(stop))
        milliseconds = cuda.check(rt.cudaEventElapsedTime(start, stop))
    finally:
        for event in (start, stop):
            cuda.check(rt.cudaEventDestroy(event))
        cuda.check(rt.cudaStreamDestroy(stream))
        for ptr in (src, dst):
            cuda.check(rt.cudaFree(ptr))
    return 2 * nbytes * repeats / (milliseconds / 1e3)


class RuntimeBackend:
    """Drives a BackboneRuntime (TensorRT or ONNX Runtime) the way the decode loop does."""

    def __init__(self, runtime, context: int):
        self.runtime, self.spec = runtime, runtime.spec
        n = runtime.max_batch
        self.codes = np.zeros((n, self.spec.num_codebooks), np.int64)
        self.lengths = np.full(n, context - 1, np.int64)  # the new column is position context - 1

    def step(self, batch: int) -> None:
        self.runtime.audio_step(np.arange(batch), self.codes[:batch], self.lengths[:batch])

    def first_audio(self, prompt_ids: np.ndarray) -> None:
        length = len(prompt_ids)
        self.runtime.prefill_split(0, prompt_ids, np.zeros((length, self.spec.num_codebooks), np.int64), np.zeros(length, bool))
        for k in range(self.spec.num_codebooks):
            self.runtime.audio_step(np.array([0]), self.codes[:1], np.array([length + k]))

    def close(self) -> None:
        self.runtime.close()


class TorchBackend:
    """export.llm's backbone in eager CUDA with a static cache: the same steps as RuntimeBackend."""

    def __init__(self, llm_dir: Path, max_batch: int, max_len: int, context: int):
        import torch

        from export.llm import Mode, load_backbone

        if not torch.cuda.is_available():
            raise Skip(f"torch {torch.__version__} has no CUDA (this venv pins the CPU wheel; install a CUDA build of torch)")
        self.torch, self.mode = torch, Mode
        self.model = load_backbone(llm_dir, torch.float16).cuda()
        cfg = self.model.config
        shape = (max_batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.cache = [tuple(torch.zeros(shape, dtype=torch.float16, device="cuda") for _ in "kv") for _ in range(cfg.num_layers)]
        self.codes = np.zeros((max_batch, 1, cfg.num_codebooks), np.int64)
        self.lengths = np.full(max_batch, context - 1, np.int64)
        self.num_codebooks = cfg.num_codebooks

    def _audio(self, batch: int, lengths: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            past = [(k[:batch], v[:batch]) for k, v in self.cache]  # views: the eager writes land in the cache
            codes = torch.from_numpy(self.codes[:batch]).cuda()
            cache_lengths = torch.from_numpy(lengths).cuda()
            last = torch.zeros(batch, dtype=torch.int64, device="cuda")
            _, audio, _ = self.model(self.mode.AUDIO, None, codes, None, cache_lengths, last, past)
            return audio.cpu().numpy()  # the host copy (and sync) every runtime pays

    def step(self, batch: int) -> None:
        self._audio(batch, self.lengths[:batch])

    def first_audio(self, prompt_ids: np.ndarray) -> None:
        torch, length = self.torch, len(prompt_ids)
        with torch.inference_mode():
            ids = torch.from_numpy(prompt_ids[None]).cuda()
            zero, last = torch.zeros(1, dtype=torch.int64, device="cuda"), torch.tensor([length - 1], device="cuda")
            text, _, _ = self.model(self.mode.TEXT, ids, None, None, zero, last, [(k[:1], v[:1]) for k, v in self.cache])
            text.cpu()
        for k in range(self.num_codebooks):
            self._audio(1, np.array([length + k], np.int64))

    def close(self) -> None:
        del self.model, self.cache
        gc.collect()
        self.torch.cuda.empty_cache()


def steps_per_second(backend, batch: int, steps: int) -> float:
    for _ in range(3):  # warm-up (TensorRT: the first call runs and captures, the next ones replay)
        backend.step(batch)
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(steps):
            backend.step(batch)
        rates.append(steps / (time.perf_counter() - started))
    return statistics.median(rates)


def first_audio_seconds(backend, prompt_ids: np.ndarray) -> float:
    backend.first_audio(prompt_ids)  # warm-up (prefill profile contexts, graph captures)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        backend.first_audio(prompt_ids)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def open_backend(runtime: str, artifacts: Path, manifest: Manifest, args) -> RuntimeBackend | TorchBackend:
    max_batch = max(args.batches)
    if runtime == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise Skip("torch is not installed") from None
        return TorchBackend(artifacts.parent / "llm", max_batch, args.max_len, args.context)
    if runtime == "ort-cuda":
        import onnxruntime as ort

        from engines.ort_runtime import OrtBackbone

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider: make setup-gpu")
        return RuntimeBackend(OrtBackbone(manifest, max_batch=max_batch, max_len=args.max_len, device="cuda"), args.context)
    from engines.trt.device import MissingDependency, import_cudart, import_tensorrt
    from engines.trt.engine_dir import EngineMismatch
    from engines.trt.runtime import TrtBackbone

    try:
        import_tensorrt()
        import_cudart()
    except MissingDependency as error:
        raise Skip(str(error).split(". ")[0]) from None
    engines = artifacts / f"engines-b{max_batch}-l{args.max_len}"
    try:
        backbone = TrtBackbone(manifest, max_batch=max_batch, max_len=args.max_len, engines_dir=engines)
    except EngineMismatch as why:
        log(f"building TensorRT engines ({str(why).splitlines()[-1].strip(' -')})")
        run_logged(
            [sys.executable, "-m", "engines.trt.build", "--artifacts", str(artifacts), "--precision", "fp16",
             "--max-batch", str(max_batch), "--max-len", str(args.max_len), "--out", str(engines), "--no-prefill"]
        )
        backbone = TrtBackbone(manifest, max_batch=max_batch, max_len=args.max_len, engines_dir=engines)
    return RuntimeBackend(backbone, args.context)


def measure(size: str, runtime: str, artifacts: Path, manifest: Manifest, args, deadline: float) -> list[Row]:
    rows = [Row(size, runtime, b, bytes_per_step=audio_step_bytes(manifest, b, args.context)) for b in args.batches]
    backend = open_backend(runtime, artifacts, manifest, args)
    try:
        prompt = np.random.default_rng(0).integers(0, 128000, args.prompt).astype(np.int64)
        for row in rows:
            if time.monotonic() > deadline:
                row.note = f"skipped: --budget-min {args.budget_min:g} spent"
                continue
            row.steps_per_s = steps_per_second(backend, row.batch, args.steps)
            log(f"{size} {runtime} batch {row.batch}: {row.steps_per_s:.1f} steps/s")
            if row.batch == 1:
                row.ttfa_s = first_audio_seconds(backend, prompt)
                log(f"{size} {runtime} time to first audio: {row.ttfa_s * 1e3:.1f} ms")
        note = getattr(backend.runtime, "graph_failure", None) if isinstance(backend, RuntimeBackend) else None
        if note:
            rows[0].note = f"CUDA graphs off: {note}"
    finally:
        backend.close()
        del backend
        gc.collect()
    return rows


def module_versions() -> dict[str, str]:
    """Version of each GPU-side Python package, 'missing' where it is not installed."""
    found = {}
    for name, module in (("tensorrt", "tensorrt"), ("onnxruntime", "onnxruntime"), ("torch", "torch"), ("cuda-python", "cuda.bindings")):
        try:
            found[name] = str(getattr(__import__(module, fromlist=["_"]), "__version__", "?"))
        except ImportError:
            found[name] = "missing"
    return found


def versions() -> str:
    return ", ".join(f"{name} {version}" for name, version in module_versions().items())


def main(argv: list[str] | None = None) -> int:
    from engines.trt.device import Cuda

    args = parse_args(argv)
    command = "python -m bench.gpu" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    started = time.monotonic()
    deadline = started + args.budget_min * 60
    budget = f"--budget-min {args.budget_min:g} spent"
    header, bandwidth = [f"date: {today()}", f"software: {versions()}"], None
    try:
        cuda = Cuda()
        name, capability = cuda.device()
        bandwidth = copy_bandwidth(cuda)
        header.insert(1, f"GPU: {name} (compute capability {capability}), device-to-device copy {bandwidth / 1e9:.0f} GB/s")
    except RuntimeError as error:  # MissingDependency (no cuda-python) or a CUDA error (no device)
        header.insert(1, f"GPU: unknown, so no bandwidth floor ({str(error).split('. ')[0]})")
    log(header[1])
    header.append(f"context {args.context} positions, KV cache {args.max_len} rows, {DTYPE} weights")
    rows: list[Row] = []
    for size in args.sizes:
        try:
            if time.monotonic() > deadline:
                raise Skip(budget)
            log(f"{size}: preparing artifacts in {args.work / size}")
            artifacts = prepare_artifacts(size, args.work)
            manifest = Manifest.load(artifacts)
        except Skip as why:
            rows += [Row(size, runtime, b, note=f"skipped: {why}") for runtime in args.runtimes for b in args.batches]
            continue
        for runtime in args.runtimes:
            try:
                if time.monotonic() > deadline:
                    raise Skip(budget)
                rows += measure(size, runtime, artifacts, manifest, args, deadline)
                continue
            except Skip as why:
                note = f"skipped: {why}"
            except Exception as error:  # one runtime failing must not cost the others' numbers
                traceback.print_exc()
                note = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            log(f"{size} {runtime}: {note}")
            rows += [Row(size, runtime, b, bytes_per_step=audio_step_bytes(manifest, b, args.context), note=note) for b in args.batches]
    header.append(f"total runtime: {(time.monotonic() - started) / 60:.1f} min")
    if not args.no_doc:
        write_doc_section(DOC, GPU_HEADING, doc_body(rows, bandwidth, args, header, command))
        log(f"wrote the GPU section of {DOC}")
    print("\n".join(["", *header, "", format_table(HEADERS, table_rows(rows, bandwidth))]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
