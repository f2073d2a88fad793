"""Text no field takes (NUL and the other control characters, lone surrogates, and what invalid UTF-8 is
decoded into) is refused at the edge with a 422 naming the field and the character, on SQLite and
PostgreSQL alike (PostgreSQL answered NUL with a 500), for every family of stored or queried text: key
names (API and dashboard), data set names, model and class names, job bodies, Idempotency-Key, artifact
names. What was stored before stays, nothing refused is stored, and a value the database itself refuses
is a 422 too."""

from __future__ import annotations

import html
import json
import uuid
from typing import Any

from fastapi.testclient import TestClient
from owner_models import linear_onnx
from service_helpers import assert_problem, job_body, service_settings
from sqlalchemy import func, select, text
from test_api_datasets import good_arrays, npz_bytes
from test_dashboard_session import ORIGIN, sign_in

from app.core.db import session_scope
from app.core.models import Dataset, Job
from app.main import create_app
from app.services.access import SessionDep

KINDS = ("NUL", "control", "surrogate")
# Each refused kind as a JSON string carries it (a lone surrogate as its escape), and the character named.
IN_JSON = {"NUL": ("a\x00b", "U+0000"), "control": ("a\x1bb", "U+001B"), "surrogate": ("\ud800", "U+D800")}
# As a URL or a form carries it: a lone surrogate's bytes are invalid UTF-8, decoded into U+FFFD.
IN_URL = {"NUL": ("a%00b", "U+0000"), "control": ("a%1Bb", "U+001B"), "surrogate": ("%ED%A0%80", "U+FFFD")}
# As raw bytes carry it (a header, a multipart part): invalid UTF-8 is read as Latin-1, where \x80 is a
# C1 control.
IN_BYTES = {
    "NUL": (b"a\x00b", "U+0000"),
    "control": (b"a\x1bb", "U+001B"),
    "surrogate": (b"\xed\xa0\x80", "U+0080"),
}


def refused(response: Any, loc: list[str | int], character: str) -> str:
    """The response is the 422 naming the field and the character; returns the error's message."""
    body = assert_problem(response, 422)
    [error] = body["errors"]
    assert error["loc"] == loc and error["type"] == "text_character", error
    assert f" {character} at position" in error["msg"], error
    return error["msg"]


def post_json(client: TestClient, url: str, body: Any, headers: dict[str, str]) -> Any:
    """POST the body as ASCII-only JSON (every other character escaped): how a lone surrogate travels."""
    return client.post(url, content=json.dumps(body), headers=headers | {"Content-Type": "application/json"})


def test_key_names_refuse_bad_text_and_keep_the_keys_stored(client, caller) -> None:
    kept = post_json(client, "/api/v1/keys", {"name": "shop\tfront"}, caller.headers)  # a tab is text
    assert kept.status_code == 201, kept.text
    for kind in KINDS:
        value, character = IN_JSON[kind]
        refused(
            post_json(client, "/api/v1/keys", {"name": value}, caller.headers), ["body", "name"], character
        )
    names = [k["name"] for k in client.get("/api/v1/keys", headers=caller.headers).json()["items"]]
    assert sorted(names) == [
        "default",
        "shop\tfront",
    ]  # the caller's own and the one made above, nothing else


def test_the_dashboard_key_form_shows_the_error_and_makes_no_key(client, caller) -> None:
    token = sign_in(client, caller.key)
    for kind in KINDS:
        value, character = IN_URL[kind]
        r = client.post(
            "/keys",
            content=f"csrf={token}&name={value}",
            headers=ORIGIN | {"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 422, r.text
        what = "replacement" if kind == "surrogate" else "control"
        assert f"name: contains the {what} character {character}" in html.unescape(r.text), r.text
    assert [k["name"] for k in client.get("/api/v1/keys").json()["items"]] == ["default"]


def test_data_set_names_refuse_bad_text_and_keep_the_data_sets(client, caller, settings) -> None:
    headers = caller.headers | {"Content-Type": "application/octet-stream"}
    kept = client.post("/api/v1/datasets?name=mine", content=npz_bytes(**good_arrays()), headers=headers)
    assert kept.status_code == 201, kept.text
    other = npz_bytes(**good_arrays(n=30))  # new bytes: an upload of known bytes would store no name
    for kind in KINDS:
        value, character = IN_URL[kind]
        r = client.post(f"/api/v1/datasets?name={value}", content=other, headers=headers)
        refused(r, ["query", "name"], character)
    with session_scope(settings.database_url) as s:
        assert s.scalars(select(Dataset.name).where(Dataset.owner_id == caller.owner_id)).all() == ["mine"]


def test_model_names_and_class_names_refuse_bad_text(client, caller) -> None:
    onnx = linear_onnx(features=4, classes=2)

    def upload(**fields: str | bytes) -> Any:
        return client.post(
            "/api/v1/models", files={"file": ("m.onnx", onnx)}, data=fields, headers=caller.headers
        )

    assert upload(name="fine").status_code == 201
    # Without a `name` the file's name labels the model. Sent by hand: clients escape some characters of a
    # file name, a hand-made request need not.
    part = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n\r\n%s\r\n--XyZ--\r\n'
    multipart = caller.headers | {"Content-Type": "multipart/form-data; boundary=XyZ"}
    for kind in KINDS:
        value, character = IN_BYTES[kind]
        refused(upload(name=value), ["body", "name"], character)
        r = client.post("/api/v1/models", content=part % (value, onnx), headers=multipart)
        refused(r, ["body", "file", "filename"], character)
        name, character = IN_JSON[kind]
        refused(upload(class_names=json.dumps(["cat", name])), ["body", "class_names", 1], character)
    assert [m["name"] for m in client.get("/api/v1/models", headers=caller.headers).json()["items"]] == [
        "fine"
    ]


def test_job_bodies_idempotency_keys_and_artifact_names_refuse_bad_text(client, caller, settings) -> None:
    for kind in KINDS:
        value, character = IN_JSON[kind]
        # A job's spec is stored and served back as given: every key and string in it is checked, free-form
        # parameters included, and the error says where.
        for where, body in (
            ("audit.device: contains", job_body(**{"audit.device": value})),
            ("teacher.dataset_params: a key contains", job_body(**{"teacher.dataset_params": {value: 1}})),
        ):
            message = refused(post_json(client, "/api/v1/jobs", body, caller.headers), ["body"], character)
            assert message.startswith(where), message
        header, character = IN_BYTES[kind]
        r = client.post("/api/v1/jobs", json=job_body(), headers=caller.headers | {"Idempotency-Key": header})  # type: ignore[dict-item]
        refused(r, ["header", "idempotency-key"], character)
        name, character = IN_URL[kind]
        r = client.get(f"/api/v1/jobs/{uuid.uuid4()}/artifacts/{name}", headers=caller.headers)
        refused(r, ["path", "name"], character)
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.owner_id == caller.owner_id)) == 0


def test_a_value_the_database_refuses_is_a_422_not_a_500(postgresql_url: str, tmp_path) -> None:
    """The last resort, for a value no edge check caught: PostgreSQL's DataError is the request's fault."""
    app = create_app(service_settings(postgresql_url, tmp_path))

    @app.get("/unchecked")
    def unchecked(session: SessionDep) -> str:
        return session.scalar(text("SELECT CAST(:v AS TEXT)"), {"v": "a\x00b"})

    body = assert_problem(TestClient(app, raise_server_exceptions=False).get("/unchecked"), 422)
    assert body["type"] == "urn:cmim:problem:unstorable-value"
    assert "cannot contain NUL" in body["detail"], body
