"""A `SpeechEngine` without a model, for the server tests (test support only).

Faithful to the protocol where the server relies on it: `submit()` puts requests in a bounded
queue (QueueFull when full); one worker thread runs up to `max_batch` generations a decode
"step" at a time (one 40 ms frame each) and pushes events through `Generation.push`, so they
cross threads exactly like the real engine's; `cancel()` is honoured at the next step; the audio
is a pure function of (seed, prompt text), so a seeded request is reproducible. It keeps a
record of what it was asked (`submitted`, `results`, `encode_calls`, `shutdown_calls`) and has
test controls (`pause`, `resume`, `ready_flag`, `fail_marker`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import os
import threading
import time

import numpy as np

from engines.api import AudioChunk, AudioCodes, Finished, Generation, QueueFull, SpeechRequest

FRAME = 960  # samples per step at 24 kHz (25 frames/s)
AUDIO_EOS = 1025


@dataclasses.dataclass
class _Run:
    generation: Generation
    frames: int  # length the "model" wants before it stops by itself
    prompt_tokens: int
    rng: np.random.Generator
    freq: float
    steps: int = 0
    pending: list = dataclasses.field(default_factory=list)


class FakeEngine:
    model_name = "fake-higgs"
    sample_rate = 24000

    def __init__(self, *, max_batch: int = 4, max_queue: int = 8, step_s: float = 0.002, frames_per_chunk: int = 4,
                 frames: tuple[int, int] = (12, 30), encoder: bool = True, fail_marker: str | None = None):
        self.max_batch, self.max_queue = max_batch, max_queue
        self.step_s, self.frames_per_chunk, self.frames = step_s, frames_per_chunk, frames
        self.encoder, self.fail_marker = encoder, fail_marker
        self.ready_flag = True
        self.submitted: list[SpeechRequest] = []
        self.results: dict[str, Finished] = {}
        self.encode_calls = 0
        self.shutdown_calls: list[bool] = []
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Run] = collections.deque()
        self._active: list[_Run] = []
        self._paused = False
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
        self._thread.start()

    # SpeechEngine ----------------------------------------------------------------------------
    def ready(self) -> bool:
        return self.ready_flag and not self._stopping

    def submit(self, request: SpeechRequest, loop=None) -> Generation:
        with self._cond:
            if self._stopping:
                raise RuntimeError("engine is shut down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(retry_after=0.5)
            generation = Generation(request, loop)
            self._waiting.append(self._plan(generation))
            self.submitted.append(request)
            self._cond.notify_all()
        return generation

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._waiting)

    def encode_reference(self, wave_24k: np.ndarray) -> AudioCodes:
        if not self.encoder:
            raise NotImplementedError("fake engine built without a codec encoder")
        with self._cond:
            self.encode_calls += 1
        digest = hashlib.sha256(np.asarray(wave_24k, np.float32).tobytes()).digest()
        frames = math.ceil(len(wave_24k) / FRAME)
        codes = np.random.default_rng(int.from_bytes(digest[:8], "little")).integers(0, 1024, (8, frames))
        return AudioCodes(codes.astype(np.int64))

    def shutdown(self, drain: bool = True) -> None:
        with self._cond:
            self.shutdown_calls.append(drain)
            self._stopping = True
            self._paused = False
            if not drain:
                for run in [*self._waiting, *self._active]:
                    run.generation.cancel()
            self._cond.notify_all()
        self._thread.join()

    # test controls -----------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop admitting and stepping: requests pile up in the queue."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    # worker ------------------------------------------------------------------------------------
    def _plan(self, generation: Generation) -> _Run:
        request = generation.request
        texts = [piece for m in request.messages for piece in m.content if isinstance(piece, str)]
        codes = [piece for m in request.messages for piece in m.content if isinstance(piece, AudioCodes)]
        seed = request.sampling.seed if request.sampling.seed is not None else int.from_bytes(os.urandom(8), "little")
        digest = hashlib.sha256(f"{seed}|{'|'.join(texts)}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        prompt_tokens = sum(len(t.split()) for t in texts) + 5 * len(request.messages) + sum(
            c.codes.shape[1] + 9 for c in codes)
        return _Run(generation, int(rng.integers(self.frames[0], self.frames[1] + 1)), prompt_tokens, rng,
                    float(rng.uniform(120.0, 400.0)))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (self._paused or not (self._waiting or self._active)):
                    self._cond.wait()
                if self._stopping and not (self._waiting or self._active):
                    return
                while self._waiting and len(self._active) < self.max_batch:
                    self._active.append(self._waiting.popleft())
                batch = list(self._active)
            time.sleep(self.step_s)
            done = [run for run in batch if self._step(run)]
            with self._cond:
                self._active = [run for run in self._active if run not in done]

    def _step(self, run: _Run) -> bool:
        """One decode step of one generation; True when it finished."""
        request = run.generation.request
        if run.generation.cancelled:
            return self._finish(run, "cancelled", None)
        if self.fail_marker and any(self.fail_marker in p for m in request.messages for p in m.content
                                    if isinstance(p, str)):
            return self._finish(run, "error", None, error="fake engine failure")
        t = (run.steps * FRAME + np.arange(FRAME)) / self.sample_rate
        frame = 0.3 * np.sin(2 * np.pi * run.freq * t) + 0.02 * run.rng.standard_normal(FRAME)
        run.pending.append(frame.astype(np.float32))
        run.steps += 1
        if run.steps >= run.frames:
            return self._finish(run, "stop", AUDIO_EOS)
        if run.steps >= request.max_tokens:
            return self._finish(run, "length", None)
        if len(run.pending) >= self.frames_per_chunk:
            self._flush(run)
        return False

    def _flush(self, run: _Run) -> None:
        if run.pending:
            run.generation.push(AudioChunk(np.concatenate(run.pending)))
            run.pending = []

    def _finish(self, run: _Run, reason: str, stop_reason, error: str | None = None) -> bool:
        if reason != "cancelled":
            self._flush(run)
        finished = Finished(reason, stop_reason, run.prompt_tokens, run.steps, run.steps * FRAME / self.sample_rate,
                            error)
        with self._cond:
            self.results[run.generation.request.request_id] = finished
        run.generation.push(finished)
        return True
