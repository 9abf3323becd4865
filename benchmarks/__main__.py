"""`./dev bench` = `python -m benchmarks [--quick] [NAME ...]`: run the benchmarks, print figures.

Each benchmark compares against a baseline measured in the same run (ratios, not absolute
times: the machines are shared and noisy). Names: rate (rate_efficiency), overhead, darwin,
readonly (readonly_migration), sync, soak (worker_soak).
Other benchmarks in this folder with a ``main(argv)`` can be named too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

BENCHMARKS = {
    "rate": "benchmarks.rate_efficiency",
    "overhead": "benchmarks.overhead",
    "darwin": "benchmarks.darwin_py",
    "readonly": "benchmarks.readonly_migration",
    "sync": "benchmarks.sync",
    "soak": "benchmarks.worker_soak",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (minutes, not tens)")
    ap.add_argument("names", nargs="*", help=f"which to run (default: {' '.join(BENCHMARKS)})")
    ns = ap.parse_args(argv)
    names = ns.names or list(BENCHMARKS)
    failed: list[str] = []
    for name in names:
        module = BENCHMARKS.get(name, f"benchmarks.{name}")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            print(f"error: no benchmark {name!r} ({e})", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        rc = int(mod.main(["--quick"] if ns.quick else []))
        print(f"== {name}: exit {rc} after {time.monotonic() - t0:.0f} s\n", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
