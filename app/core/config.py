"""Typed settings from `CMIM_*` environment variables; the defaults run the embedded mode."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal, get_args

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Scope = Literal["jobs:read", "jobs:write", "datasets:read", "datasets:write", "models:predict", "keys:admin"]
ALL_SCOPES: tuple[str, ...] = get_args(Scope)


class Settings(BaseSettings):
    """Everything configurable; embedded mode (SQLite, local worker, no broker) unless told otherwise."""

    model_config = SettingsConfigDict(env_prefix="CMIM_", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    database_url: str = "sqlite:///var/cmim.db"
    broker_url: str | None = Field(None, description="Redis URL; unset = embedded mode (the DB is the queue)")
    artifact_url: str = Field(
        "file://var/artifacts",
        description="fsspec URL of the artifact store: file://DIR, or s3://BUCKET/PREFIX when workers run "
        "on several machines (credentials from the standard AWS_* variables)",
    )
    s3_endpoint_url: str | None = Field(
        None, description="an S3-compatible server for s3:// artifact URLs (MinIO, Ceph, ...); None = AWS"
    )
    work_dir: str = Field("var/work", description="per-job scratch space (resumable training state)")
    cache_dir: str = Field("var/cache", description="local copies of remote artifacts for serving")

    # Queue and lease: a running job's heartbeat renews its lease every heartbeat_seconds, whatever its
    # epochs take; a crashed worker's job is re-queued by the next sweep after its lease runs out, so
    # it resumes within about lease_seconds + sweep_seconds (under a minute on these defaults).
    queue_name: str = "gpu"
    lease_seconds: int = Field(40, ge=1)
    heartbeat_seconds: float = Field(8.0, gt=0, description="lease renewal period; well under lease_seconds")
    max_attempts: int = Field(3, ge=1)
    sweep_seconds: float = Field(10.0, gt=0)
    resend_seconds: float = Field(
        30.0, gt=0, description="a queued job not claimed this long after its last message is sent again"
    )
    infra_retry_seconds: float = Field(
        60.0, ge=0, description="how long a worker retries a database or broker that does not answer"
    )
    poll_seconds: float = Field(1.0, gt=0)
    visibility_timeout: int = Field(7 * 24 * 3600, ge=60, description="longer than the longest job")
    device: str = Field("auto", description="torch device for jobs: auto = CUDA when present")

    # Uploads and serving.
    upload_max_bytes: int = Field(200 * 1024 * 1024, ge=1)
    upload_max_decompressed_bytes: int = Field(
        512 * 1024 * 1024, ge=1, description="an uploaded npz may expand to at most this many bytes"
    )
    max_concurrent_uploads: int = Field(2, ge=1, description="uploads validated at once per API process")

    # Request bounds.
    max_json_body_bytes: int = Field(1024 * 1024, ge=1, description="JSON request bodies larger are refused")
    max_job_cost: float = Field(
        1e11,
        gt=0,
        description="ceiling on a job's estimated cost in sample-passes (training samples x epochs, "
        "summed over the teacher, the control and every audit student)",
    )
    max_streams_per_key: int = Field(20, ge=1, description="open event streams per API key and process")
    stream_poll_seconds: float = Field(0.5, gt=0, description="how often open event streams look for news")
    predict_max_batch: int = Field(1024, ge=1)
    predict_max_bytes: int = Field(32 * 1024 * 1024, ge=1, description="largest predict request body")
    model_cache_size: int = Field(8, ge=1)
    default_query_budget: int | None = Field(
        100_000, ge=0, description="rows per key and model for new keys; None = unlimited"
    )
    model_query_budget: int | None = Field(
        None,
        ge=0,
        description="per-key query budget on every model; None = each model's audited safe budget "
        "(the smallest over its audited students of report.safe_budget.teacher) where its audit ran "
        "query budgets, else none (the key's own budget still applies)",
    )
    policy_history_cache_size: int = Field(
        1024,
        ge=1,
        description="per (key, model) query histories kept for models served with the prada detector, "
        "least recently used evicted (each holds up to prada_memory inputs)",
    )
    owner_query_budget: int | None = Field(
        None,
        ge=0,
        description="rows per owner and model across all the owner's keys, where the model's enforcement "
        "policy sets none (its owner's choice); None = no owner cap: the per-key budget and the enforcement "
        "policy hold a thief with many keys, and honest traffic over many keys is not capped by one key's "
        "budget",
    )
    global_query_budget: int | None = Field(
        None, ge=0, description="rows per model across every key and owner; None = no global cap"
    )
    rate_limit_per_minute: int = Field(600, ge=1, description="predict requests per key and minute")
    usage_flush_seconds: float = Field(
        0.5, gt=0, description="how often query counters are written back to the database"
    )
    key_poll_seconds: float = Field(
        0.25, gt=0, description="how often each API process looks for revoked keys to drop from its cache"
    )
    key_cache_seconds: float = Field(
        60.0, gt=0, description="the longest a key lookup is cached (revocations are pushed sooner)"
    )
    redis_prefix: str = Field("cmim", description="prefix of the Redis keys holding rate limits and budgets")
    webhook_queue: str = Field("webhooks", description="the Celery queue `cmim notifier` delivers from")
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="the longest one delivery attempt takes")
    webhook_max_attempts: int = Field(12, ge=1, description="attempts per delivery before it is failed")
    webhook_backoff_seconds: float = Field(
        30.0, gt=0, description="the wait after a delivery's first failed attempt; it doubles after each"
    )
    webhook_backoff_max_seconds: float = Field(
        6 * 3600.0, gt=0, description="the longest wait between two attempts of a delivery"
    )
    webhook_poll_seconds: float = Field(
        1.0,
        gt=0,
        description="how often due deliveries are looked for: by the API process (embedded) or by the "
        "notifier's sweep (deployed: deliveries whose message the broker lost)",
    )
    webhook_private_targets: bool = Field(
        False,
        description="allow webhook URLs that resolve to loopback, private or link-local addresses (a "
        "receiver on the same host or network); off, a webhook cannot make the service post to its own "
        "backends",
    )
    session_secret: str | None = Field(
        None,
        min_length=32,
        description="signs the dashboard's session cookies; the same value on every API process, required in "
        "production (unset elsewhere: a random secret per process, so sessions end when it restarts)",
    )

    secret_key: str | None = Field(
        None,
        description="the Fernet key (32 url-safe base64 bytes) that encrypts stored secrets such as a remote "
        "endpoint's headers; the same on every API process, required in production (unset elsewhere: one "
        "is made once and kept in secret_key_file)",
    )
    secret_key_file: str = Field("var/secret.key", description="the embedded mode's generated key (0600)")

    # Remote models (app/core/remote.py): a suspect's endpoint asked for the challenge.
    remote_allowed_hosts: list[str] | None = Field(
        None,
        description="host names a remote endpoint may have (an operator's allow-list against requests to "
        "internal services); None = any host",
    )
    remote_max_queries: int = Field(10_000, ge=1, description="rows one remote run may send (retries too)")
    remote_batch: int = Field(64, ge=1, le=4096, description="rows per request to a remote model, at most")
    remote_rate_per_second: float = Field(10.0, gt=0, description="requests per second to a remote model")
    remote_time_limit_seconds: float = Field(300.0, gt=0, description="the longest one remote run takes")
    remote_request_timeout_seconds: float = Field(30.0, gt=0, description="the longest one request waits")
    remote_retries: int = Field(4, ge=0, description="retries of a request answered 429/503 or not reached")
    remote_backoff_seconds: float = Field(0.5, ge=0, description="the first retry's wait; it doubles")
    remote_verify_workers: int = Field(2, ge=1, description="remote verifications at once per API process")

    @model_validator(mode="after")
    def _deployed_needs_real_parts(self) -> Settings:
        if self.environment == "production" and self.database_url.startswith("sqlite"):
            raise ValueError("CMIM_DATABASE_URL must name a server database (PostgreSQL) in production")
        if self.environment == "production" and not self.session_secret:
            raise ValueError(
                "CMIM_SESSION_SECRET must be set in production: 32 or more random characters, the same on "
                "every API process (else each signs dashboard sessions its own way)"
            )
        if self.environment == "production" and not self.secret_key:
            raise ValueError(
                "CMIM_SECRET_KEY must be set in production: a Fernet key (cryptography.fernet.Fernet."
                "generate_key()), the same on every API process (it encrypts stored secrets)"
            )
        if self.heartbeat_seconds * 2 >= self.lease_seconds:
            raise ValueError("CMIM_HEARTBEAT_SECONDS must be under half of CMIM_LEASE_SECONDS")
        return self

    @property
    def artifact_options(self) -> dict[str, object]:
        """fsspec options for artifact_url: the S3 endpoint when one is set."""
        if self.artifact_url.startswith("s3://") and self.s3_endpoint_url:
            return {"client_kwargs": {"endpoint_url": self.s3_endpoint_url}}
        return {}

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: the local worker polls the jobs table."""
        return not self.broker_url


@lru_cache
def get_settings() -> Settings:
    """Settings read once from the environment; invalid ones stop the process with one line that names each
    problem (pydantic's own message would also print every setting given, the database password included)."""
    try:
        return Settings()
    except ValidationError as e:
        problems = "; ".join(
            (f"CMIM_{'_'.join(map(str, err['loc'])).upper()}: " if err["loc"] else "")
            + err["msg"].removeprefix("Value error, ")
            for err in e.errors()
        )
        raise SystemExit(f"cmim: invalid settings: {problems}") from None
