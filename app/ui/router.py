"""Serves the console's index and static assets (shipped in the package: no CDN, works offline).

The console is a client of the public API only; these routes need no key (the page asks for one and
keeps it in sessionStorage). Every response carries a strict Content-Security-Policy: scripts and
styles only from this origin, no inline code, no framing."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}

router = APIRouter(include_in_schema=False)


class _SecureStatic(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        response.headers["Cache-Control"] = "no-cache"  # revalidate: an upgrade never mixes old and new modules
        return response


@router.get("/ui")
def ui_index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


@router.get("/ui/", response_model=None)
def ui_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


def install_ui(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", _SecureStatic(directory=STATIC_DIR), name="ui-static")
