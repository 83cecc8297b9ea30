"""multipart/form-data bodies (voice uploads): python-multipart's streaming parser, bounded, run off
the event loop.

Why not the standard library's `email` parser: it builds a message object per part, so a body of
hundreds of thousands of tiny parts takes a minute; on the event loop that froze every request.
Why not Starlette's `request.form()`: it feeds the same parser on the event loop (starlette 1.10
`formparsers.MultiPartParser.parse`). Here the loop only collects the body (already capped by the
edge middleware); the parser runs in a worker thread and stops at the first part, header or field
beyond the limits, so the work per request is bounded by the limits, not by the body.
"""

from __future__ import annotations

import dataclasses

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_PARTS = 8  # a voice upload has three
MAX_HEADER_BYTES = 4096  # all header lines of one part together
MAX_BOUNDARY = 200  # RFC 2046 §5.1.1 allows 70 characters; clients stay far below this


class FormError(ValueError):
    """The body is not a multipart/form-data body within the limits; the message says why."""


@dataclasses.dataclass
class FormPart:
    data: bytes
    filename: str | None


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a multipart/form-data content type; None for any other media type."""
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        return None
    boundary = params.get(b"boundary", b"")
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise FormError(f"the multipart/form-data content type needs a boundary of 1-{MAX_BOUNDARY} characters")
    return boundary


def parse_form(body: bytes, boundary: bytes) -> dict[str, FormPart]:
    """Field name -> part. Blocking: call it in a worker thread."""
    fields: dict[str, FormPart] = {}
    state = {"parts": 0, "header_bytes": 0, "field": b"", "value": b"", "headers": {}, "data": [], "ended": False}

    def on_part_begin():
        state["parts"] += 1
        if state["parts"] > MAX_PARTS:
            raise FormError(f"the form has more than {MAX_PARTS} parts; send name, transcript and audio")
        state["header_bytes"], state["headers"], state["data"] = 0, {}, []

    def header_bytes(data: bytes, start: int, end: int) -> bytes:
        state["header_bytes"] += end - start
        if state["header_bytes"] > MAX_HEADER_BYTES:
            raise FormError(f"a form part has more than {MAX_HEADER_BYTES} bytes of headers")
        return data[start:end]

    def on_header_field(data: bytes, start: int, end: int):
        state["field"] += header_bytes(data, start, end)

    def on_header_value(data: bytes, start: int, end: int):
        state["value"] += header_bytes(data, start, end)

    def on_header_end():
        state["headers"][state["field"].strip().lower()] = state["value"].strip()
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int):
        state["data"].append(data[start:end])

    def on_part_end():
        disposition, params = parse_options_header(state["headers"].get(b"content-disposition", b"").decode("latin-1"))
        if disposition != b"form-data" or not params.get(b"name"):
            raise FormError("every form part needs 'Content-Disposition: form-data; name=...'")
        name = _text(params[b"name"], "a form field name")
        if name in fields:
            raise FormError(f"form field {name!r} appears twice")
        filename = params.get(b"filename")
        fields[name] = FormPart(b"".join(state["data"]), None if filename is None else _text(filename, "a file name"))

    def on_end():
        state["ended"] = True

    parser = MultipartParser(boundary, callbacks={
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_end": on_end})
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise FormError(f"malformed multipart body: {exc}") from None
    if not state["ended"]:
        raise FormError("malformed multipart body: it ends before the closing boundary")
    return fields


def _text(raw: bytes, what: str) -> str:
    """Header parameters come back as the bytes the client sent; clients send UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormError(f"{what} is not valid UTF-8") from None
