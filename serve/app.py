"""The HTTP server: OpenAI chat completions with audio out, OpenAI TTS, voices, models, health and
metrics over any `engines.api.SpeechEngine`.

The engine decodes on its own thread and pushes events into the request's event loop
(`engines.api.Generation`); handlers only await those events, and CPU-bound audio work
(decoding reference clips, encoding output) runs in worker threads, so the loop never blocks on
generation. A client that leaves early gets its generation cancelled (the engine frees the slot
within one decode step). API: shared/api/README.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import re
import threading
import time
import uuid
from typing import AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from engines.api import AudioChunk, Finished, QueueFull, SpeechEngine, SpeechRequest
from engines.audio_io import MEDIA_TYPES, StreamingEncoder, encode_audio, to_pcm16
from serve import openapi
from serve.conversation import RequestBuilder
from serve.errors import APIError, install_error_handlers
from serve.forms import FormError, FormPart, boundary_of, parse_form
from serve.longform import LongText, LongTextGeneration
from serve.metrics import Metrics
from serve.playground import install_playground
from serve.protocol import (AudioSpeechRequest, ChatCompletionAudio, ChatCompletionChoice, ChatCompletionMessage,
                            ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamChoice,
                            ChatCompletionStreamResponse, DeltaAudio, DeltaMessage, ModelCard, ModelList,
                            SpeechAudioDelta, SpeechAudioDone, SpeechUsage, UsageInfo, VoiceCard, VoiceDeleted,
                            VoiceList)
from serve.settings import ServeSettings
from serve.voices import ReferenceEncoder, VoiceLibrary

log = logging.getLogger("serve")

_ENDPOINTS = ("/v1/chat/completions", "/v1/audio/speech", "/v1/audio/voices", "/v1/models", "/health", "/metrics")
# engine finish reasons -> OpenAI's; "abort" (vLLM's word) when the server cancelled the generation
_FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


def create_app(engine: SpeechEngine, settings: ServeSettings) -> FastAPI:
    """The app for one engine. Startup loads and encodes the voice presets; shutdown drains the
    engine (in-flight streams end with their final chunk) within settings.shutdown_timeout_s."""
    metrics = Metrics(queue_depth=engine.queue_depth)
    voices = VoiceLibrary(settings.voices_dir, settings.voice_aliases, ReferenceEncoder(engine), settings.limits,
                          engine.sample_rate)
    builder = RequestBuilder(settings, voices, engine.sample_rate)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await voices.load()
        log.info("serving %s as %s; api keys %s", type(engine).__name__, ", ".join(settings.model_names),
                 "required" if settings.api_keys else "off")
        yield
        await asyncio.to_thread(_shutdown_engine, engine, settings.shutdown_timeout_s)

    # docs pages from files installed with fastapi-offline, not from a CDN
    app = FastAPIOffline(title="Higgs Audio V2 text-to-speech", lifespan=lifespan)
    app.router.route_class = BoundedJSONRoute
    app.state.metrics = metrics
    engine.add_finish_listener(lambda request, finished: metrics.count_finished(finished))
    install_error_handlers(app, on_error=lambda error: metrics.errors.labels(error.code).inc())
    openapi.install_openapi(app, settings.model_names)
    app.add_middleware(EdgeMiddleware, settings=settings, metrics=metrics)

    def submit(request: SpeechRequest | LongText, endpoint: str, default_max: bool) -> Job:
        """Queue on the engine (a long text: its first chunk, the rest as it goes, serve/longform.py).
        `default_max`: the client named no max_completion_tokens, so request.max_tokens is the server
        default, which yields to a KV cache too small for it."""
        if not engine.ready():
            raise APIError(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
        loop = asyncio.get_running_loop()

        def start(one: SpeechRequest, may_shrink: bool):
            try:
                try:
                    generation = engine.submit(one, loop)
                except ValueError:
                    if not may_shrink:
                        raise
                    # the default does not fit beside this prompt: generate what fits (max_tokens None)
                    one.max_tokens = None
                    generation = engine.submit(one, loop)
            except ValueError as exc:  # the engine refuses the prompt (e.g. longer than its KV cache)
                raise APIError(400, f"the engine cannot take this request: {exc}", code="invalid_prompt") from exc
            except QueueFull as exc:
                retry = max(1, math.ceil(exc.retry_after))
                raise APIError(429, f"the server is at capacity ({engine.queue_depth()} requests queued); retry "
                               f"after {retry} s", code="queue_full", headers={"Retry-After": str(retry)}) from exc
            sampling = one.sampling
            log.info("req %s: %s submitted: %d messages, max_tokens %s, temperature %g, top_p %g, top_k %s, "
                     "seed %s", one.request_id, endpoint, len(one.messages), one.max_tokens, sampling.temperature,
                     sampling.top_p, sampling.top_k, sampling.seed)
            return generation

        if isinstance(request, LongText):
            return Job(LongTextGeneration(request, start, default_max), endpoint, metrics, engine.sample_rate)
        return Job(start(request, default_max), endpoint, metrics, engine.sample_rate)

    @app.post("/v1/chat/completions", responses=openapi.CHAT_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Audio out: base64 file in `audio.format` (default wav), or with `stream` PCM16 deltas
        (streams are always PCM16 24 kHz mono, whatever `audio.format` says)."""
        request_id = request.state.request_id
        _log_ignored(body, request_id)
        job = submit(await builder.from_chat(body, request_id), "chat",
                     default_max=body.max_completion_tokens is None and body.max_tokens is None)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return JobStream(job, _chat_chunks(job, body.model, include_usage), media_type="text/event-stream")
        collected = await _collect(job, request)
        if collected is None:
            return Response(status_code=499)  # client closed the connection; nobody reads this
        wave, finished = collected
        fmt = body.audio.format if body.audio else "wav"
        data = await asyncio.to_thread(encode_audio, wave, engine.sample_rate, "pcm" if fmt == "pcm16" else fmt)
        response = ChatCompletionResponse(
            id=f"chatcmpl-{request_id}",
            model=body.model,
            choices=[ChatCompletionChoice(
                message=ChatCompletionMessage(audio=ChatCompletionAudio(
                    id=f"audio-{uuid.uuid4().hex}", data=base64.b64encode(data).decode("ascii"))),
                finish_reason=_FINISH_REASONS[finished.finish_reason],
                stop_reason=finished.stop_reason,
            )],
            usage=_usage(finished),
        )
        return JSONResponse(response.model_dump())

    @app.post("/v1/audio/speech", response_class=StreamingResponse, responses=openapi.SPEECH_RESPONSES)
    async def audio_speech(body: AudioSpeechRequest, request: Request):
        """OpenAI TTS: encoded bytes over chunked transfer as they are produced, or SSE events."""
        request_id = request.state.request_id
        _log_ignored(body, request_id)
        speech_request = await builder.from_speech(body, request_id)
        encoder = StreamingEncoder(body.response_format, engine.sample_rate, body.speed)
        # last: nothing may fail between submit and streaming
        job = submit(speech_request, "speech", default_max=body.max_completion_tokens is None)
        if body.stream_format == "sse":
            return JobStream(job, _speech_events(job, encoder), media_type="text/event-stream")
        return JobStream(job, _encoded_audio(job, encoder), media_type=MEDIA_TYPES[body.response_format])

    @app.get("/v1/models", responses=openapi.errors())
    async def list_models() -> ModelList:
        return ModelList(data=[
            ModelCard(id=name, created=created, root=settings.model_name,
                      parent=None if name == settings.model_name else settings.model_name)
            for name in settings.model_names])

    @app.get("/v1/audio/voices", responses=openapi.errors())
    async def list_voices() -> VoiceList:
        return VoiceList(data=voices.cards())

    @app.post("/v1/audio/voices", status_code=201, response_model=VoiceCard, responses=openapi.UPLOAD_RESPONSES,
              openapi_extra=openapi.UPLOAD_BODY)
    async def add_voice(request: Request):
        """multipart/form-data: `name`, `transcript` (what the clip says), `audio` (the clip file)."""
        fields = await _multipart(request)
        missing = [f for f in ("name", "transcript", "audio") if f not in fields]
        if missing:
            raise APIError(400, f"missing form field(s) {', '.join(missing)}: send name, transcript and audio (file)",
                           param=missing[0])
        audio = fields["audio"]
        suffix = audio.filename.rpartition(".")[2] if audio.filename and "." in audio.filename else None
        voice = await voices.add(_form_text(fields, "name"), _form_text(fields, "transcript"), audio.data, suffix)
        card = next(c for c in voices.cards() if c.id == voice.name)
        return JSONResponse(card.model_dump(), status_code=201)

    @app.delete("/v1/audio/voices/{name}", responses=openapi.DELETE_RESPONSES)
    async def delete_voice(name: str) -> VoiceDeleted:
        """Remove an uploaded voice (from memory and from the voices directory); presets stay."""
        await voices.delete(name)
        return VoiceDeleted(id=name)

    @app.get("/health", responses=openapi.HEALTH_RESPONSES)
    async def health():
        if engine.ready():
            return {"status": "ok"}
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics", response_class=Response, responses=openapi.METRICS_RESPONSES)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    install_playground(app)
    return app


# ---------------------------------------------------------------------------------------------
# one generation as the server sees it


class Job:
    """A submitted generation: its events with metrics and logs on the way through, and
    `abandon()` for a client that left before the end."""

    def __init__(self, generation, endpoint: str, metrics: Metrics, sample_rate: int):
        self.generation = generation
        self.request_id = generation.request.request_id
        self.endpoint = endpoint
        self.finished: Finished | None = None
        self._metrics = metrics
        self._rate = sample_rate
        self._submitted = time.perf_counter()
        self._first_audio: float | None = None
        self._samples = 0
        self._open = True
        metrics.in_flight.inc()

    async def events(self) -> AsyncIterator[AudioChunk | Finished]:
        async for event in self.generation.events():
            if isinstance(event, AudioChunk) and len(event.pcm):
                if self._first_audio is None:
                    self._first_audio = time.perf_counter() - self._submitted
                    self._metrics.ttfa.labels(self.endpoint).observe(self._first_audio)
                    log.info("req %s: first audio after %.3f s", self.request_id, self._first_audio)
                self._samples += len(event.pcm)
                yield event
            elif isinstance(event, Finished):
                self._finish(event)
                yield event

    def abandon(self, cause: str) -> None:
        """Cancel the generation unless it already finished; idempotent."""
        if not self._open:
            return
        self.generation.cancel()
        self._close()
        self._metrics.cancelled.labels(cause).inc()
        log.info("req %s: %s after %.2f s of audio; generation cancelled", self.request_id, cause,
                 self._samples / self._rate)

    def _finish(self, finished: Finished) -> None:
        self.finished = finished
        self._close()
        self._metrics.audio_seconds.labels(self.endpoint).inc(finished.audio_seconds)
        first = f"{self._first_audio:.3f} s" if self._first_audio is not None else "never"
        log.info("req %s: finished (%s): prompt %d tokens, %d steps, %.2f s audio, first audio %s, total %.2f s",
                 self.request_id, finished.finish_reason, finished.prompt_tokens, finished.completion_tokens,
                 finished.audio_seconds, first, time.perf_counter() - self._submitted)
        if finished.finish_reason == "error":
            log.error("req %s: engine error: %s", self.request_id, finished.error)

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._metrics.in_flight.dec()


class JobStream(StreamingResponse):
    """A streaming response that cancels its job when the stream ends early. Starlette stops the
    body iterator when the client disconnects (or a send fails); either way we land here."""

    def __init__(self, job: Job, content, media_type: str):
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.abandon("disconnect")


async def _collect(job: Job, request: Request) -> tuple[np.ndarray, Finished] | None:
    """All audio of a non-streaming job, or None if the client disconnected first (then the job
    is cancelled). Engine failures become 500 / 503 errors."""

    async def gather():
        chunks = []
        async for event in job.events():
            if isinstance(event, AudioChunk):
                chunks.append(event.pcm)
            else:
                return chunks, event

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gathering, watching = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({gathering, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not gathering.done():
            gathering.cancel()
            job.abandon("disconnect" if watching.done() else "server cancelled")
    if not gathering.done() or gathering.cancelled():
        return None
    chunks, finished = gathering.result()
    _raise_for_failure(finished)
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), finished


def _raise_for_failure(finished: Finished) -> None:
    if finished.finish_reason == "error":
        raise APIError(500, f"generation failed: {finished.error or 'engine error'}", code="generation_failed")
    if finished.finish_reason == "cancelled":
        raise APIError(503, "generation was cancelled: the server is shutting down; retry", code="cancelled",
                       headers={"Retry-After": "5"})


def _usage(finished: Finished) -> UsageInfo:
    return UsageInfo(prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens,
                     total_tokens=finished.prompt_tokens + finished.completion_tokens)


def _sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def _chat_chunks(job: Job, model: str, include_usage: bool) -> AsyncIterator[str]:
    """chat.completion.chunk events: role, PCM16 audio deltas as they arrive, the finish chunk,
    the usage chunk if asked for, [DONE]. An engine failure is an SSE error event (the SDKs
    raise it), since the 200 status is already sent."""
    created, audio_id = int(time.time()), f"audio-{uuid.uuid4().hex}"

    def chunk(delta: DeltaMessage, **choice) -> str:
        return _sse(ChatCompletionStreamResponse(id=f"chatcmpl-{job.request_id}", created=created, model=model,
                                                 choices=[ChatCompletionStreamChoice(delta=delta, **choice)]))

    yield chunk(DeltaMessage(role="assistant", content=""))
    async for event in job.events():
        if isinstance(event, AudioChunk):
            data = base64.b64encode(to_pcm16(event.pcm)).decode("ascii")
            yield chunk(DeltaMessage(audio=DeltaAudio(id=audio_id, data=data)))
        elif event.finish_reason == "error":
            yield _sse(APIError(500, f"generation failed: {event.error}", code="generation_failed").body())
        else:
            yield chunk(DeltaMessage(), finish_reason=_FINISH_REASONS[event.finish_reason],
                        stop_reason=event.stop_reason)
            if include_usage:
                yield _sse(ChatCompletionStreamResponse(id=f"chatcmpl-{job.request_id}", created=created,
                                                        model=model, choices=[], usage=_usage(event)))
    yield "data: [DONE]\n\n"


async def _encoded_audio(job: Job, encoder: StreamingEncoder) -> AsyncIterator[bytes]:
    """Encoded bytes as the audio arrives. A failed generation aborts the connection (raising
    here), so the client sees a broken transfer rather than a silently truncated file."""
    async for event in job.events():
        if isinstance(event, AudioChunk):
            data = await asyncio.to_thread(encoder.feed, event.pcm)
        elif event.finish_reason in ("error", "cancelled"):
            raise RuntimeError(f"req {job.request_id}: generation {event.finish_reason}: {event.error}")
        else:
            data = await asyncio.to_thread(encoder.finish)
        if data:
            yield data


async def _speech_events(job: Job, encoder: StreamingEncoder) -> AsyncIterator[str]:
    """OpenAI's speech SSE: speech.audio.delta events (base64 of the encoded bytes), then
    speech.audio.done with usage, or an error event."""
    try:
        async for data in _encoded_audio(job, encoder):
            yield _sse(SpeechAudioDelta(audio=base64.b64encode(data).decode("ascii")))
    except RuntimeError as exc:
        yield _sse(APIError(500, str(exc), code="generation_failed").body())
        return
    usage = job.finished
    yield _sse(SpeechAudioDone(usage=SpeechUsage(input_tokens=usage.prompt_tokens,
                                                 output_tokens=usage.completion_tokens,
                                                 total_tokens=usage.prompt_tokens + usage.completion_tokens)))


def _log_ignored(body: BaseModel, request_id: str) -> None:
    if body.model_extra:
        log.info("req %s: ignoring unknown fields %s", request_id, sorted(body.model_extra))


async def _multipart(request: Request) -> dict[str, FormPart]:
    """A multipart/form-data body by field name: collected on the loop (EdgeMiddleware caps its
    size and the wait for it), parsed in a worker thread within serve/forms.py's limits."""
    try:
        boundary = boundary_of(request.headers.get("content-type", ""))
        if boundary is None:
            raise APIError(415, "send multipart/form-data with fields name, transcript and audio (a file)")
        return await asyncio.to_thread(parse_form, await request.body(), boundary)
    except FormError as exc:
        raise APIError(400, str(exc), code="invalid_form") from exc


def _form_text(fields: dict[str, FormPart], name: str) -> str:
    try:
        return fields[name].data.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, f"form field {name!r} is not valid UTF-8 text", param=name) from None


# Every JSON request of this API is a small structure around at most one large string (a base64
# clip). Bodies with more structure than any request needs are refused before parsing: json.loads
# holds the GIL for its whole run (about 1.5 s for 24 MiB of tiny members), which stalls the event
# loop and every other request whatever thread it runs in.
MAX_JSON_SEPARATORS = 65536  # ',' and ':' bytes in a body (they bound its members and values)


class _BoundedJSONRequest(Request):
    async def json(self):
        body = await self.body()
        separators = body.count(b",") + body.count(b":")
        if separators > MAX_JSON_SEPARATORS:
            # an HTTPException, which FastAPI 0.165 lets through its body parsing (fastapi/routing.py)
            raise StarletteHTTPException(413, f"request body has {separators} JSON separators; the limit is "
                                              f"{MAX_JSON_SEPARATORS}: no request of this API needs that many")
        return json.loads(body)


class BoundedJSONRoute(APIRoute):
    """Routes whose JSON bodies go through `_BoundedJSONRequest` (FastAPI's documented way to change
    how a request body is read: https://fastapi.tiangolo.com/how-to/custom-request-and-route/)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(_BoundedJSONRequest(request.scope, request.receive))

        return bounded


def _shutdown_engine(engine: SpeechEngine, timeout_s: float) -> None:
    """engine.shutdown(drain=True) bounded in time; past the budget, cancel what is left."""
    log.info("shutting down: draining in-flight generations (up to %.0f s)", timeout_s)
    drainer = threading.Thread(target=engine.shutdown, kwargs={"drain": True}, daemon=True)
    drainer.start()
    drainer.join(timeout_s)
    if drainer.is_alive():
        log.warning("drain took longer than %.0f s; cancelling the remaining generations", timeout_s)
        engine.shutdown(drain=False)


# ---------------------------------------------------------------------------------------------
# edge: before routing


_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")  # FastAPI's and fastapi-offline's defaults


class EdgeMiddleware:
    """Pure ASGI (no buffering of streamed responses): request id (X-Request-Id in and out), API
    keys on /v1/* and the API docs, the request body cap (413 before anything parses it) and wait
    (408 when the body stalls), request metrics."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app = app
        self.keys = [key.encode() for key in settings.api_keys]
        self.max_body = settings.limits.max_body_bytes
        self.body_timeout = settings.limits.body_timeout_s
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        supplied = headers.get("x-request-id", "")  # kept as a prefix for log correlation, never trusted unique
        request_id = f"{supplied}-{uuid.uuid4().hex[:8]}" if _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        try:
            rejection = self._reject(scope["path"], headers)
            if rejection is not None:
                self.metrics.errors.labels(rejection.code).inc()
                await rejection.response()(scope, receive, send_with_id)
            else:
                await self.app(scope, self._capped(receive), send_with_id)
        finally:
            endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()

    def _reject(self, path: str, headers: Headers) -> APIError | None:
        if self.keys and (path.startswith("/v1/") or path in DOCS_PATHS):
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                return APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                                code="missing_api_key")
            if not any(hmac.compare_digest(key.strip().encode(), k) for k in self.keys):
                return APIError(401, "invalid API key", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return APIError(400, f"invalid Content-Length header {length!r}")
        if length is not None and int(length) > self.max_body:
            return APIError(413, f"request body of {length} bytes exceeds the {self.max_body} byte limit",
                            code="request_too_large")
        return None

    def _capped(self, receive):
        """receive() that stops a body without Content-Length (chunked) at the same cap, and a body
        whose next piece takes longer than body_timeout (a client that sends half a request)."""
        seen, complete = 0, False

        async def capped():
            nonlocal seen, complete
            if complete:  # after the body only http.disconnect comes, whenever the client leaves
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise StarletteHTTPException(408, f"the request body stalled for {self.body_timeout:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_body:
                    raise StarletteHTTPException(413, f"request body exceeds the {self.max_body} byte limit")
            return message

        return capped


def http_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, else h11) plus a deadline for the request head.

    uvicorn 0.54 times out only idle keep-alive connections after a response
    (`on_response_complete` in protocols/http/h11_impl.py and httptools_impl.py): a connection that
    sends nothing, or half a request line or header block, is held forever. Here every connection
    waiting for a request head (none yet, or the last response complete: `cycle` unset or
    `cycle.response_complete`, as both implementations keep it) is closed after `header_timeout_s`.
    Stalled bodies are EdgeMiddleware's (408)."""

    class HeadTimeout(AutoHTTPProtocol):
        def connection_made(self, transport):
            self._head_timer = None
            super().connection_made(transport)
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_head()

        def connection_lost(self, exc) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _watch_head(self) -> None:
            if not self._waiting_for_head():
                self._stop_timer()
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _stop_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self._waiting_for_head() and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request head in %g s", header_timeout_s)
                self.transport.close()

    return HeadTimeout


def server_options(settings: ServeSettings) -> dict:
    """uvicorn options that belong to the app's limits (`python -m serve` and the tests use them)."""
    return {"http": http_protocol(settings.limits.header_timeout_s)}
