"""The landing folder: production-log files dropped by servers, and which byte ranges are new.

The production-log sensor keeps, per file, the offset up to which it has launched ingestion; `scan`
turns that cursor into the next byte ranges to ingest. Only complete lines are handed out (a file
still being written keeps its last partial line for a later tick). A gzip file cannot be read by
range: it is handed out whole once its size has been stable for `settle_seconds`.

A range's key names the file's identity (path, inode, first 4 KiB) and the byte range, so a
re-evaluated tick produces the same key and Dagster launches the run once.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

LOG_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")


@dataclass(frozen=True)
class FileRange:
    path: str
    start: int
    end: int
    identity: str

    @property
    def key(self) -> str:
        return f"{self.identity}:{self.start}-{self.end}"


def identity(path: Path) -> str:
    st = path.stat()
    with open(path, "rb") as f:
        head = f.read(4096)
    return hashlib.sha256(f"{path.resolve()}\x1f{st.st_ino}\x1f".encode() + head).hexdigest()[:16]


def last_complete_line_end(path: Path, start: int, size: int, block: int = 1 << 16) -> int:
    """The offset just after the last newline in [start, size), or `start` if there is none."""
    pos = size
    with open(path, "rb") as f:
        while pos > start:
            lo = max(start, pos - block)
            f.seek(lo)
            chunk = f.read(pos - lo)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                return lo + nl + 1
            pos = lo
    return start


def scan(landing: Path, offsets: dict[str, int], *, settle_seconds: float = 5.0, now: float | None = None) -> list[FileRange]:
    """New byte ranges of log files under `landing`, given the offsets already launched."""
    now = time.time() if now is None else now
    ranges: list[FileRange] = []
    if not landing.exists():
        return ranges
    for path in sorted(p for p in landing.rglob("*") if p.is_file() and p.name.endswith(LOG_SUFFIXES)):
        key = str(path.resolve())
        st = path.stat()
        start = offsets.get(key, 0)
        if st.st_size < start:  # truncated or replaced: start over (event ids keep it idempotent)
            start = 0
        if path.name.endswith(".gz"):
            if start == 0 and st.st_size and now - st.st_mtime >= settle_seconds:
                ranges.append(FileRange(key, 0, st.st_size, identity(path)))
            continue
        end = last_complete_line_end(path, start, st.st_size)
        if end > start:
            ranges.append(FileRange(key, start, end, identity(path)))
    return ranges


def advance(offsets: dict[str, int], ranges: list[FileRange]) -> dict[str, int]:
    out = dict(offsets)
    for r in ranges:
        out[r.path] = r.end
    return out


def file_size(path: str) -> int:
    return os.stat(path).st_size
