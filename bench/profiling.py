"""Measuring: timers, a child process's wall time and peak RSS, the CPU other processes take, and
per-op profiles of ONNX Runtime and torch (where the time of a slow row goes). Nothing here knows a
section; torch and onnxruntime are imported only by the profilers that need them.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ._peak import PEAK_PREFIX

# --- timers -----------------------------------------------------------------------------------------


def time_block(fn: Callable[[], object], n: int, warm: bool = True) -> float:
    """Mean seconds per call over `n` back-to-back calls of `fn` (after one untimed call when `warm`)."""
    if warm:
        fn()  # untimed: the first call after switching engines pays thread wake-up
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


def calibrate(fn: Callable[[], object], block_seconds: float, lo: int = 3, hi: int = 400) -> int:
    """How many calls of `fn` fill about `block_seconds` (lo..hi), judged by one call after a warm one."""
    fn()
    started = time.perf_counter()
    fn()
    one = max(time.perf_counter() - started, 1e-6)
    return int(min(hi, max(lo, block_seconds / one)))


# --- child processes: wall time and peak RSS --------------------------------------------------------


@dataclass
class ChildResult:
    returncode: int
    seconds: float
    peak_rss: int | None  # bytes: the child's own VmHWM (self-reported at exit, else the last sampled value)
    peak_rss_sampled: int | None  # bytes: max RSS of the child's process tree, psutil samples (cross-check)
    output: str  # combined stdout + stderr

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def status_field_bytes(status_text: str, key: str) -> int | None:
    """A `kB` field of /proc/PID/status (e.g. VmHWM, VmRSS) in bytes."""
    for line in status_text.splitlines():
        if line.startswith(key + ":"):
            parts = line.split()
            return int(parts[1]) * (1024 if len(parts) > 2 and parts[2].lower() == "kb" else 1)
    return None


def reported_peak(output: str) -> int | None:
    """The last `BENCH_PEAK_RSS <bytes>` line a child printed, if any."""
    for line in reversed(output.splitlines()):
        if line.startswith(PEAK_PREFIX):
            value = line[len(PEAK_PREFIX) :].strip()
            return int(value) if value.isdigit() else None
    return None


def _vmhwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return status_field_bytes(f.read(), "VmHWM")
    except OSError:
        return None


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(
    cmd: Sequence[str],
    cwd: str | Path | None = None,
    env: dict | None = None,
    on_line: Callable[[str], None] | None = None,
    sample_interval: float = 0.05,
) -> ChildResult:
    """Run `cmd`, stream its output lines to `on_line`, and measure wall time and peak RSS.

    Peak RSS is the child's own VmHWM (the kernel's high-water mark of its address space): exact
    when the child reports it at exit (run Python modules through `python -m bench._peak MODULE`),
    otherwise the last value sampled from /proc/PID/status. psutil sampling of the whole process
    tree's RSS every `sample_interval` seconds is kept as a cross-check. Not used on purpose:
    `os.wait4` / `getrusage(RUSAGE_CHILDREN)` ru_maxrss, which on Linux start from the *parent's*
    high-water mark (carried over fork + exec) and, for RUSAGE_CHILDREN, are a max over all children.
    """
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        psutil = None
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines: list[str] = []

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    watched = None
    if psutil is not None:
        try:
            watched = psutil.Process(proc.pid)
        except psutil.Error:
            watched = None
    sampled, hwm = 0, 0
    while proc.poll() is None:
        if watched is not None:
            sampled = max(sampled, _tree_rss(watched))
        hwm = max(hwm, _vmhwm(proc.pid) or 0)
        time.sleep(sample_interval)
    seconds = time.perf_counter() - started
    thread.join(timeout=10)
    proc.stdout.close()
    output = "".join(lines)
    peak = reported_peak(output) or hwm or None
    return ChildResult(proc.returncode, seconds, peak, sampled or None, output)


# --- CPU time used by other processes (the machine is shared) ---------------------------------------


def proc_stat_busy_idle(stat_text: str) -> tuple[int, int]:
    """(busy, idle) jiffies summed over all CPUs from the first line of /proc/stat."""
    first = stat_text.splitlines()[0].split()
    if first[0] != "cpu":
        raise ValueError("not a /proc/stat text")
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    busy = sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy, idle


class CpuLoad:
    """Average number of cores kept busy by *other* processes between start() and stop():
    machine-wide busy time (/proc/stat) minus this process's (and its reaped children's) CPU time."""

    def __init__(self):
        self._start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            busy, _ = proc_stat_busy_idle(Path("/proc/stat").read_text())
        except (OSError, ValueError):
            return None
        own = os.times()
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        return busy / tick, own.user + own.system + own.children_user + own.children_system, time.perf_counter()

    def background_cores(self) -> float | None:
        end = self._snapshot()
        if self._start is None or end is None:
            return None
        busy = end[0] - self._start[0]
        own = end[1] - self._start[1]
        wall = end[2] - self._start[2]
        return max(0.0, (busy - own) / wall) if wall > 0 else None


# --- per-op profiles --------------------------------------------------------------------------------


def profile_ort_ops(
    session_path, options, run_steps: Callable[[object], int | None], top: int = 3
) -> list[tuple[str, float, str]]:
    """Profile a graph with ORT's enable_profiling: [(op type, ms, largest node's shapes)] for the
    `top` op types by kernel time, then ("kernels", ms, "") and ("session.run", ms, ""), all per
    counted run. `options` are the SessionOptions the benchmarked session used. `run_steps(session)`
    runs the graph with the profiling session and returns how many leading runs are warm-up (not
    counted; None = the first run when there are several, which pays the allocations)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(session_path), options, providers=["CPUExecutionProvider"])
        warm = run_steps(session)
        events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    if warm is None:
        warm = 1 if len(model_runs) > 1 else 0
    warm = min(warm, max(0, len(model_runs) - 1))
    skip_until = model_runs[warm - 1][1] if warm else float("-inf")
    counted = model_runs[warm:]
    runs = max(1, len(counted))
    by_op: dict[str, float] = {}
    biggest: dict[str, tuple[float, str]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e.get("ts", 0) <= skip_until:
            continue
        op, dur = e["args"].get("op_name", "?"), float(e.get("dur", 0))
        by_op[op] = by_op.get(op, 0.0) + dur
        shapes = " -> ".join(
            ", ".join(str(list(d.values())[0]) for d in e["args"].get(key, []) if d)
            for key in ("input_type_shape", "output_type_shape")
        )
        if dur > biggest.get(op, (0.0, ""))[0]:
            biggest[op] = (dur, shapes)
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    out = [(op, us / runs / 1e3, biggest[op][1]) for op, us in ranked]
    session_us = sum(end - start for start, end in counted)
    return out + [("kernels", sum(by_op.values()) / runs / 1e3, ""), ("session.run", session_us / runs / 1e3, "")]


class CountingSession:
    """Session proxy counting run() calls (to tell warm-up runs from measured ones)."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


def profile_torch_ops(fn: Callable[[], object], top: int = 3) -> list[tuple[str, float]]:
    """[(aten op, self CPU ms)] of one call, the `top` ops by self time, plus ("total", ms)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    averages = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    ranked = sorted(averages, key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in averages) / 1e3
    return [(e.key, e.self_cpu_time_total / 1e3) for e in ranked[:top]] + [("total", total)]
