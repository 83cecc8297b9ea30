"""`make bench` section 2 `export`: export and load of a random checkpoint, each in a child process.

`python -m export` per dtype (wall time, per-graph time, peak RSS, weight sizes, the weights each
graph reads) and export.llm.load_backbone followed by one read of every weight page (what the first
forward pass or an export pays). The exports are removed after measuring: several GB each.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from engines.manifest import MANIFEST_FILE, WEIGHTS_FILE

from .._child import read_result
from ..common import Section, fmt_bytes, fmt_ratio, ratio
from ..config import Config
from ..workspace import Log, Workspace


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


_GRAPH_DONE = re.compile(r"done in ([\d.]+)s")  # export/onnx_export.py, one per graph
_GRAPH_STREAMED = re.compile(r"traced in ([\d.]+)s, weights written in ([\d.]+)s")  # export/streamed.py (int4 / int8)


def _graph_times(output: str) -> list[float]:
    """Seconds per exported graph, from the export's own log lines."""
    out = []
    for line in output.splitlines():
        if not line.strip().startswith("[export]"):
            continue
        if done := _GRAPH_DONE.search(line):
            out.append(float(done[1]))
        elif streamed := _GRAPH_STREAMED.search(line):
            out.append(float(streamed[1]) + float(streamed[2]))
    return out


def section_export(ws: Workspace, cfg: Config, log: Log) -> Section:
    size = cfg.export_size
    section = Section("export", f"2. Export and load of a random `{size}` checkpoint (child processes)")
    ckpt = ws.checkpoint(size)
    ckpt_bytes = _dir_bytes(ckpt, "*.safetensors")
    gen = ws.builds.get(f"ckpt-{size}")

    log(f"export: loading {size} with load_backbone (bfloat16) in a child process")
    load = ws.child(f"load-{size}", ["-m", "bench._child", "load", str(ckpt), "bfloat16"])
    info = read_result(load.output)
    after_load, after_touch = info.get("rss_after_load", {}), info.get("rss_after_touch", {})
    load_rows = [[size, "bfloat16", f"{info.get('seconds', float('nan')):.1f}", f"{info.get('touch_seconds', float('nan')):.2f}",
                  fmt_bytes(after_load.get("VmRSS")), f"{fmt_bytes(after_touch.get('RssAnon'))} / {fmt_bytes(after_touch.get('RssFile'))}",
                  fmt_bytes(load.peak_rss), fmt_bytes(info.get("parameter_bytes")), fmt_bytes(ckpt_bytes)]]
    section.summary.append((f"load_backbone {size} bf16: seconds, peak RSS (after touching every weight)",
                            f"{info.get('seconds', float('nan')):.1f} s, {fmt_bytes(load.peak_rss)} "
                            f"(anon {fmt_bytes(after_touch.get('RssAnon'))}, file-backed {fmt_bytes(after_touch.get('RssFile'))})"))

    export_rows, graph_rows = [], []
    for dtype in cfg.export_dtypes:
        out = ws.root / f"onnx-{size}-{dtype}"
        log(f"export: python -m export --dtype {dtype} ({size})")
        result = ws.child(f"export-{size}-{dtype}", ["-m", "export", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", dtype])
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        weights = (out / WEIGHTS_FILE).stat().st_size
        onnx_bytes = _dir_bytes(out, "*.onnx")
        per_graph = _graph_times(result.output)
        export_rows.append([
            size, dtype, f"{result.seconds:.1f}", " / ".join(f"{t:.0f}" for t in per_graph) or "-",
            fmt_bytes(result.peak_rss), fmt_bytes(result.peak_rss_sampled), fmt_bytes(weights), fmt_bytes(ckpt_bytes),
            fmt_ratio(ratio(weights, ckpt_bytes)), fmt_bytes(onnx_bytes),
        ])
        for name, entry in manifest["graphs"].items():
            reads = entry.get("reads", {})
            top = sorted(reads.items(), key=lambda kv: -kv[1])[:3]
            graph_rows.append([dtype, name, fmt_bytes(entry.get("weight_bytes")), fmt_ratio(ratio(entry.get("weight_bytes"), weights)),
                               ", ".join(f"{k} {fmt_bytes(v)}" for k, v in top)])
        section.summary.append((f"export {size} {dtype}: seconds, peak RSS",
                                f"{result.seconds:.0f} s, {fmt_bytes(result.peak_rss)}"))
        shutil.rmtree(out, ignore_errors=True)  # several GB each
    section.table(
        "export (python -m export --checkpoint CKPT --out DIR --dtype D, child process)",
        ["checkpoint", "dtype", "wall s", "prefill / text / audio s", "peak RSS", "peak RSS (sampled)", "weights.bin",
         "checkpoint", "weights/ckpt", "*.onnx"],
        export_rows,
    )
    section.table(
        "load (export.llm.load_backbone in a child process, then one read of every weight page)",
        ["checkpoint", "dtype", "load s", "touch s", "RSS after load", "RSS after touch: anon / file", "peak RSS",
         "parameters", "checkpoint"],
        load_rows,
    )
    section.table(
        "weights each graph reads (manifest.json weight_bytes)",
        ["dtype", "graph", "weight_bytes", "of weights.bin", "largest groups"],
        graph_rows,
    )
    if gen:
        section.notes.append(f"random checkpoint generation (export.tiny --size {size}): {gen['seconds']:.0f} s, "
                             f"peak RSS {fmt_bytes(gen['peak_rss'])} (built alongside other builds, not a timed result)")
    section.notes.append(
        "peak RSS = the child's own VmHWM (kernel high-water mark of its address space, reported at exit by "
        "bench._peak); 'sampled' = max of psutil RSS samples of the child every 50 ms (misses short spikes). Not "
        "wait4/RUSAGE_CHILDREN ru_maxrss: Linux starts a child's ru_maxrss from the parent's high-water mark. "
        "Memory-mapped checkpoint pages count as RSS. The checkpoint was just written, so it is read from the page "
        "cache (warm)."
    )
    section.notes.append(
        "load_backbone leaves bf16 weights memory-mapped from the safetensors files (file-backed pages, reclaimable "
        "page cache, shared with other readers of the same files) when they are already in the compute dtype, so "
        "'load s' is mostly metadata; the touch pass faults every page in, which is what the first forward pass or an "
        "export pays. anon = the process's own heap (torch runtime + anything converted)."
    )
    if size != "v2-3b":
        section.notes.append(f"only the {size} checkpoint was measured; nothing is extrapolated to the 3B here")
    return section
