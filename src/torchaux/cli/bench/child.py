"""One measured training run of `torchaux bench`, in its own process.

Reads a JSON request on stdin (config, method, directory, reference
fingerprints) and prints one JSON line of results.
"""

from __future__ import annotations

import json
import sys

from torchaux.cli.bench.run import BenchConfig, run_one


def main() -> None:
    """Run the requested method and print its results as JSON."""
    request = json.load(sys.stdin)
    cfg = request["cfg"]
    cfg["methods"] = tuple(cfg["methods"])
    reference = {int(k): [tuple(x) for x in v] for k, v in request["reference"].items()}
    result = run_one(BenchConfig(**cfg), request["method"], request["root"], reference)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
