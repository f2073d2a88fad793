"""Record what a `cmim bench paper` run measured of the enforced black box, for every job's report.

    python bench/record_enforced.py runs/paper/paper.json "cmim bench paper --quick" [--indicative]

writes ml/audit/enforced_measured.json (the revision is this checkout's HEAD): the protection statement of
every report says from it what the default enforcement policy adds (ml.audit.statement).
"""

import json
import subprocess
import sys
from pathlib import Path

from ml.audit.statement import ENFORCED_MEASURED
from ml.enforced_sim import enforced_record


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    report = json.loads(Path(argv[0]).read_text())
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    record = enforced_record(report, argv[1], revision, indicative="--indicative" in argv[2:])
    ENFORCED_MEASURED.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
