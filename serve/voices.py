"""Voice references: decoding client clips, codec-encoding them once, and named presets.

A voice is a (transcript, clip) pair; in the prompt it becomes a user message with the
transcript and an assistant message with the clip's codec codes, placed before the text to
speak (spec llm.md §5.2).

Preset directory layouts (all may be mixed in one `--voices DIR`):
* `config.json` as in Boson's vLLM server: `{"NAME": {"transcript": "...", "audio_file":
  "x.wav", "system_prompt": "..." (optional)}}`, audio paths relative to DIR;
* `NAME.wav` + `NAME.txt` (upstream examples/voice_prompts; any decodable audio extension);
* `NAME/` holding one audio file + `transcript.txt` (+ optional `system_prompt.txt`); voices
  uploaded through POST /v1/audio/voices are stored this way.
The reserved name `default` means "no reference" (the model picks a voice; fix it with `seed`).
OpenAI's voice names are built in as speaker descriptions (serve/builtin_voices.py); a preset or an
alias of the same name takes precedence.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from engines.api import AudioCodes, SpeechEngine
from engines.audio_io import AudioError, decode_audio, encode_audio, resample, to_pcm16
from serve.builtin_voices import BUILTIN_VOICES
from serve.errors import APIError
from serve.protocol import VoiceCard
from serve.settings import Limits

log = logging.getLogger("serve")

DEFAULT_VOICE = "default"
VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # always fullmatch: "$" lets "a\n" through
_AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".webm")


@dataclasses.dataclass
class Voice:
    name: str
    transcript: str
    wave: np.ndarray | None  # 24 kHz mono float32; None for a built-in voice
    source: str  # "builtin" | "preset" | "uploaded"
    system_prompt: str | None = None
    description: str | None = None  # a built-in voice's speaker description (scene prompt)


_BUILTINS = {name: Voice(name, "", None, "builtin", description=text) for name, text in BUILTIN_VOICES.items()}


def decode_base64(data: str, param: str) -> bytes:
    """Plain base64 or a `data:<mime>;base64,` URL."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, f"{param} is not valid base64 ({exc})", code="invalid_audio", param=param) from exc


async def load_reference(data: bytes, fmt: str | None, limits: Limits, sample_rate: int, param: str) -> np.ndarray:
    """Client clip bytes -> mono float32 at the codec rate, within the configured limits."""
    if len(data) > limits.max_reference_bytes:
        raise APIError(413, f"{param} is {len(data)} bytes; the limit for a reference clip is "
                       f"{limits.max_reference_bytes} bytes", code="audio_too_large", param=param)
    try:
        wave, rate = await asyncio.to_thread(decode_audio, data, fmt, limits.max_reference_seconds)
    except AudioError as exc:
        raise APIError(400, f"{param}: {exc}", code="invalid_audio", param=param) from exc
    seconds = len(wave) / rate
    if seconds < limits.min_reference_seconds:
        raise APIError(400, f"{param} is {seconds:.2f} s long; a reference clip needs at least "
                       f"{limits.min_reference_seconds:g} s", code="invalid_audio", param=param)
    return await asyncio.to_thread(resample, wave, rate, sample_rate)


class ReferenceEncoder:
    """`engine.encode_reference` behind a content-hash cache: the same clip (sha256 of its 24 kHz
    PCM16) is encoded once, however many requests clone it, and concurrent requests for one clip
    share the encoding."""

    def __init__(self, engine: SpeechEngine, max_entries: int = 256):
        self._engine = engine
        self._max_entries = max_entries
        self._cache: collections.OrderedDict[str, asyncio.Future] = collections.OrderedDict()

    async def encode(self, wave: np.ndarray) -> AudioCodes:
        key = hashlib.sha256(to_pcm16(wave)).hexdigest()
        future = self._cache.get(key)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(self._encode, wave))
            self._cache[key] = future
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        try:
            return await asyncio.shield(future)
        except BaseException:
            if future.done() and self._cache.get(key) is future:
                del self._cache[key]  # failures are not cached
            raise

    def _encode(self, wave: np.ndarray) -> AudioCodes:
        try:
            return self._engine.encode_reference(wave)
        except NotImplementedError as exc:
            raise APIError(501, "voice cloning needs the codec encoder graph (codec_encoder.onnx), which this "
                           "server's engine does not provide; use a request without a reference voice",
                           code="voice_cloning_unavailable") from exc


class VoiceLibrary:
    """Named voices: presets from a directory plus uploads; OpenAI names resolve through aliases."""

    def __init__(self, voices_dir: Path | None, aliases: dict[str, str], encoder: ReferenceEncoder,
                 limits: Limits, sample_rate: int):
        self._dir = voices_dir
        self._aliases = dict(aliases)
        self._encoder = encoder
        self._limits = limits
        self._rate = sample_rate
        self._voices: dict[str, Voice] = {}
        self._add_lock = asyncio.Lock()

    # startup ---------------------------------------------------------------------------------
    async def load(self) -> None:
        """Read the preset directory and encode every preset once. A broken preset stops startup
        (a misconfigured voice should not surface as per-request 400s); a missing encoder does
        not: presets then fail per request with the 501 that explains it."""
        if self._dir is not None:
            for name, (transcript, audio_path, system_prompt) in sorted(_scan(self._dir).items()):
                try:
                    wave = await load_reference(audio_path.read_bytes(), audio_path.suffix.lstrip("."),
                                                self._limits, self._rate, str(audio_path))
                except APIError as exc:
                    raise ValueError(f"voice preset {name!r}: {exc.message}") from exc
                self._voices[name] = Voice(name, transcript, wave, "preset", system_prompt)
        for alias, target in self._aliases.items():
            if target not in self._voices and target not in _BUILTINS:
                raise ValueError(f"voice alias {alias!r} points to {target!r}, which is neither a preset in "
                                 f"{self._dir} nor a built-in voice")
        for voice in self._voices.values():
            try:
                await self._encoder.encode(voice.wave)
            except APIError as exc:
                log.warning("voice presets not encoded at startup: %s", exc.message)
                break
        log.info("voices: %d presets %s, aliases %s", len(self._voices), sorted(self._voices), self._aliases)

    # requests --------------------------------------------------------------------------------
    def resolve(self, name: str, param: str) -> Voice | None:
        """The voice for a name or alias; None for `default`; 400 for anything else."""
        if name == DEFAULT_VOICE:
            return None
        target = self._aliases.get(name, name)
        voice = self._voices.get(target) or _BUILTINS.get(target)
        if voice is None:
            known = sorted({DEFAULT_VOICE, *self._voices, *self._aliases, *_BUILTINS})
            raise APIError(400, f"unknown voice {name!r}; this server has: {', '.join(known)} "
                           "(upload one with POST /v1/audio/voices)", code="voice_not_found", param=param)
        return voice

    async def encode(self, wave: np.ndarray) -> AudioCodes:
        return await self._encoder.encode(wave)

    def cards(self) -> list[VoiceCard]:
        aliases = collections.defaultdict(list)
        for alias, target in self._aliases.items():
            aliases[target].append(alias)
        builtins = [v for name, v in _BUILTINS.items() if name not in self._voices and name not in self._aliases]
        return [VoiceCard(id=DEFAULT_VOICE, name=DEFAULT_VOICE, transcript="", source="builtin",
                          description="no voice given: the model picks one (fix it with seed)")] + [
            VoiceCard(id=v.name, name=v.name, transcript=v.transcript, aliases=sorted(aliases[v.name]), source=v.source,
                      description=v.description)
            for v in builtins + sorted(self._voices.values(), key=lambda v: v.name)]

    async def add(self, name: str, transcript: str, audio: bytes, fmt: str | None) -> Voice:
        """Validate, encode and keep a new voice; stored under DIR/NAME/ when a directory is set
        (otherwise it lives until restart). At most `limits.max_uploaded_voices` uploads are kept
        (each holds its waveform in memory); DELETE frees a place."""
        if not VOICE_NAME.fullmatch(name):
            raise APIError(400, "name must be 1-64 characters of letters, digits, '_', '.', '-' and start with a "
                           "letter or digit", param="name")
        transcript = transcript.strip()
        if not transcript or len(transcript) > self._limits.max_input_chars:
            raise APIError(400, f"transcript must be 1-{self._limits.max_input_chars} characters of what the clip "
                           "says", param="transcript")
        self._check_new(name)  # before the decode and encode work, and again under the lock
        wave = await load_reference(audio, fmt, self._limits, self._rate, "audio")
        await self._encoder.encode(wave)
        async with self._add_lock:
            self._check_new(name)
            if self._dir is not None:
                await asyncio.to_thread(self._store, name, transcript, wave)
            voice = self._voices[name] = Voice(name, transcript, wave, "uploaded")
        log.info("voice %r added (%.2f s, stored=%s)", name, len(wave) / self._rate, self._dir is not None)
        return voice

    async def delete(self, name: str) -> None:
        """Forget an uploaded voice and remove the NAME/ directory its upload wrote. Presets (files
        an operator put in the voices directory) are never deleted through the API."""
        async with self._add_lock:
            voice = self._voices.get(name) if VOICE_NAME.fullmatch(name) else None
            if voice is None:
                raise APIError(404, f"no uploaded voice {name!r}", code="voice_not_found", param="name")
            if voice.source != "uploaded":
                raise APIError(403, f"voice {name!r} is a preset of the server's voices directory; only voices "
                               "uploaded through POST /v1/audio/voices can be deleted", code="voice_is_preset",
                               param="name")
            if self._dir is not None:
                await asyncio.to_thread(shutil.rmtree, self._dir / name)
            del self._voices[name]
        log.info("voice %r deleted", name)

    def _check_new(self, name: str) -> None:
        """409 for a name that is taken: a voice, an alias, a built-in voice, or any entry of the voices
        directory (config.json, a clip, a folder): uploads write DIR/NAME/ and nothing else."""
        if (name == DEFAULT_VOICE or name in self._voices or name in self._aliases or name in _BUILTINS
                or (self._dir is not None and os.path.lexists(self._dir / name))):
            raise APIError(409, f"the name {name!r} is taken on this server; pick another name", code="voice_exists",
                           param="name")
        uploaded = sum(v.source == "uploaded" for v in self._voices.values())
        if uploaded >= self._limits.max_uploaded_voices:
            raise APIError(429, f"this server keeps at most {self._limits.max_uploaded_voices} uploaded voices; "
                           "delete one first (DELETE /v1/audio/voices/{name})", code="voice_quota_exceeded",
                           param="name")

    def _store(self, name: str, transcript: str, wave: np.ndarray) -> None:
        """Write NAME/ atomically: a crash leaves no half-written preset to break the next startup."""
        self._dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self._dir))
        try:
            (staging / "audio.wav").write_bytes(encode_audio(wave, self._rate, "wav"))
            (staging / "transcript.txt").write_text(transcript + "\n", encoding="utf-8")
            staging.rename(self._dir / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _scan(root: Path) -> dict[str, tuple[str, Path, str | None]]:
    """name -> (transcript, audio path, system prompt) over the three layouts; none yet if `root` does
    not exist (uploads create it)."""
    found: dict[str, tuple[str, Path, str | None]] = {}
    if not root.is_dir():
        return found

    def add(name: str, transcript: str, audio: Path, system_prompt: str | None = None) -> None:
        if name in found:
            raise ValueError(f"voice preset {name!r} is defined twice in {root}")
        if not VOICE_NAME.fullmatch(name) or name == DEFAULT_VOICE:
            raise ValueError(f"voice preset name {name!r} in {root} is not allowed")
        if not audio.is_file():
            raise ValueError(f"voice preset {name!r}: audio file {audio} does not exist")
        if not transcript.strip():
            raise ValueError(f"voice preset {name!r}: empty transcript")
        found[name] = (transcript.strip(), audio, system_prompt)

    config = root / "config.json"
    config_audio: set[Path] = set()
    if config.is_file():
        for name, entry in json.loads(config.read_text(encoding="utf-8")).items():
            audio = root / entry["audio_file"]
            config_audio.add(audio.resolve())
            add(name, entry["transcript"], audio, entry.get("system_prompt"))
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            clips = [p for p in sorted(path.iterdir()) if p.suffix.lower() in _AUDIO_SUFFIXES]
            if clips and all(c.resolve() in config_audio for c in clips):
                continue  # a folder of clips that config.json names
            if len(clips) != 1 or not (path / "transcript.txt").is_file():
                raise ValueError(f"voice directory {path} needs exactly one audio file and transcript.txt")
            prompt = path / "system_prompt.txt"
            add(path.name, (path / "transcript.txt").read_text(encoding="utf-8"), clips[0],
                prompt.read_text(encoding="utf-8").strip() if prompt.is_file() else None)
        elif path.suffix.lower() in _AUDIO_SUFFIXES and path.resolve() not in config_audio:
            transcript = path.with_suffix(".txt")
            if not transcript.is_file():
                raise ValueError(f"voice clip {path} has no transcript {transcript.name}")
            add(path.stem, transcript.read_text(encoding="utf-8"), path)
    return found
