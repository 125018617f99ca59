"""The web console at ``/console``: server-rendered pages (Jinja2) over the same services and
role checks as the admin REST API, plus small scripts (static files, no inline script) that
call that API with the console's session for everything that changes something, so each
action is one admin request and one audit row. See docs/console.md."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from loraplex.admin.console import login, pages
from loraplex.admin.console.security import SecurityHeaders
from loraplex.admin.settings import AdminAuthSettings

HERE = Path(__file__).parent


async def _to_login(request: Request, exc: Exception) -> Response:
    return RedirectResponse(f"/console/login?next={quote(request.url.path)}", status_code=303)


def install_console(app: FastAPI, settings: AdminAuthSettings) -> None:
    """Mount the console's pages, its static files and its security headers on ``app``."""
    app.state.console_templates = Jinja2Templates(directory=HERE / "templates")
    app.add_middleware(SecurityHeaders, issuer=settings.oidc_issuer)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console_static")
    app.add_exception_handler(pages.LoginNeeded, _to_login)
    app.include_router(login.router)
    app.include_router(pages.router)
