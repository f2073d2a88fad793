"""The API documentation pages, /docs (Swagger UI) and /redoc, served with the assets packaged with
fastapi-offline: a deployment without internet access still shows them, and they load nothing from it.

FastAPI's own pages start Swagger UI from an inline script, which the pages' content security policy
(`app.api.security_headers`) refuses, and Redoc's bundle draws its logo from a CDN. These pages start both
from a file of this server (`static/docs-init.js`) and serve Redoc's bundle with its CDN addresses pointed at
a local image. Redoc writes its styles while it runs: its page allows them by a nonce drawn per response
(the scrollbar stylesheet its bundle adds before it is given the nonce is refused: the browser's own
scrollbars show instead).
"""

from __future__ import annotations

import re
import secrets
from functools import cache
from html import escape
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from app.api.security_headers import policy

PREFIX = "/static/docs"
VENDORED = Path(fastapi_offline.__file__).parent / "static"  # swagger-ui*, redoc.standalone.js, favicon.png
CDN = re.compile(rb"https://cdn\.redoc\.ly/[^\"'`\s)]*")


@cache
def redoc_bundle() -> bytes:
    """Redoc's bundle with every CDN address (its logo) pointed at the favicon served here."""
    return CDN.sub(f"{PREFIX}/favicon.png".encode(), (VENDORED / "redoc.standalone.js").read_bytes())


def _page(title: str, root: str, head: str, body: str, script: str) -> str:
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<link rel="icon" href="{root}{PREFIX}/favicon.png">
{head}</head>
<body>
{body}
<script src="{root}{PREFIX}/{script}"></script>
<script src="{root}{PREFIX}/docs-init.js"></script>
</body>
</html>
"""


def mount(app: FastAPI) -> None:
    """Add /docs, /redoc and their assets (under PREFIX) to the app."""

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = escape(request.scope.get("root_path", ""))
        return HTMLResponse(
            _page(
                f"{app.title} - Swagger UI",
                root,
                f'<link rel="stylesheet" href="{root}{PREFIX}/swagger-ui.css">\n',
                f'<div id="swagger-ui" data-url="{root}{app.openapi_url}"></div>',
                "swagger-ui-bundle.js",
            )
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root, nonce = escape(request.scope.get("root_path", "")), secrets.token_urlsafe(16)
        page = _page(
            f"{app.title} - ReDoc",
            root,
            f'<style nonce="{nonce}">body{{margin:0;padding:0}}</style>\n',
            "<noscript>ReDoc needs JavaScript to show the API documentation.</noscript>\n"
            f'<div id="redoc" data-spec-url="{root}{app.openapi_url}" data-nonce="{nonce}"></div>',
            "redoc.standalone.js",
        )
        # Redoc's search index is built in a worker made from a blob: URL.
        csp = policy(styles=[f"'nonce-{nonce}'"], workers=["blob:"])
        return HTMLResponse(page, headers={"Content-Security-Policy": csp})

    @app.get(f"{PREFIX}/redoc.standalone.js", include_in_schema=False)
    def redoc_script() -> Response:  # before the mount below, which would serve the bundle as packaged
        headers = {"Cache-Control": "max-age=3600"}
        return Response(redoc_bundle(), media_type="text/javascript", headers=headers)

    app.mount(
        PREFIX,
        StaticFiles(directory=Path(__file__).parent / "static", packages=[("fastapi_offline", "static")]),
        name="api-docs-static",
    )
