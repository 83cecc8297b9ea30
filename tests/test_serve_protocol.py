"""The server speaks the OpenAI wire format: official SDK, curl-style posts, every audio format.

Real HTTP against uvicorn in a thread; the engine is the fake unless HIGGS_SERVE_TEST_ENGINE=real
(see serve_support.py).
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile

from serve_support import (ARTIFACTS, MODEL, SEED_ALIAS, LiveServer, fake_only, make_engine, real_only, settings_for,
                           tone_wav, write_voices)

EXAMPLE_FILE = Path(__file__).resolve().parents[2] / "shared" / "api" / "chat_completion_example.json"  # beside the repo
EXAMPLE = json.loads(EXAMPLE_FILE.read_text()) if EXAMPLE_FILE.is_file() else None
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    engine = make_engine()
    with LiveServer(engine, settings_for(write_voices(tmp_path_factory.mktemp("voices")))) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=30)


def _chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": TEXT}],
                                          modalities=["text", "audio"], **kwargs)


def _pcm(wav_bytes: bytes) -> np.ndarray:
    data, rate = soundfile.read(io.BytesIO(wav_bytes), dtype="int16")
    assert rate == 24000 and data.ndim == 1
    return data


def test_chat_completion_via_sdk_returns_wav(client, live):
    completion = _chat(client, audio={"voice": "alloy", "format": "wav"}, seed=7, extra_body={"top_k": 50})
    choice = completion.choices[0]
    assert choice.message.content == ""
    assert re.fullmatch(r"audio-[0-9a-f]{32}", choice.message.audio.id)
    assert choice.message.audio.expires_at == 0 and choice.message.audio.transcript == ""
    wav = base64.b64decode(choice.message.audio.data)
    info = soundfile.info(io.BytesIO(wav))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert info.frames > 0
    assert choice.finish_reason in ("stop", "length")
    assert choice.model_extra["stop_reason"] == (1025 if choice.finish_reason == "stop" else None)
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens > 0
    if hasattr(live.engine, "submitted"):
        sampling = live.engine.submitted[-1].sampling
        assert (sampling.top_k, sampling.seed, sampling.temperature, sampling.top_p) == (50, 7, 0.7, 0.95)


def _delta_audio(delta) -> dict | None:
    """delta.audio as a dict: a typed field in recent SDKs, an extra key in older ones."""
    audio = getattr(delta, "audio", None) or (delta.model_extra or {}).get("audio")
    return audio if audio is None or isinstance(audio, dict) else audio.model_dump()


def test_streaming_pcm_equals_non_streamed_audio(client):
    whole = _pcm(base64.b64decode(_chat(client, seed=11).choices[0].message.audio.data))
    stream = _chat(client, seed=11, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    audio = [a for a in (_delta_audio(c.choices[0].delta) for c in chunks if c.choices) if a]
    assert len(audio) > 1 and len({a["id"] for a in audio}) == 1
    pcm = np.frombuffer(b"".join(base64.b64decode(a["data"]) for a in audio), dtype="<i2")
    np.testing.assert_array_equal(pcm, whole)
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_speech_every_format_decodes(client, fmt):
    audio = client.audio.speech.create(model=MODEL, voice="alloy", input=TEXT, response_format=fmt,
                                       extra_body={"seed": 3}).content
    if fmt == "pcm":
        assert len(audio) % 2 == 0 and len(audio) > 2400
        return
    if fmt in ("wav", "flac"):
        data, rate = soundfile.read(io.BytesIO(audio))
        assert rate == 24000 and len(data) > 2400
    with av.open(io.BytesIO(audio)) as container:
        frames = sum(frame.samples for frame in container.decode(audio=0))
    assert frames > 2400


def test_speech_streaming_response_and_speed(client):
    params = dict(model=MODEL, voice="echo", input=TEXT, response_format="pcm", extra_body={"seed": 5})
    with client.audio.speech.with_streaming_response.create(**params) as response:
        assert response.headers["content-type"].startswith("audio/pcm")
        streamed = b"".join(response.iter_bytes())
    assert streamed == client.audio.speech.create(**params).content
    faster = client.audio.speech.create(**params, speed=2.0).content
    assert abs(len(faster) / len(streamed) - 0.5) < 0.05


def test_speech_sse_events(live, client):
    body = {"model": MODEL, "input": TEXT, "voice": "alloy", "response_format": "pcm", "stream_format": "sse",
            "seed": 9}
    events = []
    with httpx.stream("POST", f"{live.url}/v1/audio/speech", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] > 0
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert pcm == client.audio.speech.create(model=MODEL, voice="alloy", input=TEXT, response_format="pcm",
                                             extra_body={"seed": 9}).content


def _shape(value):
    """Recursive key set and value types (for lists: the shape of their first element)."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__


@pytest.mark.skipif(EXAMPLE is None, reason="shared/api/chat_completion_example.json not found")
def test_seed_example_posted_verbatim_matches_example_shape(live):
    response = httpx.post(f"{live.url}/v1/chat/completions", json=EXAMPLE["request"], timeout=30)
    assert response.status_code == 200, response.text
    got, expected = response.json(), _shape(EXAMPLE["response"])
    if got["choices"][0]["finish_reason"] == "length":  # cap reached: no audio EOS to report
        expected["choices"][0]["stop_reason"] = "NoneType"
    assert _shape(got) == expected
    assert got["model"] == SEED_ALIAS and got["object"] == "chat.completion"
    assert base64.b64decode(got["choices"][0]["message"]["audio"]["data"])[:4] == b"RIFF"
    if hasattr(live.engine, "submitted"):  # the literal extra_body reached the sampler
        assert live.engine.submitted[-1].sampling.top_k == 50
        assert live.engine.submitted[-1].stop_strings == tuple(EXAMPLE["request"]["stop"])


def test_models_health_metrics(live, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, SEED_ALIAS]
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{live.url}/metrics").text
    for name in ("higgs_requests_total", "higgs_queue_depth", "higgs_generated_audio_seconds_total",
                 "higgs_time_to_first_audio_seconds_bucket", "higgs_generated_steps_total",
                 "higgs_generations_cancelled_total"):
        assert name in text


def test_voice_cloning_in_chat_encodes_each_clip_once(live, client):
    clip = base64.b64encode(tone_wav(1.5, freq=300.0)).decode()
    messages = [
        {"role": "system", "content": "Audio is recorded from a quiet room."},
        {"role": "user", "content": "This is the reference transcript."},
        {"role": "assistant", "content": [{"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}}]},
        {"role": "user", "content": TEXT},
    ]
    calls_before = getattr(live.engine, "encode_calls", None)
    for _ in range(2):
        completion = client.chat.completions.create(model=MODEL, messages=messages, modalities=["audio"], seed=1)
        assert base64.b64decode(completion.choices[0].message.audio.data)[:4] == b"RIFF"
    if calls_before is not None:
        assert live.engine.encode_calls == calls_before + 1  # cached by content hash
        request = live.engine.submitted[-1]
        assert [m.role for m in request.messages] == ["system", "user", "assistant", "user"]
        assert request.messages[0].content[0].startswith("Generate audio following instruction.")
        assert "<|scene_desc_start|>\nAudio is recorded from a quiet room.\n<|scene_desc_end|>" in \
            request.messages[0].content[0]
        assert request.messages[2].content[0].codes.shape[0] == 8


def test_voices_list_upload_and_use(live, client):
    listed = httpx.get(f"{live.url}/v1/audio/voices").json()["data"]
    by_id = {v["id"]: v for v in listed}
    assert by_id["belinda"]["aliases"] == ["alloy"] and by_id["en_man"]["aliases"] == ["echo"]
    assert by_id["default"]["source"] == "builtin"
    files = {"audio": ("me.wav", tone_wav(2.0, rate=48000), "audio/wav")}
    form = {"name": "narrator", "transcript": "Hello from the narrator."}
    created = httpx.post(f"{live.url}/v1/audio/voices", data=form, files=files)
    assert created.status_code == 201, created.text
    assert created.json()["source"] == "uploaded"
    assert (live.settings.voices_dir / "narrator" / "transcript.txt").read_text().strip() == form["transcript"]
    again = httpx.post(f"{live.url}/v1/audio/voices", data=form, files=files)
    assert again.status_code == 409 and again.json()["error"]["param"] == "name"
    audio = client.audio.speech.create(model=MODEL, voice="narrator", input=TEXT, response_format="wav").content
    assert soundfile.info(io.BytesIO(audio)).samplerate == 24000
    if hasattr(live.engine, "submitted"):
        messages = live.engine.submitted[-1].messages
        assert messages[0].content == ("Hello from the narrator.",) and messages[-1].content == (TEXT,)


def test_speech_reference_extension_and_instructions(live):
    body = {"model": MODEL, "input": TEXT, "response_format": "wav", "instructions": "A calm evening.",
            "reference_audio": base64.b64encode(tone_wav(1.0)).decode(), "reference_transcript": "Hi there."}
    response = httpx.post(f"{live.url}/v1/audio/speech", json=body, timeout=30)
    assert response.status_code == 200, response.text
    if hasattr(live.engine, "submitted"):
        roles = [m.role for m in live.engine.submitted[-1].messages]
        assert roles == ["system", "user", "assistant", "user"]


@fake_only
def test_missing_codec_encoder_is_a_clear_501(tmp_path):
    engine = make_engine(encoder=False)
    with LiveServer(engine, settings_for(write_voices(tmp_path / "voices"))) as server:  # presets: lazily
        response = httpx.post(f"{server.url}/v1/audio/speech", json={"model": MODEL, "input": TEXT, "voice": "alloy"})
        assert response.status_code == 501
        assert "codec encoder" in response.json()["error"]["message"]
        plain = httpx.post(f"{server.url}/v1/audio/speech", json={"model": MODEL, "input": TEXT, "voice": "default"})
        assert plain.status_code == 200


@real_only
def test_cli_settings_build_the_real_engine():
    """The wiring of `python -m serve`: flags -> settings -> Engine.from_artifacts -> app."""
    from engines.generate import Engine
    from serve.__main__ import parse_args, settings_from_args

    settings = settings_from_args(parse_args(["--artifacts", str(ARTIFACTS)]), environ={})
    engine = Engine.from_artifacts(settings.artifacts, runtime=settings.runtime, max_batch=settings.max_batch,
                                   max_queue=settings.queue_size).start()
    with LiveServer(engine, settings) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": SEED_ALIAS, "messages": [{"role": "user", "content": TEXT}], "max_completion_tokens": 50})
        assert response.status_code == 200, response.text


def test_cli_flags_and_env_build_settings(tmp_path):
    from serve.__main__ import parse_args, settings_from_args

    args = parse_args(["--artifacts", str(tmp_path), "--model", "tts", "--alias", "tts-1", "--api-key", "a",
                       "--voices", str(tmp_path), "--voice-alias", "alloy=belinda", "--top-k", "50",
                       "--runtime", "ort-cuda", "--port", "9000"])
    settings = settings_from_args(args, environ={"HIGGS_API_KEYS": "b, c"})
    assert settings.model_names == ("tts", SEED_ALIAS, "tts-1")
    assert settings.api_keys == ("a", "b", "c") and settings.voice_aliases == {"alloy": "belinda"}
    assert (settings.runtime, settings.port, settings.sampling.top_k, settings.sampling.temperature) == \
        ("ort-cuda", 9000, 50, 0.7)
    with pytest.raises(SystemExit):
        settings_from_args(parse_args(["--artifacts", "x", "--voice-alias", "alloy"]), environ={})
