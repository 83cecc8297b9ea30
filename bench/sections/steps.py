"""`make bench` section 1 `steps`: one decode step, ONNX Runtime CPU against torch eager.

The same random weights in both, a static KV cache with `context` tokens prefilled per row, audio
and text steps at each batch and thread count, timed in interleaved blocks. A row where ORT loses
carries a diagnosis: ORT's per-op profile of the step and torch's output head alone.
"""

from __future__ import annotations

import numpy as np

from ..common import Section, fmt_ms, fmt_ratio, interleaved, median, ratio, spread
from ..config import Config
from ..profiling import calibrate, profile_ort_ops, time_block
from ..workspace import Log, Workspace


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
            runtime = OrtBackbone(manifest, max_batch=max_batch, max_len=cfg.max_len, threads=threads, min_bucket=None)  # torch's cache size
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
                        n_torch = calibrate(torch_step, cfg.block_seconds)
                        n_ort = calibrate(ort_step, cfg.block_seconds)
                        times = interleaved(
                            {"torch": lambda: time_block(torch_step, n_torch), "ort": lambda: time_block(ort_step, n_ort)},
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
        original = runtime.replace_session(graph, session)
        try:
            for _ in range(30):
                runtime.run(graph, 0, {name: feed, "cache_lengths": np.full(batch, 200, np.int64),
                                       "last_index": np.zeros(batch, np.int64)})
        finally:
            runtime.replace_session(graph, original)

    try:
        from engines.ort_runtime import session_options

        ops = profile_ort_ops(path, session_options("cpu", threads), run_steps)
    except Exception as error:  # profiling is a diagnosis, not a result
        return f"{size} {graph} b{batch} {threads}t: ORT slower than torch; profiling failed: {error}"
    head = model.text_head if graph == "text" else model.audio_head
    hidden = torch.zeros(batch, spec.hidden_size)
    with torch.inference_mode():
        head_s = time_block(lambda: head(hidden), 50)
    parts = ", ".join(f"{op} {ms:.2f} ms" + (f" (largest node {shapes})" if shapes and i == 0 else "")
                      for i, (op, ms, shapes) in enumerate(ops[:-2]))
    return (f"ORT is slower than torch for {size} {graph} b{batch} with {threads} thread(s) "
            f"({fmt_ms(ort_s)} vs {fmt_ms(torch_s)} ms). ORT profile per run: {parts}; all kernels {ops[-2][1]:.2f} ms "
            f"of {ops[-1][1]:.2f} ms in session.run. "
            f"torch's {graph} head alone (F.linear): {fmt_ms(head_s)} ms.")
