"""Event delivery: every request gets its events in order, with a step's audio decoded in batched codec calls.

During a step the decode loop posts each request's events (`TextDelta`, `Finished`) and codec
windows (`DecodeWindow`, the audio frames that became final). At the end of the step `flush` hands
them all to one codec thread, which decodes every window of the step in batched calls
(`decode_windows`) while the engine runs the next backbone step, then pushes each request's events
in order; one worker keeps the steps in order too. Without a codec there are no windows and the
events are pushed at once, on the engine thread. A codec failure ends that step's requests with
finish_reason "error"; the engine raises it at its next step (`take_error`).
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from .api import AudioChunk, Event, Finished, Generation, SpeechRequest
from .codec import DecodeWindow

log = logging.getLogger("higgs.engine")

FinishListener = Callable[[SpeechRequest, Finished], None]
DecodeWindows = Callable[[list[DecodeWindow]], list[np.ndarray]]  # `engines.codec.decode_windows` on a codec


class Delivery:
    def __init__(self, decode: DecodeWindows | None):
        """decode: the windows' PCM in batched codec calls; None without a codec."""
        self._decode = decode
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="higgs-codec") if decode is not None else None
        self._outboxes: dict[Generation, list[Event | DecodeWindow]] = {}  # this step's items per request, in order
        self._latest: Future | None = None  # the latest step's delivery
        self._error: Exception | None = None
        self._listeners: list[FinishListener] = []

    def add_listener(self, callback: FinishListener) -> None:
        self._listeners.append(callback)

    def post(self, handle: Generation, item: Event | DecodeWindow) -> None:
        """Queue an event or a codec window for the end of this step."""
        self._outboxes.setdefault(handle, []).append(item)

    def end(self, handle: Generation, finished: Finished) -> None:
        """Deliver a request's Finished now (to the listeners, then the consumer)."""
        for callback in self._listeners:
            callback(handle.request, finished)
        handle.push(finished)

    def flush(self, decode: bool = True) -> None:
        """Hand this step's items over (decode=False: push the events, drop the windows)."""
        batch, self._outboxes = list(self._outboxes.items()), {}
        if not batch:
            return
        if self._thread is None:
            self._push(batch, decode=False)
        else:
            self._latest = self._thread.submit(self._push, batch, decode)

    def wait(self) -> None:
        """Until everything handed over has been delivered."""
        if self._latest is not None:
            self._latest.result()
            self._latest = None

    def take_error(self) -> Exception | None:
        """The codec failure of an earlier step, once."""
        error, self._error = self._error, None
        return error

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)

    def _push(self, batch: list[tuple[Generation, list[Event | DecodeWindow]]], decode: bool) -> None:
        windows = [item for _, items in batch for item in items if isinstance(item, DecodeWindow)]
        pcm, error = [None] * len(windows), None
        if decode and windows:
            try:
                pcm = self._decode(windows)
            except Exception as failure:  # the requests of this batch end as errors; the engine step raises it next
                log.exception("codec decode failed")
                error = self._error = failure
        chunks = iter(pcm)
        for handle, items in batch:
            for item in items:
                if isinstance(item, DecodeWindow):
                    chunk = next(chunks)
                    if chunk is not None and chunk.size:
                        handle.push(AudioChunk(chunk))
                elif isinstance(item, Finished):
                    if error is not None:
                        item = dataclasses.replace(item, finish_reason="error", error=f"codec: {error}")
                    self.end(handle, item)
                else:
                    handle.push(item)
