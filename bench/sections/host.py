"""`make bench` section 5 `host`: host overhead per step, the decode loop's own work between two backbone calls.

On a GPU the host work of a step (sampling, RAS, the delay pattern, bookkeeping, events) adds to the
device time of every step, so it is measured here with a backbone that costs nothing: the real
`Engine` over a `BackboneRuntime` whose graphs return fixed random outputs instantly, no codec, the
stream EOS masked (so every request stays in its audio segment), 20 warm-up steps, then 100 timed
steps. The real ORT audio step of the same batch is timed beside it so the ratio shows where time goes.
"""

from __future__ import annotations

import time

import numpy as np

from ..common import AUDIO_FRAME_RATE, Section, fmt_ms
from ..profiling import calibrate, time_block

WARMUP_STEPS = 20
TIMED_STEPS = 100
FLOOR_STEP_S = 1.7e-3  # H100 bandwidth floor of a 3B audio step at batch 64 (issue 12)
FRAME_S = 1 / AUDIO_FRAME_RATE  # audio seconds per decode step


def sampling_modes():
    """name -> per-request SamplingParams factory (request index -> params)."""
    from engines.api import SamplingParams

    return {
        "greedy": lambda i: SamplingParams(temperature=0.0),
        "seed sampling": lambda i: SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=i),
        "server default": lambda i: SamplingParams(),
    }


def zero_cost_runtime(manifest, max_batch: int, max_len: int, seed: int = 0):
    """A BackboneRuntime whose graphs return fixed random outputs without computing anything.

    The stream-EOS logit is -inf, so random draws never end a segment and every request stays in
    its audio segment until max_tokens.
    """
    from engines.runtime import BackboneRuntime

    spec = manifest.model
    rng = np.random.default_rng(seed)
    # one text row for every slot (prompts end with <|audio_out_bos|>, so no step samples it)
    text = np.broadcast_to((rng.standard_normal(spec.vocab_size) * 2).astype(np.float32), (max_batch, spec.vocab_size))
    audio = (rng.standard_normal((max_batch, spec.num_codebooks, spec.codebook_stride)) * 2).astype(np.float32)
    audio[..., spec.stream_eos_id] = -np.inf

    class ZeroCost(BackboneRuntime):
        name = "zero-cost"

        def run(self, graph, slot, inputs):
            rows = len(inputs["cache_lengths"])
            outputs = {"text_logits": text[:rows], "audio_logits": audio[:rows]}
            return {k: v for k, v in outputs.items() if graph == "prefill" or k.startswith(graph)}

    return ZeroCost(manifest, max_batch, max_len)


def zero_cost_sampler(manifest, seed: int = 0):
    """`GraphSampler` (all its host-side work) over a session that stands for the sampler graph on the
    device: fixed random codes (never the stream EOS) for the draw and the RAS redraw, no compute."""
    from engines.sampling import GraphSampler

    spec = manifest.model
    codes = np.random.default_rng(seed).integers(0, spec.codebook_size, (2, 1024, spec.num_codebooks))

    class FixedSession:
        def run(self, output_names, feed):
            rows = len(feed["temperature"])
            return codes[0, :rows].copy(), codes[1, :rows].copy()

    return GraphSampler(FixedSession())


def host_step_seconds(manifest, batch: int, params, renderer, sampler=None) -> tuple[float, float]:
    """(wall, CPU) seconds of one Engine.step, the mean over TIMED_STEPS steps after WARMUP_STEPS, all
    `batch` slots busy. The CPU time is the engine thread's own (time.thread_time), which other load
    on the machine inflates far less than the wall time.

    sampler None: the sampler graph's zero-cost stand-in (a GPU deployment); pass `HostSampler()` for
    the CPU engine's numpy sampling.
    """
    from engines.api import SpeechRequest
    from engines.loop import Engine
    from engines.prompt import tts_messages

    steps = WARMUP_STEPS + TIMED_STEPS
    messages = tts_messages("Host overhead of one decode step.")
    engine = Engine(zero_cost_runtime(manifest, batch, 256), codec=None, renderer=renderer, sampler=sampler or zero_cost_sampler(manifest))
    for i in range(batch):
        engine.submit(SpeechRequest(messages, sampling=params(i), max_tokens=steps + 2))
    for _ in range(WARMUP_STEPS):
        engine.step()
    if engine.active_requests() != batch:
        raise RuntimeError(f"{engine.active_requests()} of {batch} requests active after warm-up")
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(TIMED_STEPS):
        engine.step()
    wall, cpu = (time.perf_counter() - wall) / TIMED_STEPS, (time.thread_time() - cpu) / TIMED_STEPS
    engine.run_until_idle()
    return wall, cpu


def ort_audio_step_seconds(manifest, batch: int, context: int = 200) -> float:
    """The real ORT CPU audio step of the same batch (tiny model), for the ratio."""
    from engines.ort_runtime import OrtBackbone

    runtime = OrtBackbone(manifest, max_batch=batch, max_len=context + 64, prefill_graph=False)
    spec = manifest.model
    codes = np.random.default_rng(1).integers(0, spec.codebook_size, (batch, spec.num_codebooks))
    slots, lengths = np.arange(batch), np.full(batch, context, np.int64)

    def step():
        runtime.audio_step(slots, codes, lengths)

    return time_block(step, calibrate(step, 0.3))


def ceiling(batch: int, host_s: float) -> float:
    """Audio seconds per second a GPU at the floor step time could produce, given this host overhead."""
    return batch * FRAME_S / (host_s + FLOOR_STEP_S)


def section_host(ws, cfg, log) -> Section:
    from engines.manifest import Manifest
    from engines.prompt import PromptRenderer
    from engines.sampling import HostSampler

    section = Section("host", "5. Host overhead per step (zero-cost backbone, Engine.step)")
    manifest = Manifest.load(ws.artifacts("tiny"))
    renderer = PromptRenderer(manifest.tokenizer, manifest.model.num_codebooks)
    modes = sampling_modes()
    rows = []

    def best(params, sampler=None) -> tuple[float, float]:  # other load on the machine only ever adds to a run's time
        runs = [host_step_seconds(manifest, batch, params, renderer, sampler) for _ in range(cfg.host_rounds)]
        return min(r[0] for r in runs), min(r[1] for r in runs)

    def cell(t: tuple[float, float]) -> str:
        return f"{fmt_ms(t[0])} ({fmt_ms(t[1])})"

    for batch in cfg.host_batches:
        times = {name: best(params) for name, params in modes.items()}
        on_host = best(modes["seed sampling"], HostSampler())
        ort_step = ort_audio_step_seconds(manifest, batch)
        seed = times["seed sampling"][0]
        log(f"host: batch {batch}: " + ", ".join(f"{n} {cell(t)} ms" for n, t in times.items())
            + f"; seed sampling with HostSampler {cell(on_host)} ms; ORT step {fmt_ms(ort_step)} ms")
        rows.append([batch, *(cell(t) for t in times.values()), cell(on_host), fmt_ms(ort_step), f"{seed / ort_step:.2f}",
                     f"{ceiling(batch, seed):.0f}"])
        section.summary.append((f"host overhead b{batch}, wall (CPU) ms: greedy / seed sampling / server default",
                                " / ".join(cell(t) for t in times.values())))
    section.table(
        f"host ms per Engine.step over a zero-cost backbone, wall (engine thread CPU) ({TIMED_STEPS} steps after "
        f"{WARMUP_STEPS}, best of {cfg.host_rounds} runs) beside the real ORT CPU audio step (tiny model)",
        ["batch", *modes, "seed sampling, HostSampler", "ORT audio step ms (tiny)", "seed / ORT step", "GPU ceiling, audio s/s"],
        rows,
    )
    section.notes.append(
        "greedy = temperature 0 (RAS on, window 7); seed sampling = T 1.0, top-k 50, top-p 0.95, RAS, a seed per request; "
        "server default = T 0.7, top-p 0.95, RAS, no seed. The zero-cost runtime's graphs return fixed random outputs "
        "(stream EOS at -inf), no codec; every slot holds a request in its audio segment. The first three columns "
        "sample with GraphSampler over a stand-in session that returns fixed codes at once (the sampler graph on the "
        "device; its host-side work is counted, ORT's own dispatch of the call is not); HostSampler = numpy sampling "
        "on the host, what the ORT CPU engine uses."
    )
    section.notes.append(
        f"GPU ceiling = batch x {FRAME_S} s / (seed-sampling host overhead + {FLOOR_STEP_S * 1e3} ms, the H100 bandwidth "
        "floor of a 3B audio step at batch 64), wall time: audio seconds per second when the device step sits at its floor."
    )
    return section
