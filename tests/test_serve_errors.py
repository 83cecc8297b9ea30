"""Client mistakes are 4xx with OpenAI error bodies, never 5xx; saturation is 429; clients that
leave get their generation cancelled; engine failures are 500s; shutdown drains.

Real HTTP against uvicorn in a thread, in front of the real engine on the tiny default model
(see serve_support.py). Saturation uses a real engine whose worker has not started; engine
failures are a real runtime error injected into the real engine's next decode step.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import socket

import httpx
import pytest

from serve.settings import Limits
from serve_support import MODEL, LiveServer, make_engine, settings_for, tone_wav, wait_for, write_voices

LIMITS = Limits(max_input_chars=200, max_body_bytes=256 * 1024, max_completion_tokens=1000, max_messages=8,
                max_reference_seconds=5.0)
USER = [{"role": "user", "content": "Hello there."}]
CHAT = {"model": MODEL, "messages": USER}
SPEECH = {"model": MODEL, "input": "Hello there.", "voice": "alloy"}
SHORT = {"seed": 1, "max_completion_tokens": 30}  # a quick generation
LONG = {"seed": 4, "max_completion_tokens": 1500}  # on an `endless` engine: far longer than any test waits


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
    ("top-k-negative", "/v1/chat/completions", {"json": _chat(top_k=-7)}, 400, None),
    ("temperature-huge", "/v1/chat/completions", {"json": _chat(temperature=1e9)}, 400, None),
    ("ras-window-huge", "/v1/chat/completions", {"json": _chat(ras_win_len=10**6)}, 400, None),
    ("extra-body-top-k-string", "/v1/chat/completions", {"json": _chat(extra_body={"top_k": "x"})}, 400, None),
    ("seed-negative", "/v1/chat/completions", {"json": _chat(seed=-5)}, 400, None),
    ("seed-huge", "/v1/chat/completions", {"json": _chat(seed=2**70)}, 400, None),
    ("stream-string", "/v1/chat/completions", {"json": _chat(stream="yes")}, 400, None),
    ("max-tokens-string", "/v1/chat/completions", {"json": _chat(max_completion_tokens="10")}, 400, None),
    ("max-tokens-zero", "/v1/chat/completions", {"json": _chat(max_completion_tokens=0)}, 400, None),
    ("max-tokens-huge", "/v1/chat/completions", {"json": _chat(max_completion_tokens=10**9)}, 400, None),
    ("max-tokens-beyond-kv-cache", "/v1/chat/completions", {"json": _chat(max_completion_tokens=1000)}, 400,
     "invalid_prompt"),
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
    ("speech-bad-base64-reference", "/v1/audio/speech",
     {"json": {"model": MODEL, "input": "Hi.", "reference_audio": "%%%", "reference_transcript": "x"}}, 400,
     "invalid_audio"),
    ("speech-reference-too-long", "/v1/audio/speech",
     {"json": {"model": MODEL, "input": "Hi.", "reference_audio": base64.b64encode(tone_wav(6.0, rate=8000)).decode(),
               "reference_transcript": "x"}}, 400, "invalid_audio"),
    ("speech-reference-without-transcript", "/v1/audio/speech",
     {"json": {"model": MODEL, "input": "Hi.", "reference_audio": base64.b64encode(tone_wav()).decode()}}, 400, None),
    ("voices-not-multipart", "/v1/audio/voices", {"json": {"name": "x"}}, 415, None),
    ("voices-missing-file", "/v1/audio/voices", {"data": {"name": "x", "transcript": "y"}, "files": {}}, 400, None),
    ("voices-undecodable-audio", "/v1/audio/voices",
     {"data": {"name": "x", "transcript": "y"}, "files": {"audio": ("a.mp3", b"ID3" + b"\x00" * 500, "audio/mpeg")}},
     400, "invalid_audio"),
    ("voices-bad-name", "/v1/audio/voices",
     {"data": {"name": "../evil", "transcript": "y"}, "files": {"audio": ("a.wav", tone_wav(), "audio/wav")}},
     400, None),
    ("wrong-method", "/v1/chat/completions", {"method": "GET"}, 405, None),
    ("unknown-path", "/v1/nothing", {"json": {}}, 404, None),
]


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_artifacts):
    engine = make_engine(tiny_artifacts, max_len=512)  # 511 positions: max_completion_tokens 1000 cannot fit
    with LiveServer(engine, settings_for(write_voices(tmp_path_factory.mktemp("voices")), limits=LIMITS)) as server:
        yield server


def _assert_openai_error(response: httpx.Response, status: int, code: str | None) -> None:
    assert response.status_code == status, response.text[:500]
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


@pytest.mark.parametrize("data, problem", [
    ("not base64 !!", "is not valid base64"),
    ("", "audio is empty"),
    (base64.b64encode(b"\x00junk" * 300).decode(), "could not decode audio"),
    (base64.b64encode(tone_wav(6.0, rate=8000)).decode(), "longer than the 5 s limit"),
    (base64.b64encode(tone_wav(0.1)).decode(), "needs at least 0.5 s"),
], ids=["base64", "empty", "undecodable", "too-long", "too-short"])
def test_bad_reference_audio_is_a_400_naming_the_problem(live, data, problem):
    response = httpx.post(f"{live.url}/v1/chat/completions", json=_with_clip(data), timeout=30)
    _assert_openai_error(response, 400, "invalid_audio")
    error = response.json()["error"]
    assert problem in error["message"] and error["param"] == "messages.1.content.0.input_audio", error


def test_server_healthy_after_bad_requests(live):
    submitted = len(live.recorder.submitted)
    for _, path, kwargs, *_ in CASES:
        httpx.request(kwargs.get("method", "POST"), live.url + path, timeout=30,
                      **{k: v for k, v in kwargs.items() if k not in ("method", "files")})
    assert len(live.recorder.submitted) == submitted  # nothing malformed reached the engine
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert httpx.post(f"{live.url}/v1/chat/completions", json=_chat(**SHORT), timeout=60).status_code == 200
    metrics = httpx.get(f"{live.url}/metrics").text
    assert not [line for line in metrics.splitlines() if line.startswith("higgs_requests_total")
                and 'status="5' in line]


def test_default_max_tokens_yields_to_a_small_kv_cache(live):
    """No max_completion_tokens: the server default (1024 steps) does not fit beside the prompt in
    this engine's 511-position cache, so the engine generates what fits instead of a 400."""
    response = httpx.post(f"{live.url}/v1/chat/completions", json=_chat(seed=0), timeout=60)  # stops by itself
    assert response.status_code == 200, response.text[:500]
    request = live.recorder.submitted[-1]
    assert request.max_tokens_defaulted and request.max_tokens > live.engine.runtime.capacity  # lowered by the engine
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= live.engine.runtime.capacity


def test_api_keys_guard_v1_but_not_health(tiny_artifacts):
    with LiveServer(make_engine(tiny_artifacts, max_batch=1), settings_for(None, api_keys=("k1", "k2"))) as server:
        url = f"{server.url}/v1/chat/completions"
        _assert_openai_error(httpx.post(url, json=CHAT), 401, "missing_api_key")
        _assert_openai_error(httpx.post(url, json=CHAT, headers={"Authorization": "Bearer nope"}), 401,
                             "invalid_api_key")
        _assert_openai_error(httpx.get(f"{server.url}/v1/models"), 401, "missing_api_key")
        _assert_openai_error(httpx.post(url, content=b"{bad", headers={"Authorization": "Basic k1"}), 401, None)
        assert server.recorder.submitted == []
        ok = httpx.post(url, json=_chat(**SHORT), headers={"Authorization": "Bearer k2"}, timeout=60)
        assert ok.status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_health_is_503_until_engine_ready(tiny_artifacts):
    engine = make_engine(tiny_artifacts, max_batch=1, start=False)  # loaded, not warmed up, no worker
    with LiveServer(engine, settings_for(None)) as server:
        assert httpx.get(f"{server.url}/health").status_code == 503
        response = httpx.post(f"{server.url}/v1/chat/completions", json=_chat(**SHORT))
        _assert_openai_error(response, 503, None)
        assert response.headers["retry-after"] == "5"
        engine.start()
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=_chat(**SHORT), timeout=60).status_code == 200


def test_full_queue_is_429_with_retry_after(tiny_artifacts):
    """A warmed-up engine whose worker has not started: requests wait in its bounded queue."""
    engine = make_engine(tiny_artifacts, max_batch=1, max_queue=2, start=False)
    engine.warmup()
    with LiveServer(engine, settings_for(None)) as server, concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(httpx.post, f"{server.url}/v1/chat/completions", json=_chat(**{**SHORT, "seed": i}),
                               timeout=60) for i in range(2)]
        wait_for(lambda: engine.queue_depth() == 2, what="two queued requests")
        response = httpx.post(f"{server.url}/v1/chat/completions", json=_chat(**SHORT))
        _assert_openai_error(response, 429, "queue_full")
        assert int(response.headers["retry-after"]) >= 1
        assert server.metric("higgs_queue_depth") == 2
        assert server.metric("higgs_errors_total", code="queue_full") == 1
        engine.start()  # the worker drains the queue
        assert [f.result().status_code for f in waiting] == [200, 200]
        assert server.metric("higgs_queue_depth") == 0


def test_concurrent_requests_are_200_or_429(tiny_artifacts):
    """20 simultaneous requests (speech mp3, streamed and blocking chat) on 4 decode slots and a
    16-request queue: at most 4 can be turned away, never a 5xx, and every 200 is complete."""
    engine = make_engine(tiny_artifacts, max_batch=4, max_queue=16)
    limit = {"max_completion_tokens": 20}

    async def one(client: httpx.AsyncClient, i: int) -> int:
        if i % 3 == 0:
            response = await client.post("/v1/audio/speech", json={**SPEECH, "voice": "default", "seed": i,
                                                                    "response_format": "mp3", **limit})
        else:
            response = await client.post("/v1/chat/completions", json=_chat(stream=i % 3 == 1, seed=i, **limit))
        body = await response.aread()
        if response.status_code == 200 and i % 3 == 1:
            assert body.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"' in body
        elif response.status_code == 200 and i % 3 == 2:
            assert json.loads(body)["choices"][0]["message"]["audio"]["data"]
        return response.status_code

    async def burst(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(20)))

    with LiveServer(engine, settings_for(None)) as server:
        statuses = asyncio.run(burst(server.url))
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 16, statuses
        assert len(server.recorder.finished) == statuses.count(200)
        assert {f.finish_reason for f in server.recorder.finished.values()} <= {"stop", "length"}
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert server.metric("higgs_generations_in_flight") == 0


@pytest.fixture(scope="module")
def solo(tiny_artifacts):
    """One decode slot: a generation that is not cancelled would hold it for seconds."""
    with LiveServer(make_engine(tiny_artifacts, max_batch=1, endless=True), settings_for(None)) as server:
        yield server


def _raw_post(url: str, path: str, body: dict, request_id: str) -> socket.socket:
    """POST over a plain socket, so that the test can drop the connection whenever it likes."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\nX-Request-Id: {request_id}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("kind", ["chat-stream", "speech-stream", "chat-blocking"])
def test_client_disconnect_cancels_generation(solo, kind, caplog):
    caplog.set_level(logging.INFO, logger="higgs.engine")
    engine, recorder = solo.engine, solo.recorder
    request_id = f"disconnect-{kind}"
    cancelled = solo.metric("higgs_generations_cancelled_total", cause="disconnect")
    if kind == "chat-blocking":
        first_audio = solo.metric("higgs_time_to_first_audio_seconds_count", endpoint="chat")
        sock = _raw_post(solo.url, "/v1/chat/completions", _chat(**LONG), request_id)
        wait_for(lambda: solo.metric("higgs_time_to_first_audio_seconds_count", endpoint="chat") > first_audio,
                 what="first audio of the blocking request")
        sock.close()  # leave while the engine is generating
    else:
        path, body = (("/v1/chat/completions", _chat(stream=True, **LONG)) if kind == "chat-stream"
                      else ("/v1/audio/speech", {**SPEECH, "voice": "default", "response_format": "pcm", **LONG}))
        with httpx.stream("POST", solo.url + path, json=body, headers={"X-Request-Id": request_id},
                          timeout=30) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                if b'"audio"' in chunk or kind == "speech-stream" and chunk:
                    break  # leave after the first audio
    finished = wait_for(lambda: recorder.finished_with_prefix(request_id + "-"), what="the engine's last event")
    assert finished.finish_reason == "cancelled" and 0 < finished.completion_tokens < LONG["max_completion_tokens"]
    wait_for(lambda: solo.metric("higgs_generations_cancelled_total", cause="disconnect") == cancelled + 1,
             what="cancel metric")
    assert solo.metric("higgs_generations_in_flight") == 0
    wait_for(lambda: engine.active_requests() == 0, what="the decode slot freed")
    assert any(r.name == "higgs.engine" and "cancelled by the client" in r.getMessage()
               and request_id in r.getMessage() for r in caplog.records)
    assert httpx.post(f"{solo.url}/v1/chat/completions", json=_chat(**SHORT), timeout=60).status_code == 200


def test_engine_failure_is_500_with_openai_body_and_sse_error(solo):
    url, recorder = f"{solo.url}/v1/chat/completions", solo.recorder
    errors = solo.metric("higgs_generations_finished_total", reason="error")
    recorder.fail_next_audio_step("injected runtime fault")
    response = httpx.post(url, json=_chat(**SHORT), timeout=60)
    _assert_openai_error(response, 500, "generation_failed")
    assert "injected runtime fault" in response.json()["error"]["message"]
    recorder.fail_next_audio_step()
    with httpx.stream("POST", url, json=_chat(stream=True, **SHORT), timeout=60) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == "generation_failed" and events[-1] == "[DONE]"
    assert solo.metric("higgs_generations_finished_total", reason="error") == errors + 2
    assert httpx.post(url, json=_chat(**SHORT), timeout=60).status_code == 200  # the engine goes on


def test_shutdown_drains_in_flight_stream(tiny_artifacts):
    engine = make_engine(tiny_artifacts, max_batch=1, endless=True)
    server = LiveServer(engine, settings_for(None)).__enter__()
    body = _chat(stream=True, seed=4, max_completion_tokens=120)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        server.server.should_exit = True  # begin shutdown mid-stream
        rest = [line for line in lines if line]
    server.stop()
    finish = json.loads(rest[-2][6:])["choices"][0]
    assert finish["finish_reason"] == "length" and rest[-1] == "data: [DONE]"
    audio = b"".join(base64.b64decode(json.loads(line[6:])["choices"][0]["delta"]["audio"]["data"])
                     for line in rest if '"audio"' in line)
    (finished,) = engine.recorder.finished.values()
    assert finished.completion_tokens == 120 and len(audio) == 2 * round(finished.audio_seconds * 24000)
    assert engine.recorder.shutdown_calls == [True]
