"""Pure helpers of the benchmarks: statistics, table / number formatting, child-process peak RSS,
machine description and the docs/benchmarks.md section writer. No torch, no onnxruntime here.
"""

from __future__ import annotations

import datetime
import os
import re
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

# --- statistics -------------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None]
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """Relative spread (max - min) / median of repeated measurements, a noise indicator."""
    m = median(values)
    return (max(values) - min(values)) / m if m else 0.0


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def interleaved(candidates: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every candidate once per round, alternating the order each round (ABAB.. / BA..), and
    return each one's measurements. Each candidate returns one measurement (e.g. seconds per step)."""
    names = list(candidates)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            out[name].append(candidates[name]())
    return out


# --- formatting -------------------------------------------------------------------------------------


def fmt_ms(seconds: float | None, digits: int | None = None) -> str:
    """Seconds -> milliseconds with precision adapted to magnitude ('-' for missing)."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    if digits is None:
        digits = 3 if ms < 1 else 2 if ms < 10 else 1 if ms < 1000 else 0
    return f"{ms:.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x"


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f}%"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], markdown: bool = False) -> str:
    """Aligned text table (numbers right-aligned), or a GitHub markdown table."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells, expected {len(headers)}")
    numeric = [all(_looks_numeric(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


_NUMERIC = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?\s*(x|%|ms|s|B|KiB|MiB|GiB|TiB)?$")


def _looks_numeric(text: str) -> bool:
    return text == "-" or bool(_NUMERIC.match(text.strip()))


@dataclass
class Section:
    """One benchmark section's results: tables (title, headers, rows), notes, and summary ratios."""

    name: str
    title: str
    tables: list[tuple[str, list[str], list[list[object]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: list[tuple[str, str]] = field(default_factory=list)  # (what, value)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    background_cores: float | None = None  # other processes' average CPU use during the section

    def table(self, title: str, headers: list[str], rows: list[list[object]]) -> None:
        self.tables.append((title, headers, rows))

    def render(self, markdown: bool = False) -> str:
        out = []
        for title, headers, rows in self.tables:
            out.append(f"**{title}**\n" if markdown else f"{title}")
            out.append(format_table(headers, rows, markdown=markdown))
            out.append("")
        for reason in self.skipped:
            out.append(f"- skipped: {reason}" if markdown else f"  skipped: {reason}")
        for note in self.notes:
            out.append(f"- {note}" if markdown else f"  note: {note}")
        if self.background_cores is not None:
            load = f"other processes kept {self.background_cores:.2f} cores busy on average during this section ({self.seconds:.0f} s)"
            out.append(f"- {load}" if markdown else f"  load: {load}")
        return "\n".join(out).rstrip() + "\n"


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


PEAK_PREFIX = "BENCH_PEAK_RSS "  # printed by bench._peak / bench._child at exit


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


# --- CPU time used by other processes (the machine is shared) ------------------------------------


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


# --- machine / docs ---------------------------------------------------------------------------------


def cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine_description() -> str:
    try:
        model = cpu_model(Path("/proc/cpuinfo").read_text())
    except OSError:
        import platform

        model = platform.processor() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        ram = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        ram = ""
    return f"{model}, {cores} cores{ram}"


def today() -> str:
    return datetime.date.today().isoformat()


CPU_HEADING = "## CPU (ONNX Runtime)"


def replace_section(document: str, heading: str, body: str, title: str = "# Benchmarks") -> str:
    """`document` with the section under `heading` (up to the next heading of the same or a higher
    level, or the end) replaced by `body`; appended when absent. Other sections are left untouched."""
    level = len(heading) - len(heading.lstrip("#"))
    block = heading + "\n\n" + body.strip("\n") + "\n"
    if not document.strip():
        return f"{title}\n\n{block}"
    lines = document.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip() == heading), None)
    if start is None:
        return document.rstrip("\n") + "\n\n" + block
    end = len(lines)
    for i in range(start + 1, len(lines)):
        m = re.match(r"^(#+)\s", lines[i])
        if m and len(m.group(1)) <= level:
            end = i
            break
    after = "".join(lines[end:])
    return "".join(lines[:start]) + block + ("\n" + after if after else "")


def write_doc_section(path: Path, heading: str, body: str) -> None:
    """Read-modify-write right away (another writer owns the other sections of the file)."""
    existing = path.read_text() if path.exists() else ""
    updated = replace_section(existing, heading, body)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(updated)
    os.replace(tmp, path)
