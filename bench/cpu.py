"""CPU benchmarks (ONNX Runtime CPU EP vs torch eager), one section per function.

Every comparison is measured in one process run, interleaved (A B / B A rounds), and reported as
medians and ratios. Nothing here asserts a time. Checkpoints are fresh random ones (export.tiny)
made in a temporary workspace; builds run as child processes (`python -m export ...`), so a
build's wall time and peak RSS are its own.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from .common import (
    ChildResult,
    Section,
    fmt_bytes,
    fmt_ms,
    fmt_pct,
    fmt_ratio,
    interleaved,
    median,
    spread,
    ratio,
    run_measured,
)
from .host import section_host
from .real import prebuild as real_builds
from .real import section_real

Log = Callable[[str], None]
AUDIO_FRAME_RATE = 25  # codec frames (= audio decode steps) per second of audio
RESULT_PREFIX = "BENCH_RESULT "


@dataclasses.dataclass
class Config:
    quick: bool = False
    threads: int = 0  # 0: every core this process may use
    # section 1: decode steps
    step_sizes: tuple[str, ...] = ("tiny", "mid")
    step_batches: tuple[int, ...] = (1, 4)
    max_len: int = 1024
    context: int = 200
    step_rounds: int = 5
    step_threads: tuple[int, ...] = ()  # () = 1 and all cores
    block_seconds: float = 0.2  # one timed block of consecutive steps per round and engine
    # section 2: export / load
    export_size: str = "v2.5-1b"
    export_dtypes: tuple[str, ...] = ("bfloat16", "float16")
    # section 3: decode loop
    loop_sizes: tuple[str, ...] = ("tiny", "mid")
    loop_batches: tuple[int, ...] = (1, 4)
    max_tokens: int = 200
    loop_rounds: int = 3
    ttfa_codecs: tuple[str, ...] = ("tiny", "real")
    ttfa_rounds: int = 3
    # section 4: codec
    codec_sizes: tuple[str, ...] = ("tiny", "real")
    codec_audio_seconds: tuple[tuple[str, float], ...] = (("tiny", 10.0), ("real", 4.0))
    codec_rounds: int = 5
    # section 5: host overhead per step
    host_batches: tuple[int, ...] = (1, 8, 32, 64)
    host_rounds: int = 3

    @classmethod
    def make(cls, quick: bool, threads: int = 0) -> "Config":
        pinned = (threads,) if threads else ()
        if not quick:
            return cls(threads=threads, step_threads=pinned)
        return cls(
            quick=True,
            threads=threads,
            step_threads=pinned,
            step_sizes=("tiny",),
            step_rounds=5,
            block_seconds=0.15,
            export_size="tiny",
            export_dtypes=("bfloat16",),
            loop_sizes=("tiny",),
            max_tokens=100,
            loop_rounds=2,
            ttfa_codecs=("tiny",),
            ttfa_rounds=2,
            codec_sizes=("tiny",),
            codec_audio_seconds=(("tiny", 5.0),),
            codec_rounds=3,
            host_batches=(1, 64),
            host_rounds=2,
        )

    def cores(self) -> int:
        if self.threads:
            return self.threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class BuildError(RuntimeError):
    pass


def _result(child: ChildResult) -> dict:
    for line in reversed(child.output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return {}


# --- workspace: fresh random checkpoints and their exports, built once per run -----------------------


class Workspace:
    """Builds what the sections need under `root`, each thing once (thread-safe, so independent
    builds can run side by side before any timing starts)."""

    def __init__(self, root: Path, log: Log, reuse: bool = False):
        self.root = root
        self.reuse = reuse
        self.log = log
        self.python = sys.executable
        self.builds: dict[str, dict] = {}  # key -> {"seconds", "peak_rss"}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._done: dict[str, Path] = {}

    def _once(self, key: str, build: Callable[[], Path]) -> Path:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            marker = self.root / f".done-{key}"
            if key not in self._done and self.reuse and marker.is_file():  # --keep DIR from an earlier run
                self._done[key] = Path(marker.read_text())
                self.log(f"reusing {self._done[key]}")
            if key not in self._done:
                try:
                    self._done[key] = build()
                    marker.write_text(str(self._done[key]))
                except Exception as error:  # remembered: the sections that need it report it, once each
                    self._done[key] = error
            if isinstance(self._done[key], Exception):
                raise self._done[key]
            return self._done[key]

    def child(self, key: str, args: list[str], echo: bool = True) -> ChildResult:
        """Run `python args...` in the repository root, echoing its progress lines."""

        def on_line(line: str) -> None:
            if echo and line.startswith("[") and not line.startswith("[W"):
                self.log(f"  {key}: {line}")

        repo = Path(__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args[0] == "-m" and args[1] != "bench._child":
            args = ["-m", "bench._peak", *args[1:]]  # reports the module's own peak RSS at exit
        result = run_measured([self.python, *args], cwd=repo, env=env, on_line=on_line)
        if not result.ok:
            raise BuildError(f"{key}: `python {' '.join(args)}` exited {result.returncode}:\n{result.tail()}")
        self.builds[key] = {"seconds": result.seconds, "peak_rss": result.peak_rss}
        return result

    def checkpoint(self, size: str) -> Path:
        """Random LLM checkpoint (export.tiny, bf16 safetensors) -> DIR/llm."""

        def build():
            out = self.root / f"ckpt-{size}"
            self.log(f"building random {size} checkpoint")
            self.child(f"ckpt-{size}", ["-m", "export.tiny", "--out", str(out), "--size", size, "--no-codec"])
            return out / "llm"

        return self._once(f"ckpt-{size}", build)

    def artifacts(self, size: str) -> Path:
        """float32 backbone export of the random `size` checkpoint (no codec graphs)."""

        def build():
            ckpt = self.checkpoint(size)
            out = self.root / f"onnx-{size}-float32"
            self.log(f"exporting {size} (float32)")
            self.child(f"export-{size}", ["-m", "export", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", "float32"])
            return out

        return self._once(f"onnx-{size}", build)

    def codec(self, size: str) -> Path:
        def build():
            out = self.root / f"codec-{size}"
            self.log(f"writing random {size} codec")
            self.child(f"codec-{size}", ["-m", "bench._child", "write-codec", str(out), size])
            return out

        return self._once(f"codec-{size}", build)

    def codec_graphs(self, size: str) -> Path:
        """DIR with codec_decoder.onnx (+ codec_encoder.onnx) and graphs.json."""

        def build():
            src = self.codec(size)
            out = self.root / f"codec-{size}-onnx"
            self.log(f"exporting {size} codec graphs")
            self.child(f"codec-{size}-onnx", ["-m", "bench._child", "export-codec", str(src), str(out)])
            return out

        return self._once(f"codec-{size}-onnx", build)

    def prebuild(self, chains: list[list[Callable[[], Path]]]) -> None:
        """Run independent build chains side by side (before anything is timed)."""
        chains = [c for c in chains if c]
        if not chains:
            return
        with ThreadPoolExecutor(max_workers=len(chains)) as pool:
            futures = [pool.submit(self._chain, c) for c in chains]
            for future in futures:
                future.result()

    def _chain(self, steps: list[Callable[[], Path]]) -> None:
        for step in steps:
            try:
                step()
            except Exception as error:  # the sections that need it fail with this reason later
                self.log(f"build failed: {str(error).splitlines()[0]}")


def _threads_note(cfg: Config) -> str:
    return f"{cfg.cores()} threads for both torch (intra-op) and ONNX Runtime (intra_op_num_threads)"


def _time_block(fn: Callable[[], object], n: int, warm: bool = True) -> float:
    if warm:
        fn()  # untimed: the first call after switching engines pays thread wake-up
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


def _calibrate(fn: Callable[[], object], block_seconds: float, lo: int = 3, hi: int = 400) -> int:
    fn()
    started = time.perf_counter()
    fn()
    one = max(time.perf_counter() - started, 1e-6)
    return int(min(hi, max(lo, block_seconds / one)))


# --- where ORT loses: per-op profile ------------------------------------------------------------------


def profile_ort_ops(
    session_path, options, run_steps: Callable[[object], int | None], top: int = 3
) -> list[tuple[str, float, str]]:
    """Profile a graph with ORT's enable_profiling: [(op type, ms, largest node's shapes)] for the
    `top` op types by kernel time, then ("kernels", ms, "") and ("session.run", ms, ""), all per
    counted run. `options` are the SessionOptions the benchmarked session used. `run_steps(session)`
    runs the graph with the profiling session and returns how many leading runs are warm-up (not
    counted; None = the first run when there are several, which pays the allocations)."""
    import tempfile

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


class _CountingSession:
    """Session proxy counting run() calls (to tell warm-up runs from measured ones)."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


# --- section 1: ORT vs torch decode steps -------------------------------------------------------------


def section_steps(ws: Workspace, cfg: Config, log: Log) -> Section:
    import torch

    from engines.manifest import Manifest
    from engines.ort_runtime import OrtBackbone
    from export.llm import Mode, load_backbone

    section = Section("steps", "1. Decode step: ONNX Runtime CPU vs torch eager (float32, same weights)")
    rows = []
    batches = tuple(cfg.step_batches)
    max_batch = max(batches)
    thread_counts = tuple(dict.fromkeys(cfg.step_threads or (1, cfg.cores())))
    for size in cfg.step_sizes:
        ckpt, art = ws.checkpoint(size), ws.artifacts(size)
        log(f"steps: {size}: loading the torch model and prefilling {cfg.context} tokens per row")
        model = load_backbone(ckpt, torch.float32)
        manifest = Manifest.load(art)
        spec = manifest.model
        rng = np.random.default_rng(0)
        ctx = cfg.context
        ids = rng.integers(0, 128000, (max_batch, ctx))
        cache = model.new_cache(max_batch, cfg.max_len)
        with torch.inference_mode():
            model(Mode.TEXT, torch.from_numpy(ids), None, None, torch.zeros(max_batch, dtype=torch.int64),
                  torch.full((max_batch,), ctx - 1), cache)
        codes = rng.integers(0, spec.codebook_size, (max_batch, spec.num_codebooks))
        tokens = rng.integers(0, 128000, (max_batch,))
        for threads in thread_counts:
            torch.set_num_threads(threads)
            runtime = OrtBackbone(manifest, max_batch=max_batch, max_len=cfg.max_len, threads=threads)
            for slot in range(max_batch):
                runtime.prefill(slot, ids[slot], np.zeros((ctx, spec.num_codebooks), np.int64), np.zeros(ctx, bool))
            for graph in ("audio", "text"):
                for batch in batches:
                    lengths_np = np.full(batch, ctx, np.int64)
                    slots = np.arange(batch)
                    past = [(k[:batch], v[:batch]) for k, v in cache]  # views: in-place writes land in `cache`
                    lengths = torch.from_numpy(lengths_np)
                    last = torch.zeros(batch, dtype=torch.int64)
                    if graph == "audio":
                        t_codes = torch.from_numpy(codes[:batch, None, :].copy())

                        def torch_step():
                            return model(Mode.AUDIO, None, t_codes, None, lengths, last, past)[1]

                        def ort_step():
                            return runtime.audio_step(slots, codes[:batch], lengths_np)
                    else:
                        t_ids = torch.from_numpy(tokens[:batch, None].copy())

                        def torch_step():
                            return model(Mode.TEXT, t_ids, None, None, lengths, last, past)[0]

                        def ort_step():
                            return runtime.text_step(slots, tokens[:batch], lengths_np)

                    with torch.inference_mode():
                        diff = float(np.max(np.abs(torch_step().numpy() - ort_step())))
                        for _ in range(3):  # warm both (first torch calls allocate, first ORT calls bind)
                            torch_step(), ort_step()
                        n_torch = _calibrate(torch_step, cfg.block_seconds)
                        n_ort = _calibrate(ort_step, cfg.block_seconds)
                        times = interleaved(
                            {"torch": lambda: _time_block(torch_step, n_torch), "ort": lambda: _time_block(ort_step, n_ort)},
                            cfg.step_rounds,
                        )
                    t, o = median(times["torch"]), median(times["ort"])
                    r = ratio(t, o)
                    log(f"steps: {size} {graph} b{batch} {threads}t: torch {fmt_ms(t)} ms "
                        f"(spread {spread(times['torch']):.0%}), ORT {fmt_ms(o)} ms (spread {spread(times['ort']):.0%}), "
                        f"torch/ORT {fmt_ratio(r)}")
                    if r is not None and r < 1.0:
                        section.notes.append(_explain_slower(size, graph, batch, threads, t, o, runtime, model, spec))
                    rows.append([size, graph, batch, threads, fmt_ms(t), fmt_ms(o), fmt_ratio(r),
                                 f"{spread(times['torch']):.0%} / {spread(times['ort']):.0%}", f"{diff:.1e}"])
                    section.summary.append((f"{size} {graph} step b{batch}, {threads} thread{'s' if threads > 1 else ''}: torch/ORT",
                                            f"{fmt_ratio(r)} ({fmt_ms(o)} ms ORT)"))
            del runtime
        del model, cache
    torch.set_num_threads(cfg.cores())
    section.table(
        "ms per decode step (median of interleaved rounds)",
        ["config", "graph", "batch", "threads", "torch ms", "ORT ms", "torch/ORT", "spread t / o", "max abs dlogits"],
        rows,
    )
    section.notes.append(
        f"static KV cache of max_len {cfg.max_len} for both, {cfg.context} tokens prefilled per row, the step "
        f"writes position {cfg.context}; torch = export.llm in Mode.AUDIO / Mode.TEXT with in-place cache writes "
        "under inference_mode; ORT = OrtBackbone.audio_step / text_step (IO binding, cache aliased); threads = "
        "torch.set_num_threads and ORT intra_op_num_threads alike; "
        f"{cfg.step_rounds} rounds, order alternated each round; > 1.00x means ORT is faster; spread = (max - min) / "
        "median over the rounds"
    )
    return section


def _explain_slower(size, graph, batch, threads, torch_s, ort_s, runtime, model, spec) -> str:
    """ORT lost to torch on this row: profile the ORT graph per op and time torch's output head alone."""
    import torch

    name = {"audio": "audio_codes", "text": "input_ids"}[graph]
    feed = np.zeros((batch, 1, spec.num_codebooks), np.int64) if graph == "audio" else np.zeros((batch, 1), np.int64)
    path = runtime.manifest.graph_path(graph)

    def run_steps(session):
        original = runtime.sessions[graph]
        runtime.sessions[graph] = session
        runtime._step_bindings.clear()  # bindings belong to a session
        try:
            for _ in range(30):
                runtime.run(graph, 0, {name: feed, "cache_lengths": np.full(batch, 200, np.int64),
                                       "last_index": np.zeros(batch, np.int64)})
        finally:
            runtime.sessions[graph] = original
            runtime._step_bindings.clear()

    try:
        from engines.ort_runtime import session_options

        ops = profile_ort_ops(path, session_options("cpu", threads), run_steps)
    except Exception as error:  # profiling is a diagnosis, not a result
        return f"{size} {graph} b{batch} {threads}t: ORT slower than torch; profiling failed: {error}"
    head = model.text_head if graph == "text" else model.audio_head
    hidden = torch.zeros(batch, spec.hidden_size)
    with torch.inference_mode():
        head_s = _time_block(lambda: head(hidden), 50)
    parts = ", ".join(f"{op} {ms:.2f} ms" + (f" (largest node {shapes})" if shapes and i == 0 else "")
                      for i, (op, ms, shapes) in enumerate(ops[:-2]))
    return (f"ORT is slower than torch for {size} {graph} b{batch} with {threads} thread(s) "
            f"({fmt_ms(ort_s)} vs {fmt_ms(torch_s)} ms). ORT profile per run: {parts}; all kernels {ops[-2][1]:.2f} ms "
            f"of {ops[-1][1]:.2f} ms in session.run. "
            f"torch's {graph} head alone (F.linear): {fmt_ms(head_s)} ms.")


# --- section 2: export time / peak RAM, load, weights ------------------------------------------------


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def _graph_times(output: str) -> list[float]:
    out = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("[export]") and "done in" in line:
            try:
                out.append(float(line.rsplit("done in", 1)[1].strip().rstrip("s")))
            except ValueError:
                pass
    return out


def section_export(ws: Workspace, cfg: Config, log: Log) -> Section:
    size = cfg.export_size
    section = Section("export", f"2. Export and load of a random `{size}` checkpoint (child processes)")
    ckpt = ws.checkpoint(size)
    ckpt_bytes = _dir_bytes(ckpt, "*.safetensors")
    gen = ws.builds.get(f"ckpt-{size}")

    log(f"export: loading {size} with load_backbone (bfloat16) in a child process")
    load = ws.child(f"load-{size}", ["-m", "bench._child", "load", str(ckpt), "bfloat16"])
    info = _result(load)
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
        manifest = json.loads((out / "manifest.json").read_text())
        weights = (out / "weights.bin").stat().st_size
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


# --- section 3: the decode loop ---------------------------------------------------------------------


class _TimedDecoder:
    """CodecDecoder proxy that accumulates decode time (the loop's streaming codec share)."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, codes):
        started = time.perf_counter()
        try:
            return self.inner.decode(codes)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def _no_stream_eos(inner):
    """The runtime with the stream-EOS logit masked, so a greedy request on random weights runs exactly
    max_tokens audio steps (the random checkpoints end their audio after 1-5 s on purpose)."""
    from engines.runtime import BackboneRuntime

    class NoStreamEos(BackboneRuntime):
        name = inner.name

        def __init__(self):
            super().__init__(inner.manifest, inner.max_batch, inner.max_len)
            self.eos = inner.spec.stream_eos_id
            self.has_prefill_graph = inner.has_prefill_graph  # prefill() runs split without the prefill graph

        def run(self, graph, slot, inputs):
            return inner.run(graph, slot, inputs)

        def audio_step(self, slots, codes, cache_lengths):
            logits = inner.audio_step(slots, codes, cache_lengths)  # a copy (fancy-indexed rows)
            logits[..., self.eos] = -np.inf
            return logits

        def close(self):
            inner.close()

    return NoStreamEos()


LOOP_TEXT = (
    "The quick brown fox jumps over the lazy dog, and then it keeps on running through the forest until the "
    "sun goes down behind the distant hills."
)


def _run_requests(engine, requests) -> dict:
    from engines.api import AudioChunk, Finished

    engine.codec.reset()
    steps0, graph0 = engine.stats["steps"], engine.stats["graph_seconds"]
    started = time.perf_counter()
    handles = [engine.submit(r) for r in requests]
    first = [None] * len(handles)
    finished = [None] * len(handles)
    step_times = []
    while True:
        t = time.perf_counter()
        busy = engine.step()
        now = time.perf_counter()
        if busy:
            step_times.append(now - t)
        for i, handle in enumerate(handles):
            for event in handle.poll():
                if isinstance(event, AudioChunk) and first[i] is None:
                    first[i] = now - started
                elif isinstance(event, Finished):
                    finished[i] = event
        if not busy:
            break
    steps = engine.stats["steps"] - steps0
    steady = step_times[1:]  # the first step also admits and prefills
    return {
        "ttfa": first,
        "steps": steps,
        "first_step": step_times[0],
        "step": sum(steady) / len(steady),
        "graph": (engine.stats["graph_seconds"] - graph0) / steps,
        "codec": engine.codec.seconds / steps,
        "tokens": [f.completion_tokens if f else 0 for f in finished],
        "reasons": sorted({f.finish_reason if f else "none" for f in finished}),
    }


SPIN_KEY = "session.intra_op.allow_spinning"
VARIANTS = {"spin": f"{SPIN_KEY}=1 (ORT's default)", "nospin": f"{SPIN_KEY}=0 (the engine's setting)"}


def _cpu_session(path, threads: int | None, spinning: bool):
    import onnxruntime as ort

    from engines.ort_runtime import session_options

    return ort.InferenceSession(str(path), session_options("cpu", threads, spinning), providers=["CPUExecutionProvider"])


def _ort_runtime(manifest, batch: int, max_len: int, threads: int, spinning: bool):
    """OrtBackbone as the engine builds it; for the spinning variant its sessions are rebuilt with
    allow_spinning=1 (before any call, so no IO binding refers to the old ones)."""
    from engines.manifest import BACKBONE_GRAPHS
    from engines.ort_runtime import OrtBackbone

    runtime = OrtBackbone(manifest, max_batch=batch, max_len=max_len, threads=threads)
    if spinning:
        runtime.sessions = {g: _cpu_session(manifest.graph_path(g), threads, True) for g in BACKBONE_GRAPHS}
    return runtime


def _codec_decoder(path, spinning: bool):
    from engines.codec import CodecDecoder

    decoder = CodecDecoder(path, ["CPUExecutionProvider"])
    if spinning:
        decoder.session = _cpu_session(path, None, True)
    return _TimedDecoder(decoder)


def section_loop(ws: Workspace, cfg: Config, log: Log) -> Section:
    from engines.api import SamplingParams, SpeechRequest
    from engines.generate import Engine
    from engines.manifest import Manifest
    from engines.prompt import PromptRenderer, tts_messages

    section = Section("loop", "3. Decode loop (Engine.step, ORT CPU, greedy)")
    threads = cfg.cores()
    variants = list(VARIANTS)
    decoders = {
        (c, v): _codec_decoder(ws.codec_graphs(c) / "codec_decoder.onnx", v == "spin")
        for c in dict.fromkeys(("tiny", *cfg.ttfa_codecs))
        for v in variants
    }
    stream_frames = inspect.signature(Engine.__init__).parameters["stream_frames"].default
    loop_rows, ttfa_rows = [], []
    for size in cfg.loop_sizes:
        manifest = Manifest.load(ws.artifacts(size))
        spec = manifest.model
        renderer = PromptRenderer(manifest.tokenizer, spec.num_codebooks)
        messages = tts_messages(LOOP_TEXT)

        def request(max_tokens):
            return SpeechRequest(messages, sampling=SamplingParams(temperature=0.0), max_tokens=max_tokens)

        for batch in cfg.loop_batches:
            rng = np.random.default_rng(1)
            codes = rng.integers(0, spec.codebook_size, (batch, spec.num_codebooks))
            slots = np.arange(batch)
            runtimes, engines, runs, candidates = {}, {}, {v: [] for v in variants}, {}
            prompt_len = 0
            for v in variants:
                runtime = runtimes[v] = _ort_runtime(manifest, batch, cfg.max_len, threads, v == "spin")
                engine = engines[v] = Engine(_no_stream_eos(runtime), decoders["tiny", v], renderer=renderer, stream_frames=stream_frames)
                engine.warmup()
                prompt_len = len(engine._prepare(request(cfg.max_tokens))[0].input_ids)
                lengths = np.full(batch, prompt_len + cfg.max_tokens // 2, np.int64)

                def raw(runtime=runtime, lengths=lengths):
                    return runtime.audio_step(slots, codes, lengths)

                def loop_once(engine=engine, v=v):
                    runs[v].append(_run_requests(engine, [request(cfg.max_tokens) for _ in range(batch)]))
                    return runs[v][-1]["step"]

                n_raw = _calibrate(raw, 0.4)
                candidates[f"loop {v}"] = loop_once
                candidates[f"raw {v}"] = lambda raw=raw, n=n_raw: _time_block(raw, n)
            log(f"loop: {size} batch {batch}: {cfg.loop_rounds} rounds of {cfg.max_tokens} steps + raw audio_step blocks, "
                f"intra-op spinning on / off")
            times = interleaved(candidates, cfg.loop_rounds)
            for v in variants:
                step, raw_step = median(times[f"loop {v}"]), median(times[f"raw {v}"])
                graph = median(r["graph"] for r in runs[v])
                codec = median(r["codec"] for r in runs[v])
                other = step - graph  # the codec decodes on its own thread, beside the steps
                tokens = sorted({t for r in runs[v] for t in r["tokens"]})
                overhead = step / raw_step - 1
                loop_rows.append([
                    size, batch, v, prompt_len, "/".join(map(str, tokens)), fmt_ms(step), fmt_ms(graph), fmt_ms(codec), fmt_ms(other),
                    fmt_ms(raw_step), fmt_pct(overhead), f"{1 / step:.1f}", f"{batch / step / AUDIO_FRAME_RATE:.2f}",
                ])
                log(f"loop: {size} b{batch} {v}: {fmt_ms(step)} ms/step (graph {fmt_ms(graph)}, codec thread {fmt_ms(codec)}), "
                    f"raw audio_step {fmt_ms(raw_step)} ms -> overhead {fmt_pct(overhead)}")
                section.summary.append((f"{size} loop b{batch} {v}: steps/s, overhead vs raw audio_step",
                                        f"{1 / step:.1f}/s, {fmt_pct(overhead)}"))
            spin_step, nospin_step = (median(times[f"loop {v}"]) for v in ("spin", "nospin"))
            section.summary.append((f"{size} loop b{batch}: step time spin / no spin", fmt_ratio(ratio(spin_step, nospin_step))))
            if batch == 1:
                for v in variants:
                    ttfa = {"tiny": median(r["ttfa"][0] for r in runs[v] if r["ttfa"][0] is not None)}
                    first_step = {"tiny": median(r["first_step"] for r in runs[v])}
                    for codec_size in cfg.ttfa_codecs:
                        if codec_size == "tiny":
                            continue
                        other_engine = Engine(_no_stream_eos(runtimes[v]), decoders[codec_size, v], renderer=renderer,
                                              stream_frames=stream_frames)
                        other_engine.warmup()
                        short = [_run_requests(other_engine, [request(40)]) for _ in range(cfg.ttfa_rounds)]
                        ttfa[codec_size] = median(r["ttfa"][0] for r in short if r["ttfa"][0] is not None)
                        first_step[codec_size] = median(r["first_step"] for r in short)
                    for codec_size, value in ttfa.items():
                        ttfa_rows.append([size, f"{codec_size} codec", v, prompt_len, fmt_ms(first_step[codec_size]), fmt_ms(value)])
                        section.summary.append((f"{size} TTFA ({codec_size} codec, {v})", f"{fmt_ms(value)} ms"))
            for engine in engines.values():
                engine.shutdown()
    section.table(
        f"loop: ms per Engine.step, {cfg.max_tokens} greedy audio steps per request, {threads} intra-op threads "
        f"(median of {cfg.loop_rounds} interleaved rounds)",
        ["config", "batch", "ORT", "prompt", "tokens", "loop ms", "graph ms", "codec ms", "other ms", "raw step ms", "overhead",
         "steps/s", "x realtime"],
        loop_rows,
    )
    section.table(
        "time to first audio chunk (submit -> first AudioChunk, batch 1)",
        ["config", "codec decoder", "ORT", "prompt", "first step ms (prefill)", "TTFA ms"],
        ttfa_rows,
    )
    section.notes.append(
        "loop ms = mean wall time of Engine.step after the first (admit + prefill) step; graph = Engine.stats "
        "graph_seconds per step (the backbone call(s) in _feed); codec = streaming codec decode per step on the engine's "
        f"codec thread (tiny codec, chunks of {stream_frames} frames; beside the steps, not in loop ms, but on a CPU it "
        "competes for the same cores); other = loop - graph: sampling, RAS, delay pattern, bookkeeping; raw step = "
        "OrtBackbone.audio_step called back to back on the same runtime at a similar cache length; overhead = loop / raw - 1"
    )
    section.notes.append(
        f"ORT: nospin = sessions as engines/ort_runtime.py and engines/codec.py create them ({SPIN_KEY}=0: worker "
        f"threads sleep instead of busy-waiting after each run); spin = the same options with {SPIN_KEY}=1, ORT's default"
    )
    section.notes.append(
        "the stream-EOS logit is masked (a -inf write on the returned logits) so every request runs exactly max_tokens "
        "steps: random weights end their audio after 1-5 s by design. x realtime = audio seconds produced per wall second "
        f"({AUDIO_FRAME_RATE} frames/s). TTFA with the real-size codec comes from separate short requests (max_tokens 40)."
    )
    return section


# --- section 4: codec ---------------------------------------------------------------------------------


class _TorchDecoder:
    """The torch reference behind the CodecDecoder interface (so StreamingDecoder chunks it the same way)."""

    def __init__(self, codec, onnx_decoder):
        self.codec = codec
        self.num_quantizers = onnx_decoder.num_quantizers
        self.hop_length = onnx_decoder.hop_length
        self.sample_rate = onnx_decoder.sample_rate
        self.context_frames = onnx_decoder.context_frames

    def decode(self, codes):
        """CodecDecoder.decode's contract: (n_q, T) -> (960 T,), (B, n_q, T) -> (B, 960 T)."""
        import torch

        batch = np.ascontiguousarray(codes if codes.ndim == 3 else codes[None], dtype=np.int64)
        with torch.inference_mode():
            audio = self.codec.decode(torch.from_numpy(batch))[:, 0].numpy()
        return audio if codes.ndim == 3 else audio[0]


def _stream(decoder, codes, min_frames: int) -> np.ndarray:
    from engines.codec import StreamingDecoder

    streamer = StreamingDecoder(decoder, min_frames=min_frames)
    parts = [streamer.push(codes[:, i : i + 1]) for i in range(codes.shape[1])]  # one frame per step, as the loop
    parts.append(streamer.flush())
    return np.concatenate(parts)


def _test_wave(seconds: float, sample_rate: int = 24000) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    rng = np.random.default_rng(0)
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 0.5 * t) + 0.05 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


def profile_torch_ops(fn: Callable[[], object], top: int = 3) -> list[tuple[str, float]]:
    """[(aten op, self CPU ms)] of one call, the `top` ops by self time, plus ("total", ms)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    averages = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    ranked = sorted(averages, key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in averages) / 1e3
    return [(e.key, e.self_cpu_time_total / 1e3) for e in ranked[:top]] + [("total", total)]


def _explain_codec(size: str, name: str, torch_fn, ort_holder, path, run_ort, audio_s: float) -> str:
    """ORT lost to torch on a codec row: per-op profiles of both for one warm call, per audio second."""
    import onnxruntime as ort

    def run_steps(session):
        original = ort_holder.session
        counting = ort_holder.session = _CountingSession(session)
        try:
            run_ort()  # warm-up call, not counted (the first runs of a session allocate)
            warm = counting.runs
            run_ort()
        finally:
            ort_holder.session = original
        counted = counting.runs - warm
        calls.append(counted)
        return warm

    calls: list[int] = []
    try:
        ort_ops = profile_ort_ops(path, ort.SessionOptions(), run_steps, top=3)
        torch_ops = profile_torch_ops(torch_fn)
    except Exception as error:  # a diagnosis, not a result
        return f"{size} codec {name}: ORT slower than torch; profiling failed: {error}"
    n = calls[0] if calls else 1

    def per_second(ms):  # ORT numbers are per session.run; one call made n of them
        return ms * n / audio_s

    ort_parts = ", ".join(f"{op} {per_second(ms):.0f}" + (f" [largest: {shapes}]" if shapes else "")
                          for op, ms, shapes in ort_ops[:-2])
    torch_parts = ", ".join(f"{op} {ms / audio_s:.0f}" for op, ms in torch_ops[:-1])
    return (f"{size} codec {name}: ORT is slower than torch. Per-op profile of one warm call, ms per audio second "
            f"({n} session.run): ORT {ort_parts}; kernels {per_second(ort_ops[-2][1]):.0f} of "
            f"{per_second(ort_ops[-1][1]):.0f} in session.run. torch self time: {torch_parts}; all aten ops "
            f"{torch_ops[-1][1] / audio_s:.0f}.")


def section_codec(ws: Workspace, cfg: Config, log: Log) -> Section:
    import torch

    from engines.codec import CodecDecoder, CodecEncoder
    from engines.generate import Engine
    from export.codec import load_codec

    section = Section("codec", "4. Codec: ONNX Runtime CPU vs torch (float32), ms per second of audio")
    torch.set_num_threads(cfg.cores())
    stream_frames = inspect.signature(Engine.__init__).parameters["stream_frames"].default
    cpu = ["CPUExecutionProvider"]
    seconds_of = dict(cfg.codec_audio_seconds)
    rows = []
    for size in cfg.codec_sizes:
        audio_s = seconds_of.get(size, 4.0)
        graphs = ws.codec_graphs(size)
        listing = json.loads((graphs / "graphs.json").read_text())
        log(f"codec: {size}: loading torch reference and ORT sessions ({audio_s:.0f} s of audio)")
        codec = load_codec(ws.codec(size))
        ort_dec = CodecDecoder(graphs / "codec_decoder.onnx", cpu)
        torch_dec = _TorchDecoder(codec, ort_dec)
        codes = np.random.default_rng(0).integers(0, 1024, (ort_dec.num_quantizers, int(audio_s * AUDIO_FRAME_RATE)))
        cases: dict[str, tuple[Callable, Callable, Callable[[object, object], str]]] = {}

        def close(a, b):
            return f"{float(np.max(np.abs(np.asarray(a) - np.asarray(b)))):.1e}"

        cases["decode one-shot"] = (lambda: torch_dec.decode(codes), lambda: ort_dec.decode(codes), close)
        explain = {"decode one-shot": (ort_dec, graphs / "codec_decoder.onnx", lambda: ort_dec.decode(codes))}
        explain[f"decode streaming ({stream_frames}-frame chunks)"] = (
            ort_dec, graphs / "codec_decoder.onnx", lambda: _stream(ort_dec, codes, stream_frames))
        cases[f"decode streaming ({stream_frames}-frame chunks)"] = (
            lambda: _stream(torch_dec, codes, stream_frames), lambda: _stream(ort_dec, codes, stream_frames), close)
        if (graphs / "codec_encoder.onnx").is_file():
            ort_enc = CodecEncoder(graphs / "codec_encoder.onnx", cpu)
            wave = _test_wave(audio_s)
            t_wave = torch.from_numpy(wave)

            def torch_encode():
                with torch.inference_mode():
                    return codec.encode(t_wave).numpy()

            explain["encode"] = (ort_enc, graphs / "codec_encoder.onnx", lambda: ort_enc.encode(wave))
            cases["encode"] = (torch_encode, lambda: ort_enc.encode(wave), lambda a, b: f"{float(np.mean(np.asarray(a) == np.asarray(b))):.1%} codes equal")
        else:
            reason = listing.get("codec_encoder_error", "codec_encoder.onnx was not exported")
            section.skipped.append(f"{size} codec encode: {reason}")
        for name, (torch_fn, ort_fn, compare) in cases.items():
            agreement = compare(torch_fn(), ort_fn())  # also the warm-up
            times = interleaved({"torch": lambda: _time_block(torch_fn, 1, warm=False), "ort": lambda: _time_block(ort_fn, 1, warm=False)}, cfg.codec_rounds)
            t, o = median(times["torch"]) / audio_s, median(times["ort"]) / audio_s
            rows.append([size, name, f"{audio_s:.0f}", fmt_ms(t, 0), fmt_ms(o, 0), fmt_ratio(ratio(t, o)),
                         f"{spread(times['torch']):.0%} / {spread(times['ort']):.0%}", agreement])
            if ratio(t, o) is not None and ratio(t, o) < 1.0:
                holder, path, run_ort = explain[name]
                section.notes.append(_explain_codec(size, name, torch_fn, holder, path, run_ort, audio_s))
            log(f"codec: {size} {name}: torch {fmt_ms(t, 0)} ms/s, ORT {fmt_ms(o, 0)} ms/s, torch/ORT {fmt_ratio(ratio(t, o))}")
            section.summary.append((f"{size} codec {name}: torch/ORT (ORT ms per audio s)", f"{fmt_ratio(ratio(t, o))} ({fmt_ms(o, 0)})"))
        del codec
    section.table(
        f"ms of compute per second of audio (median of {cfg.codec_rounds} interleaved rounds)",
        ["codec", "what", "audio s", "torch ms/s", "ORT ms/s", "torch/ORT", "spread t / o", "agreement"],
        rows,
    )
    section.notes.append(
        "tiny = export.tiny_codec size 'tiny'; real = size 'real' (the real codec's widths, random weights). Streaming = "
        "engines.codec.StreamingDecoder fed one frame per call and flushed, the decode loop's chunking, with the same "
        "chunking around the torch reference; encode = CodecEncoder.encode / HiggsCodec.encode of a 24 kHz test signal; "
        f"{_threads_note(cfg)}; < 1000 ms/s is faster than real time"
    )
    return section


SECTIONS = {
    "steps": section_steps,
    "export": section_export,
    "loop": section_loop,
    "codec": section_codec,
    "host": section_host,
    "real": section_real,
}


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
    if "real" in sections:
        llm += real_builds(ws, cfg)[0]
    codec_sizes = []
    if "loop" in sections:
        codec_sizes += ["tiny", *cfg.ttfa_codecs]
    if "codec" in sections:
        codec_sizes += cfg.codec_sizes
    for size in dict.fromkeys(codec_sizes):
        codecs.append(lambda s=size: ws.codec_graphs(s))
    if "real" in sections:
        codecs += real_builds(ws, cfg)[1]
    return [llm, codecs]
