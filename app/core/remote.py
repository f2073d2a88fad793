"""The one client for models that run elsewhere: an Open Inference Protocol v2 server (KServe, Triton,
MLServer, ...) or a JSON route described by a small request/response template.

It sends inputs in batches under a query cap (every row sent counts, retries included), a rate limit
(requests per second) and a time limit for the whole run; it retries 429, 503 and connection errors with
exponential back-off (a `Retry-After` the server sends is honoured, within the time limit), and refuses
anything else that is not a well-formed answer. Every request is logged with its time, its duration, the
sha256 of the request body and of the answer body; an optional content-addressed cache (`AnswerCache`)
answers a request it has seen before without sending it. Labels come back as class indices: an answer
of scores (n, C) is taken by argmax, an answer of n integers as it is. Scores (`scores`, what an audit of a
deployed model attacks) come back as logits: an answer of probabilities as their log, of labels as one-hot
logits.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.config import Settings
from app.core.storage import ArtifactStore
from app.core.text import refused_character

LABEL_LOGIT = 30.0  # a label-only answer as logits: the label's (the others 0)
INPUTS = "$inputs"  # the placeholder a JSON template's request puts where the batch goes
RETRIED = (429, 503)
MODEL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,200}")


class Template(BaseModel):
    """A JSON route's request and answer: `request` is any JSON holding the string "$inputs" once (the
    batch goes there, as nested lists); `response` is the dotted path of the answers in the reply
    (e.g. `predictions` or `result.labels`; an integer step indexes a list)."""

    model_config = ConfigDict(extra="forbid")
    request: Any = Field(default_factory=lambda: {"instances": INPUTS})
    response: str = Field("predictions", min_length=1, max_length=200)

    @field_validator("request")
    @classmethod
    def _one_placeholder(cls, v: Any) -> Any:
        if json.dumps(v).count(json.dumps(INPUTS)) != 1:
            raise ValueError(f'the request template must hold the string "{INPUTS}" exactly once')
        for text in _strings(v):
            if (why := refused_character(text)) is not None:
                raise ValueError(f"a string of the request template {why}")
        return v

    @field_validator("response")
    @classmethod
    def _path_text(cls, v: str) -> str:
        if (why := refused_character(v)) is not None:
            raise ValueError(f"the response path {why}")
        return v


class EndpointSpec(BaseModel):
    """Where a remote model answers and how to ask it."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(
        min_length=1,
        max_length=2000,
        description="http(s) base URL: for v2 the server's root (the route is /v2/models/{model}/infer), "
        "for json the route itself",
    )
    protocol: Literal["v2", "json"] = "v2"
    model: str | None = Field(None, max_length=200, description="the model's name on a v2 server")
    headers: dict[str, str] = Field(
        default_factory=dict, description="sent with every request (e.g. Authorization); stored encrypted"
    )
    template: Template | None = Field(
        None, description="json protocol only; default {instances} -> predictions"
    )
    flatten: bool = Field(False, description="send each input as a flat vector (tabular servers, sklearn)")
    batch: int | None = Field(None, ge=1, le=4096, description="rows per request; default: the service's")
    max_queries: int | None = Field(
        None, ge=1, description="rows this run may send at most, retries included; at most the service's cap"
    )

    @field_validator("url")
    @classmethod
    def _http_only(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the endpoint URL must be http:// or https:// with a host")
        if (why := refused_character(v)) is not None or " " in v:
            raise ValueError(f"the URL {why or 'contains a space'}")
        return v

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_NAME.fullmatch(v):
            raise ValueError("a model name takes letters, digits and . _ : - only")
        return v

    @field_validator("headers")
    @classmethod
    def _header_text(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 32 or any(not k or len(k) > 200 or len(x) > 8192 for k, x in v.items()):
            raise ValueError("at most 32 headers, names 1-200 and values up to 8192 characters")
        for k, x in v.items():
            if any(ord(c) < 32 or ord(c) > 126 for c in k + x):
                raise ValueError(f"header {k[:40]!r}: only printable ASCII is allowed in names and values")
        return v

    def host(self) -> str:
        return (urlsplit(self.url).hostname or "").lower()

    def refused(self, settings: Settings) -> str | None:
        """Why the operator's allow-list of hosts refuses this endpoint (None: allowed)."""
        hosts, host = settings.remote_allowed_hosts, self.host()
        if hosts is None or host in {h.lower() for h in hosts}:
            return None
        return f"the host {host!r} is not in this service's allowed hosts (CMIM_REMOTE_ALLOWED_HOSTS)"

    def public(self) -> dict[str, Any]:
        """What may be shown again: everything but the header values (their names only)."""
        out = self.model_dump(exclude={"headers"}, exclude_none=True)
        return out | {"header_names": sorted(self.headers)}


@dataclass(frozen=True)
class Limits:
    batch: int = 64
    max_queries: int = 10_000
    rate_per_second: float = 10.0
    time_limit_seconds: float = 300.0
    request_timeout_seconds: float = 30.0
    retries: int = 4
    backoff_seconds: float = 0.5

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            batch=settings.remote_batch,
            max_queries=settings.remote_max_queries,
            rate_per_second=settings.remote_rate_per_second,
            time_limit_seconds=settings.remote_time_limit_seconds,
            request_timeout_seconds=settings.remote_request_timeout_seconds,
            retries=settings.remote_retries,
            backoff_seconds=settings.remote_backoff_seconds,
        )


Convert = Callable[[np.ndarray, int], np.ndarray]  # (an answer's values, rows asked) -> labels or scores


class RemoteError(Exception):
    """The remote model could not be asked (the reason is the message): nothing it answered counts."""


class AnswerCache(Protocol):
    """Answers by the sha256 of what was asked (endpoint, model and request body)."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, body: bytes) -> None: ...


class StoreCache:
    """Answers kept in the artifact store, named by the sha256 of what was asked (endpoint, model and
    request body): asking the same again, in a re-run or another process, sends nothing."""

    def __init__(self, store: ArtifactStore, prefix: str = "remote-answers") -> None:
        self.store, self.prefix = store, prefix

    def get(self, key: str) -> bytes | None:
        return self.store.read_named(f"{self.prefix}/{key[:2]}/{key}")

    def put(self, key: str, body: bytes) -> None:
        self.store.write_named(f"{self.prefix}/{key[:2]}/{key}", body)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class RemoteModel:
    """A remote classifier asked for labels; `log` and `sent` say what was asked."""

    spec: EndpointSpec
    limits: Limits = field(default_factory=Limits)
    cache: AnswerCache | None = None
    transport: httpx.BaseTransport | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    log: list[dict[str, Any]] = field(default_factory=list)
    sent: int = 0  # rows sent, every attempt counted

    def labels(self, x: np.ndarray) -> np.ndarray:
        """Class indices for every row of x, in order; RemoteError when the model cannot be asked."""
        return self._ask(x, _labels, np.zeros(0, dtype=np.int64))

    def scores(self, x: np.ndarray, num_classes: int) -> np.ndarray:
        """(n, num_classes) logits for the rows of x, in order (scores as answered, probabilities as their
        log, labels one-hot); RemoteError when the model cannot be asked or answers other classes."""
        empty = np.zeros((0, num_classes), dtype=np.float32)
        return self._ask(x, lambda v, n: _scores(v, n, num_classes), empty)

    def _ask(self, x: np.ndarray, convert: Convert, empty: np.ndarray) -> np.ndarray:
        batch, cap = min(self.spec.batch or self.limits.batch, self.limits.batch), self.cap
        if self.sent + len(x) > cap:
            raise RemoteError(f"asking {len(x)} inputs would pass the query cap of {cap}")
        deadline = self.clock() + self.limits.time_limit_seconds
        out: list[np.ndarray] = []
        with httpx.Client(transport=self.transport, follow_redirects=False) as client:
            self._last = -math.inf
            for i in range(0, len(x), batch):
                out.append(self._batch(client, x[i : i + batch], cap, deadline, convert))
        return np.concatenate(out) if out else empty

    @property
    def cap(self) -> int:  # rows this client may send at most: the endpoint's cap within the service's
        return min(self.spec.max_queries or self.limits.max_queries, self.limits.max_queries)

    def _url(self) -> str:
        if self.spec.protocol == "json":
            return self.spec.url
        if not self.spec.model:
            raise RemoteError("a v2 endpoint needs the model's name")
        return f"{self.spec.url.rstrip('/')}/v2/models/{self.spec.model}/infer"

    def _body(self, x: np.ndarray) -> bytes:
        rows = x.reshape(len(x), -1) if self.spec.flatten else x
        if self.spec.protocol == "v2":
            tensor = {"name": "input-0", "shape": list(rows.shape), "datatype": "FP32"}
            body: Any = {"inputs": [tensor | {"data": rows.astype(np.float32).ravel().tolist()}]}
        else:
            template = self.spec.template or Template()
            text = json.dumps(template.request).replace(json.dumps(INPUTS), json.dumps(rows.tolist()), 1)
            return text.encode()
        return json.dumps(body).encode()

    def _batch(
        self, client: httpx.Client, x: np.ndarray, cap: int, deadline: float, convert: Convert
    ) -> np.ndarray:
        url, body = self._url(), self._body(x)
        key = sha256(json.dumps([url, self.spec.model]).encode() + b"\n" + body)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.log.append(_entry(len(x), body, hit, 200, 0.0, attempt=0, cached=True))
            return self._parse(hit, len(x), convert)
        for attempt in range(1, self.limits.retries + 2):
            if self.sent + len(x) > cap:
                raise RemoteError(
                    f"the query cap of {cap} was reached after {self.sent} rows (retries count)"
                )
            self._pace(deadline)
            left = deadline - self.clock()
            start = self.clock()
            self.sent += len(x)
            try:
                r = client.post(
                    url,
                    content=body,
                    headers=self._headers(),
                    timeout=min(self.limits.request_timeout_seconds, left),
                )
            except httpx.TimeoutException:
                waited = min(self.limits.request_timeout_seconds, left)
                self.log.append(
                    _entry(len(x), body, None, None, self.clock() - start, attempt, error="timeout")
                )
                raise RemoteError(f"the endpoint did not answer within {waited:.1f} s") from None
            except httpx.TransportError as e:
                self.log.append(
                    _entry(len(x), body, None, None, self.clock() - start, attempt, error=str(e)[:200])
                )
                wait = self.limits.backoff_seconds * 2 ** (attempt - 1)
                if attempt > self.limits.retries or self.clock() + wait >= deadline:
                    raise RemoteError(
                        f"the endpoint could not be reached: {type(e).__name__}: {str(e)[:200]}"
                    ) from None
                self.sleep(wait)
                continue
            self.log.append(_entry(len(x), body, r.content, r.status_code, self.clock() - start, attempt))
            if r.status_code == 200:
                answers = self._parse(r.content, len(x), convert)
                if self.cache is not None:
                    self.cache.put(key, r.content)
                return answers
            if r.status_code not in RETRIED:
                raise RemoteError(f"the endpoint answered HTTP {r.status_code}: {r.text[:200]!r}")
            wait = _retry_after(r) or self.limits.backoff_seconds * 2 ** (attempt - 1)
            if attempt > self.limits.retries or self.clock() + wait >= deadline:
                raise RemoteError(f"the endpoint kept answering HTTP {r.status_code} ({attempt} attempts)")
            self.sleep(wait)
        raise AssertionError("unreachable: the loop returns or raises")

    def _headers(self) -> dict[str, str]:
        return {"content-type": "application/json", "accept": "application/json"} | self.spec.headers

    def _pace(self, deadline: float) -> None:
        """Wait for the rate limit's next slot; RemoteError when the time limit is spent."""
        wait = self._last + 1.0 / self.limits.rate_per_second - self.clock()
        if self.clock() + max(wait, 0.0) >= deadline:
            raise RemoteError(f"the time limit of {self.limits.time_limit_seconds:.0f} s was reached")
        if wait > 0:
            self.sleep(wait)
        self._last = self.clock()

    def _parse(self, content: bytes, n: int, convert: Convert) -> np.ndarray:
        try:
            answer = json.loads(content)
            values = (
                _v2_output(answer) if self.spec.protocol == "v2" else _path(answer, self._response_path())
            )
            return convert(values, n)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RemoteError(f"the endpoint answered the wrong shape: {str(e)[:200]}") from None

    def _response_path(self) -> str:
        return (self.spec.template or Template()).response


def _entry(
    rows: int, body: bytes, answer: bytes | None, status: int | None, seconds: float, attempt: int,
    cached: bool = False, error: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "rows": rows,
        "attempt": attempt,
        "status": status,
        "ms": round(seconds * 1000, 1),
        "request_sha256": sha256(body),
        "answer_sha256": None if answer is None else sha256(answer),
        "cached": cached,
        "error": error,
    }


def _strings(value: Any) -> list[str]:  # every string in a JSON value, keys included
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return min(max(float(r.headers["retry-after"]), 0.0), 60.0)
    except (KeyError, ValueError):
        return None


def _v2_output(answer: dict[str, Any]) -> np.ndarray:  # the first output tensor of a v2 answer, shaped
    out = answer["outputs"][0]
    data = np.asarray(out["data"], dtype=np.float64)
    shape = [int(s) for s in out["shape"]]
    if data.size != math.prod(shape):
        raise ValueError(f"output {out.get('name')!r} has {data.size} values for shape {shape}")
    return data.reshape(shape)


def _path(answer: Any, path: str) -> np.ndarray:
    for step in path.split("."):
        answer = answer[int(step)] if isinstance(answer, list) else answer[step]
    return np.asarray(answer, dtype=np.float64)


def _labels(values: np.ndarray, n: int) -> np.ndarray:
    """Class indices from n labels or n rows of scores; ValueError for anything else."""
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim == 2 and values.shape[0] == n and values.shape[1] > 1:
        return values.argmax(-1).astype(np.int64)
    if values.ndim == 1 and len(values) == n and np.all(values == np.round(values)):
        return values.astype(np.int64)
    raise ValueError(f"expected {n} labels or {n} rows of scores, got an array of shape {list(values.shape)}")


def _scores(values: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """(n, num_classes) logits from n rows of scores (probabilities: their log) or n labels (one-hot)."""
    if values.ndim == 2 and values.shape[0] == n and values.shape[1] > 1:
        if values.shape[1] != num_classes:
            raise ValueError(f"expected scores of {num_classes} classes, got {values.shape[1]}")
        probs = values.min() >= 0 and np.allclose(values.sum(-1), 1.0, atol=1e-3)
        return (np.log(np.clip(values, 1e-12, None)) if probs else values).astype(np.float32)
    labels = _labels(values, n)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    return np.eye(num_classes, dtype=np.float32)[labels] * LABEL_LOGIT
