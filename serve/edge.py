"""The server's edge: everything a request meets before its handler runs.

A request is given an id, checked for its API key, held to the body cap and the body wait, and
counted; a JSON body with more structure than any request needs is refused before it is parsed;
a connection that never sends a complete request head is closed. These are the limits of
`serve.settings.Limits` applied where they are cheapest, so that the routes (serve/app.py) see
only requests worth reading. Errors raised here take the OpenAI shape through serve/errors.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import uuid

from fastapi import Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from serve.errors import APIError
from serve.metrics import Metrics
from serve.settings import ServeSettings

log = logging.getLogger("serve")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")  # FastAPI's and fastapi-offline's defaults
# the `endpoint` label of request metrics: the API's route templates (a path parameter stands for one
# segment, so the label set stays bounded); any other path is counted as "other"
ENDPOINTS = ("/v1/chat/completions", "/v1/audio/speech", "/v1/audio/voices", "/v1/audio/voices/{name}",
             "/v1/models", "/health", "/metrics")
_ENDPOINT_PATTERNS = [(compile_path(template)[0], template) for template in ENDPOINTS]


def endpoint_label(path: str) -> str:
    """The route template that `path` requests, or "other"."""
    return next((template for pattern, template in _ENDPOINT_PATTERNS if pattern.fullmatch(path)), "other")


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
            self.metrics.requests.labels(endpoint_label(scope["path"]), str(status)).inc()

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
