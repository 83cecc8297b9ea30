"""Harness of the server tests: the real engine on the tiny default model, a live uvicorn server,
a recorder on the engine, voice presets.

Every server test runs `engines.loop.Engine` (ONNX Runtime, CPU) built from the
`tiny_artifacts` session fixture (tests/conftest.py): real prompts, real sampling, real codec
decode and encode. The tiny model is random, so its audio is noise of a seed-dependent length;
tests that need a long or short generation pick their seed (and max_completion_tokens) for it.
`Recorder` watches the engine from outside (what the server submitted, how each generation
finished, encoder and shutdown calls) and can inject one runtime fault; nothing is faked.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import soundfile
import uvicorn

from engines.api import Finished, SpeechRequest
from engines.loop import Engine
from serve.app import create_app
from serve.edge import server_options
from serve.settings import Limits, ServeSettings

MODEL = "higgs-audio-v2"
SEED_ALIAS = "boson-audio-multimodal-checkpoint-1200"


class Recorder:
    """Wraps one real engine's `submit`, `encode_reference` and `shutdown` (on the instance) and
    listens to it, to record what the server asked and how each generation ended."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.submitted: list[SpeechRequest] = []
        self.finished: dict[str, Finished] = {}  # request id -> the engine's last event
        self.encode_calls = 0
        self.encoded: list[np.ndarray] = []  # the 24 kHz waveforms the codec encoder got
        self.shutdown_calls: list[bool] = []
        self._lock = threading.Lock()
        submit, encode, shutdown = engine.submit, engine.encode_reference, engine.shutdown
        engine.add_finish_listener(self._record_finish)

        def recording_submit(request, loop=None):
            generation = submit(request, loop)  # raises QueueFull / ValueError: nothing recorded
            with self._lock:
                self.submitted.append(request)
            return generation

        def counting_encode(wave):
            with self._lock:
                self.encode_calls += 1
                self.encoded.append(np.array(wave))
            return encode(wave)

        def recording_shutdown(drain=True, timeout=None):
            self.shutdown_calls.append(drain)
            return shutdown(drain=drain, timeout=timeout)

        engine.submit, engine.encode_reference, engine.shutdown = recording_submit, counting_encode, recording_shutdown

    def _record_finish(self, request: SpeechRequest, finished: Finished) -> None:
        """Runs on the engine thread before the consumer sees the event."""
        with self._lock:
            self.finished[request.request_id] = finished

    def finished_with_prefix(self, prefix: str) -> Finished | None:
        """How the request whose id starts with `prefix` (the client's X-Request-Id) ended, if it has."""
        with self._lock:
            found = [f for request_id, f in self.finished.items() if request_id.startswith(prefix)]
        assert len(found) <= 1, f"several requests with id prefix {prefix!r}"
        return found[0] if found else None

    def fail_next_audio_step(self, message: str = "injected runtime fault") -> None:
        """The runtime's next audio decode step raises (once): a real mid-generation engine failure."""
        runtime = self.engine.runtime
        original = runtime.audio_step

        def failing(*args, **kwargs):
            runtime.audio_step = original
            raise RuntimeError(message)

        runtime.audio_step = failing


def make_engine(artifacts: Path, *, start: bool = True, max_batch: int = 4, max_queue: int = 8, max_len: int = 2048,
                stream_frames: int = 8, endless: bool = False) -> Engine:
    """A real engine on the tiny model with a `Recorder` at `engine.recorder`; started (warmed up,
    worker running) unless start=False. `endless`: the stream-EOS logit is masked, so audio never ends
    by itself and a generation's length is max_tokens whatever path its seed takes on this CPU."""
    engine = Engine.from_artifacts(artifacts, runtime="ort-cpu", max_batch=max_batch, max_len=max_len,
                                   max_queue=max_queue, stream_frames=stream_frames)
    if endless:
        audio_step, eos = engine.runtime.audio_step, engine.spec.stream_eos_id

        def without_eos(*args):
            logits = audio_step(*args)
            logits[..., eos] = -np.inf
            return logits

        engine.runtime.audio_step = without_eos
    engine.recorder = Recorder(engine)
    return engine.start() if start else engine


def artifacts_without_encoder(artifacts: Path, out: Path) -> Path:
    """A copy of `artifacts` (symlinks) whose manifest has no codec_encoder graph: what `make
    export` writes without CODEC."""
    out.mkdir(parents=True, exist_ok=True)
    for path in artifacts.iterdir():
        if path.name not in ("manifest.json", "codec_encoder.onnx"):
            (out / path.name).symlink_to(path.resolve())
    manifest = json.loads((artifacts / "manifest.json").read_text())
    del manifest["graphs"]["codec_encoder"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def tone_wav(seconds: float = 1.0, rate: int = 16000, freq: float = 220.0, channels: int = 1) -> bytes:
    """A PCM16 WAV clip (deliberately not 24 kHz: the server must resample)."""
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.4 * np.sin(2 * np.pi * freq * t)
    if channels > 1:
        wave = np.stack([wave * (1 - 0.3 * c) for c in range(channels)], axis=1)
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_voices(root: Path) -> Path:
    """Presets in two layouts: NAME.wav + NAME.txt, and Boson's config.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "belinda.wav").write_bytes(tone_wav(1.2, freq=180.0))
    (root / "belinda.txt").write_text("Twas the night before Christmas.\n")
    (root / "clips").mkdir()
    (root / "clips" / "man.wav").write_bytes(tone_wav(1.0, rate=44100, freq=110.0))
    (root / "config.json").write_text(
        '{"en_man": {"transcript": "Maintaining your ability to learn.", "audio_file": "clips/man.wav"}}')
    return root


def settings_for(voices_dir: Path | None = None, **overrides) -> ServeSettings:
    limits = overrides.pop("limits", Limits())
    return ServeSettings(model_name=MODEL, voices_dir=voices_dir, voice_aliases={"alloy": "belinda", "echo": "en_man"}
                         if voices_dir else {}, limits=limits, shutdown_timeout_s=10.0, **overrides)


def delta_audio(delta) -> dict | None:
    """A chat stream chunk's delta.audio as a dict: a typed field in recent SDKs, an extra key in older ones."""
    audio = getattr(delta, "audio", None) or (delta.model_extra or {}).get("audio")
    return audio if audio is None or isinstance(audio, dict) else audio.model_dump()


def wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    """Poll `condition` until it returns something truthy (returned) or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


class LiveServer:
    """uvicorn on a free localhost port in a background thread: real HTTP, real lifespan (which
    shuts the engine down when the server stops)."""

    def __init__(self, engine, settings: ServeSettings):
        self.engine = engine
        self.recorder: Recorder | None = getattr(engine, "recorder", None)
        self.settings = settings
        self.app = create_app(engine, settings)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=10,
                                                    **server_options(settings)))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        wait_for(lambda: self.server.started or not self._thread.is_alive(), 30, "server start")
        if not self.server.started:
            raise RuntimeError("server did not start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self._sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()

    def metric(self, name: str, **labels) -> float:
        """Current value of one sample of the app's registry (0 when absent)."""
        value = self.app.state.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0
