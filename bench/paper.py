"""The discriminating benchmark; same as `cmim bench paper` (pass --quick for the small variant)."""

import sys

from ml.cli import app

if __name__ == "__main__":
    app(["bench", "paper", *sys.argv[1:]])
