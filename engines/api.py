"""What the server hands to the decode loop and what it gets back: plain data, no HTTP, no torch.

The server (serve/) turns OpenAI wire requests into a `SpeechRequest`, submits it to a
`SpeechEngine` and consumes `Event`s from the returned `Generation` handle. The engine runs
generation on its own worker thread; events cross into asyncio through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from typing import AsyncIterator, Callable, Literal, Protocol, Union

import numpy as np

SAMPLE_RATE = 24000


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature 0 means greedy; top_k None/0 and top_p 1.0 mean off."""

    temperature: float = 0.7
    top_k: int | None = None
    top_p: float = 0.95
    ras_window: int = 7  # repetition-aware sampling window; <= 0 disables RAS
    ras_max_repeat: int = 2
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class AudioCodes:
    """Codec codes of one reference clip: int64 (num_codebooks, frames), values in [0, 1023]."""

    codes: np.ndarray


@dataclasses.dataclass(frozen=True)
class SpecialToken:
    """One special token by name (e.g. "<|scene_desc_start|>", "<SE>"). Text pieces are tokenized as
    plain text, so structure (scene blocks, sound-event tags) enters a prompt only as these pieces,
    placed by the server's own prompt building, never parsed out of client text."""

    name: str


Content = Union[str, AudioCodes, SpecialToken]


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat message: role is system | user | assistant; content pieces are rendered in order."""

    role: str
    content: tuple[Content, ...]


@dataclasses.dataclass
class SpeechRequest:
    messages: list[Message]
    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = None  # generation steps, each counts once (spec §5.7); None = what fits in the cache
    # max_tokens is a default the server chose, not the client's: the engine lowers it to the room the
    # prompt leaves in the KV cache, where an explicit max_tokens that does not fit is refused
    max_tokens_defaulted: bool = False
    stop_strings: tuple[str, ...] = ("<|end_of_text|>", "<|eot_id|>")
    force_audio: bool = True  # append <|audio_out_bos|> after the assistant header
    request_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    # Already-rendered prompt (goldens, verify): token ids with one <|AUDIO_OUT|> per delayed
    # (N, T+N+1) segment in `prompt_audio`. When set, `messages` is not rendered.
    prompt_ids: np.ndarray | None = None
    prompt_audio: tuple[np.ndarray, ...] = ()


@dataclasses.dataclass(frozen=True)
class AudioChunk:
    """Final PCM samples, float32 mono at SAMPLE_RATE, in playback order."""

    pcm: np.ndarray


@dataclasses.dataclass(frozen=True)
class TextDelta:
    token_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Finished:
    """The last event of a request. The counts default to zero for a request that ended before its prompt ran."""

    finish_reason: Literal["stop", "length", "cancelled", "error"]
    stop_reason: int | str | None = None  # 1025 when the audio stream ended by itself
    prompt_tokens: int = 0
    completion_tokens: int = 0
    audio_seconds: float = 0.0
    error: str | None = None
    # what was generated, for verification and debugging: delayed (N, W) audio segments and the
    # text-side ids in upstream's compressed form (one <|AUDIO_OUT|> per segment)
    segments: tuple[np.ndarray, ...] = ()
    text_ids: tuple[int, ...] = ()


Event = Union[AudioChunk, TextDelta, Finished]


class QueueFull(Exception):
    """The engine's bounded request queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float = 1.0):
        super().__init__("request queue is full")
        self.retry_after = retry_after


class Generation:
    """Handle of one submitted request. The engine pushes events; the consumer iterates them.

    Created on the consumer's event loop (or without one, for blocking use). `cancel()` is
    honoured by the engine within one decode step.
    """

    def __init__(self, request: SpeechRequest, loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self._loop = loop
        self._async_queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._sync_events: list[Event] = []
        self._polled = 0
        self._sync_cond = threading.Condition()
        self._cancelled = threading.Event()

    # engine side -------------------------------------------------------------
    def push(self, event: Event) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_queue.put_nowait, event)
            except RuntimeError:  # consumer's loop closed: nobody is listening any more
                self._cancelled.set()
        else:
            with self._sync_cond:
                self._sync_events.append(event)
                self._sync_cond.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # consumer side -----------------------------------------------------------
    def cancel(self) -> None:
        self._cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        assert self._async_queue is not None, "Generation was created without an event loop"
        while True:
            event = await self._async_queue.get()
            yield event
            if isinstance(event, Finished):
                return

    def poll(self) -> list[Event]:
        """Events pushed since the last poll, without waiting (for callers that drive the engine inline)."""
        with self._sync_cond:
            events = self._sync_events[self._polled :]
            self._polled = len(self._sync_events)
        return events

    def iter_blocking(self):
        """Blocking iteration for CLIs and tests without asyncio."""
        index = 0
        while True:
            with self._sync_cond:
                while index >= len(self._sync_events):
                    self._sync_cond.wait()
                event = self._sync_events[index]
            index += 1
            yield event
            if isinstance(event, Finished):
                return


class SpeechEngine(Protocol):
    """What the server needs from the decode loop (implemented by engines.loop.Engine)."""

    model_name: str
    sample_rate: int

    def ready(self) -> bool:
        """True once graphs are loaded and warmed."""

    def submit(self, request: SpeechRequest, loop: asyncio.AbstractEventLoop | None = None) -> Generation:
        """Queue a request; raises QueueFull when the bounded queue is full."""

    def queue_depth(self) -> int:
        """Requests waiting for a decode slot."""

    def encode_reference(self, wave_24k: np.ndarray) -> AudioCodes:
        """Codec-encode a 24 kHz mono float32 reference clip (voice cloning)."""

    def add_finish_listener(self, callback: Callable[[SpeechRequest, Finished], None]) -> None:
        """callback(request, finished) as each request ends, cancelled ones included (metrics)."""

    def shutdown(self, drain: bool = True) -> None:
        """Stop the worker: finish (drain) or cancel what is running."""
