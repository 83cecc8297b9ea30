"""The engine's pieces as the sections drive them on random weights.

Random checkpoints end their audio after 1-5 s on purpose, so a timed request would stop at a
random length: `no_stream_eos` masks the stream-EOS logit and every greedy request runs exactly
max_tokens audio steps. `run_requests` drives `Engine.step` by hand and times each step, the time
to first audio and the codec's share (through `TimedDecoder`); `stream_decode` feeds a
`StreamingDecoder` one frame per push, as the decode loop does; `cpu_session` opens a graph with
the engine's session options.
"""

from __future__ import annotations

import time

import numpy as np

from engines.codec import STREAM_MAX_FRAMES, StreamingDecoder

LOOP_TEXT = (
    "The quick brown fox jumps over the lazy dog, and then it keeps on running through the forest until the "
    "sun goes down behind the distant hills."
)


def cpu_session(path, threads: int | None, spinning: bool = False):
    """An ONNX Runtime CPU session of the graph at `path` with the engine's session options."""
    from engines.ort_runtime import open_session, session_options

    return open_session(path, session_options("cpu", threads, spinning), ["CPUExecutionProvider"])


def no_stream_eos(inner):
    """The runtime with the stream-EOS logit masked, so a greedy request on random weights runs exactly
    max_tokens audio steps (the random checkpoints end their audio after 1-5 s on purpose)."""
    from engines.runtime import BackboneRuntime

    class NoStreamEos(BackboneRuntime):
        name = inner.name

        def __init__(self):
            super().__init__(inner.manifest, inner.max_batch, inner.max_len)
            self.eos = inner.spec.stream_eos_id
            self.has_prefill_graph = inner.has_prefill_graph  # prefill() runs split without the prefill graph

        @property
        def scratch_position(self):
            return inner.scratch_position

        def reserve(self, positions):
            inner.reserve(positions)

        def release(self, slot):
            inner.release(slot)

        def run(self, graph, slot, inputs):
            return inner.run(graph, slot, inputs)

        def audio_step(self, slots, codes, cache_lengths):
            logits = inner.audio_step(slots, codes, cache_lengths)  # a copy (fancy-indexed rows)
            logits[..., self.eos] = -np.inf
            return logits

        def close(self):
            inner.close()

    return NoStreamEos()


class TimedDecoder:
    """CodecDecoder proxy that accumulates decode time (the loop's streaming codec share)."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, codes, context=(0, 0)):
        started = time.perf_counter()
        try:
            return self.inner.decode(codes, context)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def run_requests(engine, requests) -> dict:
    """Submit `requests` to an engine whose codec is a `TimedDecoder` and step it until idle: time to
    first audio per request, the first step (admit + prefill), the mean later step, graph and codec
    seconds per step, tokens and finish reasons."""
    from engines.api import AudioChunk, Finished

    engine.codec.reset()
    steps0, graph0 = engine.stats.steps, engine.stats.graph_seconds
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
    steps = engine.stats.steps - steps0
    steady = step_times[1:]  # the first step also admits and prefills
    return {
        "ttfa": first,
        "steps": steps,
        "first_step": step_times[0],
        "step": sum(steady) / len(steady),
        "graph": (engine.stats.graph_seconds - graph0) / steps,
        "codec": engine.codec.seconds / steps,
        "tokens": [f.completion_tokens if f else 0 for f in finished],
        "reasons": sorted({f.finish_reason if f else "none" for f in finished}),
    }


def stream_decode(decoder, codes: np.ndarray, min_frames: int, max_frames: int = STREAM_MAX_FRAMES) -> np.ndarray:
    """`codes` (n_q, T) through a StreamingDecoder, one frame per push as the loop feeds it, then flushed."""
    streamer = StreamingDecoder(decoder, min_frames=min_frames, max_frames=max_frames)
    parts = [streamer.push(codes[:, i : i + 1]) for i in range(codes.shape[1])]
    return np.concatenate(parts + [streamer.flush()])
