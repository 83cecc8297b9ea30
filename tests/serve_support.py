"""Harness of the server tests: the engine under test, a live uvicorn server, voice presets.

HIGGS_SERVE_TEST_ENGINE=fake (default) runs them against tests/fake_engine.py; =real builds
engines.generate.Engine from HIGGS_SERVE_TEST_ARTIFACTS (default build/tiny-onnx, `make export`).
`fake_only` tests inspect or steer the fake engine (queue pausing, records); `real_only` tests
need the real decode loop. Everything else is engine-agnostic.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import uvicorn

from fake_engine import FakeEngine
from serve.app import create_app
from serve.settings import Limits, ServeSettings

ENGINE = os.environ.get("HIGGS_SERVE_TEST_ENGINE", "fake")
ARTIFACTS = Path(os.environ.get("HIGGS_SERVE_TEST_ARTIFACTS", "build/tiny-onnx"))
fake_only = pytest.mark.skipif(ENGINE != "fake", reason="inspects or steers the fake engine")
real_only = pytest.mark.skipif(ENGINE != "real", reason="needs the real engine: HIGGS_SERVE_TEST_ENGINE=real")

MODEL = "higgs-audio-v2"
SEED_ALIAS = "boson-audio-multimodal-checkpoint-1200"


def make_engine(max_batch: int = 4, max_queue: int = 8, **fake_options):
    if ENGINE == "real":
        from engines.generate import Engine

        return Engine.from_artifacts(ARTIFACTS, runtime="ort-cpu", max_batch=max_batch, max_queue=max_queue).start()
    return FakeEngine(max_batch=max_batch, max_queue=max_queue, **fake_options)


def tone_wav(seconds: float = 1.0, rate: int = 16000, freq: float = 220.0) -> bytes:
    """A mono PCM16 WAV clip (deliberately not 24 kHz: the server must resample)."""
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.4 * np.sin(2 * np.pi * freq * t), rate, format="WAV", subtype="PCM_16")
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
                         if voices_dir else {}, limits=limits, **overrides)


class LiveServer:
    """uvicorn on a free localhost port in a background thread: real HTTP, real lifespan."""

    def __init__(self, engine, settings: ServeSettings):
        self.engine = engine
        self.settings = settings
        self.app = create_app(engine, settings)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)
        self._sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()

    def metric(self, name: str, **labels) -> float:
        """Current value of one sample of the app's registry (0 when absent)."""
        value = self.app.state.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0
