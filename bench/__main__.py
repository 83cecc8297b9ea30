"""`make bench`: CPU benchmarks, ratios measured in one run (ONNX Runtime CPU vs torch eager).

    python -m bench [--quick] [--only steps|export|loop|codec ...] [--threads N] [--write-doc | --no-doc]

Sections: 1 `steps` decode step ORT vs torch (tiny, mid; audio/text; batch 1, 4); 2 `export` export
time + peak RSS (v2.5-1b in bf16 and fp16), load_backbone time + peak RSS, weight sizes; 3 `loop`
Engine.step loop vs raw graph step, time to first audio, batch 4; 4 `codec` encoder / decoder
(one-shot and streaming) ORT vs torch, tiny and real-size codec; 5 `host` host overhead per step
(Engine.step over a zero-cost backbone, batch 1-64) beside the real ORT audio step; 6 `real` the v2.5-1b
in float32 / int8 / int4 and the v2-3b in int4 (streamed export) with the real-size codec. One module per section in bench/sections/; they
run on bench/workspace.py (builds), bench/profiling.py (measuring) and bench/harness.py (driving the
engine). Everything is built from fresh random checkpoints in a temporary folder that is removed at
the end. A full run (no --quick, no --only) writes its results into the CPU section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from .common import CPU_HEADING, Section, format_table, machine_description, today, write_doc_section
from .config import Config
from .profiling import CpuLoad
from .sections import codec, export, host, loop, real, steps
from .workspace import Workspace

SECTIONS = {  # report order (section numbers)
    "steps": steps.section_steps,
    "export": export.section_export,
    "loop": loop.section_loop,
    "codec": codec.section_codec,
    "host": host.section_host,
    "real": real.section_real,
}
ORDER = list(SECTIONS)
NUMBERED = {str(number): name for number, name in enumerate(ORDER, 1)}  # --only 1 = --only steps, ...
RUN_ORDER = ["steps", "loop", "codec", "host", "real", "export"]  # the long export section last
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def prebuild_chains(ws: Workspace, cfg: Config, sections: list[str]) -> list[list[Callable[[], Path]]]:
    """Two independent build chains for what `sections` need (backbones | codecs)."""
    llm: list[Callable[[], Path]] = []
    codecs: list[Callable[[], Path]] = []
    sizes = []
    if "steps" in sections:
        sizes += cfg.step_sizes
    if "loop" in sections:
        sizes += cfg.loop_sizes
    if "host" in sections:
        sizes += ["tiny"]
    for size in dict.fromkeys(sizes):
        llm.append(lambda s=size: ws.artifacts(s))
    if "export" in sections:
        llm.append(lambda: ws.checkpoint(cfg.export_size))
    real_llm, real_codecs = real.prebuild(ws, cfg) if "real" in sections else ([], [])
    llm += real_llm
    codec_sizes = []
    if "loop" in sections:
        codec_sizes += ["tiny", *cfg.ttfa_codecs]
    if "codec" in sections:
        codec_sizes += cfg.codec_sizes
    for size in dict.fromkeys(codec_sizes):
        codecs.append(lambda s=size: ws.codec_graphs(s))
    codecs += real_codecs
    return [llm, codecs]


def _versions() -> str:
    parts = [f"Python {sys.version.split()[0]}"]
    for name in ("torch", "onnxruntime", "numpy"):
        try:
            module = __import__(name)
            parts.append(f"{name} {module.__version__}")
        except ImportError:
            parts.append(f"{name} missing")
    return ", ".join(parts)


def doc_body(sections: list[Section], command: str, total: float, cfg: Config, machine: str, versions: str) -> str:
    lines = [
        "Written by `python -m bench` (bench/); every number below comes from one run of that command. "
        "Comparisons are interleaved in the same process and reported as medians and ratios (torch/ORT > 1 means "
        "ONNX Runtime is faster). Random weights, so only speed and memory mean anything here.",
        "",
        f"- date: {today()}",
        f"- machine: {machine}",
        f"- software: {versions}",
        f"- command: `{command}`",
        f"- total runtime: {total / 60:.1f} min ({'quick subset' if cfg.quick else 'full run'})",
        "",
    ]
    for section in sections:
        lines += [f"### {section.title}", "", section.render(markdown=True), ""]
    summary = [[what, value] for s in sections for what, value in s.summary]
    if summary:
        lines += ["### Summary", "", format_table(["what", "value"], summary, markdown=True), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~2 minute subset (tiny configs only; export of the tiny checkpoint)")
    parser.add_argument("--only", action="append", choices=ORDER, type=lambda v: NUMBERED.get(v, v),
                        metavar="SECTION", help=f"run only this section (repeatable): {', '.join(ORDER)} (or 1-{len(ORDER)})")
    parser.add_argument("--threads", type=int, default=0, help="threads for torch and ONNX Runtime (default: all usable cores)")
    parser.add_argument("--export-dtypes", default=None, help="comma-separated dtypes for the export section (default: bfloat16,float16)")
    parser.add_argument("--write-doc", action="store_true", help="write docs/benchmarks.md even for --quick / --only runs")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--keep", type=Path, default=None, help="build in this folder, keep it, and reuse its builds next time (default: a temp folder, removed)")
    args = parser.parse_args(argv)

    cfg = Config.make(args.quick, args.threads)
    if args.export_dtypes:
        cfg.export_dtypes = tuple(d.strip() for d in args.export_dtypes.split(",") if d.strip())
    wanted = args.only or ORDER
    command = "python -m bench" + ("".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])))
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[bench {time.perf_counter() - started:6.1f}s] {message}", flush=True)

    machine, versions = machine_description(), _versions()
    log(f"{machine}; {versions}")
    log(f"sections: {', '.join(wanted)}{' (quick)' if cfg.quick else ''}; threads {cfg.cores()}")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        root = args.keep
    else:
        root = Path(tempfile.mkdtemp(prefix="higgs-bench-"))
    results: dict[str, Section] = {}
    try:
        ws = Workspace(root, log, reuse=args.keep is not None)
        log(f"building checkpoints and exports in {root} (two build chains side by side; nothing is timed yet)")
        ws.prebuild(prebuild_chains(ws, cfg, wanted))
        log("builds done")
        for name in [n for n in RUN_ORDER if n in wanted]:
            t0 = time.perf_counter()
            load = CpuLoad()
            log(f"section {name}")
            try:
                section = SECTIONS[name](ws, cfg, log)
            except Exception as error:  # report, go on with the other sections
                traceback.print_exc()
                section = Section(name, f"{ORDER.index(name) + 1}. {name}")
                section.skipped.append(f"section failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            section.seconds = time.perf_counter() - t0
            section.background_cores = load.background_cores()
            results[name] = section
            print(f"\n=== {section.title} ({section.seconds:.0f} s) ===\n{section.render()}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - started
    ordered = [results[n] for n in ORDER if n in results]
    summary = [[what, value] for s in ordered for what, value in s.summary]
    print("=== Summary (ratios torch/ORT: > 1.00x means ONNX Runtime is faster) ===")
    if summary:
        print(format_table(["what", "value"], summary))
    failed = [s.name for s in ordered if any(r.startswith("section failed") for r in s.skipped)]
    print(f"total runtime {total / 60:.1f} min ({total:.0f} s){'; failed sections: ' + ', '.join(failed) if failed else ''}")
    partial = args.quick or args.only
    if not args.no_doc and (args.write_doc or not partial):
        write_doc_section(DOC, CPU_HEADING, doc_body(ordered, command, total, cfg, machine, versions))
        print(f"wrote the CPU section of {DOC}")
    elif not args.no_doc:
        print(f"{DOC} not updated (partial run; --write-doc forces it)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
