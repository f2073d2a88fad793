"""The enforced black box: the default protection behind the serving gate, against a thief with many keys.

The gate is the API's predict path run in process with the same pieces: a suspended key is refused
(`Standing.suspended`), a request's rows must fit the key's budget (the audited per-key safe budget, cut
on probation: `Standing.limit`, `first_exhausted`), answered rows are tested against the model's bank
(`QueryBank`) and counted by the CUSUMs (`ModelMonitor`), and each alert acts on the keys it names by the
default `EnforcementPolicy` (`escalate`, kept in a `StandingBook`). Two simplifications: the monitor's
counts are applied after every request (the API flushes them within a second, so a fast thief gets a
second's worth of rows more per key), and there is no clock, so a throttle (a rate cut) is counted but
does not slow anyone.

The attacker holds K keys and sends its own query stream as in the audit, a batch per request; a key
that is suspended or out of budget is replaced by the next one (the rest of the batch goes to it), until
the stream ends (the unlimited attacker's whole schedule) or no key is left. Its student trains on the
answered prefix of its stream, by the audit's budget phase (`train_lockstep(budget=...)`). Attackers:
every attack row of the audit, and three that know the monitor (`AWARE`):

- `jitter`: fm_edge, each query pushed just past the monitor's hit radius from the attacker's own
  nearest earlier query (tau estimated by the published calibration on its own data);
- `fresh_mix`: fm_edge on even mixes (40-60 %) of two random inputs, so no query is near an earlier one;
- `slow`: fm_edge in requests of a few rows, its keys taking turns, among the honest traffic.

Honest traffic: the second half of the test split over `HONEST_KEYS` keys, interleaved evenly with the
attack; among them `RESENDERS` keys send every input three times (retries) and `SENSORS` keys send
readings of one input with 1 % noise (a sensor stream).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ml.attacks import ATTACKS
from ml.audit.batches import Batch
from ml.audit.blackbox import BlackBox
from ml.audit.config import NULL_FIELDS, AuditConfig
from ml.audit.lockstep import train_lockstep
from ml.audit.sources import LiveSource
from ml.audit.stats import summarise
from ml.audit.students import Run
from ml.audit.verdict import judge
from ml.data import Dataset
from ml.enforcement import EnforcementPolicy, Standing, StandingBook, escalate, first_exhausted
from ml.monitor import ModelMonitor, MonitorConfig, QueryBank, Reference, calibrate
from ml.pool import pool_map
from ml.resume import Kept, digest, keeping, weights_digest
from ml.train import resolve_device

KEYS = (1, 16, 256)
AWARE = ("jitter", "fresh_mix", "slow")
HONEST_KEYS, RESENDERS, SENSORS = 50, 5, 5
MODEL = "model"  # the one served model of a simulation
JITTER_MARGIN = 1.25  # jitter: queries kept this many estimated tau from the attacker's earlier ones
JITTER_PUSHES = 4  # jitter: pushes away from the nearest earlier query, at most
FRESH_RANGE = (0.4, 0.6)  # fresh_mix: mixing ratios of its queries
SLOW_ROWS = 16  # slow: samples per request
SENSOR_NOISE = 0.01  # sensor keys: reading noise, in data standard deviations


@dataclass
class Gate:
    """One served model's predict path: per-key budget, standings, bank, CUSUMs, the policy's actions."""

    ref: Reference
    budget: int | None  # per-key rows
    policy: EnforcementPolicy = field(default_factory=EnforcementPolicy)

    def __post_init__(self) -> None:
        self.bank = QueryBank(self.ref)
        self.monitor = ModelMonitor(self.ref.config, self.ref.p0)
        self.book = StandingBook()
        self.used: dict[str, int] = {}
        self.alerts = 0
        self.acted: dict[str, Standing] = {}  # every key an action held, its strongest standing

    def standing(self, key: str) -> Standing | None:
        return self.book.get(MODEL, key)

    def limit(self, key: str) -> int | None:
        standing = self.standing(key)
        return self.budget if standing is None else standing.limit(self.budget)

    def room(self, key: str) -> int | None:
        """Rows the key may still get (None: no budget); 0 when suspended."""
        standing, limit = self.standing(key), self.limit(key)
        if standing is not None and standing.suspended:
            return 0
        return None if limit is None else max(limit - self.used.get(key, 0), 0)

    def ask(self, key: str, x: Tensor) -> bool:
        """Answer the request (every row) or refuse it whole; then the monitor counts it and acts."""
        standing = self.standing(key)
        if standing is not None and standing.suspended:
            return False
        used = self.used.get(key, 0)
        if first_exhausted([self.limit(key)], [used], len(x)) is not None:
            return False
        self.used[key] = used + len(x)
        tested = self.bank.test(x)
        if tested.counted:
            hits = int(np.count_nonzero(tested.hits))
            for alert in self.monitor.record(key, tested.counted, hits, self.ref.llr(tested.counted, hits)):
                self._act(alert.kind, [k["key_id"] for k in alert.keys])
        return True

    def _act(self, kind: str, keys: list[str]) -> None:
        self.alerts += 1
        action, now = self.policy.action(kind), datetime.now(UTC)
        for key in keys:
            after = escalate(
                self.standing(key), action, self.policy, self.used.get(key, 0), str(self.alerts), now
            )
            if after is not None:
                self.book.put(MODEL, key, after)
                self.acted[key] = after


class Jitter:
    """The jitter attacker's reshaping: each fm_edge query moved away from the attacker's own nearest
    earlier query (its last `bank` queries) to JITTER_MARGIN x its estimate of tau, when closer."""

    def __init__(self, tau: float, bank: int) -> None:
        self.radius, self.size = JITTER_MARGIN * tau, bank
        self.kept: Tensor | None = None  # ring buffer of its last `bank` queries, flattened
        self.filled = self.next = 0
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, batch: Batch) -> Batch:
        x = batch.views["mixup_edge"]
        flat = x.reshape(len(x), -1).clone()
        if self.kept is None:
            self.kept = torch.zeros((self.size, flat.shape[1]), dtype=flat.dtype)
        for i in range(len(flat)):  # in order: each row sees the rows sent before it
            row = flat[i]
            for _ in range(JITTER_PUSHES if self.filled else 0):  # a push may bring it near another one
                d = torch.linalg.vector_norm(self.kept[: self.filled] - row, dim=1)
                j = int(d.argmin())
                if d[j] >= self.radius:
                    break
                # an input sent again goes off in a direction of its own (drawn reproducibly)
                away = (
                    row - self.kept[j]
                    if d[j] > 1e-3 * self.radius
                    else torch.randn(row.shape, generator=self.gen)
                )
                row = self.kept[j] + away * (self.radius / torch.linalg.vector_norm(away))
            flat[i] = row
            self.kept[self.next] = row
            self.next = (self.next + 1) % self.size
            self.filled = min(self.filled + 1, self.size)
        batch.views["mixup_edge"] = flat.reshape(x.shape)
        return batch


@dataclass
class Attacker:
    """One attacker: its audit row (`Run`), the config its stream is drawn with, its reshaping, and how
    many samples a request holds (None: a whole batch) and whether its keys take turns."""

    name: str
    run: Callable[[], Run]
    cfg: AuditConfig
    reshape: Callable[[], Callable[[Batch], Batch] | None] = lambda: None
    rows: int | None = None
    rotate: bool = False
    stream_of: str = ""  # attackers with the same value send the same stream ("": its own name)

    @property
    def stream_key(self) -> str:
        return self.stream_of or self.name


def attackers(cfg: AuditConfig, data: Dataset, seed: int, aware: bool = True) -> list[Attacker]:
    """Every attack row of the audit, then the monitor-aware attackers (fm_edge variants)."""

    def make(name: str, key: str, params: Any) -> Callable[[], Run]:
        return lambda: Run(
            name, cfg.students[0], teacher="enforced", attack=ATTACKS.get(key)(data.num_classes, params)
        )

    # audit rows that query the same views draw the same stream (one generator per view)
    out = [
        Attacker(name, run, cfg, stream_of="+".join(run().views))
        for name, key, params in cfg.attack_rows()
        for run in [make(name, key, params)]
    ]
    if not aware:
        return out
    edge = make("fm_edge", "fm_edge", None)
    tau = calibrate(data.x_train, MonitorConfig(), seed + 7919).tau  # its own estimate, own projection
    bank = MonitorConfig().bank
    fresh = cfg.model_copy(update={"edge_range": FRESH_RANGE})
    return out + [
        Attacker("jitter", edge, cfg, reshape=lambda: Jitter(tau, bank)),
        Attacker("fresh_mix", edge, fresh),
        # its requests are smaller, its stream is fm_edge's
        Attacker("slow", edge, cfg, rows=SLOW_ROWS, rotate=True, stream_of="+".join(edge().views)),
    ]


def stream(a: Attacker, data: Dataset, seed: int) -> Iterator[Tensor]:
    """The attacker's queries batch by batch over its whole schedule: (samples, views, *input) each."""
    run = a.run()
    live = LiveSource([run], data, {}, a.cfg, seed, reshape=a.reshape())
    for _ in range(a.cfg.epochs):
        for batch, _ in live.epoch():
            yield torch.stack([batch.views[v] for v in run.views], 1)


class Replay:
    """An iterator's items drawn once, as far as any pass went, and replayed to every later pass: one
    attacker's stream for each K, drawn (and reshaped) once."""

    def __init__(self, items: Iterable[Tensor]) -> None:
        self.items, self.drawn = iter(items), []

    def __iter__(self) -> Iterator[Tensor]:
        for i in itertools.count():
            if i == len(self.drawn):
                item = next(self.items, None)
                if item is None:
                    return
                self.drawn.append(item)
            yield self.drawn[i]


def honest_requests(data: Dataset, seed: int) -> list[tuple[str, Tensor]]:
    """(key, one input) in sending order: plain clients, resenders (each input three times), sensors."""
    half = len(data.x_test) // 2
    rng = np.random.default_rng(seed)
    pool = data.x_test[half:][torch.from_numpy(rng.permutation(len(data.x_test) - half))]
    per = len(pool) // HONEST_KEYS
    plain = HONEST_KEYS - RESENDERS - SENSORS
    std = torch.tensor(data.std, dtype=pool.dtype).view((1, -1) + (1,) * (pool.dim() - 2))
    gen = torch.Generator().manual_seed(seed)
    keyed: list[list[tuple[str, Tensor]]] = []
    for k in range(HONEST_KEYS):
        mine = pool[k * per : (k + 1) * per]
        name = f"honest-{k}"
        if k < plain:
            keyed.append([(name, x[None]) for x in mine])
        elif k < plain + RESENDERS:
            keyed.append([(name, x[None]) for x in mine for _ in range(3)])
        else:  # one input read again and again with the sensor's noise
            noise = SENSOR_NOISE * std * torch.randn((per, *mine.shape[1:]), generator=gen)
            keyed.append([(name, (mine[0] + n)[None]) for n in noise])
    # the clients take turns: one request each, round after round
    out = []
    for i in range(max(len(k) for k in keyed)):
        out += [k[i] for k in keyed if i < len(k)]
    return out


def simulate(
    gate: Gate,
    a: Attacker,
    data: Dataset,
    seed: int,
    keys: int,
    honest: list[tuple[str, Tensor]],
    batches: Iterable[Tensor] | None = None,
) -> dict[str, Any]:
    """Run the attacker with `keys` keys and the honest traffic through the gate; samples it got.
    `batches`: its stream already drawn (`Replay`), else drawn here."""
    total = a.cfg.epochs * len(data.x_train)
    reach = total if gate.budget is None else min(total, keys * gate.budget)  # rows it could get at most
    got, sent_honest, turn, live = 0, 0, 0, list(range(keys))

    def honest_upto(fraction: float) -> None:
        nonlocal sent_honest
        upto = min(len(honest), math.ceil(len(honest) * fraction))
        for key, x in honest[sent_honest:upto]:
            gate.ask(key, x)
        sent_honest = max(sent_honest, upto)

    for batch in stream(a, data, seed) if batches is None else batches:
        views = batch.shape[1]
        pending = batch
        while len(pending) and live:
            if a.rotate:
                turn %= len(live)
            else:
                turn = 0
            key = f"attacker-{live[turn]}"
            room = gate.room(key)
            n = len(pending) if room is None else min(len(pending), room // views)
            n = n if a.rows is None else min(n, a.rows)
            if n == 0 or not gate.ask(key, pending[:n].reshape(-1, *pending.shape[2:])):
                live.pop(turn)  # suspended or out of budget: its successor takes over
                continue
            got += n
            pending = pending[n:]
            turn += 1
            honest_upto(got * views / max(reach, 1))
        if not live:
            break
    honest_upto(1.0)
    return {"samples": got, "queries": got * views, "keys_stopped": keys - len(live)}


def simulate_attacker(
    cfg: AuditConfig, data: Dataset, budget: int, s: int, index: int, keys: tuple[int, ...], aware: bool
) -> list[tuple[dict[str, Any], dict[str, int]]]:
    """Attacker `index` of seed index `s` holding each K of `keys` keys, beside the honest traffic, each
    through a gate of its own: (what it got, the honest keys the gate held) per K."""
    seed = cfg.base_seed + s
    ref = calibrate(data.x_test[: len(data.x_test) // 2], MonitorConfig(), seed)
    requests = honest_requests(data, seed)
    a = attackers(cfg, data, seed, aware)[index]
    batches = Replay(stream(a, data, seed))
    out = []
    for k in keys:
        gate = Gate(ref, budget)
        got = simulate(gate, a, data, seed, k, requests, batches)
        out.append((got, honest_standing(gate)))
    return out


def honest_standing(gate: Gate) -> dict[str, int]:
    """Honest keys an action held: suspended, and throttled or on probation (limited)."""
    held = {k: s for k, s in gate.acted.items() if k.startswith("honest-")}
    return {
        "suspended": sum(s.suspended for s in held.values()),
        "limited": sum(not s.suspended for s in held.values()),
    }


def enforced_phase(
    cfg: AuditConfig,
    data: Dataset,
    box: BlackBox,
    budget: int,
    ls_results: dict[str, dict[str, Any]],
    *,
    keys: tuple[int, ...] = KEYS,
    aware: bool = True,
    workers: int = 1,
    log: Callable[[str], None] = print,
    kept: Kept | None = None,
) -> dict[str, Any]:
    """Every attacker x K over the seeds: queries obtained, the student trained on them, and margins
    against the best LS student (the audit's `judge`, Holm over every row); `ls_results` are the audit's
    LS rows of the student (the report's `students[student].ls`, as JSON).

    The simulations run first, one job per seed and attacker (every K); then every distinct student
    (seed, attacker, samples obtained) trains. Both run `workers` at a time in spawned processes
    (`pool_map`): the same numbers as one at a time, for the same thread count per job. Simulations and
    students `kept` (`ml.resume`) are read back, and each one run is kept as soon as it is done."""
    sims: list[tuple[int, str, dict[str, Any]]] = []  # (seed index, row, what the simulation got)
    # (seed index, stream, samples) -> the attackers whose students train on those answers, together
    groups: dict[tuple[int, str, int], list[str]] = {}
    honest = {"suspended": 0, "limited": 0, "keys": 0}
    roster = attackers(cfg, data, cfg.base_seed, aware)  # names and streams are the same for every seed
    setup = cfg.model_dump_json(exclude=NULL_FIELDS)  # the evidence null changes no simulation or student
    context = [setup, data.fingerprint, budget, list(keys), aware]
    context += [MonitorConfig().model_dump_json(), EnforcementPolicy().model_dump_json()]
    sim_keys = {(s, i): digest(*context, s, a.name) for s in range(cfg.seeds) for i, a in enumerate(roster)}
    simulated = {j: None if kept is None else kept.piece("simulations", key) for j, key in sim_keys.items()}
    # the monitor-aware attackers (last) stream longest: they start first; each is kept where it ran
    todo_sims = sorted((j for j, got in simulated.items() if got is None), key=lambda j: (-j[1], j[0]))
    log(f"enforced: {len(simulated) - len(todo_sims)} of {len(simulated)} attackers' simulations kept")
    args = [
        (kept, "simulations", sim_keys[(s, i)], simulate_attacker, cfg, data, budget, s, i, keys, aware)
        for s, i in todo_sims
    ]
    for j, got in zip(todo_sims, pool_map(keeping, args, workers), strict=True):
        simulated[j] = got
        log(f"enforced seed {j[0]}: {roster[j[1]].name} simulated with {', '.join(map(str, keys))} keys")
    for (s, i), per_k in simulated.items():
        a = roster[i]
        for k, (got, held) in zip(keys, per_k, strict=True):
            honest["suspended"] += held["suspended"]
            honest["limited"] += held["limited"]
            honest["keys"] += HONEST_KEYS
            sims.append((s, f"{a.name} K={k}", got))
            group = groups.setdefault((s, a.stream_key, got["samples"]), [])
            if a.name not in group:
                group.append(a.name)
            log(
                f"enforced seed {s}: {a.name} K={k}: {got['queries']} queries, {got['keys_stopped']} "
                f"keys out, honest held {held}"
            )
    count = sum(len(g) for g in groups.values())
    log(
        f"enforced: training {count} students of {len(sims)} simulations in {len(groups)} lockstep groups "
        f"over {workers} worker(s)"
    )
    served = [box.mode.model_dump_json(), [p.config.model_dump_json() for p in box.policies or []]]
    context = [setup, data.fingerprint, served, weights_digest(box.models), aware]
    named = {g: digest(*context, g, names) for g, names in groups.items()}
    trained: dict[tuple[int, str, int], tuple[float, float]] = {}
    todo = []
    for group, names in groups.items():
        s, _, samples = group
        found = None if kept is None else kept.piece("enforced", named[group])
        if found is None:
            todo.append(group)
            continue
        for name, (best, last) in zip(names, found, strict=True):
            trained[(s, name, samples)] = (best, last)
            log(f"enforced seed {s}: {name} on {samples} samples: student {best:.2f}% (kept)")
    jobs = [
        (kept, "enforced", named[g], train_attackers, cfg, data, box, g[0], groups[g], g[2], aware)
        for g in todo
    ]
    for (s, stream_key, samples), accs in zip(todo, pool_map(keeping, jobs, workers), strict=True):
        for name, got in zip(groups[(s, stream_key, samples)], accs, strict=True):
            trained[(s, name, samples)] = got
            log(f"enforced seed {s}: {name} on {samples} samples: student {got[0]:.2f}%")
    acc: dict[str, dict[str, list[float]]] = {}
    queries: dict[str, list[int]] = {}
    for s, row, got in sims:
        best, last = trained[(s, row.rsplit(" K=", 1)[0], got["samples"])]
        acc.setdefault(row, {"best": [], "last": []})
        acc[row]["best"].append(best)
        acc[row]["last"].append(last)
        queries.setdefault(row, []).append(got["queries"])
    rows = {
        name: {
            "acc_best": summarise(v["best"]),
            "acc_last": summarise(v["last"]),
            "queries": summarise([float(q) for q in queries[name]]),
        }
        for name, v in acc.items()
    }
    verdict = judge(ls_results, rows, cfg.alpha)
    return {
        "budget": budget,
        "keys": list(keys),
        "policy": EnforcementPolicy().model_dump(),
        "honest": honest,
        "rows": rows,
        "verdict": verdict,
    }


def train_attackers(
    cfg: AuditConfig, data: Dataset, box: BlackBox, s: int, names: list[str], samples: int, aware: bool
) -> list[tuple[float, float]]:
    """The students of attackers `names` of seed index `s`, which send the same stream, trained in one
    lockstep on its first `samples` (the audit's budget phase): each one's best and last accuracy."""
    seed = cfg.base_seed + s
    chosen = [a for a in attackers(cfg, data, seed, aware) if a.name in names]
    chosen.sort(key=lambda a: names.index(a.name))
    oracle = {"enforced": box.oracle(s, resolve_device(cfg.device))}
    runs = [a.run() for a in chosen]
    first = chosen[0]
    budget = samples * len(runs[0].views)
    train_lockstep(runs, data, oracle, first.cfg, seed, budget=budget, reshape=first.reshape())
    return [(max(r.acc), r.acc[-1]) for r in runs]


def enforced_summary(enforced: dict[str, Any] | None) -> dict[str, Any]:
    """The benchmark's summary fields: the largest margin over every attacker and K, its standard error,
    the most queries any attacker got (mean over seeds), honest keys suspended (in all simulations) and
    the percent throttled or on probation."""
    if not enforced:
        return dict.fromkeys(
            (
                "enforced_margin",
                "enforced_margin_se",
                "enforced_queries",
                "honest_suspended",
                "honest_limited",
            )
        )
    rows, honest = enforced["rows"], enforced["honest"]
    worst = max(rows, key=lambda r: rows[r]["margin"])
    return {
        "enforced_margin": rows[worst]["margin"],
        "enforced_margin_se": rows[worst]["margin_se"],
        "enforced_queries": max(r["queries"]["mean"] for r in rows.values()),
        "honest_suspended": honest["suspended"],
        "honest_limited": 100.0 * honest["limited"] / max(honest["keys"], 1),
    }


def enforced_markdown(enforced: dict[str, Any], seeds: int) -> list[str]:
    """The table: per attacker and K, queries obtained, margin vs the best LS student (* significant,
    ** after Holm), and the honest keys held."""
    h = enforced["honest"]
    lines = [
        "",
        f"Enforced black box (the default protection, label-only, per-key budget {enforced['budget']:,}, "
        f"monitor and the default enforcement policy; {seeds} seeds; best LS "
        f"{enforced['verdict']['best_ls']} {enforced['verdict']['ls_acc']:.2f}):",
        "",
        "| attacker | keys K | queries obtained | knockoff acc | margin vs best LS |",
        "|---|---|---|---|---|",
    ]
    for name, r in enforced["rows"].items():
        attacker, k = name.rsplit(" K=", 1)
        mark = "**" if r.get("significant_holm") else "*" if r.get("significant") else ""
        q, a = r["queries"], r["acc_best"]
        lines.append(
            f"| {attacker} | {k} | {q['mean']:,.0f} ± {_se(q):,.0f} | {a['mean']:.2f} ± {_se(a):.2f} | "
            f"{r['margin']:+.2f} ± {_se({'se': r['margin_se']}):.2f}{mark} |"
        )
    lines += [
        "",
        f"Honest keys held over all simulations ({h['keys']} honest key runs): {h['suspended']} suspended, "
        f"{h['limited']} throttled or on probation.",
    ]
    return lines


def _se(summary: dict[str, Any]) -> float:
    se = summary["se"]
    return 0.0 if se is None or math.isnan(se) else se


def enforced_record(report: dict[str, Any], command: str, revision: str, indicative: bool) -> dict[str, Any]:
    """What a benchmark run measured of the enforced black box, as the protection statement reads it."""
    enforced = report.get("enforced")
    if not enforced:
        raise ValueError('the report has no enforced black box (no safe budget, or enforced: "")')
    rows = enforced["rows"]
    worst = max(rows, key=lambda r: rows[r]["margin"])
    return {
        "benchmark": report["benchmark"]["dataset"],
        "seeds": report["config"]["seeds"],
        "keys": max(enforced["keys"]),
        "per_key_budget": enforced["budget"],
        "worst": worst,
        "significant_holm": bool(rows[worst].get("significant_holm")),
        **enforced_summary(enforced),
        "revision": revision,
        "command": command,
        "indicative": indicative,
    }
