"""Schemathesis drives the API from its own OpenAPI: authenticated, every operation, plus stateful sequences
along the schema's links. No input may give a server error, and every response must match the schema.

A succeeded job and an uploaded dataset exist beforehand, so report, artifact, model and predict
operations are reached with real ids (the fuzzer's own ids only reach 404s there).

Text no database column can hold or no client should store (NUL and other control characters, lone
surrogates, very long strings) is mixed into every text field the generator fills, and each text field of
each operation is also sent each such value in an otherwise valid request."""

from __future__ import annotations

import copy
import io
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from owner_models import linear_onnx
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from service_helpers import Trained, job_body, service_settings

from app.core.config import Settings
from app.core.db import session_scope
from app.core.keys import create_api_key
from app.main import create_app

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
# Bounded time in CI: a few dozen cases per operation, short stateful sequences.
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
STATEFUL = settings(FUZZ, max_examples=15, stateful_step_count=6)


# Text a database refuses (PostgreSQL: NUL), other control characters (C0, DEL, C1), the replacement
# character a server decodes invalid UTF-8 into, and a name far over any length bound.
HOSTILE = ("a\x00b", "\x00", "tab\there\x01\x1b[2J\x7f", "c1\x85\x9f", "\ufffd", "x" * 10_000)
# Only a JSON body carries a lone surrogate (as an escape); elsewhere its bytes go, invalid UTF-8.
LONE_SURROGATE = "\ud800"
SURROGATE_BYTES = LONE_SURROGATE.encode("utf-8", "surrogatepass")
SPEC = create_app(Settings(environment="test")).openapi()


def _resolve(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = SPEC["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _text_leaves(node: Any, keys: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The paths to free text in a JSON schema: `[]` is an element of a list, `*` any key of a free-form
    object (where both the key and its value are text). Names from a closed set (enum) and uuids,
    dates and files are not free text."""
    node = _resolve(node)
    if not isinstance(node, dict):
        return
    for branch in node.get("anyOf", []) + node.get("oneOf", []) + node.get("allOf", []):
        yield from _text_leaves(branch, keys)
    kind = node.get("type")
    if kind == "string" and "enum" not in node and node.get("format") not in ("uuid", "date-time", "binary"):
        yield keys
    elif kind == "array":
        yield from _text_leaves(node.get("items", {}), (*keys, "[]"))
    elif kind == "object":
        for name, child in node.get("properties", {}).items():
            yield from _text_leaves(child, (*keys, name))
        extra = node.get("additionalProperties", not node.get("properties"))
        if extra is True:
            yield (*keys, "*")
        elif isinstance(extra, dict):
            yield from _text_leaves(extra, (*keys, "*"))


def text_fields() -> Iterator[tuple[str, str, str, tuple[str, ...]]]:
    """Every free-text input of the API: (method, path, location, keys); location is a parameter's
    (`query`, `header`, `path`) or a body's media type."""
    for path, operations in SPEC["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                for keys in _text_leaves(parameter["schema"], (parameter["name"],)):
                    yield method.upper(), path, parameter["in"], keys
            for media_type, content in operation.get("requestBody", {}).get("content", {}).items():
                for keys in _text_leaves(content.get("schema", {})):
                    yield method.upper(), path, media_type, keys


def _binding_key(keys: tuple[str, ...]) -> str | None:
    """The schemathesis parameter name of a body field (`body.inputs[*].name`); None under a free key."""
    if "*" in keys:
        return None
    return "body." + ".".join(keys).replace(".[]", "[*]")


def fuzz_config() -> SchemathesisConfig:
    """Hostile text drawn into a fifth of the generated text fields: every string parameter, and each
    body field by name (schemathesis binds body dictionaries per field). Its dictionaries hold what
    the wire carries as text (no lone surrogate); the per-field cases below add the rest."""
    binding = {"dictionary": "hostile", "probability": 0.2}
    body_keys = {
        key
        for _, _, location, keys in text_fields()
        if location not in ("query", "header", "path")
        if (key := _binding_key(keys))
    }
    return SchemathesisConfig.from_dict(
        {
            "dictionaries": {"hostile": {"values": list(HOSTILE)}},
            "generation": {"dictionaries": {"string": binding}},
            "parameters": dict.fromkeys(sorted(body_keys), binding),
        }
    )


# The schema is read when the module is collected, from an app that is never started (no database, no
# background tasks); the cases are sent to an app on PostgreSQL (stricter than SQLite about types and
# ranges) built by the fixture.
schema = schemathesis.openapi.from_dict(SPEC, config=fuzz_config())


def npz(seed: int) -> bytes:
    """A small valid data set; another seed, other bytes (an upload of known bytes stores nothing new)."""
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    np.savez(
        buf,
        x_train=rng.normal(size=(40, 1, 8)).astype(np.float32),
        y_train=np.arange(40) % 2,
        x_test=rng.normal(size=(20, 1, 8)).astype(np.float32),
        y_test=np.arange(20) % 2,
    )
    return buf.getvalue()


class Fuzzed:
    """The app under test, its caller's headers and the ids of real objects."""

    def __init__(self, trained: Trained, dataset_id: str) -> None:
        self.trained, self.app, self.headers = trained, trained.client.app, trained.headers
        self.own_key = trained.client.get("/api/v1/keys/me", headers=trained.headers).json()["id"]
        self.real = {
            "job_id": trained.job_id,
            "model_id": trained.job_id,
            "dataset_id": dataset_id,
            "key_id": self.spare_key(),
            "name": "report.json",
            "hook_id": trained.client.post(
                "/api/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}, headers=trained.headers
            ).json()["id"],
        }
        self.uploads = 0

    def spare_key(self) -> str:
        """Another key of the same owner: what a revocation aimed at a real key revokes."""
        with session_scope(self.trained.settings.database_url) as s:
            return str(create_api_key(s, owner_id=self.trained.owner_id)[0].id)

    def aim(self, case: Any, always: bool = False) -> None:
        """Point half the cases (`always`: every case) at real objects, and submit valid jobs; a stream
        always at a finished job.

        The caller's own key is never revoked (schemathesis links `GET /keys/me` to `DELETE /keys/{id}`):
        a spare key of the same owner takes its place, or every later case would be a 401."""
        # Our key, not a generated Authorization header: the cases test the operations, not the auth.
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        path = case.path_parameters or {}
        stream = case.operation.path.endswith("/events") and "after" not in (case.query or {})
        for name, real in self.real.items():
            if name in path and (always or stream or _coin(path[name])):
                path[name] = real
        if "key_id" in path and _same_uuid(path["key_id"], self.own_key):
            path["key_id"] = self.spare_key()
        if (case.method, case.operation.path) == ("POST", "/api/v1/jobs") and _coin(case.body):
            case.body = job_body(**{"teacher.seed": zlib.crc32(str(case.body).encode()) % 1000})

    def valid_request(self, operation: Any) -> dict[str, Any]:
        """A request the operation takes (real ids; the schema's example body, a fresh data set, an ONNX
        model), so that a text field set in it is the only thing wrong."""
        media_type = next(iter(operation.definition.raw.get("requestBody", {}).get("content", {})), None)
        body: Any = schemathesis.core.NOT_SET
        if media_type == "application/octet-stream":
            self.uploads += 1
            body = npz(self.uploads)
        elif media_type == "multipart/form-data":
            body = {"file": linear_onnx()}
        elif media_type is not None:
            example = _resolve(operation.definition.raw["requestBody"]["content"][media_type]["schema"])
            body = copy.deepcopy(example.get("examples", [{}])[0])
        path = {
            p["name"]: self.real.get(p["name"], str(uuid.UUID(int=0)))  # no object of its own: a 404
            for p in operation.definition.raw.get("parameters", [])
            if p["in"] == "path"
        }
        return {"path_parameters": path, "query": {}, "headers": {}, "body": body, "media_type": media_type}


def _with(node: Any, keys: tuple[str, ...], value: Any) -> Any:
    """A copy of the JSON value with `value` at keys: `[]` is the first element of a list, `*` a new key
    (the value itself) holding it."""
    if not keys:
        return value
    key, rest = keys[0], keys[1:]
    if key == "[]":
        items = node if isinstance(node, list) and node else [{}]
        return [_with(items[0], rest, value), *items[1:]]
    node = node if isinstance(node, dict) else {}
    if key == "*":
        return node | {value: _with({}, rest, value)}
    return node | {key: _with(node.get(key, {}), rest, value)}


def _same_uuid(value: object, ident: str) -> bool:
    """Whether the value names this UUID in any spelling the API accepts (case, braces, no hyphens)."""
    try:
        return uuid.UUID(str(value)) == uuid.UUID(ident)
    except ValueError:
        return False


def _coin(value: object) -> bool:
    """A fair coin decided by the value itself, so a derandomized run is reproducible."""
    return zlib.crc32(str(value).encode()) % 2 == 0


@pytest.fixture(scope="module")
def fuzzed(postgresql_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("fuzz")
    # Webhook URLs are taken without resolving their host: the generated ones name hosts no resolver knows.
    # A suspect endpoint that cannot be reached is not retried: its run ends at once.
    settings = service_settings(
        postgresql_url, tmp, upload_max_bytes=256 * 1024, webhook_private_targets=True, remote_retries=0
    )
    trained = Trained(settings, tmp)
    # Three seeds: a null of 3 independent students, so that verify takes a request (a suspect endpoint).
    trained.job_id = trained.submit(job_body(**{"audit.seeds": 3}))
    r = trained.client.post(
        "/api/v1/datasets",
        content=npz(0),
        headers=trained.headers | {"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    yield Fuzzed(trained, r.json()["id"])


@schema.parametrize()
@FUZZ
def test_no_input_gives_a_server_error_or_an_off_schema_answer(case: Any, fuzzed: Fuzzed) -> None:
    fuzzed.aim(case)
    case.call_and_validate(headers=fuzzed.headers, checks=CHECKS, app=fuzzed.app)


TEXT_FIELDS = sorted(set(text_fields()))


@pytest.mark.parametrize(
    ("method", "path", "location", "keys"),
    TEXT_FIELDS,
    ids=[f"{m} {p} {loc}:{'.'.join(k)}" for m, p, loc, k in TEXT_FIELDS],
)
def test_hostile_text_in_each_text_field_gives_no_server_error(
    method: str, path: str, location: str, keys: tuple[str, ...], fuzzed: Fuzzed
) -> None:
    """Each text field, in an otherwise valid request, gets each hostile value its place can carry."""
    operation = schema[path][method]
    values: list[Any] = list(HOSTILE)
    if location == "application/json":
        values.append(LONE_SURROGATE)
    elif location == "header":  # the UTF-8 bytes of each, sent as they are (a header is Latin-1 text)
        values = [v.encode() for v in HOSTILE] + [SURROGATE_BYTES]
        values = [v.decode("latin-1") for v in values]
    elif location in ("query", "multipart/form-data"):
        values.append(SURROGATE_BYTES)
    valid = operation.Case(**fuzzed.valid_request(operation))
    answer = valid.call(headers=fuzzed.headers, app=fuzzed.app)
    # So that each hostile value below is the one thing wrong with its request.
    assert answer.status_code < 300, (
        f"{method} {path} refused its valid request: give its body an example it takes (its schema's "
        f"`examples`), its path parameters real objects (Fuzzed.real): {answer.text}"
    )
    for value in values:
        request = fuzzed.valid_request(operation)
        if location in ("query", "header", "path"):
            place = {"query": "query", "header": "headers", "path": "path_parameters"}[location]
            request[place] = request[place] | {keys[0]: value}
        else:
            request["body"] = _with(request["body"], keys, value)
        case = operation.Case(**request)
        try:
            case.call_and_validate(headers=fuzzed.headers, checks=CHECKS, app=fuzzed.app)
        except BaseException as e:
            e.add_note(f"{location} {'.'.join(keys)} = {value!r:.60}")
            raise


def test_stateful_sequences_along_the_links(fuzzed: Fuzzed) -> None:
    links = schema.as_state_machine()
    seen: set[tuple[str, int]] = set()

    class Sequences(links):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            # Every id at a real object: a short sequence must reach them, whatever the links produced.
            fuzzed.aim(case, always=True)
            return {"headers": fuzzed.headers, "app": fuzzed.app}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            seen.add((case.operation.path, response.status_code))
            case.validate_response(response, checks=CHECKS)

    Sequences.run(settings=STATEFUL)
    reached = {path for path, status in seen if status < 300}
    # Which linked operations a short sequence reaches is up to the state machine; some real object is.
    assert "/api/v1/jobs" in reached and any("{" in p for p in reached), seen


def test_the_fuzzer_reached_real_objects(fuzzed: Fuzzed) -> None:
    """The real ids answer, so the aimed cases reach reports, artifacts, the dataset and the model."""
    from fastapi.testclient import TestClient

    client, headers, job = TestClient(fuzzed.app), fuzzed.headers, fuzzed.real["job_id"]
    assert client.get(f"/api/v1/jobs/{job}/report", headers=headers).status_code == 200
    assert client.get(f"/api/v1/jobs/{job}/artifacts", headers=headers).json()
    assert client.get(f"/v2/models/{job}", headers=headers).status_code == 200
    assert client.get(f"/api/v1/datasets/{fuzzed.real['dataset_id']}", headers=headers).status_code == 200
