"""Pure helpers of the benchmarks: statistics, table / number formatting, a section's results,
machine description, a free localhost port and the docs/benchmarks.md section writer. No torch, no
onnxruntime here. (Timers and memory measurement: bench/profiling.py.)
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

AUDIO_FRAME_RATE = 25  # codec frames (= audio decode steps) per second of audio

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


# --- machine / network / docs -----------------------------------------------------------------------


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
    from engines.codec import usable_cores

    cores = usable_cores()
    try:
        import psutil

        ram = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        ram = ""
    return f"{model}, {cores} cores{ram}"


def free_port() -> int:
    """A localhost TCP port that nothing listens on right now (for a server started next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
