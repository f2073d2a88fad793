"""The monitor against the audit's strongest label-only attack, replayed over many keys.

Honest traffic: the second half of the test split (the first half calibrates the monitor, as the serving
policy's detectors are calibrated), spread over `honest_keys` keys, one query per request, interleaved
evenly with the attack. The attack: the audit's fm_edge query stream (the attacker's labelled data =
the training split, augmented every epoch, each input mixed 70-100 % with another one of its batch;
the audit's generators of that seed), one batch of `batch_size` per request, batch j sent by key j mod K.
The hits do not depend on K (the bank is the model's), so one pass computes them and each K replays the
CUSUMs. Reported per K: attacker queries sent when the first alert naming it (a key alert on one of its
keys, or a model alert) fired, and honest keys named in any alert.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ml.audit.batches import make_batch, view_generators
from ml.audit.config import AuditConfig
from ml.data import Dataset
from ml.monitor import ModelMonitor, MonitorConfig, QueryBank, Reference, calibrate
from ml.train import batches

SPLITS = (1, 4, 16)


def fm_edge_stream(data: Dataset, queries: int, seed: int, batch_size: int = 128) -> Iterator[torch.Tensor]:
    """The audit's fm_edge queries of this seed, batch by batch, epoch after epoch, `queries` in all."""
    cfg, gens = AuditConfig(), view_generators(seed)
    sent = 0
    while sent < queries:
        for idx in batches(len(data.x_train), batch_size, gens["plain"]):
            x = make_batch(data, data.x_train[idx], data.y_train[idx], {"mixup_edge"}, cfg, gens).views[
                "mixup_edge"
            ]
            x = x[: queries - sent]
            sent += len(x)
            yield x
            if sent >= queries:
                return


def _events(
    data: Dataset, bank: QueryBank, seed: int, queries: int, honest_keys: int
) -> list[tuple[int, int, int, int]]:
    """(sender, rows sent, rows counted, hits) in arrival order (repeats are sent but not counted);
    sender >= 0: attack batch index, < 0: honest key -1 - k."""
    half = len(data.x_test) // 2
    honest = data.x_test[half:][
        torch.from_numpy(np.random.default_rng(seed).permutation(len(data.x_test) - half))
    ]
    events, h, sent = [], 0, 0
    for j, x in enumerate(fm_edge_stream(data, queries, seed)):
        tested = bank.test(x)
        events.append((j, len(x), tested.counted, int(tested.hits.sum())))
        sent += len(x)
        upto = round(len(honest) * sent / queries)
        for i in range(h, upto):
            tested = bank.test(honest[i : i + 1])
            events.append((-1 - i % honest_keys, 1, tested.counted, int(tested.hits.sum())))
        h = upto
    return events


def _replay(events: list[tuple[int, int, int, int]], ref: Reference, keys: int) -> dict[str, Any]:
    """CUSUMs over the events with the attack split over `keys` keys (0: honest traffic only)."""
    llr = ref.llr
    monitor, sent, first, flagged, alerts = ModelMonitor(ref.config, ref.p0), 0, None, set(), 0
    for sender, rows, counted, hits in events:
        if sender >= 0 and keys == 0:
            continue
        key = f"attacker-{sender % keys}" if sender >= 0 else f"honest-{-1 - sender}"
        sent += rows if sender >= 0 else 0
        for alert in monitor.record(key, counted, hits, llr(counted, hits)):
            alerts += 1
            named = {k["key_id"] for k in alert.keys}
            flagged |= {k for k in named if k.startswith("honest-")}
            if (
                first is None
                and keys
                and (alert.kind == "model" or any(k.startswith("attacker-") for k in named))
            ):
                first = sent
    return {"keys": keys, "queries_to_alert": first, "honest_keys_flagged": len(flagged), "alerts": alerts}


def simulate(
    data: Dataset,
    seed: int,
    *,
    config: MonitorConfig | None = None,
    queries: int = 200_000,
    honest_keys: int = 50,
    splits: tuple[int, ...] = SPLITS,
) -> dict[str, Any]:
    """One seed: calibrate on the first half of the test split, replay honest + fm_edge traffic per split."""
    config = config or MonitorConfig()
    half = len(data.x_test) // 2
    ref = calibrate(data.x_test[:half], config, seed)
    events = _events(data, QueryBank(ref), seed, queries, honest_keys)
    rows = [_replay(events, ref, k) for k in (0, *splits)]
    return {"seed": seed, "tau": ref.tau, "p0": ref.p0, "calibration": ref.calibration, "rows": rows}


def simulate_seeds(
    data: Dataset, seeds: int, *, config: MonitorConfig | None = None, queries: int = 200_000
) -> dict[str, Any]:
    """`simulate` over seeds 0..seeds-1, with mean +- standard error per split; an attacker never
    alerted on counts as `queries` (the replay's length) and is reported in `never`."""
    runs = [simulate(data, s, config=config, queries=queries) for s in range(seeds)]
    summary = {}
    for i, row in enumerate(runs[0]["rows"]):
        q = [r["rows"][i]["queries_to_alert"] for r in runs]
        f = [r["rows"][i]["honest_keys_flagged"] for r in runs]
        summary[str(row["keys"])] = {
            "queries_to_alert": _mean_se([queries if v is None else v for v in q]),
            "never": sum(v is None for v in q),
            "honest_keys_flagged": _mean_se(f),
            "alerts": _mean_se([r["rows"][i]["alerts"] for r in runs]),
        }
    cfg = (config or MonitorConfig()).model_dump()
    return {"config": cfg, "queries": queries, "seeds": seeds, "splits": summary, "runs": runs}


def _mean_se(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    se = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "se": se}


def monitor_markdown(sim: dict[str, Any]) -> str:
    """The simulation table: per attacker split, queries to the first alert and honest keys flagged."""
    lines = [
        f"Monitor (honest test inputs over 50 keys + fm_edge split over K keys, {sim['seeds']} seeds, "
        f"replay of {sim['queries']} attack queries):",
        "",
        "| attacker keys | attack queries before the first alert | never alerted | honest keys flagged "
        "| alerts |",
        "|---|---|---|---|---|",
    ]
    for keys, s in sim["splits"].items():
        q, f = s["queries_to_alert"], s["honest_keys_flagged"]
        label = "none (honest only)" if keys == "0" else keys
        qa = "" if keys == "0" else f"{q['mean']:.0f} ± {q['se']:.0f}"
        never = "" if keys == "0" else s["never"]
        flagged = f"{f['mean']:.2f} ± {f['se']:.2f}"
        lines.append(f"| {label} | {qa} | {never} | {flagged} | {s['alerts']['mean']:.1f} |")
    return "\n".join(lines) + "\n"
