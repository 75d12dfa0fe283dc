"""Atomic writes of every artifact (JSON, .npy, CSV, text, bytes) and content hashes of inputs.

A reader never sees half a file: each writer writes a temp file beside the target and renames it.
Every CSV the project writes goes through `save_csv` / `save_dict_csv`, which neutralise spreadsheet
formulas in text cells (`csv_cell`), so an id such as `=HYPERLINK(...)` opens as text, never runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


def atomic_write(path: Path | str, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, then rename the temp file onto `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's PID in the name: `folder_lock.remove_temp_files` deletes it once that process is gone.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{os.getpid()}-{path.name}")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make outputs unreadable to the rest of a team
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def save_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_json(path: Path | str, obj) -> Path:
    return save_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


def save_npy(path: Path | str, array: np.ndarray) -> Path:
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    return atomic_write(path, write)


def load_npy(path: Path | str, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


# OWASP's CSV-injection rule: spreadsheets run a cell that starts with one of these as a formula
# (TAB and CR too, since some strip them first). Such text gets a leading ' so it opens as text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# ...except a plain decimal number ("-1.5", "-3e-4"): no formula, and numeric columns must stay numeric.
# The report's review export (reporting/templates/report.js, csvField) applies the same two patterns.
PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def csv_cell(value):
    """The value to write in a CSV cell: text that a spreadsheet would run as a formula gets a leading '."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def save_csv(path: Path | str, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow([csv_cell(c) for c in header])
            w.writerows([csv_cell(c) for c in row] for row in rows)

    return atomic_write(path, write)


def save_dict_csv(path: Path | str, columns: Sequence[str], records: Iterable[dict]) -> Path:
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(columns))
            w.writeheader()
            w.writerows({k: csv_cell(v) for k, v in r.items()} for r in records)

    return atomic_write(path, write)


def source_hash(path: Path) -> str:
    """Content hash of a file or of every file under a folder (names relative, sorted)."""
    h = hashlib.blake2b(digest_size=16)
    if path.is_file():
        files = [path]
        base = path.parent
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file())
        base = path
    for f in files:
        h.update(str(f.relative_to(base)).encode())
        h.update(b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
