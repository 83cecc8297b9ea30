"""The benchmark's pure helpers (bench/common.py): formatting, the docs section writer; the child
peak-RSS measurement (bench/profiling.py); the workspace's build commands and --keep reuse, and
section 6's sizes (bench/workspace.py, bench/sections/real.py). No benchmark runs here and nothing is timed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.common import (CPU_HEADING, fmt_bytes, fmt_ms, fmt_pct, fmt_ratio, format_table, interleaved, median, ratio,
                          replace_section, spread, write_doc_section)
from bench.profiling import proc_stat_busy_idle, reported_peak, run_measured, status_field_bytes

MiB = 1 << 20
linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")


def test_number_formatting():
    assert fmt_ms(0.000123) == "0.123"
    assert fmt_ms(0.00456) == "4.56"
    assert fmt_ms(0.0456) == "45.6"
    assert fmt_ms(2.5) == "2500"
    assert fmt_ms(0.0456, 0) == "46"
    assert fmt_ms(None) == "-"
    assert fmt_ratio(2.345) == "2.35x" and fmt_ratio(None) == "-"
    assert fmt_pct(0.25) == "+25.0%" and fmt_pct(-0.1) == "-10.0%"
    assert fmt_bytes(512) == "512 B"
    assert fmt_bytes(3 * MiB) == "3.00 MiB"
    assert fmt_bytes(5 * 1024 * MiB) == "5.00 GiB"


def test_statistics():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert ratio(4.0, 2.0) == 2.0
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None
    assert spread([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        median([])


def test_interleaved_alternates_order():
    calls = []
    out = interleaved({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert out == {"a": [1.0] * 3, "b": [2.0] * 3}


def test_text_table_aligns_numbers_right():
    text = format_table(["config", "ms"], [["tiny", "1.5"], ["mid", "12.25"]])
    lines = text.splitlines()
    assert lines[0].split() == ["config", "ms"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].endswith("  1.5") and lines[3].endswith("12.25")
    assert len({len(line) for line in lines[2:]}) == 1


def test_markdown_table():
    text = format_table(["config", "ratio"], [["tiny", "2.00x"], ["mid", None]], markdown=True)
    assert text.splitlines() == ["| config | ratio |", "|---|---:|", "| tiny | 2.00x |", "| mid | - |"]
    with pytest.raises(ValueError):
        format_table(["a", "b"], [["only one"]])


GPU = "## GPU (TensorRT)\n\ngpu numbers\n\n### H100\n\nmore gpu\n"


def test_replace_section_keeps_other_sections():
    doc = f"# Benchmarks\n\nintro\n\n{CPU_HEADING}\n\nold cpu\n\n### sub\n\nold sub\n\n{GPU}"
    out = replace_section(doc, CPU_HEADING, "new cpu\n")
    assert "old cpu" not in out and "old sub" not in out
    assert out.startswith("# Benchmarks\n\nintro\n\n")
    assert f"{CPU_HEADING}\n\nnew cpu\n" in out
    assert out.endswith(GPU)
    assert replace_section(out, CPU_HEADING, "new cpu\n") == out  # idempotent


def test_replace_section_appends_or_creates():
    assert replace_section("", CPU_HEADING, "body") == f"# Benchmarks\n\n{CPU_HEADING}\n\nbody\n"
    out = replace_section(f"# Benchmarks\n\n{GPU}", CPU_HEADING, "body")
    assert out.startswith(f"# Benchmarks\n\n{GPU}")
    assert out.endswith(f"\n\n{CPU_HEADING}\n\nbody\n")
    last = replace_section(f"# B\n\n{CPU_HEADING}\n\nold\n", CPU_HEADING, "new")
    assert last == f"# B\n\n{CPU_HEADING}\n\nnew\n"


def test_write_doc_section(tmp_path):
    path = tmp_path / "benchmarks.md"
    write_doc_section(path, CPU_HEADING, "first")
    path.write_text(path.read_text() + "\n" + GPU)  # the other writer adds its section
    write_doc_section(path, CPU_HEADING, "second")
    text = path.read_text()
    assert "second" in text and "first" not in text and GPU in text
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]


def test_proc_parsers():
    status = "Name:\tpython\nVmPeak:\t  20000 kB\nVmHWM:\t   10840 kB\nVmRSS:\t    9000 kB\n"
    assert status_field_bytes(status, "VmHWM") == 10840 * 1024
    assert status_field_bytes(status, "VmSwap") is None
    assert reported_peak("x\nBENCH_PEAK_RSS 123\nBENCH_PEAK_RSS 456\n") == 456
    assert reported_peak("nothing") is None
    stat = "cpu  100 5 50 1000 20 3 2 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
    assert proc_stat_busy_idle(stat) == (100 + 5 + 50 + 3 + 2 + 7, 1020)


ALLOC = "import numpy; a = numpy.ones(2**24); a += 1"  # 128 MiB touched


@linux_only
def test_run_measured_reports_the_childs_own_peak():
    """The parent holds more memory than the child ever does: the child's number must not include it
    (Linux ru_maxrss from wait4 would: it starts from the forking parent's high-water mark)."""
    import numpy as np

    ballast = np.ones(48 * MiB)  # 384 MiB in this process
    ballast += 1
    code = f"{ALLOC}; from bench._peak import own_peak_rss; print('BENCH_PEAK_RSS', own_peak_rss())"
    lines = []
    result = run_measured([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, on_line=lines.append)
    assert result.ok and lines[-1].startswith("BENCH_PEAK_RSS")
    assert 128 * MiB <= result.peak_rss < 300 * MiB
    assert result.peak_rss_sampled is None or result.peak_rss_sampled < 300 * MiB
    del ballast


@linux_only
def test_run_measured_samples_without_a_report():
    result = run_measured([sys.executable, "-c", f"{ALLOC}; import time; time.sleep(0.4)"], sample_interval=0.02)
    assert result.ok
    assert 128 * MiB <= result.peak_rss < 300 * MiB
    assert result.seconds >= 0.4


def test_run_measured_failure_output():
    result = run_measured([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    assert result.returncode == 3 and not result.ok
    assert result.tail().strip() == "boom"


def test_streamed_export_without_float32_reference_is_built_once(tmp_path):
    """Section 6's 3B: checkpoint, then the streamed int4 export with no float32 reference (a 3B's is
    23 GB); a second run over the same --keep folder builds nothing."""
    from bench.workspace import Workspace

    def workspace():
        ws = Workspace(tmp_path, log=lambda message: None, reuse=True)
        ws.child = lambda key, args, echo=True: calls.append((key, args))
        return ws

    calls = []
    out = workspace().streamed("v2-3b", "int4")
    assert [key for key, _ in calls] == ["ckpt-v2-3b", "onnx-v2-3b-int4-streamed"]
    export = calls[1][1]
    assert export[:2] == ["-m", "export"] and export[-3:] == ["--dtype", "int4", "--no-float32-reference"]
    assert export[export.index("--checkpoint") + 1] == str(tmp_path / "ckpt-v2-3b" / "llm")
    assert export[export.index("--out") + 1] == str(out)
    calls.clear()
    assert workspace().streamed("v2-3b", "int4") == out and calls == []


def test_real_section_sizes():
    """--quick stays a wiring check of minutes: no real-size model or codec (the 3B alone builds for ~7 min)."""
    from bench.config import Config
    from bench.sections.real import sizes

    assert sizes(Config.make(quick=False)) == ("v2.5-1b", "real", "v2-3b")
    quick = sizes(Config.make(quick=True))
    assert not {"v2.5-1b", "real", "v2-3b"} & set(quick)
