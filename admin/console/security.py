"""Security headers on every console response (pages and static files): a strict
Content-Security-Policy (scripts and styles from this origin only, no inline script, no
framing), and the headers older browsers read for the same things. Pages are not cached."""

from __future__ import annotations

from urllib.parse import urlparse

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "/console"


def policy(issuer: str | None) -> str:
    # A form's redirect (logout to the identity provider) is checked against form-action.
    form_action = "'self'"
    if issuer:
        url = urlparse(issuer)
        form_action += f" {url.scheme}://{url.netloc}"
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            "connect-src 'self'",
            f"form-action {form_action}",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ]
    )


class SecurityHeaders:
    def __init__(self, app: ASGIApp, issuer: str | None) -> None:
        self.app = app
        self.headers = {
            "content-security-policy": policy(issuer),
            "x-frame-options": "DENY",
            "x-content-type-options": "nosniff",
            "referrer-policy": "same-origin",
            "cross-origin-opener-policy": "same-origin",
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        static = path.startswith(PREFIX + "/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    headers[name] = value
                if not static:
                    headers["cache-control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)
