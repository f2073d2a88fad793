"""The `cmim` console script: the ML library's commands plus the service (serve, worker, keys, db).

The service commands import the service's packages (SQLAlchemy, FastAPI, Celery) only when they run,
so `pip install .` without the service extra gives working `cmim train / audit / cmi / attacks / bench`.
"""

from __future__ import annotations

import logging
import uuid
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


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="a label for the key")] = "cli",
    scope: Annotated[list[str] | None, typer.Option(help="repeatable; default: all scopes")] = None,
    owner: Annotated[str | None, typer.Option(help="an existing owner id; default: a new owner")] = None,
    budget: Annotated[int | None, typer.Option(help="predict queries allowed; default: the server's")] = None,
) -> None:
    """Create an API key and print its secret (shown once)."""
    from app.core.config import ALL_SCOPES, get_settings
    from app.core.db import session_scope
    from app.core.keys import create_api_key

    settings = get_settings()
    with session_scope(settings.database_url) as s:
        key, secret = create_api_key(
            s,
            owner_id=uuid.UUID(owner) if owner else None,
            name=name,
            scopes=scope or ALL_SCOPES,
            query_budget=budget if budget is not None else settings.default_query_budget,
        )
        owner_id = key.owner_id
    console.print(f"owner {owner_id}")
    typer.echo(secret)


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
    from worker.local import start_local_worker

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    settings = get_settings()
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as s:
        first = None
        if not s.scalar(select(func.count()).select_from(ApiKey)):
            first = create_api_key(s, name="first key", query_budget=settings.default_query_budget)[1]
    proc = stop = None
    if settings.embedded and worker:
        proc, stop = start_local_worker()
    base = f"http://{host}:{port}"
    console.print(f"cmim API on {base}  (docs: {base}/docs)", highlight=False)
    if first:
        console.print(f"API key (shown once): {first}", highlight=False)
    else:
        console.print("API keys exist already; `cmim keys create` makes another", highlight=False)
    console.print(
        "mode: "
        + ("embedded (SQLite queue, local worker)" if settings.embedded else "broker: run `cmim worker`"),
        highlight=False,
    )
    try:
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level="info")
    finally:
        if proc is not None and stop is not None:
            stop.set()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()


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


if __name__ == "__main__":
    cli()
