"""The HTTP server's routes: OpenAI chat completions with audio out, OpenAI TTS, voices, models,
health and metrics over any `engines.api.SpeechEngine`.

The engine decodes on its own thread and pushes events into the request's event loop
(`engines.api.Generation`); handlers only await those events, and CPU-bound audio work
(decoding reference clips, encoding output) runs in worker threads, so the loop never blocks on
generation. A client that leaves early gets its generation cancelled (the engine frees the slot
within one decode step). API: shared/api/README.md.

Routes stay thin; the rest has its own room: the edge every request passes first (serve/edge.py),
a generation from submit to the end of its response (serve/jobs.py), the bodies of streamed
responses (serve/streams.py), requests into engine terms (serve/conversation.py), errors
(serve/errors.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from engines.api import QueueFull, SpeechEngine, SpeechRequest
from engines.audio_io import MEDIA_TYPES, StreamingEncoder, encode_audio
from serve import openapi
from serve.conversation import RequestBuilder
from serve.edge import BoundedJSONRoute, EdgeMiddleware
from serve.errors import APIError, install_error_handlers
from serve.forms import FormError, FormPart, boundary_of, parse_form
from serve.jobs import FINISH_REASONS, Job, JobStream, collect, shutdown_engine, usage
from serve.longform import LongText, LongTextGeneration
from serve.metrics import Metrics
from serve.playground import install_playground
from serve.protocol import (AudioSpeechRequest, ChatCompletionAudio, ChatCompletionChoice, ChatCompletionMessage,
                            ChatCompletionRequest, ChatCompletionResponse, ModelCard, ModelList, VoiceCard,
                            VoiceDeleted, VoiceList)
from serve.settings import ServeSettings
from serve.streams import chat_chunks, encoded_audio, speech_events
from serve.voices import ReferenceEncoder, VoiceLibrary

log = logging.getLogger("serve")


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
        await asyncio.to_thread(shutdown_engine, engine, settings.shutdown_timeout_s)

    # docs pages from files installed with fastapi-offline, not from a CDN
    app = FastAPIOffline(title="Higgs Audio V2 text-to-speech", lifespan=lifespan)
    app.router.route_class = BoundedJSONRoute
    app.state.metrics = metrics
    engine.add_finish_listener(lambda request, finished: metrics.count_finished(finished))
    install_error_handlers(app, on_error=lambda error: metrics.errors.labels(error.code).inc())
    openapi.install_openapi(app, settings.model_names)
    app.add_middleware(EdgeMiddleware, settings=settings, metrics=metrics)

    def submit(request: SpeechRequest | LongText, endpoint: str) -> Job:
        """Queue on the engine (a long text: its first chunk, the rest as it goes, serve/longform.py).
        A max_tokens the server defaulted yields to a KV cache too small for it (engines/admission.py)."""
        if not engine.ready():
            raise APIError(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
        loop = asyncio.get_running_loop()

        def start(one: SpeechRequest):
            try:
                generation = engine.submit(one, loop)
            except ValueError as exc:  # the engine refuses the prompt (e.g. longer than its KV cache)
                raise APIError(400, f"the engine cannot take this request: {exc}", code="invalid_prompt") from exc
            except QueueFull as exc:
                retry = max(1, math.ceil(exc.retry_after))
                raise APIError(429, f"the server is at capacity ({engine.queue_depth()} requests queued); retry "
                               f"after {retry} s", code="queue_full", headers={"Retry-After": str(retry)}) from exc
            sampling = one.sampling
            log.info("req %s: %s submitted: %d messages, max_tokens %s%s, temperature %g, top_p %g, top_k %s, "
                     "seed %s", one.request_id, endpoint, len(one.messages), one.max_tokens,
                     " (default, or what fits)" if one.max_tokens_defaulted else "", sampling.temperature,
                     sampling.top_p, sampling.top_k, sampling.seed)
            return generation

        if isinstance(request, LongText):
            return Job(LongTextGeneration(request, start), endpoint, metrics, engine.sample_rate)
        return Job(start(request), endpoint, metrics, engine.sample_rate)

    @app.post("/v1/chat/completions", responses=openapi.CHAT_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Audio out: base64 file in `audio.format` (default wav), or with `stream` PCM16 deltas
        (streams are always PCM16 24 kHz mono, whatever `audio.format` says)."""
        request_id = request.state.request_id
        _log_ignored(body, request_id)
        job = submit(await builder.from_chat(body, request_id), "chat")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return JobStream(job, chat_chunks(job, body.model, include_usage), media_type="text/event-stream")
        collected = await collect(job, request)
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
                finish_reason=FINISH_REASONS[finished.finish_reason],
                stop_reason=finished.stop_reason,
            )],
            usage=usage(finished),
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
        job = submit(speech_request, "speech")
        if body.stream_format == "sse":
            return JobStream(job, speech_events(job, encoder), media_type="text/event-stream")
        return JobStream(job, encoded_audio(job, encoder), media_type=MEDIA_TYPES[body.response_format])

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
