"""API keys: least privilege by default, listing, revocation, expiry, and the `cmim keys` commands."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from service_helpers import assert_problem
from typer.testing import CliRunner

from app.core.models import utcnow


def test_a_key_made_without_scopes_can_only_predict(client, caller) -> None:
    made = client.post("/api/v1/keys", json={"name": "frontend"}, headers=caller.headers)
    assert made.status_code == 201, made.text
    assert made.json()["scopes"] == ["models:predict"]
    narrow = {"Authorization": f"Bearer {made.json()['key']}"}
    body = assert_problem(client.post("/api/v1/keys", json={"name": "more"}, headers=narrow), 403)
    assert "keys:admin" in body["detail"]
    assert_problem(client.get("/api/v1/jobs", headers=narrow), 403)
    assert client.get("/api/v1/keys/me", headers=narrow).json()["name"] == "frontend"


def test_a_key_never_grants_a_scope_its_creator_lacks(client, new_caller) -> None:
    admin = new_caller(scopes=["keys:admin", "models:predict"])
    body = assert_problem(
        client.post("/api/v1/keys", json={"scopes": ["jobs:write"]}, headers=admin.headers), 403
    )
    assert "jobs:write" in body["detail"]


def test_keys_are_listed_per_owner_and_revoked(client, caller, other_caller) -> None:
    made = [
        client.post("/api/v1/keys", json={"name": f"k{i}"}, headers=caller.headers).json() for i in range(3)
    ]
    page = client.get("/api/v1/keys", params={"limit": 2}, headers=caller.headers).json()
    rest = client.get("/api/v1/keys", params={"cursor": page["next_cursor"]}, headers=caller.headers).json()
    listed = {k["id"] for k in page["items"] + rest["items"]}
    assert listed == {str(caller.key_id)} | {k["id"] for k in made} and rest["next_cursor"] is None
    assert all("key" not in k for k in page["items"])  # secrets are shown once, at creation
    victim = {"Authorization": f"Bearer {made[0]['key']}"}
    assert client.get("/api/v1/keys/me", headers=victim).status_code == 200
    # Another owner's key is a 404, as a missing one.
    assert_problem(client.delete(f"/api/v1/keys/{made[0]['id']}", headers=other_caller.headers), 404)
    assert client.delete(f"/api/v1/keys/{made[0]['id']}", headers=caller.headers).status_code == 204
    assert_problem(client.get("/api/v1/keys/me", headers=victim), 401)
    again = client.get("/api/v1/keys", headers=caller.headers).json()["items"]
    assert next(k for k in again if k["id"] == made[0]["id"])["revoked_at"] is not None
    assert_problem(client.get("/api/v1/keys", params={"cursor": "nope"}, headers=caller.headers), 422)


def test_a_key_expires(client, caller, new_caller) -> None:
    soon = (utcnow() + timedelta(days=1)).isoformat()
    live = client.post("/api/v1/keys", json={"expires_at": soon}, headers=caller.headers).json()
    assert live["expires_at"] is not None
    ok = {"Authorization": f"Bearer {live['key']}"}
    assert client.get("/api/v1/keys/me", headers=ok).status_code == 200
    # A key whose time has come (the API refuses to make one already expired).
    dead = new_caller(owner_id=caller.owner_id, expires_at=utcnow() - timedelta(seconds=1))
    body = assert_problem(client.get("/api/v1/keys/me", headers=dead.headers), 401)
    assert "expired" in body["detail"]
    naive = client.post("/api/v1/keys", json={"expires_at": "2030-01-01T00:00:00"}, headers=caller.headers)
    assert_problem(naive, 422)


@pytest.fixture
def cli(settings, monkeypatch):  # noqa: ANN001, ANN201 - the `cmim` CLI against the test database
    import app.core.config
    import worker.cli

    # The CLI's service commands import get_settings when they run: patch it where they find it.
    monkeypatch.setattr(app.core.config, "get_settings", lambda: settings)
    runner = CliRunner()
    return lambda *args: runner.invoke(worker.cli.cli, list(args))


def test_cli_keys_create_for_an_owner_list_and_revoke(cli, client, caller) -> None:
    made = cli(
        "keys", "create", "--owner", str(caller.owner_id), "--name", "second", "--expires-in-days", "1"
    )
    assert made.exit_code == 0, made.output
    secret = made.output.strip().splitlines()[-1]
    second = {"Authorization": f"Bearer {secret}"}
    me = client.get("/api/v1/keys/me", headers=second).json()
    assert me["owner_id"] == str(caller.owner_id) and me["expires_at"] is not None
    listed = cli("keys", "list", "--owner", str(caller.owner_id))
    assert listed.exit_code == 0 and me["id"] in listed.output and secret not in listed.output
    assert cli("keys", "revoke", me["id"]).exit_code == 0
    assert "revoked=" in cli("keys", "list", "--owner", str(caller.owner_id)).output
    # The API process had the key cached; its background poll (every `key_poll_seconds`, 0.25 s) drops it.
    # The deadline is generous so that a loaded machine cannot fail the test.
    deadline = time.monotonic() + 30
    while client.get("/api/v1/keys/me", headers=second).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_problem(client.get("/api/v1/keys/me", headers=second), 401)


@pytest.mark.parametrize(
    "args, message",
    [
        (["keys", "create", "--owner", "nope"], "--owner must be a UUID"),
        (["keys", "create", "--owner", "00000000-0000-0000-0000-000000000001"], "no key has owner"),
        (["keys", "create", "--scope", "jobs:everything"], "unknown scope"),
        (["keys", "revoke", "00000000-0000-0000-0000-000000000001"], "no key with id"),
        (["keys", "create", "--expires-in-days", "0"], "--expires-in-days must be above 0"),
        (["keys", "create", "--name", "a\x00b"], "--name contains the control character U+0000"),
    ],
    ids=["owner-not-uuid", "unknown-owner", "unknown-scope", "unknown-key", "expires-now", "nul-name"],
)
def test_cli_keys_errors_are_one_line(cli, args: list[str], message: str) -> None:
    result = cli(*args)
    assert result.exit_code != 0 and message in result.output
