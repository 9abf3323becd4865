"""Multi-slot items from a user's manifest: which keys form which item, in which slot.

CSV (with a header row) or JSONL, one row per slot: ``item_name``, ``slot_name``, ``key`` and an
optional ``path`` (the item's dataset folder below ``plan.root_path``). Rows are streamed, never
all held: a manifest of millions of rows is staged into the ledger and grouped there.

A malformed manifest is a ConfigError naming the file and line, raised before any work.
"""

from __future__ import annotations

import csv
from collections.abc import Generator, Iterator
from pathlib import Path

import orjson

from ingest.errors import ConfigError

REQUIRED = ("item_name", "slot_name", "key")

Row = tuple[str, str, str, str]  # item_name, slot_name, key, path


def read_manifest(path: str | Path) -> Generator[Row, None, None]:
    """Rows of a CSV or JSONL manifest (chosen by extension: .jsonl/.ndjson, else CSV)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: plan.manifest file not found: {p}")
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        yield from _jsonl(p)
    else:
        yield from _csv(p)


def check_manifest(path: str | Path) -> None:
    """Preflight: the file is there, readable, and its header and first row are well formed
    (a ConfigError naming the file and line otherwise). Reads one row, not the whole file:
    a later malformed row is found, just as clearly, when the manifest is staged."""
    rows = read_manifest(path)
    try:
        next(rows, None)
    except OSError as e:
        raise ConfigError(
            f"config: plan.manifest {path}: cannot read it ({e.strerror or e})"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"manifest {path}: not UTF-8 text (a CSV or JSONL file)") from None
    finally:
        rows.close()


def _check(p: Path, line: int, row: dict[str, object]) -> Row:
    values: dict[str, str] = {}
    for name in (*REQUIRED, "path"):
        v = row.get(name, "")
        if v is None:
            v = ""
        if not isinstance(v, str):
            raise ConfigError(f"manifest {p}:{line}: {name} must be a string, got {v!r}")
        values[name] = v.strip() if name != "key" else v
    for name in REQUIRED:
        if not values[name]:
            raise ConfigError(f"manifest {p}:{line}: {name} is empty")
    if values["key"].startswith("/"):
        raise ConfigError(f"manifest {p}:{line}: key must not start with '/'")
    return values["item_name"], values["slot_name"], values["key"], values["path"]


def _csv(p: Path) -> Iterator[Row]:
    with p.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            need, lacking = ", ".join(REQUIRED), ", ".join(missing)
            raise ConfigError(f"manifest {p}: header must name {need} (missing {lacking})")
        for row in reader:
            yield _check(p, reader.line_num, dict(row))


def _jsonl(p: Path) -> Iterator[Row]:
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise ConfigError(f"manifest {p}:{n}: not valid JSON ({e})") from None
            if not isinstance(doc, dict):
                raise ConfigError(f"manifest {p}:{n}: each line must be a JSON object")
            yield _check(p, n, doc)
