"""One generation as the server sees it, from submit to the end of its response.

The engine decodes on its own thread and pushes events into the request's event loop
(`engines.api.Generation`). A `Job` wraps that handle with what the server adds on the way through:
metrics, request logs, and cancellation when the client leaves (`JobStream` for streamed
responses, `collect` for whole ones). A finished job is told in OpenAI's terms here
(`FINISH_REASONS`, `usage`), and `shutdown_engine` drains what is in flight when the server stops.
The routes (serve/app.py) create jobs; the stream bodies (serve/streams.py) read them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator

import numpy as np
from fastapi import Request
from fastapi.responses import StreamingResponse

from engines.api import AudioChunk, Finished, SpeechEngine
from serve.errors import APIError
from serve.metrics import Metrics
from serve.protocol import UsageInfo

log = logging.getLogger("serve")

# engine finish reasons -> OpenAI's; "abort" (vLLM's word) when the server cancelled the generation
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


class Job:
    """A submitted generation: its events with metrics and logs on the way through, and
    `abandon()` for a client that left before the end."""

    def __init__(self, generation, endpoint: str, metrics: Metrics, sample_rate: int):
        self.generation = generation
        self.request_id = generation.request.request_id
        self.endpoint = endpoint
        self.finished: Finished | None = None
        self._metrics = metrics
        self._rate = sample_rate
        self._submitted = time.perf_counter()
        self._first_audio: float | None = None
        self._samples = 0
        self._open = True
        metrics.in_flight.inc()

    async def events(self) -> AsyncIterator[AudioChunk | Finished]:
        async for event in self.generation.events():
            if isinstance(event, AudioChunk) and len(event.pcm):
                if self._first_audio is None:
                    self._first_audio = time.perf_counter() - self._submitted
                    self._metrics.ttfa.labels(self.endpoint).observe(self._first_audio)
                    log.info("req %s: first audio after %.3f s", self.request_id, self._first_audio)
                self._samples += len(event.pcm)
                yield event
            elif isinstance(event, Finished):
                self._finish(event)
                yield event

    def abandon(self, cause: str) -> None:
        """Cancel the generation unless it already finished; idempotent."""
        if not self._open:
            return
        self.generation.cancel()
        self._close()
        self._metrics.cancelled.labels(cause).inc()
        log.info("req %s: %s after %.2f s of audio; generation cancelled", self.request_id, cause,
                 self._samples / self._rate)

    def _finish(self, finished: Finished) -> None:
        self.finished = finished
        self._close()
        self._metrics.audio_seconds.labels(self.endpoint).inc(finished.audio_seconds)
        first = f"{self._first_audio:.3f} s" if self._first_audio is not None else "never"
        log.info("req %s: finished (%s): prompt %d tokens, %d steps, %.2f s audio, first audio %s, total %.2f s",
                 self.request_id, finished.finish_reason, finished.prompt_tokens, finished.completion_tokens,
                 finished.audio_seconds, first, time.perf_counter() - self._submitted)
        if finished.finish_reason == "error":
            log.error("req %s: engine error: %s", self.request_id, finished.error)

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._metrics.in_flight.dec()


class JobStream(StreamingResponse):
    """A streaming response that cancels its job when the stream ends early. Starlette stops the
    body iterator when the client disconnects (or a send fails); either way we land here."""

    def __init__(self, job: Job, content, media_type: str):
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.abandon("disconnect")


async def collect(job: Job, request: Request) -> tuple[np.ndarray, Finished] | None:
    """All audio of a non-streaming job, or None if the client disconnected first (then the job
    is cancelled). Engine failures become 500 / 503 errors."""

    async def gather():
        chunks = []
        async for event in job.events():
            if isinstance(event, AudioChunk):
                chunks.append(event.pcm)
            else:
                return chunks, event

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gathering, watching = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({gathering, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not gathering.done():
            gathering.cancel()
            job.abandon("disconnect" if watching.done() else "server cancelled")
    if not gathering.done() or gathering.cancelled():
        return None
    chunks, finished = gathering.result()
    _raise_for_failure(finished)
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), finished


def _raise_for_failure(finished: Finished) -> None:
    if finished.finish_reason == "error":
        raise APIError(500, f"generation failed: {finished.error or 'engine error'}", code="generation_failed")
    if finished.finish_reason == "cancelled":
        raise APIError(503, "generation was cancelled: the server is shutting down; retry", code="cancelled",
                       headers={"Retry-After": "5"})


def usage(finished: Finished) -> UsageInfo:
    return UsageInfo(prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens,
                     total_tokens=finished.prompt_tokens + finished.completion_tokens)


def shutdown_engine(engine: SpeechEngine, timeout_s: float) -> None:
    """engine.shutdown(drain=True) bounded in time; past the budget, cancel what is left."""
    log.info("shutting down: draining in-flight generations (up to %.0f s)", timeout_s)
    drainer = threading.Thread(target=engine.shutdown, kwargs={"drain": True}, daemon=True)
    drainer.start()
    drainer.join(timeout_s)
    if drainer.is_alive():
        log.warning("drain took longer than %.0f s; cancelling the remaining generations", timeout_s)
        engine.shutdown(drain=False)
