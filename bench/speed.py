"""Speed benchmark: CMIM step / CE step and lockstep audit / sequential; same as `cmim bench speed`."""

import json

from ml.bench import speed

if __name__ == "__main__":
    print(json.dumps(speed()))
