"""Server configuration: one frozen dataclass built by the CLI (serve/__main__.py) or by tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from engines.api import SamplingParams

Runtime = Literal["ort-cpu", "ort-cuda", "tensorrt"]


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for. Everything beyond is a 4xx that names the limit."""

    max_input_chars: int = 20_000  # all text of a request: target, transcripts, scene description
    max_messages: int = 32
    max_completion_tokens: int = 4096  # upper bound for max_completion_tokens (steps, §5.7)
    default_max_tokens: int = 1024  # when the request names none: about 40 s of audio, or what fits in the
    # KV cache beside the prompt when that is less (serve/app.py)
    max_body_bytes: int = 24 * 2**20  # checked before parsing; base64 inflates audio by 4/3
    max_reference_bytes: int = 16 * 2**20  # one encoded reference clip
    min_reference_seconds: float = 0.5
    max_reference_seconds: float = 30.0
    max_references: int = 4  # reference clips in one request
    max_uploaded_voices: int = 32  # POST /v1/audio/voices; each keeps up to 30 s of 24 kHz float32 in memory
    header_timeout_s: float = 10.0  # a connection that has not sent a complete request head by then is closed
    body_timeout_s: float = 30.0  # longest wait for the next piece of a request body (408 after)


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Everything the app needs besides the engine.

    `sampling` holds the defaults for fields a request leaves out. They are upstream's serve
    engine defaults (spec llm.md §6.1: temperature 0.7, top_p 0.95, top_k off, RAS window 7 /
    max 2 repeats), not the hosted example's (which sends temperature 1.0, top_k 50 itself).

    `voice_aliases` maps names clients send to preset names in `voices_dir` or to built-in voices
    (OpenAI's alloy, ash, ballad, coral, echo, fable, nova, onyx, sage, shimmer, verse, marin, cedar
    are built in, serve/builtin_voices.py; an alias or preset of the same name overrides them); a
    name that is none of these is a 400, never a silent fallback.
    """

    artifacts: Path | None = None
    model_name: str = "higgs-audio-v2"
    aliases: tuple[str, ...] = ("boson-audio-multimodal-checkpoint-1200",)
    host: str = "127.0.0.1"
    port: int = 8000
    runtime: Runtime = "ort-cpu"
    max_batch: int = 8
    max_len: int = 2048  # KV cache positions per slot: prompt + generated steps
    queue_size: int = 64
    api_keys: tuple[str, ...] = ()
    voices_dir: Path | None = None
    voice_aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    sampling: SamplingParams = SamplingParams()
    limits: Limits = Limits()
    shutdown_timeout_s: float = 30.0  # drain budget for in-flight generations on shutdown
    normalize_text: bool = True  # speech input normalised as upstream's generation example (serve/textnorm.py)
    # long text (serve/longform.py): chunks of at most this many characters, and how many previous
    # chunks each chunk's prompt keeps. 200 characters of English are about 13 s of speech (~340
    # audio positions, 45-65 Llama-3 tokens), so two carried chunks, a scene prompt and the default
    # max_tokens (1024) fit the default 2048-position KV cache; at 300 only one would.
    chunk_chars: int = 200
    chunk_context: int = 2

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.aliases)
