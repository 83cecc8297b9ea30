"""OpenAI-style errors: one exception type for the handlers to raise, and the handlers that turn
every failure (ours, FastAPI's validation, Starlette's HTTP errors, bugs) into the OpenAI body
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from serve.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("serve")

_TYPES = {401: "authentication_error", 429: "rate_limit_error", 501: "not_implemented_error",
          503: "service_unavailable"}
_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
          408: "request_timeout", 409: "conflict", 413: "request_too_large", 415: "unsupported_media_type",
          429: "rate_limit_exceeded",
          500: "internal_error", 501: "not_implemented", 503: "unavailable"}


class APIError(Exception):
    """A request that ends in an error response; `message` tells the client what to fix."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status, "error")
        self.param = param
        self.headers = headers

    def body(self) -> dict:
        err_type = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        info = ErrorInfo(message=self.message, type=err_type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def install_error_handlers(app: FastAPI, on_error: Callable[[APIError], None]) -> None:
    """Route every exception through APIError; `on_error` sees each one (metrics)."""

    def respond(error: APIError) -> JSONResponse:
        on_error(error)
        return error.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return respond(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{request.method} {request.url.path}: {message}"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return respond(APIError(exc.status_code, message, headers=headers))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return respond(APIError(500, "internal server error; the server log has the traceback"))


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette's 405 names only the methods of the
    first route whose path matched (starlette 1.10 routing.py, Router.app), and FastAPI registers
    one route per method, so GET and POST /v1/audio/voices would answer `Allow: GET`."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)  # PARTIAL: the path matches, the method does not
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def validation_error(errors: list[dict]) -> APIError:
    """Pydantic errors as one OpenAI 400 whose `param` is the dotted location in the body.

    A value that fits no member of a union (content: string or list of parts) yields one error
    per member; the deepest says most (e.g. an unknown part type), and members that fail at the
    same place are reported together.
    """
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    located = [(_field_path(e.get("loc", ())), e) for e in errors]
    depth = max(len(path) for path, _ in located)
    path, error = next((p, e) for p, e in located if len(p) == depth)
    if not path and error.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return APIError(400, "request body must be a JSON object", code="invalid_request")
    param = ".".join(path) or None
    if error.get("type") == "missing":
        return APIError(400, f"missing required field {param!r}", code="invalid_value", param=param)
    messages = dict.fromkeys(e["msg"].removeprefix("Value error, ") for p, e in located if p == path)
    message = f"{param}: {' or '.join(messages)}" if param else " or ".join(messages)
    if "input" in error:
        message += f" (got {_short(error['input'])})"
    return APIError(400, message, code="invalid_value", param=param)


def _field_path(loc) -> list[str]:
    """Body location without FastAPI's "body" root and pydantic's union-member tags."""
    return [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (
        "[" in p or p in ("str", "int", "float", "bool", "list", "dict", "none")))]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
