"""The built-in page at /ui: a chat box that shows the answer, which experts were scored and
chosen, the timings, and the pool's residency live. One static HTML file with its script (no build
step); it reads only the API's JSON: GET v1/models, POST v1/chat/completions (its `coe` field:
experts [{name, score, chosen}], answered_by, timings, ...) and GET v1/pool (data[].residence),
with the API key the user types (kept in the tab's sessionStorage). Its URLs are relative, so it
works under any route prefix."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("index.html")
# Only this page's own script and the API of its own origin: no third-party content can run.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def add_ui(app: FastAPI, path: str = "/ui") -> None:
    """Serve the page at `path` of `app` (no key needed for the page; its calls send the key)."""
    html = PAGE.read_text()

    @app.get(path, include_in_schema=False)
    async def ui() -> HTMLResponse:
        return HTMLResponse(html, headers=SECURITY_HEADERS)
