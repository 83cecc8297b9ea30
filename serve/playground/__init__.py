"""The web playground: one page at `/` and `/playground` that drives this server's public API
from the browser, for people who try a voice by listening rather than by decoding base64.

The page is plain files under `static/`, served as they are: no build step, no CDN, no external
fonts, so it works on an offline machine. It uses relative URLs only, so a reverse proxy may
mount the server under any path prefix.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
# Everything the page loads comes from this server; the generated audio lives in blob: URLs.
_CSP = ("default-src 'self'; img-src 'self' data:; media-src 'self' blob:; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'")


def install_playground(app: FastAPI) -> None:
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": _CSP})

    for path in ("/", "/playground"):
        app.get(path, include_in_schema=False)(page)
    app.mount("/playground/static", StaticFiles(directory=STATIC), name="playground-static")
