"""What the decode loop holds per slot: the per-step state of every slot as arrays, and the rest of a request in flight.

The per-step state (latest token, cache length, step count, sampling parameters, next feed) is one
array per field, indexed by slot, so a step reads and writes it for all sequences at once; what is
rare or per request (its handle, RNG, stop matcher, segments) lives in one `SlotSequence` each.
"""

from __future__ import annotations

import dataclasses
import enum
import time

import numpy as np

from .api import Generation, SamplingParams, SpeechRequest
from .codec import StreamingDecoder
from .prompt import StopMatcher


class Feed(enum.IntEnum):
    """What a slot feeds the backbone at the end of the step."""

    NONE = 0
    AUDIO = 1  # an audio column, from SlotState.feed_audio
    TEXT = 2  # a text token, from SlotState.feed_token


class SlotState:
    """The per-step state of every slot, one array per field indexed by slot."""

    def __init__(self, slots: int, num_codebooks: int):
        self.last_token = np.zeros(slots, np.int64)  # decides the next step: AUDIO_INIT, audio column or text
        self.cache_length = np.zeros(slots, np.int64)  # positions in the KV cache
        self.steps = np.zeros(slots, np.int64)  # generation steps taken
        self.max_tokens = np.zeros(slots, np.int64)
        self.temperature = np.zeros(slots)
        self.top_k = np.zeros(slots, np.int64)  # 0: off
        self.top_p = np.ones(slots)
        self.ras_window = np.zeros(slots, np.int64)  # 0: off
        self.ras_max_repeat = np.zeros(slots, np.int64)
        self.feed_kind = np.full(slots, Feed.NONE, np.int8)
        self.feed_audio = np.zeros((slots, num_codebooks), np.int64)
        self.feed_token = np.zeros(slots, np.int64)

    def admit(self, slot: int, prompt_ids: np.ndarray, max_tokens: int, params: SamplingParams) -> None:
        """A new sequence in `slot`, its prompt already in the cache."""
        self.last_token[slot] = prompt_ids[-1]
        self.cache_length[slot] = len(prompt_ids)
        self.steps[slot] = 0
        self.max_tokens[slot] = max_tokens
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = params.temperature, params.top_k or 0, params.top_p
        self.ras_window[slot], self.ras_max_repeat[slot] = max(params.ras_window, 0), params.ras_max_repeat
        self.feed_kind[slot] = Feed.NONE


@dataclasses.dataclass
class SlotSequence:
    """One request in flight: what is rare or per request (the per-step state is in `SlotState`)."""

    request: SpeechRequest
    handle: Generation
    slot: int
    prompt_tokens: int
    rng: np.random.Generator
    stop: StopMatcher
    streamer: StreamingDecoder | None  # None: no codec (LLM-only artifacts), segments only
    text_logits: np.ndarray | None = None
    text_ids: list[int] = dataclasses.field(default_factory=list)
    segments: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # closed [start, stop) in the column log
    segment_start: int | None = None  # where the open segment starts in the column log
    audio_samples: int = 0
    audio_ended: bool = False  # the latest audio segment ended by itself (stream EOS)
    submitted_at: float = dataclasses.field(default_factory=time.monotonic)
