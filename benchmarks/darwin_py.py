"""Against darwin-py: the same keys registered by darwin-py's ``dataset.register`` and by
``ingest run``, against the same emulator settings (its own process each time, fresh state).

darwin-py (PyPI ``darwin-py``) runs in its own virtual environment, created here under
``.bench/darwin-venv`` on first use (it pins pillow<13, which the engine does not want). It is
pointed at the emulator with ``DARWIN_BASE_URL``; ``DARWIN_RETRY_INITIAL_WAIT=1`` is set before
it is imported (its back-off otherwise starts at 60 s; with the emulator at the engine's rate it
should not matter unless a 429 happens, and the script reports the 429s). It authenticates with
``Client.from_api_key`` (``GET users/token_info``), finds the dataset (``GET datasets``) and the
storage configuration (``GET teams/{team}/storage``), then ``dataset.register(store, keys)``
POSTs ``register_existing`` 10 items at a time, one request after another.

The engine lists the same keys from benchmarks/synthetic_s3.py and registers them with its
defaults (10 items a request) at ``rate.requests_per_s`` = the emulator's rate.

Wall times are whole commands (process start to exit: imports, preflight, listing included).

    python -m benchmarks.darwin_py                 # 2,000 keys, emulator 20 req/s, 50 ms
    python -m benchmarks.darwin_py --quick         # 500 keys
"""

from __future__ import annotations

import argparse
import subprocess
import venv
from typing import Any

import orjson

from benchmarks import _common as c

RATE = 20.0
LATENCY_MS = 50.0
VENV = c.WORK / "darwin-venv"

# Runs inside darwin-py's virtual environment; prints one JSON line.
DARWIN_SCRIPT = r"""
import json, os, sys, time
os.environ.setdefault("DARWIN_RETRY_INITIAL_WAIT", "1")
os.environ.setdefault("DARWIN_RETRY_MAX_WAIT", "5")
t0 = time.perf_counter()
import darwin
from darwin.client import Client
n, dataset, storage, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], os.environ["DARWIN_API_KEY"]
client = Client.from_api_key(key)
team = client.default_team
ds = client.get_remote_dataset(f"{team}/{dataset}")
store = client.get_external_storage(team_slug=team, name=storage)
per = -(-n // 100)
keys = [f"data/{i // per:05d}/{i:09d}.jpg" for i in range(n)]
t1 = time.perf_counter()
result = ds.register(store, keys)
t2 = time.perf_counter()
print(json.dumps({"version": darwin.__version__ if hasattr(darwin, "__version__") else "",
                  "setup_s": t1 - t0, "register_s": t2 - t1,
                  "result": {k: len(v) for k, v in result.items()}}))
"""


def ensure_venv() -> str:
    """darwin-py's own virtual environment (created once); returns its python."""
    py = VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {VENV} and installing darwin-py (pip)", flush=True)
        venv.create(VENV, with_pip=True)
    ok = subprocess.run([str(py), "-c", "import darwin.client"], capture_output=True, check=False)
    if ok.returncode != 0:
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "darwin-py", "pillow<13"], check=True
        )
    return str(py)


def darwin_version(py: str) -> str:
    out = subprocess.run(
        [py, "-m", "pip", "show", "darwin-py"], capture_output=True, text=True, check=False
    )
    for line in out.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return "?"


def check_emulator(v7: str, keys: int) -> dict[str, Any]:
    items = c.admin(v7, f"items?dataset={c.DATASET}")["items"]
    state = c.emulator_state(v7)
    seen = {(i["path"], i["name"]) for i in items}
    storage_keys = {s["storage_key"] for i in items for s in i["slots"]}
    return {
        "items": len(items),
        "unique": len(seen),
        "storage_keys": len(storage_keys),
        "ok": len(items) == keys and len(seen) == keys and len(storage_keys) == keys,
        "requests": c.counter(state, "register_requests"),
        "n429": c.counter(state, "rate_limited"),
    }


def run_darwin(py: str, keys: int) -> dict[str, Any]:
    script = c.workdir("darwin") / "register_with_darwin_py.py"
    script.write_text(DARWIN_SCRIPT, encoding="utf-8")
    with c.emulator("--rate", str(RATE), "--latency-ms", str(LATENCY_MS)) as v7:
        env = c.cli_env(DARWIN_BASE_URL=v7, HOME=str(c.workdir("darwin")))
        run = c.run_child([py, str(script), str(keys), c.DATASET, c.STORAGE], env=env)
        check = check_emulator(v7, keys)
    if run.returncode != 0:
        raise RuntimeError(f"darwin-py failed (exit {run.returncode}):\n{run.output[-3000:]}")
    doc = orjson.loads(run.output.strip().splitlines()[-1])
    return {"wall_s": run.wall_s, **doc, **check}


def run_engine(keys: int) -> dict[str, Any]:
    d = c.workdir("darwin")
    with (
        c.synthetic_s3(keys) as s3,
        c.emulator("--rate", str(RATE), "--latency-ms", str(LATENCY_MS)) as v7,
    ):
        cfg = c.write_config(
            d / "engine.toml",
            v7_url=v7,
            s3_url=s3,
            ledger=d / "ledger.sqlite",
            requests_per_s=RATE,
            max_in_flight=8,
            max_items=10,  # what darwin-py sends
        )
        run = c.run_child(c.ingest_cmd(cfg), log=d / "ingest.log")
        check = check_emulator(v7, keys)
    if run.returncode != 0:
        raise RuntimeError(f"ingest run failed (exit {run.returncode}):\n{run.output[-3000:]}")
    return {"wall_s": run.wall_s, **check}


def main(argv: list[str] | None = None) -> int:
    global LATENCY_MS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="500 keys instead of 2,000")
    ap.add_argument("--keys", type=int, default=0)
    ap.add_argument("--latency-ms", type=float, default=LATENCY_MS, help="emulator latency")
    ns = ap.parse_args(argv)
    LATENCY_MS = ns.latency_ms
    keys = ns.keys or (500 if ns.quick else 2_000)
    py = ensure_venv()
    print(
        f"== against darwin-py {darwin_version(py)}: {keys:,} keys, emulator {RATE:g} req/s, "
        f"{LATENCY_MS:g} ms ({c.load_note()})",
        flush=True,
    )
    d = run_darwin(py, keys)
    print(
        f"darwin-py: {d['wall_s']:.1f} s (register() {d['register_s']:.1f} s), "
        f"{d['items']:,} items stored, {d['requests']} requests, {d['n429']} answered 429",
        flush=True,
    )
    e = run_engine(keys)
    print(
        f"ingest run: {e['wall_s']:.1f} s, {e['items']:,} items stored, {e['requests']} requests, "
        f"{e['n429']} answered 429",
        flush=True,
    )
    print()
    rows: list[list[object]] = [
        [
            "darwin-py dataset.register",
            d["wall_s"],
            keys / d["wall_s"],
            d["requests"],
            d["n429"],
            d["items"],
            "yes" if d["ok"] else "NO",
        ],
        [
            "ingest run",
            e["wall_s"],
            keys / e["wall_s"],
            e["requests"],
            e["n429"],
            e["items"],
            "yes" if e["ok"] else "NO",
        ],
    ]
    print(c.table(["what", "wall s", "items/s", "requests", "429", "stored", "each once"], rows))
    print(f"\ndarwin-py wall ÷ ingest wall: {d['wall_s'] / e['wall_s']:.2f}")
    return 0 if d["ok"] and e["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
