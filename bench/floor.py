"""The arithmetic floor of `cmim bench paper --seeds 5 --workers W` on this machine.

Counts the benchmark's FLOPs (torch's FLOP counter on one seed's phases and one epoch of each teacher
recipe, scaled by the schedule) and divides them by the measured fp32 matmul rate of one thread times
W: no fp32 run of the same arithmetic can be faster. `--wall` compares a measured run with the floor,
`--target` says what fraction of the bound a target wall time would need.
"""

from __future__ import annotations

import argparse
import json

from ml.speed import paper_floor

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--wall", type=float, action="append", default=[], help="a measured wall time, s")
    parser.add_argument("--target", type=float, default=1200.0, help="a target wall time, s (default 20 min)")
    args = parser.parse_args()
    out = paper_floor(args.workers)
    floor = out["floor_s"]
    out["target_s"] = args.target
    out["target_fraction_of_bound"] = floor / args.target
    print(
        f"a {args.target:.0f} s run would need {floor / args.target:.2f} of the bound throughout", flush=True
    )
    out["measured"] = [{"wall_s": w, "fraction_of_bound": floor / w} for w in args.wall]
    for w in args.wall:
        print(f"measured {w:.0f} s: {floor / w:.2f} of the bound", flush=True)
    print(json.dumps(out))
