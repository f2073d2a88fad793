"""What every dashboard page shares: the templates, the route class that answers problems as HTML error
pages, rendering, who is signed in (the session's key, checked exactly as the API checks a Bearer key) and
the CSRF-checked form."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute

from app.core.keys import KeyInfo
from app.core.storage import CorruptObjectError
from app.problems import Problem, corrupt_object
from app.services import sessions as web_session
from app.services.access import authorize
from app.services.templates import templates  # one environment for every page, the report included

HERE = Path(__file__).parent


# Why the sign-in page was shown instead of the page asked for: a code in its link (`?reason=`) and the
# words the page shows for it. Only these: a link from elsewhere cannot put its own words on the page.
SIGN_IN_REASONS = {
    "ended": "Your session has ended (signed out, or 12 hours old): sign in again.",
    "key": "The API key of this session has been revoked or has expired: sign in with a live key.",
}


class SignIn(Exception):
    """Raised by a page whose visitor is not (or no longer) signed in: answered by the sign-in page."""

    def __init__(self, reason: Literal["ended", "key"] | None = None) -> None:
        self.reason = reason  # a key of SIGN_IN_REASONS


class PageRoute(APIRoute):
    """A dashboard route: API problems (404, 403, 422, ...) are answered as an HTML error page."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def page(request: Request) -> Response:
            await web_session.resolve(request)  # what every page and form check reads
            try:
                return await handler(request)
            except Problem as p:
                if p.status == 401:  # the session's key was revoked or has expired
                    raise SignIn("key") from None
                return error_page(request, p.status, p.title, p.detail)
            except CorruptObjectError as e:
                p = corrupt_object(e)
                return error_page(request, p.status, p.title, p.detail)
            except RequestValidationError as e:
                detail = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                return error_page(request, 404 if "path" in detail else 422, "Not found", detail)

        return page


def page_router() -> APIRouter:
    """A router of dashboard pages (not in the API's schema; problems answered as HTML)."""
    return APIRouter(route_class=PageRoute, include_in_schema=False)


def render(
    request: Request,
    name: str,
    status_code: int = 200,
    session: web_session.WebSession | None = None,
    **context: Any,
) -> HTMLResponse:
    session = session or web_session.current(request)
    csrf = web_session.csrf_token(request, session)
    context |= {"request": request, "csrf": csrf, "signed_in": bool(session and session.digest)}
    # Its headers (content security policy, no framing elsewhere) are set by `SecurityHeaders`.
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def error_page(request: Request, status: int, title: str, detail: str) -> HTMLResponse:
    return render(request, "error.html", status_code=status, status=status, title=title, detail=detail)


def page_key(*scopes: str) -> Callable[[Request], Awaitable[KeyInfo]]:
    """A dependency: the signed-in key holding these scopes (exactly as the API checks a Bearer key)."""

    async def signed_in(request: Request) -> KeyInfo:
        session = web_session.current(request)
        if session is None or session.digest is None:
            raise SignIn("ended" if web_session.ended(request) else None)
        return await authorize(request, session.digest, list(scopes))

    return signed_in


JobsReader = Annotated[KeyInfo, Depends(page_key("jobs:read"))]


JobsWriter = Annotated[KeyInfo, Depends(page_key("jobs:write"))]


KeysAdmin = Annotated[KeyInfo, Depends(page_key("keys:admin"))]


PredictKey = Annotated[KeyInfo, Depends(page_key("models:predict"))]


async def form(request: Request) -> dict[str, str]:
    """The posted form, after the CSRF token and the same-origin check; 403 otherwise."""
    data = await request.form()
    fields = {k: v for k, v in data.items() if isinstance(v, str)}
    if not web_session.csrf_ok(request, web_session.current(request), fields.get("csrf")):
        raise Problem(403, "refused: a form post must come from this dashboard's own pages", slug="forbidden")
    return fields


Form = Annotated[dict[str, str], Depends(form)]
