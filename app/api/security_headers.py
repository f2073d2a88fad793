"""Security headers on every response: browsers never guess a content type, and HTML pages (the dashboard,
report.html, the API docs) load and run only what this server serves and are framed by no other site.

Framing is allowed to this server's own pages ('self', SAMEORIGIN), not to none: the dashboard's job page
shows report.html in a frame. Clickjacking needs a page of another origin, which both headers refuse.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

NOSNIFF = (b"x-content-type-options", b"nosniff")
FRAMING = (b"x-frame-options", b"SAMEORIGIN")  # for browsers without CSP frame-ancestors


def inline_style(css: str) -> str:
    """The CSP source that allows exactly this inline stylesheet (`<style>{css}</style>`), and no other."""
    return f"'sha256-{base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()}'"


def policy(styles: Iterable[str] = (), workers: Iterable[str] = ()) -> str:
    """A page's content security policy: everything from this server only, no inline script at all, and
    these further sources of styles and of workers."""
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            " ".join(["style-src 'self'", *styles]),
            "img-src 'self' data:",  # the API docs' stylesheets draw their icons as data: images
            " ".join(["worker-src 'self'", *workers]),
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'self'",
        ]
    )


class SecurityHeaders:
    """ASGI middleware: `X-Content-Type-Options: nosniff` on every response; on HTML, `X-Frame-Options` and
    the content security policy `csp`, unless the page set a policy of its own (one with a nonce)."""

    def __init__(self, app: ASGIApp, csp: str) -> None:
        self.app = app
        self.csp = (b"content-security-policy", csp.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), NOSNIFF]
                named = dict(headers)
                if named.get(b"content-type", b"").startswith(b"text/html"):
                    headers.append(FRAMING)
                    if b"content-security-policy" not in named:
                        headers.append(self.csp)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_secured)
