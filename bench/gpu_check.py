"""`make gpu-check`: one command that proves the GPU path on an NVIDIA machine, and says what it proved.

    python -m bench.gpu_check [--work build/gpu-check] [--bench-sizes mid,v2.5-1b] [--bench-minutes 4]

In order, each step in its own process with its own timeout, a failing step never stopping the rest:

1. versions: driver, GPU, CUDA, TensorRT, onnxruntime (and the CUDA it was built for), cuda-python, providers;
2. export: random `tiny` and `mid` checkpoints in float16, and the shared tiny golden in float32;
3. engines: TensorRT engines for all three (verbose builder log kept next to the report);
4. check-engine: every fp16 engine against ONNX Runtime (engines/trt/check.py);
5. golden: teacher-forced logits and greedy generation of the shared tiny golden through `ort-cpu`,
   `ort-cuda` and `tensorrt` (fp32 artifacts and engines), against the golden (export/verify.py's checks);
6. replay: TensorRT decode steps replayed from captured CUDA graphs give the logits of uncaptured runs;
7. bench: `python -m bench.gpu` (audio s/s at batch 1/8/32/64, time to first audio, per runtime, against
   torch CUDA eager and the memory-bandwidth floor) within --bench-minutes.

Writes WORK/report.md and WORK/report.json: what ran, what passed, what failed or could not run, and
each step's log. Without an NVIDIA GPU, or without the GPU extras, it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from engines.gpu_env import GpuUnavailable, driver_cuda_version, onnxruntime_cuda, require_runtime

from .gpu import module_versions

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT.parent / "shared" / "golden" / "llm_tiny"
SIZES = ("tiny", "mid")  # float16 exports the engines and check-engine run on
ENGINE_BATCH, ENGINE_LEN = 8, 512
GOLDEN_LEN = 256  # the golden's longest teacher-forced sequence (89 positions) + verify's 64 spare rows fit
GPU_LOGITS_ATOL = 1e-2  # fp32 on a GPU (TF32 matmuls) against the float32 golden; greedy choices must match exactly
REPLAY_STEPS = 6
REPLAY_ATOL = 1e-3  # same engine and kernels either way; only split-K reduction order may differ (fp16 logits)


@dataclasses.dataclass
class Step:
    name: str
    what: str
    command: list[str]
    timeout_s: int
    log: str = ""
    status: str = "not run"  # passed / failed / timed out / not run
    seconds: float = 0.0
    summary: str = ""


def log(message: str) -> None:
    print(f"[gpu-check] {message}", flush=True)


def python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def plan(work: Path, bench_sizes: str, bench_minutes: float) -> list[Step]:
    """Every step after the version report, as commands (so each gets its own process and timeout)."""
    golden = work / "golden-fp32"
    steps = []
    chain = []  # the commands of one stage run in one `sh -ec`, so the stage has one timeout and one log
    for size in SIZES:
        chain.append(" ".join(python("export.tiny", "--out", str(work / size), "--size", size, "--no-codec")))
        chain.append(" ".join(python("export", "--checkpoint", str(work / size / "llm"), "--out", str(work / size / "onnx"), "--dtype", "float16")))
    chain.append(" ".join(python("export", "--checkpoint", str(GOLDEN), "--out", str(golden), "--dtype", "float32")))
    steps.append(Step("export", "random tiny + mid checkpoints in float16, the shared tiny golden in float32", ["sh", "-ec", " && ".join(chain)], 420))
    builds = [
        " ".join(python("engines.trt.build", "--artifacts", str(work / size / "onnx"), "--precision", "fp16", "--max-batch",
                        str(ENGINE_BATCH), "--max-len", str(ENGINE_LEN), "--out", str(work / size / "onnx" / "engines"), "--verbose"))
        for size in SIZES
    ]
    builds.append(" ".join(python("engines.trt.build", "--artifacts", str(golden), "--precision", "fp32", "--max-batch", "1",
                                  "--max-len", str(GOLDEN_LEN), "--out", str(golden / "engines"), "--verbose")))
    steps.append(Step("engines", "TensorRT engines (verbose builder log)", ["sh", "-ec", " && ".join(builds)], 600))
    checks = [" ".join(python("engines.trt.check", "--artifacts", str(work / s / "onnx"), "--engines", str(work / s / "onnx" / "engines")))
              for s in SIZES]
    steps.append(Step("check-engine", "fp16 engines vs ONNX Runtime, logits and caches", ["sh", "-ec", " && ".join(checks)], 300))
    steps.append(Step("golden", "shared tiny golden through ort-cpu, ort-cuda and tensorrt (logits + greedy generation)",
                      python("bench.gpu_check", "golden", "--artifacts", str(golden)), 300))
    steps.append(Step("replay", "CUDA-graph replay of decode steps equals uncaptured runs",
                      python("bench.gpu_check", "replay", "--artifacts", str(work / "tiny" / "onnx")), 180))
    steps.append(Step("bench", "GPU benchmark table (python -m bench.gpu)",
                      python("bench.gpu", "--sizes", bench_sizes, "--budget-min", f"{bench_minutes:g}", "--work", str(work / "bench"), "--no-doc"),
                      int(bench_minutes * 60) + 300))
    return steps


def run_step(step: Step, logs: Path) -> None:
    path = logs / f"{step.name}.log"
    step.log = str(path)
    log(f"{step.name}: {step.what} (timeout {step.timeout_s}s, log {path})")
    started = time.monotonic()
    with open(path, "w") as out:  # own process group: a timeout ends the step's children (sh -ec chains) too
        process = subprocess.Popen(step.command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            code = process.wait(timeout=step.timeout_s)
            step.status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            step.status = f"timed out after {step.timeout_s}s"
    step.seconds = time.monotonic() - started
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    step.summary = lines[-1][:300] if lines else ""
    log(f"{step.name}: {step.status} in {step.seconds:.0f}s: {step.summary}")


def versions() -> dict:
    """What this machine has; every entry a string, 'missing' where a piece is not installed."""
    info = {}
    smi = shutil.which("nvidia-smi")
    if smi:
        result = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=60)
        info["gpu"] = result.stdout.strip() or result.stderr.strip()
    driver = driver_cuda_version()
    info["driver CUDA"] = f"{driver[0]}.{driver[1]}" if driver else "missing"
    info.update(module_versions())
    try:
        import onnxruntime as ort

        info["onnxruntime CUDA"] = onnxruntime_cuda()
        info["providers"] = ", ".join(ort.get_available_providers())
    except GpuUnavailable as error:
        info["onnxruntime CUDA"] = str(error)
    return info


def write_report(work: Path, info: dict, steps: list[Step], started: float) -> None:
    passed = [s.name for s in steps if s.status == "passed"]
    verdict = "every step passed" if len(passed) == len(steps) else f"{len(passed)}/{len(steps)} steps passed"
    lines = ["# make gpu-check", "", f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {(time.monotonic() - started) / 60:.1f} min: "
             f"**{verdict}**", "", "| piece | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", "| step | what | result | seconds | last line of its log |", "|---|---|---|---|---|"]
    lines += [f"| {s.name} | {s.what} | {s.status} | {s.seconds:.0f} | `{s.summary.replace('|', '/')}` |" for s in steps]
    lines += ["", "Logs: " + ", ".join(f"`{Path(s.log).name}`" for s in steps if s.log) + f" in `{work / 'logs'}`."]
    (work / "report.md").write_text("\n".join(lines) + "\n")
    (work / "report.json").write_text(json.dumps({"versions": info, "steps": [dataclasses.asdict(s) for s in steps], "verdict": verdict}, indent=2))
    log(f"{verdict}; report: {work / 'report.md'} and report.json")


def preflight() -> str | None:
    """One line naming what this machine lacks for the GPU path, or None."""
    if driver_cuda_version() is None:
        return "no NVIDIA GPU here (no loadable NVIDIA driver, libcuda.so.1): run make gpu-check on an NVIDIA machine"
    for runtime in ("ort-cuda", "tensorrt"):
        try:
            require_runtime(runtime)
        except GpuUnavailable as error:
            return str(error)
    return None


def run_all(args) -> int:
    problem = preflight()
    if problem:
        print(f"gpu-check: {problem}", file=sys.stderr)
        return 2
    work, started = args.work.resolve(), time.monotonic()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    info = versions()
    for key, value in info.items():
        log(f"{key}: {value}")
    steps = plan(work, args.bench_sizes, args.bench_minutes)
    for step in steps:
        run_step(step, logs)
    write_report(work, info, steps, started)
    return 0 if all(s.status == "passed" for s in steps) else 1


# --- steps that run inside this module (own processes, started by run_all) -------------------------


def golden_step(artifacts: Path) -> int:
    """Teacher-forced logits and greedy generation of the shared tiny golden through every runtime."""
    from engines.loop import Engine
    from engines.manifest import Manifest
    from engines.ort_runtime import OrtBackbone
    from engines.trt.runtime import TrtBackbone
    from export.verify import LOGITS_ATOL, Report, _verify_generation, golden_prompts, llm_cases, onnx_logits

    golden = np.load(GOLDEN / "cases.npz")
    manifest = Manifest.load(artifacts)
    audio_out = manifest.model.audio_out_token_id
    failed = []
    for name, make, atol in (
        ("ort-cpu", lambda: OrtBackbone(manifest, max_batch=1, max_len=GOLDEN_LEN), LOGITS_ATOL),
        ("ort-cuda", lambda: OrtBackbone(manifest, max_batch=1, max_len=GOLDEN_LEN, device="cuda", prefill_graph=False), GPU_LOGITS_ATOL),
        ("tensorrt", lambda: TrtBackbone(manifest, max_batch=1, max_len=GOLDEN_LEN, engines_dir=artifacts / "engines"), GPU_LOGITS_ATOL),
    ):
        report, runtime = Report(), make()
        try:
            for case in llm_cases(golden):
                prompt, forced = golden_prompts(golden, case, audio_out)
                text_last, _ = onnx_logits(runtime, prompt)
                report.compare(f"{name} {case}/text_logits_last", text_last, golden[f"{case}/text_logits_last"], atol)
                _, forced_audio = onnx_logits(runtime, forced)
                report.compare(f"{name} {case}/teacher_forced_audio_logits", forced_audio, golden[f"{case}/teacher_forced_audio_logits"], atol)
                _verify_generation(Engine(runtime, codec=None), golden, case, report)
        finally:
            runtime.close()
        print(f"{name}: {'ok' if report.passed else 'FAIL'} (max error {report.overall():.2e})", flush=True)
        if not report.passed:
            failed.append(name)
    print(f"golden: {'FAILED ' + ', '.join(failed) if failed else 'ort-cpu, ort-cuda and tensorrt all match'}", flush=True)
    return 1 if failed else 0


def replay_step(artifacts: Path) -> int:
    """Decode steps over every row bucket, once through captured CUDA graphs and once uncaptured."""
    from engines.manifest import Manifest
    from engines.trt.runtime import TrtBackbone

    manifest = Manifest.load(artifacts)
    spec = manifest.model
    results = {}
    for graphs in (True, False):
        backbone = TrtBackbone(manifest, max_batch=ENGINE_BATCH, max_len=ENGINE_LEN, engines_dir=artifacts / "engines", cuda_graphs=graphs)
        try:
            rng, logits = np.random.default_rng(0), []
            for slot in range(ENGINE_BATCH):
                ids = rng.integers(0, spec.vocab_size, 5 + slot)
                backbone.prefill(slot, ids, np.zeros((len(ids), spec.num_codebooks), np.int64), np.zeros(len(ids), bool))
            for step in range(REPLAY_STEPS):
                for rows in (1, 2, 4, ENGINE_BATCH):  # each bucket: first call captures, later ones replay
                    slots = np.arange(rows)
                    codes = rng.integers(0, spec.codebook_size, (rows, spec.num_codebooks))
                    logits.append(backbone.audio_step(slots, codes, 5 + slots + step).copy())
            if graphs and backbone.graph_failure:
                print(f"replay: CUDA graphs were disabled: {backbone.graph_failure}", flush=True)
                return 1
            results[graphs] = logits
        finally:
            backbone.close()
    error = max(float(np.abs(a - b).max()) for a, b in zip(results[True], results[False]))
    print(f"replay: captured vs uncaptured decode steps, max |difference| {error:.3e} (tolerance {REPLAY_ATOL:g})", flush=True)
    return 0 if error <= REPLAY_ATOL else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("step", nargs="?", choices=("all", "golden", "replay"), default="all", help="internal: one step")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "gpu-check", help="exports, engines, logs and the report")
    parser.add_argument("--artifacts", type=Path, help="internal: the artifacts a single step runs on")
    parser.add_argument("--bench-sizes", default="mid,v2.5-1b", help="python -m bench.gpu --sizes")
    parser.add_argument("--bench-minutes", type=float, default=4.0, help="python -m bench.gpu --budget-min")
    args = parser.parse_args(argv)
    if args.step == "all":
        return run_all(args)
    if args.artifacts is None:
        parser.error(f"{args.step} needs --artifacts")
    return golden_step(args.artifacts) if args.step == "golden" else replay_step(args.artifacts)


if __name__ == "__main__":
    sys.exit(main())
