"""Client mistakes are 4xx with OpenAI error bodies, never 5xx; saturation is 429; clients that
leave get their generation cancelled.

Real HTTP against uvicorn in a thread; the engine is the fake unless HIGGS_SERVE_TEST_ENGINE=real
(see serve_support.py). Queue, disconnect and engine-failure tests steer the fake engine.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import time

import httpx
import pytest

from serve.settings import Limits
from serve_support import MODEL, LiveServer, fake_only, make_engine, settings_for, tone_wav, write_voices

LIMITS = Limits(max_input_chars=200, max_body_bytes=256 * 1024, max_completion_tokens=1000, max_messages=8,
                max_reference_seconds=5.0)
USER = [{"role": "user", "content": "Hello there."}]
CHAT = {"model": MODEL, "messages": USER}
SPEECH = {"model": MODEL, "input": "Hello there.", "voice": "alloy"}


def _chat(**changes):
    return {**CHAT, **changes}


def _with_clip(data: str, fmt: str = "wav", role: str = "assistant"):
    clip = {"role": role, "content": [{"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}
    return _chat(messages=[{"role": "user", "content": "Reference words."}, clip, *USER])


def _chunked(size: int):
    yield b'{"model": "' + b"x" * size + b'"}'


# (id, path, request kwargs for httpx, expected status, expected error code or None)
CASES = [
    ("bad-json", "/v1/chat/completions", {"content": b'{"model": ', "headers": {"content-type": "application/json"}},
     400, "invalid_json"),
    ("body-not-object", "/v1/chat/completions", {"json": [1, 2]}, 400, None),
    ("missing-model", "/v1/chat/completions", {"json": {"messages": USER}}, 400, None),
    ("messages-string", "/v1/chat/completions", {"json": _chat(messages="hi")}, 400, None),
    ("empty-messages", "/v1/chat/completions", {"json": _chat(messages=[])}, 400, None),
    ("temperature-string", "/v1/chat/completions", {"json": _chat(temperature="hot")}, 400, None),
    ("temperature-negative", "/v1/chat/completions", {"json": _chat(temperature=-1)}, 400, None),
    ("top-p-too-big", "/v1/chat/completions", {"json": _chat(top_p=2)}, 400, None),
    ("top-k-float", "/v1/chat/completions", {"json": _chat(top_k=1.5)}, 400, None),
    ("extra-body-top-k-string", "/v1/chat/completions", {"json": _chat(extra_body={"top_k": "x"})}, 400, None),
    ("seed-negative", "/v1/chat/completions", {"json": _chat(seed=-5)}, 400, None),
    ("seed-huge", "/v1/chat/completions", {"json": _chat(seed=2**70)}, 400, None),
    ("stream-string", "/v1/chat/completions", {"json": _chat(stream="yes")}, 400, None),
    ("max-tokens-string", "/v1/chat/completions", {"json": _chat(max_completion_tokens="10")}, 400, None),
    ("max-tokens-zero", "/v1/chat/completions", {"json": _chat(max_completion_tokens=0)}, 400, None),
    ("max-tokens-huge", "/v1/chat/completions", {"json": _chat(max_completion_tokens=10**9)}, 400, None),
    ("legacy-max-tokens-huge", "/v1/chat/completions", {"json": _chat(max_tokens=5000)}, 400, None),
    ("n-2", "/v1/chat/completions", {"json": _chat(n=2)}, 400, None),
    ("stop-too-many", "/v1/chat/completions", {"json": _chat(stop=[f"s{i}" for i in range(20)])}, 400, None),
    ("content-int", "/v1/chat/completions", {"json": _chat(messages=[{"role": "user", "content": 5}])}, 400, None),
    ("unknown-role", "/v1/chat/completions", {"json": _chat(messages=[{"role": "robot", "content": "x"}])}, 400, None),
    ("unknown-part-type", "/v1/chat/completions",
     {"json": _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])},
     400, None),
    ("text-only-modality", "/v1/chat/completions", {"json": _chat(modalities=["text"])}, 400, None),
    ("bad-modality", "/v1/chat/completions", {"json": _chat(modalities=["video"])}, 400, None),
    ("unknown-model", "/v1/chat/completions", {"json": _chat(model="gpt-4o")}, 404, "model_not_found"),
    ("unknown-voice-chat", "/v1/chat/completions", {"json": _chat(audio={"voice": "nobody"})}, 400, "voice_not_found"),
    ("bad-audio-format", "/v1/chat/completions", {"json": _chat(audio={"format": "wma"})}, 400, None),
    ("last-message-assistant", "/v1/chat/completions",
     {"json": _chat(messages=[*USER, {"role": "assistant", "content": "ok"}])}, 400, None),
    ("empty-text", "/v1/chat/completions", {"json": _chat(messages=[{"role": "user", "content": "   "}])}, 400, None),
    ("oversized-input", "/v1/chat/completions", {"json": _chat(messages=[{"role": "user", "content": "a" * 500}])},
     400, None),
    ("too-many-messages", "/v1/chat/completions", {"json": _chat(messages=USER * 9)}, 400, None),
    ("bad-base64-audio", "/v1/chat/completions", {"json": _with_clip("not base64 !!")}, 400, "invalid_audio"),
    ("undecodable-audio", "/v1/chat/completions", {"json": _with_clip(base64.b64encode(b"\x00junk" * 300).decode())},
     400, "invalid_audio"),
    ("reference-too-long", "/v1/chat/completions",
     {"json": _with_clip(base64.b64encode(tone_wav(6.0, rate=8000)).decode())}, 400, "invalid_audio"),
    ("reference-too-short", "/v1/chat/completions",
     {"json": _with_clip(base64.b64encode(tone_wav(0.1)).decode())}, 400, "invalid_audio"),
    ("audio-in-user-message", "/v1/chat/completions",
     {"json": _with_clip(base64.b64encode(tone_wav(1.0)).decode(), role="user")}, 400, None),
    ("body-too-large", "/v1/chat/completions", {"json": _chat(user="x" * 300_000)}, 413, "request_too_large"),
    ("chunked-body-too-large", "/v1/chat/completions", {"content": _chunked(300_000)}, 413, None),
    ("speech-missing-input", "/v1/audio/speech", {"json": {"model": MODEL, "voice": "alloy"}}, 400, None),
    ("speech-empty-input", "/v1/audio/speech", {"json": {**SPEECH, "input": ""}}, 400, None),
    ("speech-unknown-voice", "/v1/audio/speech", {"json": {**SPEECH, "voice": "nobody"}}, 400, "voice_not_found"),
    ("speech-bad-format", "/v1/audio/speech", {"json": {**SPEECH, "response_format": "wma"}}, 400, None),
    ("speech-speed-huge", "/v1/audio/speech", {"json": {**SPEECH, "speed": 10}}, 400, None),
    ("speech-speed-string", "/v1/audio/speech", {"json": {**SPEECH, "speed": "fast"}}, 400, None),
    ("speech-bad-stream-format", "/v1/audio/speech", {"json": {**SPEECH, "stream_format": "ws"}}, 400, None),
    ("speech-oversized-input", "/v1/audio/speech", {"json": {**SPEECH, "input": "b" * 500}}, 400, None),
    ("speech-unknown-model", "/v1/audio/speech", {"json": {**SPEECH, "model": "tts-1"}}, 404, "model_not_found"),
    ("speech-voice-and-reference", "/v1/audio/speech",
     {"json": {**SPEECH, "reference_audio": base64.b64encode(tone_wav()).decode(), "reference_transcript": "x"}},
     400, None),
    ("speech-reference-without-transcript", "/v1/audio/speech",
     {"json": {"model": MODEL, "input": "Hi.", "reference_audio": base64.b64encode(tone_wav()).decode()}}, 400, None),
    ("voices-not-multipart", "/v1/audio/voices", {"json": {"name": "x"}}, 415, None),
    ("voices-missing-file", "/v1/audio/voices", {"data": {"name": "x", "transcript": "y"}, "files": {}}, 400, None),
    ("voices-bad-name", "/v1/audio/voices",
     {"data": {"name": "../evil", "transcript": "y"}, "files": {"audio": ("a.wav", tone_wav(), "audio/wav")}},
     400, None),
    ("wrong-method", "/v1/chat/completions", {"method": "GET"}, 405, None),
    ("unknown-path", "/v1/nothing", {"json": {}}, 404, None),
]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    engine = make_engine()
    with LiveServer(engine, settings_for(write_voices(tmp_path_factory.mktemp("voices")), limits=LIMITS)) as server:
        yield server


def _assert_openai_error(response: httpx.Response, status: int, code: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 5
    if code is not None:
        assert error["code"] == code, error


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_is_a_4xx_with_openai_body(live, case):
    _, path, kwargs, status, code = case
    kwargs = dict(kwargs)
    if "files" in kwargs and not kwargs["files"]:
        kwargs["files"] = {"other": ("x.txt", b"x", "text/plain")}
    response = httpx.request(kwargs.pop("method", "POST"), live.url + path, timeout=30, **kwargs)
    _assert_openai_error(response, status, code)


def test_server_healthy_after_bad_requests(live):
    for _, path, kwargs, *_ in CASES[:10]:
        httpx.post(live.url + path, **{k: v for k, v in kwargs.items() if k != "method"})
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert httpx.post(f"{live.url}/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
    metrics = httpx.get(f"{live.url}/metrics").text
    assert not [line for line in metrics.splitlines() if line.startswith("higgs_requests_total")
                and 'status="5' in line]


def test_api_keys_guard_v1_but_not_health():
    with LiveServer(make_engine(), settings_for(None, api_keys=("k1", "k2"))) as server:
        url = f"{server.url}/v1/chat/completions"
        _assert_openai_error(httpx.post(url, json=CHAT), 401, "missing_api_key")
        _assert_openai_error(httpx.post(url, json=CHAT, headers={"Authorization": "Bearer nope"}), 401,
                             "invalid_api_key")
        _assert_openai_error(httpx.get(f"{server.url}/v1/models"), 401, "missing_api_key")
        _assert_openai_error(httpx.post(url, content=b"{bad", headers={"Authorization": "Basic k1"}), 401, None)
        assert httpx.post(url, json=CHAT, headers={"Authorization": "Bearer k2"}, timeout=30).status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_health_is_503_until_engine_ready():
    engine = make_engine()
    if not hasattr(engine, "ready_flag"):
        pytest.skip("needs the fake engine's readiness switch")
    engine.ready_flag = False
    with LiveServer(engine, settings_for(None)) as server:
        assert httpx.get(f"{server.url}/health").status_code == 503
        _assert_openai_error(httpx.post(f"{server.url}/v1/chat/completions", json=CHAT), 503, None)
        engine.ready_flag = True
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


@fake_only
def test_full_queue_is_429_with_retry_after():
    engine = make_engine(max_batch=1, max_queue=2)
    with LiveServer(engine, settings_for(None)) as server, concurrent.futures.ThreadPoolExecutor(2) as pool:
        engine.pause()
        waiting = [pool.submit(httpx.post, f"{server.url}/v1/chat/completions", json=CHAT, timeout=30)
                   for _ in range(2)]
        _wait_for(lambda: engine.queue_depth() == 2)
        response = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
        _assert_openai_error(response, 429, "queue_full")
        assert int(response.headers["retry-after"]) >= 1
        assert server.metric("higgs_queue_depth") == 2
        engine.resume()
        assert [f.result().status_code for f in waiting] == [200, 200]


def test_concurrent_requests_are_200_or_429():
    engine = make_engine(max_batch=4, max_queue=6)

    async def one(client: httpx.AsyncClient, i: int) -> int:
        if i % 3 == 0:
            response = await client.post("/v1/audio/speech", json={**SPEECH, "voice": "default",
                                                                    "response_format": "mp3"})
        else:
            response = await client.post("/v1/chat/completions", json=_chat(stream=i % 3 == 1, seed=i))
        await response.aread()
        return response.status_code

    async def burst(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(24)))

    with LiveServer(engine, settings_for(None)) as server:
        statuses = asyncio.run(burst(server.url))
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 4, statuses
        assert httpx.get(f"{server.url}/health").status_code == 200


@fake_only
@pytest.mark.parametrize("kind", ["chat-stream", "speech-stream", "chat-blocking"])
def test_client_disconnect_cancels_generation(kind):
    engine = make_engine(step_s=0.01, frames=(2000, 2000))  # 20 s of decoding unless cancelled
    with LiveServer(engine, settings_for(None)) as server:
        request_id = f"disconnect-{kind}"
        headers = {"X-Request-Id": request_id}
        if kind == "chat-blocking":
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=headers, timeout=0.3)
        else:
            path, body = (("/v1/chat/completions", _chat(stream=True)) if kind == "chat-stream"
                          else ("/v1/audio/speech", {**SPEECH, "voice": "default", "response_format": "pcm"}))
            with httpx.stream("POST", server.url + path, json=body, headers=headers, timeout=30) as response:
                assert response.status_code == 200
                received = 0
                for chunk in response.iter_bytes():
                    received += len(chunk)
                    if received > 20_000:
                        break  # leave mid-stream
        _wait_for(lambda: engine.results)
        (engine_id, finished), = engine.results.items()
        assert engine_id.startswith(request_id + "-")  # the client's X-Request-Id prefixes the server's
        assert finished.finish_reason == "cancelled" and finished.completion_tokens < 2000
        _wait_for(lambda: server.metric("higgs_generations_cancelled_total", cause="disconnect") == 1)
        assert server.metric("higgs_generations_in_flight") == 0


@fake_only
def test_engine_failure_is_500_with_openai_body_and_sse_error():
    engine = make_engine(fail_marker="EXPLODE")
    with LiveServer(engine, settings_for(None)) as server:
        body = _chat(messages=[{"role": "user", "content": "EXPLODE now"}])
        _assert_openai_error(httpx.post(f"{server.url}/v1/chat/completions", json=body), 500, "generation_failed")
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["code"] == "generation_failed" and events[-1] == "[DONE]"


@fake_only
def test_shutdown_drains_in_flight_stream():
    engine = make_engine(step_s=0.01, frames=(60, 60))
    server = LiveServer(engine, settings_for(None)).__enter__()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=_chat(stream=True), timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        server.server.should_exit = True  # begin shutdown mid-stream
        rest = [line for line in lines if line]
    server.stop()
    finish = json.loads(rest[-2][6:])["choices"][0]
    assert finish["finish_reason"] == "stop" and rest[-1] == "data: [DONE]"
    assert engine.shutdown_calls == [True]


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
