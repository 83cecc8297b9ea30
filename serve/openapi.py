"""What the OpenAPI document (/openapi.json) says about each route, so that it describes the server
as it behaves: every status it sends with the OpenAI error body, audio media types for audio, the
multipart body of the voice upload. `make fuzz` (schemathesis) holds the server to this document.

FastAPI derives the request schemas from the pydantic models; this module adds what it cannot
know: error statuses raised from handlers and middleware, non-JSON responses, and a request body
read by hand. It also drops the 422 FastAPI documents for validation errors: this server answers
those with 400 (serve/errors.py), as OpenAI does.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from engines.audio_io import MEDIA_TYPES
from serve.protocol import ChatCompletionResponse, ErrorResponse
from serve.voices import VOICE_NAME

_WHY = {
    400: "invalid request (the message names the field and the fix)",
    401: "API key missing or wrong (only when the server requires keys)",
    403: "forbidden for this resource",
    404: "unknown model or resource",
    408: "the request body stalled",
    409: "the name is taken",
    413: "request body or clip too large",
    415: "wrong content type",
    429: "server at capacity (Retry-After) or quota reached",
    500: "generation failed",
    501: "not available on this server (e.g. voice cloning without the codec encoder)",
    503: "model loading or server shutting down (Retry-After)",
}
# what any request may get before it reaches its handler (serve/edge.py, serve/errors.py)
_EDGE = (400, 401, 408, 413, 500)
_BINARY = {"schema": {"type": "string", "format": "binary"}}
# one server-sent event, as OpenAPI < 3.2 has `schema` describe each event of a stream
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "JSON of one event (chat.completion.chunk, "
                            "speech.audio.delta, speech.audio.done or an OpenAI error body), or [DONE]"},
                   "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}}


def errors(*statuses: int) -> dict:
    """`responses=` entries for these statuses and the edge ones, each with the OpenAI error body."""
    return {status: {"model": ErrorResponse, "description": _WHY[status]} for status in sorted({*_EDGE, *statuses})}


GENERATION = (404, 429, 501, 503)
CHAT_RESPONSES = {**errors(*GENERATION), 200: {
    "model": ChatCompletionResponse, "content": _SSE,
    "description": "the completion with base64 audio, or with `stream` chat.completion.chunk events"}}
SPEECH_RESPONSES = {**errors(*GENERATION), 200: {
    "content": {**{media: _BINARY for media in dict.fromkeys(MEDIA_TYPES.values())}, **_SSE},
    "description": "audio in `response_format`, streamed; with `stream_format: sse` speech.audio events"}}
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["name", "transcript", "audio"],
    "properties": {
        "name": {"type": "string", "pattern": f"^{VOICE_NAME.pattern}$"},  # ECMA-262 "$": the end only
        "transcript": {"type": "string", "description": "what the clip says"},
        "audio": {"type": "string", "format": "binary", "description": "the clip (wav, flac, mp3, ogg, m4a, ...)"},
    }}}}}}
UPLOAD_RESPONSES = errors(409, 415, 429, 501)
DELETE_RESPONSES = errors(403, 404)
HEALTH_RESPONSES = {**errors(), 503: {"description": "model still loading", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"status": {"type": "string"}}}}}}}
METRICS_RESPONSES = {**errors(), 200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {
    "type": "string"}}}}}


def install_openapi(app: FastAPI, model_names: tuple[str, ...]) -> None:
    """Serve the document FastAPI builds, without its 422 responses and their schemas, and with the
    model names this server answers to as the `model` field's enum (any other name is a 404)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in document["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
            schemas = document.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for name in ("ChatCompletionRequest", "AudioSpeechRequest"):
                schemas[name]["properties"]["model"]["enum"] = list(model_names)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
