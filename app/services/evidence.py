"""Evidence of theft as a service: the model's current challenge (a generation: a secret committed to and
the challenge drawn from it), verifications of suspects (posted answers, an uploaded model, or a remote
endpoint asked in the background), their records, and the evidence bundle, whose download reveals the
secret and so retires the challenge: the model gets a fresh one, committed the same way.

Generation 0 is what the job's audit stored (`ml.evidence.verify.store_names`); generation g >= 1 is drawn
here from a new secret by the same mechanism, with the teacher's forward pass on the job's training data.
Its null is the audit's (measured on generation 0): the same selection from the same teacher and data
with another secret, so independent models agree with it alike; it is not measured again.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import session_scope
from app.core.keys import KeyInfo
from app.core.models import Dataset, Job, UploadedModel, Verification, utcnow
from app.core.remote import EndpointSpec, Limits, RemoteError, RemoteModel
from app.core.secrets import SecretBox
from app.core.storage import ArtifactStore
from app.problems import Problem, not_found
from app.services.jobs import job_artifact, owned_job, report_artifact
from app.services.serving import load_served
from app.services.tenancy import get_owned
from app.services.uploaded_models import invalid
from ml.catalog import load_dataset
from ml.evidence import (
    CHALLENGE_POINTS,
    DEFAULT_MECHANISM,
    MECHANISMS,
    Challenge,
    Secret,
    build_bundle,
    evidence_note,
    mechanism_null,
    pack_challenge,
    predicted_labels,
    selected_names,
    store_names,
    unpack_challenge,
    verdict,
)
from ml.loading import CONFIG_NAME, ModelMeta, load_meta, load_model

log = logging.getLogger(__name__)
COULD_NOT_VERIFY = "could_not_verify"
STALE_MARGIN = timedelta(seconds=60)  # a run this much past its time limit died with its API process


def generation_names(job_id: uuid.UUID, generation: int) -> tuple[str, str]:
    """Named objects of one challenge generation: (secret, challenge)."""
    if generation == 0:
        return store_names(str(job_id))
    return (
        f"evidence/{job_id}/gen{generation}/secret.json",
        f"evidence/{job_id}/gen{generation}/challenge.npz",
    )


def _current_name(job_id: uuid.UUID) -> str:
    return f"evidence/{job_id}/current.json"


@dataclass(frozen=True)
class Material:
    """What a verification of one model needs: its current challenge generation, the null, the meta."""

    job_id: uuid.UUID
    generation: int
    secret: Secret
    challenge: Challenge
    report: dict[str, Any]
    meta: ModelMeta
    mechanism: str = DEFAULT_MECHANISM

    def commitment(self) -> dict[str, Any]:
        return self.secret.commitment() | {"generation": self.generation}

    def null(self) -> tuple[dict[str, list[float]], Any, float]:
        """(each family's agreements, the fitted null, the measured false-positive rate); 409 without."""
        try:
            return mechanism_null(self.report, self.mechanism)
        except ValueError as e:
            raise Problem(
                409, f"model {self.job_id}: {e} (more seeds or LS rows)", slug="no-evidence"
            ) from None


def current_generation(store: ArtifactStore, job_id: uuid.UUID) -> int:
    raw = store.read_named(_current_name(job_id))
    return 0 if raw is None else int(json.loads(raw)["generation"])


def load_generation(
    store: ArtifactStore, job_id: uuid.UUID, generation: int, mechanism: str = DEFAULT_MECHANISM
) -> tuple[Secret, Challenge] | None:
    """A generation's secret and challenge; the selected challenge (`mechanism` "selected") has only
    generation 0, written when the job was published."""
    secret_name, challenge_name = generation_names(job_id, generation)
    if mechanism != DEFAULT_MECHANISM:
        challenge_name = selected_names(str(job_id))[1]
    raw_secret, raw_challenge = store.read_named(secret_name), store.read_named(challenge_name)
    if raw_secret is None or raw_challenge is None:
        return None
    return Secret.from_json(json.loads(raw_secret)), unpack_challenge(raw_challenge)


def material(session: Session, store: ArtifactStore, model_id: uuid.UUID, key: KeyInfo) -> Material:
    """The model's current challenge, report and meta; 409 when it has no evidence material."""
    job = owned_job(session, model_id, key)
    report = json.loads(store.read_bytes(report_artifact(session, job).storage_key))
    generation = current_generation(store, job.id)
    loaded = load_generation(store, job.id, generation)
    if loaded is None or DEFAULT_MECHANISM not in report.get("evidence", {}).get("mechanisms", {}):
        if generation > 0:
            detail = f"model {job.id}: challenge {generation - 1} was revealed and no fresh one could be made"
        elif (job.spec.get("teacher") or {}).get("endpoint") is not None:
            detail = (
                f"model {job.id} was audited as deployed, through its endpoint: cmim holds no weights to "
                "draw a challenge from, so it has no evidence material (the report's findings say so)"
            )
        else:
            detail = f"model {job.id} has no evidence material (its job predates it)"
        raise Problem(409, detail, slug="no-evidence")
    meta = load_meta(store.local_path(job_artifact(session, job.id, CONFIG_NAME).storage_key))
    selected = load_generation(store, job.id, 0, "selected") if generation == 0 else None
    if selected is not None:  # the report says the selected challenge works (stored only then)
        return Material(job.id, 0, selected[0], selected[1], report, meta, "selected")
    return Material(job.id, generation, loaded[0], loaded[1], report, meta)


SELECTED_SCOPE = (
    "tested against the audit's held-out independent models (seeds 1, 3, ...; the challenge was chosen on "
    "seeds 0, 2, ...), per family, the worst p over them; the bound holds for suspects like them"
)


def decide(m: Material, labels: list[int]) -> dict[str, Any]:
    """The verdict on a suspect's labels for the challenge (checked to be the right number and classes),
    with the mechanism whose challenge and null it used."""
    _, null, fpr = m.null()
    out = verdict(m.challenge, torch.tensor(labels), null, fpr) | {"mechanism": m.mechanism}
    if m.mechanism != DEFAULT_MECHANISM:
        return out | {"null_scope": SELECTED_SCOPE}
    return out | evidence_note(m.report)


def check_labels(labels: list[int], m: Material) -> str | None:
    """Why these labels cannot be a suspect's answers to the challenge (None: they can)."""
    if len(labels) != len(m.challenge.labels):
        return (
            f"answers must hold one label per challenge input: {len(m.challenge.labels)}, got {len(labels)}"
        )
    bad = [a for a in labels if not 0 <= a < m.meta.num_classes]
    return f"answers must be class indices in 0..{m.meta.num_classes - 1}; got {bad[0]}" if bad else None


def record_done(
    session: Session, m: Material, key: KeyInfo, kind: str, request: dict[str, Any], labels: list[int],
    result: dict[str, Any],
) -> Verification:  # fmt: skip
    """A finished verification (posted answers or an uploaded model), stored in one transaction."""
    row = Verification(
        owner_id=key.owner_id, model_id=m.job_id, kind=kind, request=request, status="done",
        verdict=result, answers=labels, commitment=m.commitment(), finished_at=utcnow(),
    )  # fmt: skip
    session.add(row)
    session.commit()
    return row


# -- remote endpoints, asked in the background ------------------------------------------------------------


def limits(settings: Settings) -> Limits:
    return Limits.from_settings(settings)


def allowed(settings: Settings, spec: EndpointSpec) -> str | None:
    """Why the operator's allow-list refuses this endpoint (None: allowed)."""
    return spec.refused(settings)


class Verifier:
    """Runs remote verifications on a few threads of the API process; each is bounded by the remote
    client's time limit, and a full queue is refused rather than grown."""

    def __init__(self, settings: Settings, store: ArtifactStore) -> None:
        self.settings, self.store = settings, store
        self._slots = threading.BoundedSemaphore(settings.remote_verify_workers * 4)
        self._queue: queue.SimpleQueue[tuple[uuid.UUID, Material]] = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    def _start_workers(self) -> None:
        """The threads, started by the first verification (an API that never verifies runs none). Daemon
        threads: a process that stops does not wait for a run (it is reported failed when read)."""
        with self._lock:
            if self._started:
                return
            for i in range(self.settings.remote_verify_workers):
                threading.Thread(target=self._work, name=f"cmim-verify-{i}", daemon=True).start()
            self._started = True

    def _work(self) -> None:
        while True:
            self._run(*self._queue.get())

    def start(self, session: Session, m: Material, key: KeyInfo, spec: EndpointSpec) -> Verification:
        """Store the running verification (headers sealed) and start asking the endpoint; 429 when full."""
        if not self._slots.acquire(blocking=False):
            raise Problem(429, "too many remote verifications are running; try again later", slug="busy")
        try:
            sealed = SecretBox.from_settings(self.settings).seal(spec.headers) if spec.headers else None
            row = Verification(
                owner_id=key.owner_id, model_id=m.job_id, kind="endpoint", request=spec.public(),
                headers_sealed=sealed, status="running", commitment=m.commitment(),
            )  # fmt: skip
            session.add(row)
            session.commit()
            self._start_workers()
            self._queue.put((row.id, m))
        except BaseException:
            self._slots.release()
            raise
        return row

    def _run(self, vid: uuid.UUID, m: Material) -> None:
        """Ask the endpoint and store the outcome; whatever goes wrong ends the run as could-not-verify."""
        remote: RemoteModel | None = None
        status, labels = "failed", None
        try:
            remote = RemoteModel(self._spec(vid), limits(self.settings))
            answers = [int(a) for a in remote.labels(m.challenge.x.numpy())]
            if (problem := check_labels(answers, m)) is not None:
                raise RemoteError(f"the endpoint answered the wrong shape: {problem}")
            status, result, labels = "done", decide(m, answers) | {"queries": remote.sent}, answers
        except RemoteError as e:
            result = {"verdict": COULD_NOT_VERIFY, "reason": str(e)}
        except Exception as e:  # noqa: BLE001 (a bug must still end the run with a reason, not "running")
            log.exception("verification %s", vid)
            result = {"verdict": COULD_NOT_VERIFY, "reason": f"internal error: {type(e).__name__}"}
        try:
            if status == "failed" and remote is not None:
                result["queries"] = remote.sent
            with session_scope(self.settings.database_url) as s:
                row = s.get(Verification, vid)
                assert row is not None, "a running verification is never deleted"
                row.status, row.verdict, row.answers = status, result, labels
                row.log, row.finished_at = (remote.log if remote else []), utcnow()
        finally:
            self._slots.release()

    def _spec(self, vid: uuid.UUID) -> EndpointSpec:
        """The endpoint as it was asked for, its headers decrypted."""
        with session_scope(self.settings.database_url) as s:
            row = s.get(Verification, vid)
            assert row is not None, "a running verification is never deleted"
            public = {k: v for k, v in row.request.items() if k != "header_names"}
            return EndpointSpec.model_validate(public | {"headers": self._headers(row)})

    def _headers(self, row: Verification) -> dict[str, str]:
        if row.headers_sealed is None:
            return {}
        headers = SecretBox.from_settings(self.settings).open(row.headers_sealed)
        assert isinstance(headers, dict)
        return headers


def verification(
    session: Session, settings: Settings, model_id: uuid.UUID, vid: uuid.UUID, key: KeyInfo
) -> Verification:
    """One of the caller's verifications of this model (404 otherwise); a run whose API process stopped
    is ended as could-not-verify."""
    owned_job(session, model_id, key)
    row = session.get(Verification, vid)
    if row is None or row.model_id != model_id or row.owner_id != key.owner_id:
        raise not_found("verification", vid)
    stale = utcnow() - timedelta(seconds=settings.remote_time_limit_seconds) - STALE_MARGIN
    if row.status == "running" and row.created_at < stale:
        row.status, row.finished_at = "failed", utcnow()
        row.verdict = {"verdict": COULD_NOT_VERIFY, "reason": "the API process running it stopped"}
        session.commit()
    return row


# -- the bundle, and the fresh challenge its download commits ----------------------------------------------

_retire_lock = threading.Lock()


def bundle(session: Session, store: ArtifactStore, row: Verification) -> bytes:
    """The evidence bundle of a finished verification; its challenge is retired (a fresh one committed)."""
    if row.status != "done" or row.answers is None or row.verdict is None:
        raise Problem(
            409, f"verification {row.id} is {row.status}: it has no evidence to bundle", slug="no-bundle"
        )
    generation = int(row.commitment["generation"])
    mechanism = row.verdict.get("mechanism", DEFAULT_MECHANISM)
    loaded = load_generation(store, row.model_id, generation, mechanism)
    job = session.get(Job, row.model_id)
    if loaded is None or job is None:
        raise Problem(409, f"the challenge of verification {row.id} is no longer stored", slug="no-bundle")
    report = json.loads(store.read_bytes(report_artifact(session, job).storage_key))
    meta = load_meta(store.local_path(job_artifact(session, job.id, CONFIG_NAME).storage_key))
    m = Material(job.id, generation, loaded[0], loaded[1], report, meta, mechanism)
    families, _, _ = m.null()
    data = build_bundle(
        secret=m.secret, generation=generation, challenge=m.challenge, answers=row.answers,
        suspect=_suspect_words(row), null=families, alpha=float(row.verdict["alpha"]), verdict=row.verdict,
        request_log=row.log if row.kind == "endpoint" else None,
        context={
            "model": str(job.id), "verification": str(row.id), "mechanism": mechanism,
            "null_measured_on_generation": 0, "suspect_request": row.request,
        },
    )  # fmt: skip
    retire(session, store, job, generation)
    return data


def retire(session: Session, store: ArtifactStore, job: Job, generation: int) -> None:
    """The challenge `generation` was revealed: commit generation + 1 (once) and make it current. When no
    fresh challenge can be drawn (the data is gone), the model has no current challenge (409 on verify)."""
    with _retire_lock:
        if current_generation(store, job.id) != generation:
            return  # already retired
        nxt = generation + 1
        try:
            secret = Secret.new()
            teacher = load_served(session, store, job.id, job.owner_id).model
            data = _job_data(session, store, job)
            ch = MECHANISMS.get(DEFAULT_MECHANISM).challenge(teacher, None, data, secret, CHALLENGE_POINTS)
        except Exception:  # noqa: BLE001 (the old challenge is retired all the same; verify then says why)
            log.exception("model %s: no fresh challenge could be drawn", job.id)
            ch = None
        if ch is not None:
            secret_name, challenge_name = generation_names(job.id, nxt)
            store.write_named(challenge_name, pack_challenge(ch))
            store.write_named(secret_name, json.dumps(secret.to_json()).encode())
        store.write_named(_current_name(job.id), json.dumps({"generation": nxt}).encode())


def _job_data(session: Session, store: ArtifactStore, job: Job) -> Any:
    """The job's training data as its teacher saw it (the built-in data set, or the owner's upload)."""
    spec = job.spec["teacher"]
    if job.dataset_id is None:
        return load_dataset(spec["dataset"], **spec.get("dataset_params", {}))
    upload = session.get(Dataset, job.dataset_id)
    assert upload is not None, "uploaded datasets are never deleted while a job uses them"
    return load_dataset(spec["dataset"], path=str(store.local_path(upload.storage_key)))


def _suspect_words(row: Verification) -> str:
    if row.kind == "endpoint":
        return f"endpoint {row.request['url']} ({row.request['protocol']}, model {row.request.get('model')})"
    return "answers" if row.kind == "answers" else f"uploaded model {row.request.get('suspect_model_id')}"


def uploaded_suspect_labels(
    session: Session, store: ArtifactStore, ident: uuid.UUID, key: KeyInfo, m: Material
) -> list[int]:
    """An uploaded model of the caller's, checked to take the teacher's inputs and classes, asked the
    challenge: its labels."""
    row = get_owned(session, UploadedModel, ident, key, "model")
    meta = m.meta
    if tuple(row.input_shape) != tuple(meta.input_shape) or row.num_classes != meta.num_classes:
        raise invalid(
            f"the suspect takes {tuple(row.input_shape)} with {row.num_classes} classes; the model answers "
            f"{tuple(meta.input_shape)} with {meta.num_classes}"
        )
    onnx = row.output if row.format == "onnx" else None
    model, _ = load_model(
        store, row.storage_key, row.config_key, onnx_output=onnx, input_shape=tuple(meta.input_shape),
        num_classes=meta.num_classes,
    )  # fmt: skip
    return [int(a) for a in predicted_labels(model, m.challenge)]
