"""The server speaks the OpenAI wire format: official SDK, curl, every audio format, voices.

Real HTTP against uvicorn in a thread, in front of the real engine on the tiny default model
(see serve_support.py). Seeds are chosen for generations of a useful length.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import subprocess
from pathlib import Path

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile
import soxr

from engines.api import AudioChunk, AudioCodes, Message, SamplingParams, SpeechRequest
from engines.audio_io import encode_audio, to_pcm16
from engines.prompt import content_text
from serve_support import (MODEL, SEED_ALIAS, LiveServer, artifacts_without_encoder, delta_audio, make_engine,
                           settings_for, tone_wav, wait_for, write_voices)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_FILE = ROOT.parent / "shared" / "api" / "chat_completion_example.json"  # beside the repo
EXAMPLE = json.loads(EXAMPLE_FILE.read_text()) if EXAMPLE_FILE.is_file() else None
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_artifacts):
    engine = make_engine(tiny_artifacts)
    with LiveServer(engine, settings_for(write_voices(tmp_path_factory.mktemp("voices")))) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def endless_client(tiny_artifacts):
    """A server whose audio never ends by itself: generation lengths are exactly max_completion_tokens."""
    with LiveServer(make_engine(tiny_artifacts, max_batch=2, endless=True), settings_for(None)) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": TEXT}],
                                          modalities=["text", "audio"], **kwargs)


def _pcm(wav_bytes: bytes) -> np.ndarray:
    data, rate = soundfile.read(io.BytesIO(wav_bytes), dtype="int16")
    assert rate == 24000 and data.ndim == 1
    return data


def test_chat_completion_via_sdk_returns_wav(client, live):
    encodes = live.recorder.encode_calls
    completion = _chat(client, audio={"voice": "alloy", "format": "wav"}, seed=7, max_completion_tokens=60,
                       extra_body={"top_k": 50})
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
    request = live.recorder.submitted[-1]
    sampling = request.sampling
    assert (sampling.top_k, sampling.seed, sampling.temperature, sampling.top_p) == (50, 7, 0.7, 0.95)
    assert request.max_tokens == 60
    finished = live.recorder.finished[request.request_id]
    assert (finished.prompt_tokens, finished.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert info.frames == round(finished.audio_seconds * 24000)
    assert live.recorder.encode_calls == encodes  # the preset behind "alloy" was encoded at startup


def test_streaming_pcm_equals_non_streamed_audio(endless_client):
    params = dict(seed=4, max_completion_tokens=60)  # 60 steps: 51 frames = 2 s of audio, 7 stream chunks
    whole = _pcm(base64.b64decode(_chat(endless_client, **params).choices[0].message.audio.data))
    stream = _chat(endless_client, **params, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    audio = [a for a in (delta_audio(c.choices[0].delta) for c in chunks if c.choices) if a]
    assert len(audio) >= 5 and len({a["id"] for a in audio}) == 1
    pcm = np.frombuffer(b"".join(base64.b64decode(a["data"]) for a in audio), dtype="<i2")
    assert len(whole) > 24000
    np.testing.assert_array_equal(pcm, whole)
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_speech_every_format_decodes(client, fmt):
    audio = client.audio.speech.create(model=MODEL, voice="alloy", input=TEXT, response_format=fmt,
                                       extra_body={"seed": 3, "max_completion_tokens": 40}).content
    if fmt == "pcm":
        assert len(audio) % 2 == 0 and len(audio) > 4800
        return
    if fmt in ("wav", "flac"):
        data, rate = soundfile.read(io.BytesIO(audio))
        assert rate == 24000 and len(data) > 2400
    with av.open(io.BytesIO(audio)) as container:
        frames = sum(frame.samples for frame in container.decode(audio=0))
    assert frames > 2400


def test_speech_streaming_response_and_speed(client):
    params = dict(model=MODEL, voice="echo", input=TEXT, response_format="pcm",
                  extra_body={"seed": 5, "max_completion_tokens": 80})
    with client.audio.speech.with_streaming_response.create(**params) as response:
        assert response.headers["content-type"].startswith("audio/pcm")
        streamed = b"".join(response.iter_bytes())
    assert len(streamed) > 24000 * 2  # more than a second
    assert streamed == client.audio.speech.create(**params).content
    faster = client.audio.speech.create(**params, speed=2.0).content
    assert abs(len(faster) / len(streamed) - 0.5) < 0.05


def test_speech_sse_events(live, client):
    body = {"model": MODEL, "input": TEXT, "voice": "alloy", "response_format": "pcm", "stream_format": "sse",
            "seed": 9, "max_completion_tokens": 60}
    events = []
    with httpx.stream("POST", f"{live.url}/v1/audio/speech", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert len(events) >= 3
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] > 0
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert pcm == client.audio.speech.create(model=MODEL, voice="alloy", input=TEXT, response_format="pcm",
                                             extra_body={"seed": 9, "max_completion_tokens": 60}).content


def _shape(value):
    """Recursive key set and value types (for lists: the shape of their first element)."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__


def _docs_seed_curl() -> str:
    """The seed request's curl command in docs/serving.md (the block that posts to chat/completions)."""
    text = (ROOT / "docs" / "serving.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    commands = [b.strip() for b in blocks if b.lstrip().startswith("curl") and "/v1/chat/completions" in b]
    assert commands, "docs/serving.md has no curl command for /v1/chat/completions"
    return commands[0]


@pytest.mark.skipif(EXAMPLE is None, reason="shared/api/chat_completion_example.json not found")
def test_seed_example_posted_verbatim_with_the_docs_curl_command(live):
    command = _docs_seed_curl()
    words = shlex.split(command)
    posted = json.loads(words[words.index("-d") + 1])
    assert posted == EXAMPLE["request"]  # the docs post the seed request verbatim, extra_body and all
    result = subprocess.run(["bash", "-c", command.replace("http://127.0.0.1:8000", live.url)],
                            capture_output=True, text=True, timeout=120, check=True)
    got, expected = json.loads(result.stdout), _shape(EXAMPLE["response"])
    if got["choices"][0]["finish_reason"] == "length":  # cap reached: no audio EOS to report
        expected["choices"][0]["stop_reason"] = "NoneType"
    assert _shape(got) == expected
    assert got["model"] == SEED_ALIAS and got["object"] == "chat.completion"
    assert base64.b64decode(got["choices"][0]["message"]["audio"]["data"])[:4] == b"RIFF"
    request = live.recorder.submitted[-1]  # the literal extra_body reached the sampler
    assert (request.sampling.top_k, request.sampling.temperature, request.max_tokens) == (50, 1.0, 500)
    assert request.stop_strings == tuple(EXAMPLE["request"]["stop"])


def test_models_health_metrics(live, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, SEED_ALIAS]
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{live.url}/metrics").text
    for name in ("higgs_requests_total", "higgs_queue_depth", "higgs_generated_audio_seconds_total",
                 "higgs_time_to_first_audio_seconds_bucket", "higgs_generated_steps_total",
                 "higgs_generations_cancelled_total"):
        assert name in text


def _clone_messages(clip: bytes, fmt: str = "wav", system: str | None = None) -> list[dict]:
    audio = {"data": base64.b64encode(clip).decode(), "format": fmt}
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "This is the reference transcript."},
        {"role": "assistant", "content": [{"type": "input_audio", "input_audio": audio}]},
        {"role": "user", "content": TEXT},
    ]


def test_input_audio_clone_equals_passing_the_reference_codes(live, client):
    """Chat input_audio (16 kHz WAV) -> decode, resample, encode -> the same codes, and the same
    generation, as submitting the codes of that clip to the engine directly."""
    clip = tone_wav(1.6, rate=16000, freq=260.0)
    completion = client.chat.completions.create(model=MODEL, messages=_clone_messages(clip), modalities=["audio"],
                                                seed=1, max_completion_tokens=120,
                                                extra_headers={"X-Request-Id": "clone-http"})
    served = live.recorder.finished_with_prefix("clone-http-")
    reference = live.recorder.submitted[-1].messages[1].content[0]
    served_wave = live.recorder.encoded[-1]

    wave, rate = soundfile.read(io.BytesIO(clip), dtype="float32")
    wave = soxr.resample(wave, rate, 24000, quality="HQ").astype(np.float32)
    np.testing.assert_array_equal(served_wave, wave)  # decoded, resampled, level untouched (no loudness norm)
    codes = live.engine.encode_reference(wave)
    assert codes.codes.shape == (8, 40)
    np.testing.assert_array_equal(reference.codes, codes.codes)

    direct = SpeechRequest([Message("user", ("This is the reference transcript.",)), Message("assistant", (codes,)),
                            Message("user", (TEXT,))], sampling=SamplingParams(seed=1), max_tokens=120,
                           request_id="clone-direct")
    handle = live.engine.submit(direct)  # no event loop: the worker thread runs it, we poll
    finished = wait_for(lambda: live.recorder.finished.get("clone-direct"), 60, "direct generation")
    pcm = np.concatenate([e.pcm for e in handle.poll() if isinstance(e, AudioChunk)])
    assert finished.finish_reason == served.finish_reason and finished.text_ids == served.text_ids
    assert len(finished.segments) == len(served.segments) > 0
    for ours, theirs in zip(finished.segments, served.segments):
        np.testing.assert_array_equal(ours, theirs)
    assert base64.b64decode(completion.choices[0].message.audio.data)[44:] == to_pcm16(pcm)


def test_voice_cloning_in_chat_encodes_each_clip_once(live, client):
    messages = _clone_messages(tone_wav(1.5, freq=300.0), system="Audio is recorded from a quiet room.")
    calls_before = live.recorder.encode_calls
    for _ in range(2):
        completion = client.chat.completions.create(model=MODEL, messages=messages, modalities=["audio"], seed=1,
                                                    max_completion_tokens=40)
        assert base64.b64decode(completion.choices[0].message.audio.data)[:4] == b"RIFF"
    assert live.recorder.encode_calls == calls_before + 1  # cached by content hash
    request = live.recorder.submitted[-1]
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "user"]
    assert content_text(request.messages[0].content) == \
        "Generate audio following instruction.\n\n<|scene_desc_start|>\nAudio is recorded from a quiet room.\n<|scene_desc_end|>"
    assert request.messages[2].content[0].codes.shape == (8, 38)  # 1.5 s at 25 frames/s (+ the codec's edge)


def _encoded_clip(fmt: str, seconds: float = 1.0) -> bytes:
    rate = 16000  # one that every encoder takes (libopus: 8-48 kHz steps)
    wave = (0.4 * np.sin(2 * np.pi * 200.0 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
    if fmt in ("flac", "ogg"):
        buffer = io.BytesIO()
        soundfile.write(buffer, wave, rate, format=fmt.upper())
        return buffer.getvalue()
    return encode_audio(wave, rate, fmt)


@pytest.mark.parametrize("fmt", ["mp3", "flac", "ogg", "opus"])
def test_input_audio_formats_are_decoded_and_encoded(live, client, fmt):
    completion = client.chat.completions.create(model=MODEL, messages=_clone_messages(_encoded_clip(fmt), fmt),
                                                modalities=["audio"], seed=2, max_completion_tokens=4)
    assert completion.choices[0].finish_reason == "length"
    codes = live.recorder.submitted[-1].messages[1].content[0]
    assert isinstance(codes, AudioCodes) and codes.codes.shape[0] == 8 and 24 <= codes.codes.shape[1] <= 28


def test_stereo_reference_is_mixed_down_to_mono(live, client):
    """A stereo clip is the mean of its channels: the same content (hash, codes) as that mean
    sent as a mono float WAV, so the encoder runs once for both."""
    stereo = tone_wav(1.0, freq=150.0, channels=2)
    wave, rate = soundfile.read(io.BytesIO(stereo), dtype="float32")
    mono = io.BytesIO()
    soundfile.write(mono, wave.mean(axis=1), rate, format="WAV", subtype="FLOAT")
    before = live.recorder.encode_calls
    codes = []
    for clip in (mono.getvalue(), stereo):
        client.chat.completions.create(model=MODEL, messages=_clone_messages(clip), modalities=["audio"], seed=2,
                                       max_completion_tokens=2)
        codes.append(live.recorder.submitted[-1].messages[1].content[0].codes)
    np.testing.assert_array_equal(*codes)
    assert live.recorder.encode_calls == before + 1


def test_voices_list_upload_and_use_via_sdk(live, client):
    by_id = {v["id"]: v for v in client.get("/audio/voices", cast_to=object)["data"]}
    assert by_id["belinda"]["aliases"] == ["alloy"] and by_id["en_man"]["aliases"] == ["echo"]
    assert by_id["default"]["source"] == "builtin" and by_id["belinda"]["source"] == "preset"
    form = {"name": "narrator", "transcript": "Hello from the narrator."}
    clip = tone_wav(2.0, rate=48000)
    encodes = live.recorder.encode_calls
    created = client.post("/audio/voices", cast_to=object, body=form, files=[("audio", ("me.wav", clip, "audio/wav"))],
                          options={"headers": {"Content-Type": "multipart/form-data"}})
    assert created["id"] == "narrator" and created["source"] == "uploaded"
    assert live.recorder.encode_calls == encodes + 1  # encoded (validated) on upload
    assert (live.settings.voices_dir / "narrator" / "transcript.txt").read_text().strip() == form["transcript"]
    with pytest.raises(openai.ConflictError) as conflict:
        client.post("/audio/voices", cast_to=object, body=form, files=[("audio", ("me.wav", clip, "audio/wav"))],
                    options={"headers": {"Content-Type": "multipart/form-data"}})
    assert conflict.value.body["param"] == "name"
    assert "narrator" in {v["id"] for v in client.get("/audio/voices", cast_to=object)["data"]}

    audio = client.audio.speech.create(model=MODEL, voice="narrator", input=TEXT, response_format="wav",
                                       extra_body={"seed": 2, "max_completion_tokens": 30}).content
    assert soundfile.info(io.BytesIO(audio)).samplerate == 24000
    messages = live.recorder.submitted[-1].messages
    assert messages[0].content == ("Hello from the narrator.",) and messages[-1].content == (TEXT,)
    completion = _chat(client, audio={"voice": "narrator", "format": "wav"}, max_completion_tokens=30,
                       extra_body={"seed": 2, "top_k": 50})
    assert base64.b64decode(completion.choices[0].message.audio.data)[:4] == b"RIFF"
    request = live.recorder.submitted[-1]
    assert [m.role for m in request.messages] == ["user", "assistant", "user"] and request.sampling.top_k == 50
    assert live.recorder.encode_calls == encodes + 1  # the preset's codes come from the cache


def _curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, timeout=60, check=True)


def _curl_json(*args: str) -> tuple[int, dict]:
    body, _, status = _curl(*args).stdout.decode().rpartition("\n")
    return int(status), json.loads(body)


def test_voices_list_upload_and_use_via_curl(live, tmp_path):
    clip = tmp_path / "curl voice.wav"
    clip.write_bytes(tone_wav(1.5, rate=22050, freq=330.0))
    url = f"{live.url}/v1/audio/voices"
    status, card = _curl_json("-F", "name=curl_voice", "-F", "transcript=Hello from curl.", "-F", f"audio=@{clip}", url)
    assert status == 201 and card["id"] == "curl_voice" and card["transcript"] == "Hello from curl."
    status, listed = _curl_json(url)
    assert status == 200 and "curl_voice" in {v["id"] for v in listed["data"]}

    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00garbage" * 100)
    status, error = _curl_json("-F", "name=junk", "-F", "transcript=x", "-F", f"audio=@{junk}", url)
    assert status == 400 and error["error"]["code"] == "invalid_audio" and error["error"]["param"] == "audio"

    out = tmp_path / "out.wav"
    body = json.dumps({"model": MODEL, "input": TEXT, "voice": "curl_voice", "response_format": "wav", "seed": 2,
                       "max_completion_tokens": 40})
    result = _curl(f"{live.url}/v1/audio/speech", "-H", "Content-Type: application/json", "-d", body, "-o", str(out))
    assert result.stdout.decode().strip() == "200"
    assert soundfile.info(str(out)).samplerate == 24000
    assert live.recorder.submitted[-1].messages[0].content == ("Hello from curl.",)


def test_speech_reference_extension_and_instructions(live, client):
    calls = live.recorder.encode_calls
    audio = client.audio.speech.create(
        model=MODEL, input=TEXT, voice="default", response_format="wav", instructions="A calm evening.",
        extra_body={"reference_audio": base64.b64encode(tone_wav(1.0)).decode(), "reference_transcript": "Hi there.",
                    "seed": 2, "max_completion_tokens": 30}).content
    assert audio[:4] == b"RIFF"
    roles = [m.role for m in live.recorder.submitted[-1].messages]
    assert roles == ["system", "user", "assistant", "user"] and live.recorder.encode_calls == calls + 1


def test_missing_codec_encoder_is_a_clear_501(tmp_path, tiny_artifacts):
    engine = make_engine(artifacts_without_encoder(tiny_artifacts, tmp_path / "no-encoder"), max_batch=1)
    assert engine.encoder is None
    with LiveServer(engine, settings_for(write_voices(tmp_path / "voices"))) as server:  # presets: not encoded
        body = {"model": MODEL, "input": TEXT, "voice": "alloy", "max_completion_tokens": 10}
        response = httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=60)
        assert response.status_code == 501
        assert "codec encoder" in response.json()["error"]["message"]
        plain = httpx.post(f"{server.url}/v1/audio/speech", json={**body, "voice": "default"}, timeout=60)
        assert plain.status_code == 200


def test_cli_settings_build_the_real_engine(tiny_artifacts):
    """The wiring of `python -m serve`: flags -> settings -> Engine.from_artifacts -> app."""
    from serve.__main__ import build_engine, parse_args, settings_from_args

    settings = settings_from_args(parse_args(["--artifacts", str(tiny_artifacts), "--max-batch", "2",
                                              "--max-len", "512"]), environ={})
    engine = build_engine(settings).start()
    assert (engine.runtime.max_batch, engine.runtime.capacity) == (2, 511)
    with LiveServer(engine, settings) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": SEED_ALIAS, "messages": [{"role": "user", "content": TEXT}], "max_completion_tokens": 20})
        assert response.status_code == 200, response.text[:500]


def test_cli_flags_and_env_build_settings(tmp_path):
    from serve.__main__ import parse_args, settings_from_args

    args = parse_args(["--artifacts", str(tmp_path), "--model", "tts", "--alias", "tts-1", "--api-key", "a",
                       "--voices", str(tmp_path), "--voice-alias", "alloy=belinda", "--top-k", "50",
                       "--runtime", "ort-cuda", "--port", "9000", "--max-len", "4096"])
    settings = settings_from_args(args, environ={"HIGGS_API_KEYS": "b, c"})
    assert settings.model_names == ("tts", SEED_ALIAS, "tts-1")
    assert settings.api_keys == ("a", "b", "c") and settings.voice_aliases == {"alloy": "belinda"}
    assert (settings.runtime, settings.port, settings.max_len, settings.sampling.top_k,
            settings.sampling.temperature) == ("ort-cuda", 9000, 4096, 50, 0.7)
    with pytest.raises(SystemExit):
        settings_from_args(parse_args(["--artifacts", "x", "--voice-alias", "alloy"]), environ={})
