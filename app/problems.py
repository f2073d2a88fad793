"""RFC 9457 problem details: every error the API returns is `application/problem+json`."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ml.registry import UnknownNameError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:cmim:problem:"


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


async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(Problem(500, "internal error; the server log has the details"))


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error, ours or the framework's, as problem+json."""
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_error)
