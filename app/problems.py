"""RFC 9457 problem details: every error the API returns is `application/problem+json`."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.outage import OUTAGE_ERRORS, is_outage
from app.core.storage import CorruptObjectError
from ml.catalog import UnknownNameError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:cmim:problem:"
RETRY_AFTER_S = 5  # what a client is told to wait when the database or broker does not answer


class Problem(Exception):
    """An error answered as problem+json; `extra` members are added to the body (e.g. `errors`)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers, extra
        self.title = title or HTTPStatus(status).phrase
        self.type = f"{TYPE_PREFIX}{slug}" if slug else "about:blank"


def not_found(kind: str, ident: object) -> Problem:
    """The same 404 for a missing object and for another owner's object (ids reveal nothing)."""
    return Problem(404, f"no {kind} with id {ident}", slug="not-found")


def validation_problem(errors: list[dict[str, Any]], detail: str | None = None) -> Problem:
    return Problem(
        422,
        detail or "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors),
        slug="validation-error",
        title="Request validation failed",
        errors=errors,
    )


def unknown_choice(exc: UnknownNameError, loc: list[str | int]) -> Problem:
    """422 naming the unknown value and every valid choice."""
    error = {"loc": loc, "msg": str(exc), "type": "unknown_choice", "choices": exc.choices}
    return validation_problem([error])


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _error_entry(err: dict[str, Any]) -> dict[str, Any]:
    """One pydantic error as a problem `errors` member; unknown registry names carry their choices."""
    entry = {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, UnknownNameError):
        entry.update(msg=str(cause), type="unknown_choice", choices=cause.choices)
    elif err.get("ctx"):
        entry["ctx"] = _json_safe(err["ctx"])
    return entry


def problem_response(problem: Problem) -> JSONResponse:
    body = {"type": problem.type, "title": problem.title, "status": problem.status, "detail": problem.detail}
    body["error"] = problem.detail  # the Open Inference Protocol's error member, which v2 clients read
    body.update(_json_safe(problem.extra))
    return JSONResponse(body, status_code=problem.status, headers=problem.headers, media_type=PROBLEM_JSON)


async def _on_problem(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc)


async def _on_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return problem_response(validation_problem([_error_entry(e) for e in exc.errors()]))


async def _on_http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).description
    return problem_response(Problem(exc.status_code, detail, headers=exc.headers))


def unavailable(exc: BaseException) -> Problem:
    """503 with Retry-After: a database or broker did not answer; nothing was changed, try again."""
    return Problem(
        503,
        f"a backing service did not answer ({type(exc).__name__}); nothing was changed, retry shortly",
        slug="service-unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def corrupt_object(exc: CorruptObjectError) -> Problem:
    """502: a stored object the answer needs no longer matches its sha256; none of it was served.

    Not the request's fault and not transient: the store returned bad bytes (the server log names the
    object), and the answer stays 502 until an operator puts the object back."""
    return Problem(
        502,
        f"the stored object with sha256 {exc.expected} failed its integrity check (its bytes changed after "
        "they were stored); nothing of it was served and the operator is alerted in the server log",
        slug="artifact-corrupt",
        title="Stored artifact failed its integrity check",
        sha256=exc.expected,
    )


async def _on_corrupt(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CorruptObjectError)
    return problem_response(corrupt_object(exc))


async def _on_data_error(request: Request, exc: Exception) -> JSONResponse:
    """Last resort: the database refused a value (NUL in text, a number out of range) that no check at the
    edge caught. The request's fault, so not a 500; logged, since it means a field lacks its check."""
    assert isinstance(exc, DataError)
    reason = str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__
    log.warning("database refused a value on %s %s: %s", request.method, request.url.path, reason)
    return problem_response(
        Problem(
            422,
            f"the database refused a value of this request: {reason}",
            slug="unstorable-value",
            title="Value cannot be stored",
        )
    )


async def _on_outage(request: Request, exc: Exception) -> JSONResponse:
    log.warning("outage on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return problem_response(unavailable(exc))


async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    if is_outage(exc):
        return await _on_outage(request, exc)
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(Problem(500, "internal error; the server log has the details"))


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error, ours or the framework's, as problem+json."""
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(DataError, _on_data_error)
    app.add_exception_handler(CorruptObjectError, _on_corrupt)
    for outage in OUTAGE_ERRORS:
        app.add_exception_handler(outage, _on_outage)
    app.add_exception_handler(Exception, _on_error)


def _too_large(limit: int) -> Problem:
    return Problem(413, f"request body is over the {limit:,}-byte limit", slug="too-large")


# Bodies that carry files (data sets as octet-stream, models as multipart forms) get the upload cap.
UPLOAD_TYPES = (b"application/octet-stream", b"multipart/form-data")


class BodyLimit:
    """ASGI middleware bounding every request body: uploads (octet-stream, multipart) by one cap, others by
    another.

    A declared Content-Length over the cap is refused before a byte is read; a body without one is
    counted as it arrives and refused the moment it crosses the cap.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_upload_bytes: int) -> None:
        self.app, self.max_bytes, self.max_upload_bytes = app, max_bytes, max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        upload = headers.get(b"content-type", b"").split(b";")[0].strip() in UPLOAD_TYPES
        limit = self.max_upload_bytes if upload else self.max_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await problem_response(_too_large(limit))(scope, receive, send)
            return
        if b"transfer-encoding" not in headers:
            # The server reads exactly the declared length (none: no body), so the cap already holds:
            # only a chunked body needs counting. This keeps the predict hot path free of the wrappers.
            await self.app(scope, receive, send)
            return
        seen, cut, answered = 0, False, False

        async def capped() -> Message:
            # Past the cap the app is told the client went away; the 413 is sent here instead.
            nonlocal seen, cut
            if cut:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                cut = True
                return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal answered
            if cut and not answered:
                return  # the app's answer to a body it never got whole
            answered = True
            await send(message)

        try:
            await self.app(scope, capped, guarded)
        except Exception:
            if not cut or answered:
                raise
        if cut and not answered:
            await problem_response(_too_large(limit))(scope, receive, send)


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; validation errors add `errors` (loc, msg, type, choices)",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": True,
}


def document_problems(app: FastAPI) -> None:
    """State in the OpenAPI what every error is: problem+json, for any status an operation may answer."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Problem"] = PROBLEM_SCHEMA
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        problem = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.setdefault("responses", {})
                for code, response in responses.items():
                    if code[0] in "45":
                        response["content"] = problem
                responses.setdefault(
                    "default", {"description": "an error (problem+json)", "content": problem}
                )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
