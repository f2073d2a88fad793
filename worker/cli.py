"""The `cmim` console script: the ML library's commands plus the service (serve, worker, keys, db).

The service commands import the service's packages (SQLAlchemy, FastAPI, Celery) only when they run,
so `pip install .` without the service extra gives working `cmim train / audit / cmi / attacks / bench`.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Annotated

import typer
from rich.console import Console

from ml.cli import app as ml_app

cli = typer.Typer(
    help="Train undistillable classifiers (CMIM), audit them, and serve them.", no_args_is_help=True
)
cli.add_typer(ml_app)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
cli.add_typer(keys_app, name="keys")
cli.add_typer(db_app, name="db")
console = Console()

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Apply the migrations to CMIM_DATABASE_URL."""
    from app.core.config import get_settings
    from app.core.migrate import upgrade

    url = get_settings().database_url
    upgrade(url, revision)
    console.print(f"database at revision {revision}")


def _uuid(value: str | None, what: str) -> uuid.UUID | None:
    """The UUID given on the command line; a one-line error otherwise."""
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise typer.BadParameter(f"{what} must be a UUID, got {value!r}") from None


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="a label for the key")] = "cli",
    scope: Annotated[list[str] | None, typer.Option(help="repeatable; default: every scope")] = None,
    owner: Annotated[
        str | None,
        typer.Option(help="the owner id of an existing key (`cmim keys list`); default: a new owner"),
    ] = None,
    budget: Annotated[
        int | None, typer.Option(min=0, help="predict rows allowed per model; default: the server's")
    ] = None,
    expires_in_days: Annotated[
        float | None, typer.Option(min=0, help="the key stops working after this many days; default: never")
    ] = None,
) -> None:
    """Create an API key and print its secret (shown once). Keys of one owner see the same jobs."""
    from sqlalchemy import func, select

    from app.core.config import ALL_SCOPES, get_settings
    from app.core.db import session_scope
    from app.core.keys import create_api_key
    from app.core.models import ApiKey, utcnow
    from app.core.text import refused_character

    if (reason := refused_character(name)) is not None or not 1 <= len(name) <= 200:
        raise typer.BadParameter(f"--name {reason or 'takes 1 to 200 characters'}")
    if expires_in_days is not None and expires_in_days <= 0:
        raise typer.BadParameter(f"--expires-in-days must be above 0, not {expires_in_days}")
    settings = get_settings()
    owner_id = _uuid(owner, "--owner")
    with session_scope(settings.database_url) as s:
        if owner_id is not None and not s.scalar(select(func.count()).where(ApiKey.owner_id == owner_id)):
            raise typer.BadParameter(f"no key has owner {owner_id}; `cmim keys list` shows the owners")
        try:
            key, secret = create_api_key(
                s,
                owner_id=owner_id,
                name=name,
                scopes=scope or ALL_SCOPES,
                query_budget=budget if budget is not None else settings.default_query_budget,
                expires_at=None if expires_in_days is None else utcnow() + timedelta(days=expires_in_days),
            )
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        owner_id = key.owner_id
    console.print(f"owner {owner_id}")
    typer.echo(secret)


@keys_app.command("list")
def keys_list(owner: Annotated[str | None, typer.Option(help="only this owner's keys")] = None) -> None:
    """List the keys (never their secrets): id, owner, name, prefix, scopes, budget, expiry, revocation."""
    from app.core.config import get_settings
    from app.core.db import session_scope
    from app.core.keys import list_api_keys

    settings = get_settings()
    with session_scope(settings.database_url) as s:
        rows = list_api_keys(s, _uuid(owner, "--owner"))
        lines = [
            "\t".join(
                [
                    str(k.id),
                    str(k.owner_id),
                    k.name,
                    k.prefix + "...",
                    ",".join(k.scopes),
                    f"budget={k.query_budget}",
                    f"expires={k.expires_at:%Y-%m-%dT%H:%MZ}" if k.expires_at else "expires=never",
                    f"revoked={k.revoked_at:%Y-%m-%dT%H:%MZ}" if k.revoked_at else "live",
                ]
            )
            for k in rows
        ]
    typer.echo("\t".join(["id", "owner", "name", "prefix", "scopes", "budget", "expires", "state"]))
    for line in lines:
        typer.echo(line)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id (`cmim keys list`)")]) -> None:
    """Revoke a key: every API process refuses it within a second."""
    from app.core.config import get_settings
    from app.core.db import session_scope
    from app.core.keys import revoke_api_key

    settings = get_settings()
    ident = _uuid(key_id, "KEY_ID")
    assert ident is not None
    with session_scope(settings.database_url) as s:
        if revoke_api_key(s, ident) is None:
            console.print(f"error: no key with id {ident}", style="red", highlight=False)
            raise typer.Exit(1)
    console.print(f"revoked {ident}", highlight=False)


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    worker: Annotated[bool, typer.Option(help="run the embedded worker (embedded mode only)")] = True,
) -> None:
    """Run the API (and, without a broker, the embedded worker): migrations first, a first key if none."""
    import uvicorn
    from sqlalchemy import func, select

    from app.core.config import get_settings
    from app.core.db import session_scope
    from app.core.keys import create_api_key
    from app.core.migrate import upgrade
    from app.core.models import ApiKey
    from worker.local import SupervisedWorker

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    settings = get_settings()
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as s:
        first = None
        if not s.scalar(select(func.count()).select_from(ApiKey)):
            first = create_api_key(s, name="first key", query_budget=settings.default_query_budget)[1]
        oldest = s.scalar(select(ApiKey.owner_id).order_by(ApiKey.created_at).limit(1))
    local = SupervisedWorker() if settings.embedded and worker else None
    base = f"http://{host}:{port}"
    console.print(f"cmim API on {base}  (dashboard: {base}/  docs: {base}/docs)", highlight=False)
    if first:
        console.print(f"API key (shown once): {first}", highlight=False)
    else:
        # A key for a new owner would see none of the jobs: name the first key's owner.
        console.print(
            "API keys exist already; `cmim keys list` lists them. Another key for the first key's owner "
            f"(who sees its jobs): `cmim keys create --owner {oldest}`",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        "mode: "
        + ("embedded (SQLite queue, local worker)" if settings.embedded else "broker: run `cmim worker`"),
        highlight=False,
    )
    try:
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level="info")
    finally:
        if local is not None:
            local.close()


@cli.command("worker")
def worker_cmd(
    concurrency: Annotated[int, typer.Option("-c", "--concurrency", help="jobs at once (1 per GPU)")] = 1,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork or solo")] = "prefork",
    local: Annotated[
        bool, typer.Option(help="poll the database instead of a broker (embedded mode)")
    ] = False,
) -> None:
    """Run a job worker: Celery on CMIM_BROKER_URL, or the embedded loop with --local."""
    from app.core.config import get_settings

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    settings = get_settings()
    if local or settings.embedded:
        from worker.local import run_local_worker

        run_local_worker(settings=settings)
        return
    from worker.celery_app import celery_app

    celery_app.worker_main(
        ["worker", "-Q", settings.queue_name, "-c", str(concurrency), "--pool", pool, "--loglevel", "INFO"]
    )


@cli.command("notifier")
def notifier_cmd(
    concurrency: Annotated[int, typer.Option("-c", "--concurrency", help="deliveries at once")] = 4,
) -> None:
    """Deliver owner webhooks (deployed): a Celery worker on CMIM_WEBHOOK_QUEUE. Embedded, the API does."""
    from app.core.config import get_settings

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    settings = get_settings()
    if settings.embedded:
        console.print("embedded mode (no CMIM_BROKER_URL): `cmim serve` delivers webhooks itself")
        raise typer.Exit(1)
    from worker.webhooks import celery_app

    celery_app.worker_main(
        [
            "worker",
            "-Q",
            settings.webhook_queue,
            "-c",
            str(concurrency),
            "--pool",
            "threads",
            "-n",
            "notifier@%h",
            "--loglevel",
            "INFO",
        ]
    )


if __name__ == "__main__":
    cli()
