"""`make bench` section 3 `loop`: the decode loop (Engine.step, ORT CPU, greedy) against its raw graph step.

Each batch runs whole requests through Engine.step (stream EOS masked, so every request runs
max_tokens steps) interleaved with blocks of the bare OrtBackbone.audio_step at a similar cache
length: the difference is the loop's own work. Both with ORT's intra-op threads spinning (its
default) and sleeping (the engine's setting). Then the time to first audio with each codec size.
"""

from __future__ import annotations

import numpy as np

from engines.manifest import CODEC_DECODER, graph_file
from engines.ort_runtime import SPIN_KEY

from ..common import AUDIO_FRAME_RATE, Section, fmt_ms, fmt_pct, fmt_ratio, interleaved, median, ratio
from ..config import Config
from ..harness import LOOP_TEXT, TimedDecoder, cpu_session, no_stream_eos, run_requests
from ..profiling import calibrate, time_block
from ..workspace import Log, Workspace


VARIANTS = ("spin", "nospin")  # SPIN_KEY=1 (ORT's default), SPIN_KEY=0 (the engine's setting)


def _ort_runtime(manifest, batch: int, max_len: int, threads: int, spinning: bool):
    """OrtBackbone as the engine builds it; for the spinning variant its sessions are replaced by ones
    with allow_spinning=1 (before any call)."""
    from engines.ort_runtime import OrtBackbone

    runtime = OrtBackbone(manifest, max_batch=batch, max_len=max_len, threads=threads, prefill_graph=False)
    if spinning:
        for graph in list(runtime.sessions):
            runtime.replace_session(graph, cpu_session(manifest.graph_path(graph), threads, spinning=True))
    return runtime


def _codec_decoder(path, spinning: bool):
    from engines.codec import CodecDecoder

    decoder = CodecDecoder(path, ["CPUExecutionProvider"])
    if spinning:
        decoder.session = cpu_session(path, None, spinning=True)
    return TimedDecoder(decoder)


def section_loop(ws: Workspace, cfg: Config, log: Log) -> Section:
    from engines.api import SamplingParams, SpeechRequest
    from engines.loop import DEFAULT_STREAM_FRAMES, Engine
    from engines.manifest import Manifest
    from engines.prompt import PromptRenderer, tts_messages

    section = Section("loop", "3. Decode loop (Engine.step, ORT CPU, greedy)")
    threads = cfg.cores()
    decoders = {
        (c, v): _codec_decoder(ws.codec_graphs(c) / graph_file(CODEC_DECODER), v == "spin")
        for c in dict.fromkeys(("tiny", *cfg.ttfa_codecs))
        for v in VARIANTS
    }
    stream_frames = DEFAULT_STREAM_FRAMES
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
            runtimes, engines, runs, candidates = {}, {}, {v: [] for v in VARIANTS}, {}
            prompt_len = 0
            for v in VARIANTS:
                runtime = runtimes[v] = _ort_runtime(manifest, batch, cfg.max_len, threads, v == "spin")
                engine = engines[v] = Engine(no_stream_eos(runtime), decoders["tiny", v], renderer=renderer, stream_frames=stream_frames)
                engine.warmup()
                prompt_len = engine.prompt_length(request(cfg.max_tokens))
                lengths = np.full(batch, prompt_len + cfg.max_tokens // 2, np.int64)

                def raw(runtime=runtime, lengths=lengths):
                    return runtime.audio_step(slots, codes, lengths)

                def loop_once(engine=engine, v=v):
                    runs[v].append(run_requests(engine, [request(cfg.max_tokens) for _ in range(batch)]))
                    return runs[v][-1]["step"]

                n_raw = calibrate(raw, 0.4)
                candidates[f"loop {v}"] = loop_once
                candidates[f"raw {v}"] = lambda raw=raw, n=n_raw: time_block(raw, n)
            log(f"loop: {size} batch {batch}: {cfg.loop_rounds} rounds of {cfg.max_tokens} steps + raw audio_step blocks, "
                f"intra-op spinning on / off")
            times = interleaved(candidates, cfg.loop_rounds)
            for v in VARIANTS:
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
                for v in VARIANTS:
                    ttfa = {"tiny": median(r["ttfa"][0] for r in runs[v] if r["ttfa"][0] is not None)}
                    first_step = {"tiny": median(r["first_step"] for r in runs[v])}
                    for codec_size in cfg.ttfa_codecs:
                        if codec_size == "tiny":
                            continue
                        other_engine = Engine(no_stream_eos(runtimes[v]), decoders[codec_size, v], renderer=renderer,
                                              stream_frames=stream_frames)
                        other_engine.warmup()
                        short = [run_requests(other_engine, [request(40)]) for _ in range(cfg.ttfa_rounds)]
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
