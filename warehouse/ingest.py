"""Production-log ingestion: JSONL(.gz) files → validated, pseudonymized, encrypted events.

The record format is documented in docs/production-logs.md. The path, per block of whole lines:

1. **read**: plain files are memory-mapped and cut into blocks at line ends (no copy); gzip files are
   decompressed as a stream. Lines are found with numpy; CR, byte-order marks and blank lines are
   handled per line, a line longer than `max_line_bytes` is kept truncated and flagged.
2. **parse**: the whole block at once with pyarrow's JSON reader against `RECORD_SCHEMA`, straight from
   the file's bytes; if the block holds a bad line the parse fails and the block is bisected until the
   bad lines stand alone, so a clean block costs one vectorized parse and a dirty one a few more.
3. **validate** (vectorized masks): record type, required fields per type, value ranges.
4. **diagnose** each line that failed 2 or 3 with a strict per-line parser that names the problem
   (invalid UTF-8 at byte N, duplicate key, truncated JSON, wrong type for a field, ...).
5. **build** events in DuckDB SQL (name-based event ids, streams, canonical payload JSON), pseudonymize
   user ids (keyed HMAC), encrypt the personal fields per subject (AES-GCM).
6. **append** the events and **quarantine** the bad lines in one transaction, so a crash leaves both or
   neither. Quarantined raw bytes are encrypted too (under the subject's key when the line names a
   user, else under a key of their own) and keep file, line, byte offset and reason.

Steps 1-5 are pure functions of a block (`prepare_block`); where they run is the ingester's choice: a
plain file large enough is split into byte ranges that worker processes read and prepare themselves,
handing back Arrow IPC files in shared memory, while this process only appends; smaller files and gzip
files (a stream cannot be split) are prepared by a thread of this process. Either way the events are
appended in file order, in transactions of whole DuckDB row groups (`ROW_GROUP_ROWS` events, cut at a
line), so the stored result does not depend on how the file was split.

Every run reports, per file, `read = ingested + duplicates + quarantined` (read counts non-blank
lines); the invariant is checked after every file. Re-ingesting a file, or the rest of a file after a
crash, adds nothing twice: event ids derive from the records' own ids, quarantine rows are keyed by
(file, byte offset).

Fields a record carries beyond the schema (schema drift) are kept, encrypted with the personal part
(they may be personal), and flagged in the report and the `schema_drift` table.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from warehouse.events import EVENT_NAMESPACE
from warehouse.keystore import KeyStore
from warehouse.store import BATCH_SCHEMA, EventStore

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

# Every field any record type may carry. Which are required depends on `type` (KINDS below).
RECORD_SCHEMA = pa.schema(
    [
        ("type", pa.string()),
        ("schema_version", pa.int64()),
        ("request_id", pa.string()),
        ("feedback_id", pa.string()),
        ("user_id", pa.string()),
        ("session_id", pa.string()),
        ("model_version", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("response", pa.string()),
        ("latency_ms", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("status", pa.string()),
        ("thumbs", pa.int64()),
        ("rating", pa.int64()),
        ("correction", pa.string()),
        ("comment", pa.string()),
        ("labels", pa.list_(pa.string())),
    ]
)
KNOWN_FIELDS = frozenset(RECORD_SCHEMA.names)
SUPPORTED_SCHEMA_VERSION = 1

# record type → (required fields, optional fields)
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "interaction": (
        ("request_id", "user_id", "model_version", "timestamp", "messages", "response", "latency_ms",
         "prompt_tokens", "completion_tokens"),
        ("type", "schema_version", "session_id", "status", "labels"),
    ),
    "feedback": (
        ("feedback_id", "request_id", "user_id", "timestamp"),
        ("type", "schema_version", "thumbs", "rating", "correction", "comment", "labels"),
    ),
    "erasure_request": (
        ("request_id", "user_id", "timestamp"),
        ("type", "schema_version"),
    ),
}
ROLES = ("system", "user", "assistant", "tool")
STATUSES = ("ok", "error")
ARROW_TYPE_NAMES = {
    pa.string(): "string",
    pa.int64(): "integer",
    pa.float64(): "number",
    pa.timestamp("us", tz="UTC"): "ISO-8601 timestamp string",
}

# DuckDB writes an append of a whole row group straight to the database file, and a checkpoint then
# has nothing to rewrite; appends that leave partial row groups behind make every later checkpoint
# merge (rewrite) them. So bulk appends go in multiples of this many events.
ROW_GROUP_ROWS = 122_880

QUARANTINE_SQL = """
CREATE TABLE IF NOT EXISTS quarantine (
    file            VARCHAR NOT NULL,
    byte_offset     BIGINT  NOT NULL,
    line            BIGINT  NOT NULL,
    length          BIGINT  NOT NULL,
    reason          VARCHAR NOT NULL,
    key_id          VARCHAR NOT NULL,   -- keystore subject whose key encrypts `raw`
    raw             BLOB USING COMPRESSION uncompressed,
    raw_truncated   BOOLEAN NOT NULL,
    quarantined_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (file, byte_offset)
);
CREATE TABLE IF NOT EXISTS schema_drift (
    field VARCHAR PRIMARY KEY, first_file VARCHAR, first_line BIGINT, first_seen TIMESTAMPTZ, records BIGINT
);
"""


@dataclass
class FileReport:
    """What happened to one file. `read == ingested + duplicates + quarantined` always."""

    path: str
    read: int = 0
    ingested: int = 0
    duplicates: int = 0
    quarantined: int = 0
    blank_lines: int = 0
    bom_lines: int = 0
    redacted: int = 0  # records of shredded subjects: stored without their personal fields
    bytes_read: int = 0
    next_offset: int = 0  # where a later run should resume (growing files)
    drift_fields: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    truncated_gzip: bool = False

    def check(self) -> None:
        if self.read != self.ingested + self.duplicates + self.quarantined:
            raise AssertionError(
                f"{self.path}: read {self.read} != ingested {self.ingested} + duplicates "
                f"{self.duplicates} + quarantined {self.quarantined}"
            )


@dataclass
class IngestReport:
    files: list[FileReport] = field(default_factory=list)

    def total(self, name: str) -> int:
        return sum(getattr(f, name) for f in self.files)

    @property
    def read(self) -> int:
        return self.total("read")

    @property
    def ingested(self) -> int:
        return self.total("ingested")

    @property
    def duplicates(self) -> int:
        return self.total("duplicates")

    @property
    def quarantined(self) -> int:
        return self.total("quarantined")


@dataclass(frozen=True)
class Line:
    number: int  # 1-based
    offset: int  # byte offset of the line's first byte (in the decompressed stream for .gz)
    raw: bytes  # without the terminator, CR or BOM
    truncated: bool = False  # longer than max_line_bytes: raw holds only the first bytes


@dataclass
class _Bad:
    line: Line
    reason: str
    user_id: str | None = None
    subject_id: str | None = None  # instead of user_id, when only the pseudonym is at hand


# --- reading files -------------------------------------------------------------------------------

_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True  # what bytes.strip() strips


@dataclass
class Block:
    """Whole lines of a file in one buffer: non-blank line i is `data[starts[i]:ends[i]]`.

    Terminators, a trailing CR and a leading byte-order mark are outside the [start, end) ranges, so
    when no line needed a BOM cut or a truncation the lines can be parsed straight from `data`.
    """

    data: Any  # bytes or a memoryview (of a memory-mapped file)
    starts: np.ndarray  # int64, into data
    ends: np.ndarray
    offsets: np.ndarray  # byte offset of each line's first byte in the file (before a BOM)
    numbers: np.ndarray  # line numbers; relative to the range's first line in a worker
    truncated: np.ndarray  # bool: longer than max_line_bytes, only the first bytes are kept
    first_number: int  # number of the line before the block
    line_count: int  # lines the block covers, blank ones included
    blank_numbers: np.ndarray  # numbers of the blank lines (skipped, counted)
    bom_lines: int
    nbytes: int  # input bytes the block covers
    base: int  # file offset of data[0]
    contiguous: bool  # no BOM cut, no truncation: a range of lines is one slice of `data`

    def __len__(self) -> int:
        return len(self.starts)

    def raw(self, i: int) -> bytes:
        return bytes(self.data[int(self.starts[i]) : int(self.ends[i])])

    def line(self, i: int) -> Line:
        return Line(int(self.numbers[i]), int(self.offsets[i]), self.raw(i), bool(self.truncated[i]))


def _newlines(arr: np.ndarray) -> np.ndarray:
    """Positions of b"\\n" in `arr`, found a few MiB at a time (small temporaries, no page churn)."""
    step = 1 << 22
    found = [np.flatnonzero(arr[i : i + step] == 10) + i for i in range(0, len(arr), step)]
    return np.concatenate(found).astype(np.int64) if found else np.empty(0, np.int64)


def split_lines(
    data: Any,
    *,
    offset: int,
    first_number: int,
    max_line_bytes: int,
    final: bool,
    truncated_line: bool = False,
) -> Block:
    """Cut `data` (whole lines; the last may lack its terminator when `final`) into a Block.

    `offset` is the file offset of data[0]; `first_number` the number of the line before it. With
    `truncated_line`, data is the kept prefix of one over-long line.
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    n = len(arr)
    if truncated_line:
        line_ends = np.array([n], dtype=np.int64)
    else:
        line_ends = _newlines(arr)
        if final and n and (not len(line_ends) or line_ends[-1] != n - 1):
            line_ends = np.append(line_ends, np.int64(n))  # a last line without terminator
    count = len(line_ends)
    starts = np.zeros(count, dtype=np.int64)
    if count > 1:
        starts[1:] = line_ends[:-1] + 1
    lengths = line_ends - starts
    truncated = np.ones(count, dtype=bool) if truncated_line else lengths > max_line_bytes
    ends = np.minimum(line_ends, starts + max_line_bytes)
    offsets = starts + offset
    if n:
        cr = (ends > starts) & (arr[np.maximum(ends - 1, 0)] == 13)
        ends = ends - cr
        bom = np.zeros(count, dtype=bool)
        if n >= 3:
            s = np.minimum(starts, n - 3)
            bom = (ends - starts >= 3) & (arr[s] == 0xEF) & (arr[s + 1] == 0xBB) & (arr[s + 2] == 0xBF)
            starts = starts + 3 * bom
        blank = ends <= starts
        maybe = np.flatnonzero(~blank & _WHITESPACE[arr[np.minimum(starts, n - 1)]])
        for i in maybe:  # starts with whitespace: blank only if nothing else follows
            blank[i] = bool(_WHITESPACE[arr[starts[i] : ends[i]]].all())
    else:
        bom = blank = np.zeros(count, dtype=bool)
    numbers = np.arange(first_number + 1, first_number + 1 + count, dtype=np.int64)
    keep = ~blank
    return Block(
        data=data,
        starts=starts[keep],
        ends=ends[keep],
        offsets=offsets[keep],
        numbers=numbers[keep],
        truncated=truncated[keep],
        first_number=first_number,
        line_count=count,
        blank_numbers=numbers[blank],
        bom_lines=int(bom.sum()),
        nbytes=n,
        base=offset,
        contiguous=not (bom.any() or truncated.any()),
    )


class _MappedFile:
    """A plain file memory-mapped read-only (the page cache is read in place, nothing is copied)."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        if self.map is not None:
            self.map.madvise(mmap.MADV_SEQUENTIAL)
        self.view = memoryview(self.map) if self.map is not None else memoryview(b"")

    def count_lines(self, end: int) -> int:
        """Line terminators before byte `end` (so line numbers count from the start of the file)."""
        arr = np.frombuffer(self.view[:end], dtype=np.uint8)
        step = 1 << 22
        return sum(int(np.count_nonzero(arr[i : i + step] == 10)) for i in range(0, len(arr), step))

    def plan(
        self, start: int, end_offset: int | None, complete_lines_only: bool, block_bytes: int
    ) -> tuple[list[tuple[int, int]], int, int]:
        """Byte ranges of about `block_bytes` ending at line ends; returns (ranges, stop, end).

        `stop` is where reading ends (after the last complete line with `complete_lines_only`) and
        `end` where the input ends (EOF or `end_offset`).
        """
        end = max(start, self.size if end_offset is None else min(end_offset, self.size))
        stop = end
        if complete_lines_only and end > start:
            stop = self.map.rfind(b"\n", start, end) + 1 or start
        ranges = []
        a = start
        while a < stop:
            b = min(a + block_bytes, stop)
            if b < stop:
                nl = self.map.find(b"\n", b - 1, stop)
                b = stop if nl < 0 else nl + 1
            ranges.append((a, b))
            a = b
        return ranges, stop, end

    def close(self) -> None:
        try:
            self.view.release()
            if self.map is not None:
                self.map.close()
        except BufferError:  # a block still holds a view; the map goes with the last of them
            pass


def _plain_blocks(
    mapped: _MappedFile,
    ranges: list[tuple[int, int]],
    first_number: int,
    max_line_bytes: int,
    final_line: bool,
) -> Iterator[Block]:
    """Blocks over byte ranges of a mapped file; line numbers continue from `first_number`."""
    number = first_number
    for k, (a, b) in enumerate(ranges):
        block = split_lines(
            mapped.view[a:b], offset=a, first_number=number, max_line_bytes=max_line_bytes,
            final=final_line and k == len(ranges) - 1,
        )
        number += block.line_count
        yield block


def _decompressed_blocks(f: Any, report: FileReport, read_size: int) -> Iterator[bytes]:
    dec = zlib.decompressobj(wbits=47)  # gzip or zlib header, auto-detected
    while True:
        comp = f.read(read_size)
        if not comp:
            break
        out = dec.decompress(comp)
        while dec.eof and dec.unused_data:  # multi-member gzip
            rest = dec.unused_data
            dec = zlib.decompressobj(wbits=47)
            out += dec.decompress(rest)
        if out:
            yield out
    tail = dec.flush()
    if tail:
        yield tail
    if not dec.eof:
        report.truncated_gzip = True


def _gzip_blocks(
    path: Path,
    report: FileReport,
    *,
    block_bytes: int,
    max_line_bytes: int,
    complete_lines_only: bool,
    read_size: int = 8 << 20,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Block]:
    """Blocks of a gzip stream. An over-long line is never held whole: its first `max_line_bytes`
    are kept, the rest is skipped up to its end."""
    pieces: list[bytes] = []
    size = 0  # bytes in pieces
    tail = 0  # bytes of the last, unterminated line in pieces
    offset = 0  # stream offset of pieces[0]
    number = 0  # lines before pieces[0]
    long_prefix: bytes | None = None  # kept prefix of an over-long line being skipped
    long_offset = 0

    def flush(final: bool) -> Iterator[Block]:
        """Lines complete in `pieces` (all of them when final) as a block; the tail stays."""
        nonlocal pieces, size, offset, number
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        cut = len(data) if final else len(data) - tail
        if cut:
            block = split_lines(
                memoryview(data)[:cut], offset=offset, first_number=number, max_line_bytes=max_line_bytes,
                final=final,
            )
            number += block.line_count
            offset += cut
            yield block
        rest = data[cut:]
        pieces, size = ([rest], len(rest)) if rest else ([], 0)

    def long_line() -> Block:
        nonlocal number
        block = split_lines(
            long_prefix, offset=long_offset, first_number=number, max_line_bytes=max_line_bytes,
            final=True, truncated_line=True,
        )
        number += 1
        return block

    with open(path, "rb") as f:
        last_pos = 0
        for piece in _decompressed_blocks(f, report, read_size):
            if progress:
                pos = f.tell()
                progress(pos - last_pos)
                last_pos = pos
            report.bytes_read += len(piece)
            if long_prefix is not None:  # inside an over-long line: skip to its end
                nl = piece.find(b"\n")
                if nl < 0:
                    offset += len(piece)
                    continue
                offset += nl + 1
                yield long_line()
                long_prefix = None
                piece = piece[nl + 1 :]
                if not piece:
                    continue
            pieces.append(piece)
            size += len(piece)
            nl = piece.rfind(b"\n")
            tail = tail + len(piece) if nl < 0 else len(piece) - nl - 1
            if tail > max_line_bytes:  # the pending line is over-long: keep its prefix only
                if size > tail:
                    yield from flush(False)
                data = b"".join(pieces)
                long_prefix, long_offset = data[:max_line_bytes], offset
                offset += len(data)
                pieces, size, tail = [], 0, 0
            elif size - tail >= block_bytes:
                yield from flush(False)
        if long_prefix is not None:
            if complete_lines_only:
                offset = long_offset  # resume at the unfinished line
            else:
                yield long_line()
        elif pieces:
            if complete_lines_only:
                if size > tail:
                    yield from flush(False)
            else:
                yield from flush(True)
    report.next_offset = offset


# --- parsing and validation ------------------------------------------------------------------------


def _parse_lines(block: Block, use_threads: bool) -> tuple[list[pa.Table], list[int]]:
    """Vectorized parse; bisect around lines pyarrow rejects. Returns (tables, rejected line indices).

    Truncated lines are not parsed (they are diagnosed). Each table has RECORD_SCHEMA's columns plus
    `_extra` (JSON of fields outside the schema, or null) and `_line` (index into the block).
    """
    tables: list[pa.Table] = []
    rejected: list[int] = []
    idx = np.flatnonzero(~block.truncated) if not block.contiguous else np.arange(len(block), dtype=np.int64)
    lengths = block.ends - block.starts

    def payload(lo: int, hi: int) -> pa.Buffer:
        if block.contiguous:  # the lines as they are in the file: CR, blank lines are JSON whitespace
            return pa.py_buffer(memoryview(block.data)[int(block.starts[lo]) : int(block.ends[hi - 1])])
        return pa.py_buffer(b"\n".join(block.raw(int(i)) for i in idx[lo:hi]))

    def parse(lo: int, hi: int) -> None:
        try:
            longest = int(lengths[idx[lo:hi]].max())
            t = pj.read_json(
                pa.BufferReader(payload(lo, hi)),
                # 1 MiB chunks: ~7% faster to parse than 4 MiB (measured; they stay in cache)
                read_options=pj.ReadOptions(block_size=max(longest + 2, 1 << 20), use_threads=use_threads),
                parse_options=pj.ParseOptions(explicit_schema=RECORD_SCHEMA, unexpected_field_behavior="infer"),
            )
            if t.num_rows != hi - lo:
                raise ValueError("row count mismatch")
            t.validate(full=True)  # the JSON reader does not check that strings are valid UTF-8
            t = _with_extras(t)
        except Exception:  # noqa: BLE001 - any rejection means: look closer
            if hi - lo == 1:
                rejected.append(int(idx[lo]))
                return
            mid = (lo + hi) // 2
            parse(lo, mid)
            parse(mid, hi)
            return
        tables.append(t.append_column("_line", pa.array(idx[lo:hi])))

    if len(idx):
        parse(0, len(idx))
    return tables, rejected


def _with_extras(t: pa.Table) -> pa.Table:
    """Fold columns outside RECORD_SCHEMA into one `_extra` JSON column; nested drift is rejected
    here (the table would not match the schema) and handled by the per-line path."""
    extra_names = [n for n in t.column_names if n not in KNOWN_FIELDS]
    known = t.select(RECORD_SCHEMA.names)
    if known.schema != RECORD_SCHEMA:
        raise ValueError("nested fields outside the schema")
    if not extra_names:
        return known.append_column("_extra", pa.nulls(t.num_rows, pa.string()))
    cols = {n: t.column(n).to_pylist() for n in extra_names}
    extra = []
    for i in range(t.num_rows):
        d = {n: cols[n][i] for n in extra_names if cols[n][i] is not None}
        extra.append(orjson.dumps(d, option=orjson.OPT_SORT_KEYS, default=str).decode() if d else None)
    return known.append_column("_extra", pa.array(extra, pa.string()))


def _strict_object(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """Parse one line strictly; returns (object, None) or (None, reason)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start}"
    nul = text.find("\x00")
    if nul >= 0:
        return None, f"NUL byte at character {nul}"

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen[k] = v
        return seen

    try:
        obj = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at character {e.pos}"
    except ValueError as e:
        return None, str(e)
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    return obj, None


def _type_problem(name: str, value: Any) -> str | None:
    """Why `value` does not fit RECORD_SCHEMA's field `name` (None if it fits)."""
    if value is None:
        return None
    typ = RECORD_SCHEMA.field(name).type
    if typ == pa.string():
        ok = isinstance(value, str)
    elif typ == pa.int64():
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ == pa.float64():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif pa.types.is_timestamp(typ):
        ok = isinstance(value, str) and _parse_time(value) is not None
    elif name == "labels":
        ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
    else:  # messages
        if not isinstance(value, list):
            return f"field {name!r}: expected a list of {{role, content}} objects, got {type(value).__name__}"
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"field {name!r}[{i}]: expected an object with string 'role' and 'content'"
        return None
    if ok:
        return None
    expected = ARROW_TYPE_NAMES.get(typ, str(typ))
    if name == "labels":
        expected = "list of strings"
    return f"field {name!r}: expected {expected}, got {type(value).__name__} {_short(value)}"


def _parse_time(value: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))  # noqa: FURB162 - kept as the per-line rule
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _short(value: Any) -> str:
    s = json.dumps(value, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def _diagnose(line: Line) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """A line the vectorized parser rejected: (row for RECORD_SCHEMA + _extra, or None; reason; user_id)."""
    if line.truncated:
        return None, f"line longer than the {len(line.raw)}-byte limit (max_line_bytes)", None
    obj, reason = _strict_object(line.raw)
    if obj is None:
        return None, reason, None
    user_id = obj.get("user_id") if isinstance(obj.get("user_id"), str) else None
    for name in RECORD_SCHEMA.names:
        problem = _type_problem(name, obj.get(name))
        if problem:
            return None, problem, user_id
    row = {n: obj.get(n) for n in RECORD_SCHEMA.names}
    if row["timestamp"] is not None:
        row["timestamp"] = _parse_time(row["timestamp"])
    extra = {k: v for k, v in obj.items() if k not in KNOWN_FIELDS}
    nested = [m for m in obj.get("messages") or [] if set(m) - {"role", "content"}]
    if nested:  # keep the messages as sent; the typed column keeps role/content
        extra["messages"] = obj["messages"]
    row["_extra"] = orjson.dumps(extra, option=orjson.OPT_SORT_KEYS).decode() if extra else None
    return row, None, user_id


def _present_not_in(column: pa.ChunkedArray, allowed: tuple[Any, ...]) -> pa.ChunkedArray:
    """True where the value is given and not one of `allowed` (a null is not a violation)."""
    return pc.and_(pc.is_valid(column), pc.invert(pc.is_in(column, pa.array(allowed))))


def _validate(t: pa.Table) -> list[str | None]:
    """Per-row reason a parsed record is invalid (None = valid); vectorized masks, first rule wins."""
    n = t.num_rows
    reasons: list[str | None] = [None] * n
    bad = pa.array([False] * n)

    def rule(mask: pa.Array, reason: str | Callable[[int], str]) -> None:
        nonlocal bad
        mask = pc.and_(pc.fill_null(mask, False), pc.invert(bad))
        if not pc.any(mask).as_py():
            return
        for i in pc.indices_nonzero(mask).to_pylist():
            reasons[i] = reason(i) if callable(reason) else reason
        bad = pc.or_(bad, mask)

    kind = t.column("type")
    types = t.column("type").to_pylist() if pc.any(pc.invert(pc.is_in(kind, pa.array(list(KINDS))))).as_py() else None
    rule(
        pc.invert(pc.fill_null(pc.is_in(kind, pa.array(list(KINDS))), False)),
        lambda i: "missing required field 'type'" if types[i] is None
        else f"unknown record type {types[i]!r} (expected one of {', '.join(KINDS)})",
    )
    for k, (required, _) in KINDS.items():
        is_k = pc.equal(kind, k)
        for f in required:
            rule(pc.and_(is_k, pc.is_null(t.column(f))), f"missing required field {f!r} for type {k!r}")
    is_i = pc.equal(kind, "interaction")
    rule(pc.and_(is_i, pc.equal(pc.list_value_length(t.column("messages")), 0)), "field 'messages' is empty")
    flat = pc.list_flatten(t.column("messages"))
    if len(flat):
        parents = pc.list_parent_indices(t.column("messages"))
        role_bad = pc.invert(pc.is_in(pc.struct_field(flat, "role"), pa.array(ROLES)))
        content_bad = pc.is_null(pc.struct_field(flat, "content"))
        bad_parents = set(pc.filter(parents, pc.or_(role_bad, content_bad)).to_pylist())
        if bad_parents:
            rule(
                pa.array([i in bad_parents for i in range(n)]),
                f"field 'messages': each needs 'content' and a 'role' in {', '.join(ROLES)}",
            )
    for f in ("latency_ms", "prompt_tokens", "completion_tokens"):
        rule(pc.less(t.column(f), 0), f"field {f!r} is negative")
    rule(pc.and_(is_i, _present_not_in(t.column("status"), STATUSES)), f"field 'status' must be one of {', '.join(STATUSES)}")
    is_f = pc.equal(kind, "feedback")
    rule(
        pc.and_(is_f, pc.and_(pc.is_null(t.column("thumbs")), pc.and_(pc.is_null(t.column("rating")),
                                                                        pc.is_null(t.column("correction"))))),
        "feedback needs at least one of 'thumbs', 'rating', 'correction'",
    )
    rule(_present_not_in(t.column("thumbs"), (-1, 1)), "field 'thumbs' must be 1 or -1")
    rule(
        pc.or_(pc.less(t.column("rating"), 1), pc.greater(t.column("rating"), 5)),
        "field 'rating' must be between 1 and 5",
    )
    for f in ("request_id", "feedback_id", "user_id"):
        rule(pc.equal(pc.utf8_length(t.column(f)), 0), f"field {f!r} is empty")
    return reasons


_PARSED_SCHEMA = RECORD_SCHEMA.append(pa.field("_extra", pa.string()))


def parse_block(block: Block, *, use_threads: bool = True) -> tuple[pa.Table | None, np.ndarray, list[_Bad], list[tuple[int, str]]]:
    """Parse + validate a block: (valid records in line order, their line indices, bad lines, drift).

    Drift is one (line number, field) pair per record and field outside the schema, and
    (line number, "schema_version=N") for records of a newer schema version.
    """
    tables, rejected = _parse_lines(block, use_threads)
    bad: list[_Bad] = []
    rows: list[dict[str, Any]] = []
    row_idx: list[int] = []
    for i in sorted(set(rejected) | set(np.flatnonzero(block.truncated).tolist())):
        row, reason, user_id = _diagnose(block.line(i))
        if row is None:
            bad.append(_Bad(block.line(i), reason or "unparseable", user_id))
        else:
            rows.append(row)
            row_idx.append(i)
    parts = [t.drop_columns(["_line"]) for t in tables]
    line_idx = np.concatenate([t.column("_line").to_numpy() for t in tables] + [np.array(row_idx, dtype=np.int64)])
    if rows:
        parts.append(pa.Table.from_pylist(rows, schema=_PARSED_SCHEMA))
    if not parts:
        return None, np.empty(0, np.int64), bad, []
    records = pa.concat_tables(parts).combine_chunks()
    if rows or len(tables) > 1:  # lines the per-line path took go back to their place in the file
        order = np.argsort(line_idx, kind="stable")
        if (order != np.arange(len(order))).any():
            records, line_idx = records.take(pa.array(order)), line_idx[order]
    reasons = _validate(records)
    if any(r is not None for r in reasons):
        user_ids = records.column("user_id").to_pylist()
        keep = np.array([r is None for r in reasons])
        bad.extend(_Bad(block.line(int(line_idx[i])), r, user_ids[i]) for i, r in enumerate(reasons) if r is not None)
        records = records.filter(pa.array(keep))
        line_idx = line_idx[keep]
    drift: list[tuple[int, str]] = []
    extras = records.column("_extra")
    if extras.null_count < records.num_rows:
        for i in np.flatnonzero(extras.is_valid().to_numpy(zero_copy_only=False)):
            number = int(block.numbers[line_idx[i]])
            drift.extend((number, name) for name in orjson.loads(extras[int(i)].as_py()))
    newer = pc.fill_null(pc.greater(records.column("schema_version"), SUPPORTED_SCHEMA_VERSION), False)
    if pc.any(newer).as_py():
        versions = records.column("schema_version").to_pylist()
        for i in np.flatnonzero(newer.to_numpy(zero_copy_only=False)):
            drift.append((int(block.numbers[line_idx[i]]), f"schema_version={versions[i]}"))
    bad.sort(key=lambda b: b.line.number)
    return records.drop_columns(["schema_version"]), line_idx, bad, drift


# --- building events -------------------------------------------------------------------------------

# UUID v5 from the hex SHA-1 of (namespace || name): identical to `warehouse.events.derive_event_id`.
_UUID5_MACRO = """
CREATE OR REPLACE TEMP MACRO uuid5_from_sha1(x) AS concat(
    substr(x, 1, 8), '-', substr(x, 9, 4), '-5', substr(x, 14, 3), '-',
    substr('89ab89ab89ab89ab', strpos('0123456789abcdef', substr(x, 17, 1)), 1),
    substr(x, 18, 3), '-', substr(x, 21, 12))
"""

_BUILD_SQL = f"""
SELECT
    uuid5_from_sha1(sha1(from_hex('{EVENT_NAMESPACE.hex}') || encode(
        CASE type WHEN 'feedback' THEN 'feedback:' || feedback_id ELSE type || ':' || request_id END
    ))) AS event_id,
    CASE type WHEN 'erasure_request' THEN 'subject-' || subject_id
              ELSE 'interaction-' || request_id END AS stream_id,
    CASE type WHEN 'interaction' THEN 'InteractionLogged'
              WHEN 'feedback' THEN 'FeedbackGiven'
              ELSE 'ErasureRequested' END AS type,
    1::INTEGER AS schema_version,
    "timestamp" AS occurred_at,
    subject_id,
    CASE type
      WHEN 'interaction' THEN json_object(
        'completion_tokens', completion_tokens, 'labels', labels, 'latency_ms', latency_ms,
        'model_version', model_version, 'prompt_tokens', prompt_tokens, 'request_id', request_id,
        'session_id', session_id, 'status', coalesce(status, 'ok'))
      WHEN 'feedback' THEN json_object(
        'feedback_id', feedback_id, 'has_correction', correction IS NOT NULL, 'labels', labels,
        'rating', rating, 'request_id', request_id, 'thumbs', thumbs)
      ELSE json_object('request_id', request_id, 'requested_by', 'subject')
    END::VARCHAR AS payload,
    CASE type
      WHEN 'interaction' THEN json_object('messages', messages, 'response', response, 'user_id', user_id)
      WHEN 'feedback' THEN json_object('comment', comment, 'correction', correction, 'user_id', user_id)
      ELSE json_object('user_id', user_id)
    END::VARCHAR AS personal,
    _extra
FROM _records
"""

# The personal part, with the record's drift fields (a JSON object) spliced in as "extra".
_PLAINTEXT_SQL = f"""
SELECT * EXCLUDE (personal, _extra),
    CASE WHEN _extra IS NULL THEN personal
         ELSE substr(personal, 1, length(personal) - 1) || ',"extra":' || _extra || '}}' END AS plaintext
FROM ({_BUILD_SQL})
"""

_scratch = threading.local()


def _scratch_db() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB per thread for building events (no warehouse lock needed)."""
    con = getattr(_scratch, "con", None)
    if con is None:
        con = _scratch.con = duckdb.connect()
        con.execute(_UUID5_MACRO)
    return con


class Subjects:
    """Pseudonym and key of every user an ingester has met, so each is derived/fetched once.

    The users met so far are an Arrow array, and a block's users are looked up in it with one
    vectorized `index_in`; only users never met before go to the keystore (pseudonym, key created).
    Position i of the cache holds user i's subject id and AEAD (None once the subject is shredded).
    When the keystore's set of shredded subjects grows (checked before every block), those
    subjects' AEADs are dropped, so a cached key never encrypts a record that a fresh
    `KeyStore.keys_for` would have redacted.
    """

    MAX_CACHED = 1 << 21  # users; past this the cache starts over

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys
        self._shredded: set[str] = set()
        self._clear()

    def _clear(self) -> None:
        self._users = pa.array([], pa.string())
        self._subject_ids = pa.array([], pa.string())
        self._aeads: list[AESGCM | None] = []

    def resolve(self, user_ids: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray, list[AESGCM | None]]:
        """Each row's subject id, and what `encrypt_rows` needs: each row's position in the cache
        (`codes`) and the cache's AEADs (None: shredded). Keys are created where missing; per-user
        work is done once per user."""
        shredded = self.keys.shredded_subjects()
        if len(self._aeads) > self.MAX_CACHED:
            self._clear()
        elif not shredded <= self._shredded:
            gone = shredded - self._shredded
            for i, subject_id in enumerate(self._subject_ids.to_pylist()):
                if subject_id in gone:
                    self._aeads[i] = None
        self._shredded = shredded
        codes = pc.index_in(user_ids, value_set=self._users)
        if codes.null_count:
            new = pc.unique(pc.filter(user_ids, pc.is_null(codes))).to_pylist()
            pseudonyms = self.keys.pseudonymize_many(new)
            found = self.keys.keys_for(pseudonyms.values())
            self._users = pa.concat_arrays([self._users, pa.array(new, pa.string())])
            self._subject_ids = pa.concat_arrays([self._subject_ids, pa.array(pseudonyms.values(), pa.string())])
            self._aeads.extend(key._aead if key is not None else None for key in map(found.get, pseudonyms.values()))
            codes = pc.index_in(user_ids, value_set=self._users)
        return pc.take(self._subject_ids, codes), codes.to_numpy(), self._aeads


def build_events(records: pa.Table, subjects: Subjects) -> tuple[pa.Table, int]:
    """Valid records → an Arrow batch for `EventStore.append_batch`; returns (batch, redacted count).

    Rows keep the order of `records`.
    """
    subject_ids, codes, aeads = subjects.resolve(records.column("user_id"))
    con = _scratch_db()
    con.register("_records", records.append_column("subject_id", subject_ids))
    try:
        built = con.sql(_PLAINTEXT_SQL).to_arrow_table()
    finally:
        con.unregister("_records")
    pii, redacted = encrypt_rows(built.column("plaintext"), built.column("event_id"), codes, aeads)
    batch = built.select(["event_id", "stream_id", "type", "schema_version", "occurred_at", "subject_id", "payload"])
    return batch.append_column("pii", pii).cast(BATCH_SCHEMA), redacted


def encrypt_rows(
    plaintext: pa.ChunkedArray, aad: pa.ChunkedArray, codes: np.ndarray, aeads: list[AESGCM | None]
) -> tuple[pa.Array, int]:
    """AES-GCM per row under `aeads[codes[i]]` with the row's `aad`; returns (nonce+ciphertext+tag
    per row, null where the key is None, and the count of those).

    Nonces are 96-bit: 64 random bits per call plus a 32-bit counter (NIST SP 800-38D 8.2.1), the
    same scheme as `keystore.NonceSequence`. The hot loop is one `AESGCM.encrypt` per row driven by
    `map` (no interpreter loop); the results are joined once into one Arrow buffer.
    """
    n = len(plaintext)
    keyed = np.array([a is not None for a in aeads], dtype=bool)[codes] if n else np.zeros(0, dtype=bool)
    rows = np.flatnonzero(keyed)
    m = len(rows)
    if m >= 1 << 32:  # pragma: no cover - the counter would wrap
        raise ValueError("encrypt at most 2**32 rows per call")
    nonces = np.empty((m, 12), dtype=np.uint8)
    nonces[:, :8] = np.frombuffer(os.urandom(8), dtype=np.uint8)
    nonces[:, 8:] = np.arange(m, dtype=">u4").view(np.uint8).reshape(m, 4)
    plain = pc.cast(plaintext, pa.binary()).to_pylist()
    ids = pc.cast(aad, pa.binary()).to_pylist()
    if m < n:
        plain, ids = [plain[i] for i in rows.tolist()], [ids[i] for i in rows.tolist()]
    nonce_list = nonces.view("V12").ravel().tolist()
    sealed = list(map(AESGCM.encrypt, map(aeads.__getitem__, codes[rows].tolist()), nonce_list, plain, ids))
    # nonce || ciphertext+tag per row (GCM: as long as the plaintext, +16), joined into one buffer
    sizes = np.zeros(n, dtype=np.int64)
    sizes[rows] = pc.binary_length(plaintext).to_numpy()[rows] + 12 + 16
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    if offsets[-1] >= 1 << 31:  # pragma: no cover - blocks are far smaller
        raise ValueError("encrypted block larger than 2 GiB")
    data = pa.py_buffer(b"".join(itertools.chain.from_iterable(zip(nonce_list, sealed, strict=True))))
    validity = pa.py_buffer(np.packbits(keyed, bitorder="little").tobytes())
    pii = pa.Array.from_buffers(pa.binary(), n, [validity, pa.py_buffer(offsets.astype(np.int32)), data], null_count=n - m)
    return pii, n - m


# --- preparing blocks ------------------------------------------------------------------------------

# Per event, where its line is: for quarantining a conflict found only at append.
_EVENT_LINE_COLUMNS = ("_line", "_offset", "_start", "_length")


@dataclass
class _Part:
    """A block made ready to append: events in file order, bad lines as quarantine rows."""

    events: pa.Table | None  # BATCH_SCHEMA + _EVENT_LINE_COLUMNS
    quarantine: pa.Table | None  # rows in line order
    drift: list[tuple[int, str]]  # (line, field) per drifted record
    first_line: int  # number of the line before the block
    line_count: int
    blank_numbers: np.ndarray
    bom_lines: int
    nbytes: int
    raw: Callable[[int, int], bytes]  # (file offset, length) → bytes of a line in this block

    @property
    def last_line(self) -> int:
        return self.first_line + self.line_count

    def event_lines(self) -> np.ndarray:
        return self.events.column("_line").to_numpy() if self.events is not None else np.empty(0, np.int64)

    def quarantine_lines(self) -> np.ndarray:
        return self.quarantine.column("line").to_numpy() if self.quarantine is not None else np.empty(0, np.int64)

    def shift(self, lines: int) -> None:
        """Renumber lines counted from a range's start (a worker's view) from the file's start."""
        if not lines:
            return
        if self.events is not None:
            i = self.events.schema.get_field_index("_line")
            self.events = self.events.set_column(i, "_line", pc.add(self.events.column("_line"), lines))
        if self.quarantine is not None:
            i = self.quarantine.schema.get_field_index("line")
            self.quarantine = self.quarantine.set_column(i, "line", pc.add(self.quarantine.column("line"), lines))
        self.drift = [(n + lines, name) for n, name in self.drift]
        self.first_line += lines
        self.blank_numbers = self.blank_numbers + lines


def prepare_block(block: Block, path: str, subjects: Subjects, *, use_threads: bool = True) -> _Part:
    """Parse, validate, build, pseudonymize and encrypt one block (steps 2-5; no warehouse access)."""
    records, line_idx, bad, drift = parse_block(block, use_threads=use_threads)
    events = None
    if records is not None and records.num_rows:
        batch, _ = build_events(records, subjects)
        starts = block.starts[line_idx]
        events = (
            batch.append_column("_line", pa.array(block.numbers[line_idx]))
            .append_column("_offset", pa.array(block.offsets[line_idx]))
            .append_column("_start", pa.array(starts + block.base))
            .append_column("_length", pa.array(block.ends[line_idx] - starts))
        )
    data, base = block.data, block.base
    return _Part(
        events=events,
        quarantine=_quarantine_rows(subjects.keys, bad, path),
        drift=drift,
        first_line=block.first_number,
        line_count=block.line_count,
        blank_numbers=block.blank_numbers,
        bom_lines=block.bom_lines,
        nbytes=block.nbytes,
        raw=lambda start, length: bytes(data[start - base : start - base + length]),
    )


# --- appending -------------------------------------------------------------------------------------


@dataclass
class _Written:
    """What one transaction wrote; added to the file's report once it has committed."""

    events: int = 0  # events handed to the store (appended, duplicates and conflicts)
    appended: int = 0
    duplicates: int = 0
    redacted: int = 0
    reasons: list[str] = field(default_factory=list)  # one per quarantined line
    drift: Counter[str] = field(default_factory=Counter)


class _Appender:
    """Appends parts in file order, in transactions of `commit_events` events cut at a line.

    Each transaction carries the quarantine rows and drift of the lines it covers, so after it commits
    every line up to its last one is accounted for (the `on_commit` acknowledgement). A transaction
    gets its events in one append: filling it part by part as parts arrive (to overlap the appending
    with the preparing) was measured to cost the appender more CPU than it saved in waiting.

    The connection, and with it the warehouse lock, is kept from one transaction to the next for up
    to `hold_seconds` (each open costs ~25 ms), then released so other processes get their turn.
    Each aligned commit is checkpointed either way.
    """

    def __init__(self, ingester: Ingester, report: FileReport, commit_events: int, hold_seconds: float) -> None:
        self.ingester = ingester
        self.report = report
        self.commit_events = commit_events
        self.hold_seconds = hold_seconds
        self.parts: deque[_Part] = deque()
        self.event_pos = 0  # events of parts[0] already committed
        self.quarantine_pos = 0
        self.done = -1  # last line committed (-1: none yet)
        self.pending_events = 0
        self.pending_lines = 0
        self.con: duckdb.DuckDBPyConnection | None = None
        self._connection: ExitStack | None = None
        self._opened_at = 0.0
        self._aligned = True  # the last commit ended on a row-group boundary

    def add(self, part: _Part) -> None:
        self.report.blank_lines += len(part.blank_numbers)
        self.report.bom_lines += part.bom_lines
        if self.done < 0:
            self.done = part.first_line
        self.parts.append(part)
        self.pending_events += part.events.num_rows if part.events is not None else 0
        self.pending_lines += part.line_count
        while self.pending_events >= self.commit_events:
            self._commit(self._line_of_event(self.commit_events))
        if self.pending_lines >= 2 * self.commit_events:  # a run of bad lines: do not hold it all
            self._commit(None)

    def finish(self) -> None:
        """Commit what is left, fold the WAL into the database file, and let the warehouse go."""
        if self.parts:
            self._commit(None)
        if self.con is not None:
            # on this connection: a new one would first replay the WAL (measured ~0.1 s at 1M events)
            self.con.execute("CHECKPOINT")
            self._aligned = True
            self.close()
        elif not self._aligned:  # released after a partial row group, which stayed in the WAL
            self.ingester.store.checkpoint()

    def close(self) -> None:
        """Release the connection (at the end of a file, after the hold, or after an error)."""
        if self._connection is None:
            return
        try:
            if not self._aligned:
                # the partial row group stays in the WAL: a checkpoint would rewrite it at every commit
                self.con.execute("PRAGMA disable_checkpoint_on_shutdown")
        finally:
            connection, self._connection, self.con = self._connection, None, None
            connection.close()

    def _line_of_event(self, k: int) -> int:
        """The line of the k-th pending event (1-based)."""
        pos = self.event_pos
        for part in self.parts:
            lines = part.event_lines()
            if k <= len(lines) - pos:
                return int(lines[pos + k - 1])
            k -= len(lines) - pos
            pos = 0
        raise AssertionError("fewer pending events than asked for")

    def _connect(self) -> duckdb.DuckDBPyConnection:
        if self._connection is None:
            self._connection = ExitStack()
            self.con = self._connection.enter_context(self.ingester.store.connect())
            self.con.execute("SET threads=1")  # the preparing side has the other core: ~20% less CPU per row
            self._opened_at = time.monotonic()
        return self.con

    def _commit(self, upto: int | None) -> None:
        """Commit every pending line up to line `upto` (None: all pending lines), in one transaction."""
        pieces: list[tuple[pa.Table, _Part]] = []
        quarantine: list[pa.Table] = []
        drift: list[tuple[int, str]] = []
        read = 0
        last = self.done
        while self.parts:
            part = self.parts[0]
            end = part.last_line if upto is None else min(upto, part.last_line)
            e_lines, q_lines = part.event_lines(), part.quarantine_lines()
            e_end = int(np.searchsorted(e_lines, end, side="right"))
            q_end = int(np.searchsorted(q_lines, end, side="right"))
            if e_end > self.event_pos:
                pieces.append((part.events.slice(self.event_pos, e_end - self.event_pos), part))
            if q_end > self.quarantine_pos:
                quarantine.append(part.quarantine.slice(self.quarantine_pos, q_end - self.quarantine_pos))
            drift.extend(d for d in part.drift if self.done < d[0] <= end)
            lo = max(self.done, part.first_line)
            blank = part.blank_numbers
            read += end - lo - int(np.count_nonzero((blank > lo) & (blank <= end)))
            nonblank = end
            while nonblank > lo and nonblank in blank:
                nonblank -= 1
            if nonblank > lo:
                last = nonblank
            self.pending_events -= e_end - self.event_pos
            self.pending_lines -= end - lo
            self.done = end
            if end == part.last_line:
                self.parts.popleft()
                self.event_pos = self.quarantine_pos = 0
                continue
            self.event_pos, self.quarantine_pos = e_end, q_end
            break
        if not read:
            return
        con = self._connect()
        con.execute("BEGIN")
        try:
            written = self.ingester._write(con, self.report.path, pieces, quarantine, drift)
            con.execute("COMMIT")
        except BaseException:
            with suppress(duckdb.Error):  # a failed COMMIT has ended the transaction already
                con.execute("ROLLBACK")
            self.close()
            raise
        self._aligned = written.events % ROW_GROUP_ROWS == 0
        report = self.report
        report.read += read
        report.ingested += written.appended
        report.duplicates += written.duplicates
        report.quarantined += len(written.reasons)
        report.redacted += written.redacted
        report.drift_fields.update(written.drift)
        for reason in written.reasons:
            report.reasons[_reason_kind(reason)] += 1
        if time.monotonic() - self._opened_at >= self.hold_seconds:
            self.close()  # checkpoints, if the commit was aligned
        elif self._aligned:
            # what closing would do: later commits on a connection that skips it were measured slower
            con.execute("CHECKPOINT")
        if self.ingester.on_commit:  # runs in this thread: the store is usable from it (re-entrant)
            self.ingester.on_commit(report, last)


# --- worker processes ------------------------------------------------------------------------------


def _shm_root() -> Path:
    """Where workers hand over Arrow files: shared memory where there is room (containers often give
    /dev/shm 64 MiB; a few blocks in flight need a few hundred), else the temp folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize >= 1 << 30:
            return shm
    return Path(tempfile.gettempdir())


def _sweep_stale_handoff_dirs(root: Path) -> None:
    """Remove hand-over folders of ingest processes that died (SIGKILL leaves them behind)."""
    for d in root.glob("flywheel-ingest-*"):
        try:
            pid = int(d.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            for f in d.iterdir():
                f.unlink(missing_ok=True)
            d.rmdir()
        except (ValueError, IndexError, PermissionError, OSError):
            continue


class _Workers:
    """Worker processes that read byte ranges of a file themselves and prepare them (steps 1-5).

    Plain `python -c` subprocesses, not multiprocessing: nothing of the caller's `__main__` is
    re-imported. Tasks and headers travel as JSON over the workers' stdin/stdout; events come back
    as Arrow IPC files in shared memory, memory-mapped here (zero-copy) and unlinked at once. A
    worker exits when its stdin closes, so a SIGKILLed ingester leaves no process behind.
    """

    def __init__(self, n: int, keys_path: Path) -> None:
        root = _shm_root()
        _sweep_stale_handoff_dirs(root)
        self.dir = root / f"flywheel-ingest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir()
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
            # Each block allocates and frees a few hundred MB; allocators that hand pages back to the
            # kernel at once make every block fault them in again (sys time). Keep them.
            MALLOC_TRIM_THRESHOLD_=str(1 << 30),
            MALLOC_MMAP_THRESHOLD_=str(32 << 20),
            MIMALLOC_PURGE_DELAY="1000",
            OPENBLAS_NUM_THREADS="1",  # numpy's BLAS threads would only spin beside ours
        )
        code = "import sys; from warehouse.ingest import _worker_main; _worker_main(sys.argv[1])"
        self.procs = [
            subprocess.Popen([sys.executable, "-c", code, str(keys_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env=env, close_fds=True)
            for _ in range(n)
        ]
        self.seq = 0

    def submit(self, worker: int, task: dict[str, Any]) -> None:
        self.seq += 1
        task["out"] = str(self.dir / f"{self.seq}.arrow")
        proc = self.procs[worker]
        try:
            _send(proc.stdin, json.dumps(task).encode())
        except OSError as e:  # a broken pipe: the worker is gone
            raise RuntimeError(f"ingest worker {proc.pid} died (exit code {proc.poll()})") from e

    def receive(self, worker: int, raw: Callable[[int, int], bytes]) -> _Part:
        proc = self.procs[worker]
        try:
            header = json.loads(_recv(proc.stdout))
            quarantine = _recv(proc.stdout)
        except EOFError as e:
            raise RuntimeError(f"ingest worker {proc.pid} died (exit code {proc.poll()})") from e
        if "error" in header:
            raise RuntimeError(f"ingest worker {proc.pid} failed on {header['task']}:\n{header['error']}")
        events = None
        if header["events"]:
            events = pa.ipc.open_file(pa.memory_map(header["events"])).read_all()
            os.unlink(header["events"])  # the mapping stays valid; the memory goes with it
        return _Part(
            events=events,
            quarantine=pa.ipc.open_stream(quarantine).read_all() if quarantine else None,
            drift=[(n, name) for n, name in header["drift"]],
            first_line=header["first_line"],
            line_count=header["line_count"],
            blank_numbers=np.array(header["blank"], dtype=np.int64),
            bom_lines=header["bom"],
            nbytes=header["nbytes"],
            raw=raw,
        )

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.close()  # the worker's signal to exit
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a worker stuck in a task
                proc.kill()
                proc.wait()
            proc.stdout.close()
        for f in self.dir.iterdir():
            f.unlink(missing_ok=True)
        self.dir.rmdir()


def _send(stream: Any, payload: bytes) -> None:
    stream.write(len(payload).to_bytes(8, "little") + payload)
    stream.flush()


def _recv(stream: Any) -> bytes:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError
    size = int.from_bytes(head, "little")
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError
    return payload


WORKER_NICE = 5  # measured: the appender's commits 8.9 s → 7.3 s of a 1M-event ingest, total 11.6 s → 11.2 s


def _worker_main(keys_path: str) -> None:
    """A worker process: prepare the byte ranges sent on stdin until stdin closes."""
    # The appender (one process, one DuckDB writer) is the pipeline's serial stage: when the cores
    # are contended, it goes first, and workers fill what it leaves.
    os.nice(WORKER_NICE)
    inbox = os.fdopen(os.dup(0), "rb")
    outbox = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints must not corrupt the protocol
    subjects = Subjects(KeyStore(Path(keys_path)))
    _scratch_db().execute("SET threads=1")  # two workers and the appender share the cores
    files: dict[str, _MappedFile] = {}
    while True:
        try:
            task = json.loads(_recv(inbox))
        except EOFError:
            # Every reply is flushed and every key committed: skip the interpreter's teardown of
            # pyarrow, DuckDB and numpy (measured ~0.2 s that the ingester would wait for).
            os._exit(0)
        try:
            mapped = files.get(task["path"])
            if mapped is None or mapped.size < task["end"]:
                files.clear()  # one file at a time
                mapped = files[task["path"]] = _MappedFile(Path(task["path"]))
            block = split_lines(
                mapped.view[task["start"] : task["end"]], offset=task["start"], first_number=0,
                max_line_bytes=task["max_line_bytes"], final=task["final"],
            )
            part = prepare_block(block, task["label"], subjects, use_threads=False)
            events_path = None
            if part.events is not None:
                events_path = task["out"]
                with pa.OSFile(events_path, "wb") as sink, pa.ipc.new_file(sink, part.events.schema) as writer:
                    writer.write_table(part.events)
            quarantine = b""
            if part.quarantine is not None:
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, part.quarantine.schema) as writer:
                    writer.write_table(part.quarantine)
                quarantine = sink.getvalue().to_pybytes()
            header = {
                "events": events_path, "drift": part.drift, "first_line": part.first_line,
                "line_count": part.line_count, "blank": part.blank_numbers.tolist(), "bom": part.bom_lines,
                "nbytes": part.nbytes,
            }
            del block, part
            reply = [json.dumps(header).encode(), quarantine]
        except Exception:  # noqa: BLE001 - reported to the ingester, which raises it
            reply = [json.dumps({"error": traceback.format_exc(), "task": task}).encode(), b""]
        try:
            for payload in reply:
                _send(outbox, payload)
        except (BrokenPipeError, OSError):  # the ingester is gone
            return


# --- the ingester ---------------------------------------------------------------------------------


class Ingester:
    """Ingests production-log files into an EventStore.

    A plain file of at least `parallel_min_bytes` is prepared by `workers` processes that each read
    their own byte ranges of it, while this process appends; otherwise a thread prepares block k+1
    while block k is appended (pyarrow and DuckDB release the GIL). `workers=0` keeps everything in
    this process. Results are the same either way.

    Between transactions the warehouse stays open (and locked) for up to `hold_seconds`, so a bulk
    load does not reopen it for every row group; other processes wait at most that long plus one
    transaction. `hold_seconds=0` releases it after every commit.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        chunk_lines: int = 131_072,
        max_line_bytes: int = 64 << 20,
        on_commit: Callable[[FileReport, int], None] | None = None,
        workers: int | None = None,
        parallel_min_bytes: int = 256 << 20,
        block_bytes: int = 32 << 20,
        hold_seconds: float = 3.0,
    ) -> None:
        self.store = store
        # Events per transaction: whole row groups (see ROW_GROUP_ROWS) unless asked for fewer.
        self.chunk_lines = chunk_lines
        self.commit_events = chunk_lines // ROW_GROUP_ROWS * ROW_GROUP_ROWS if chunk_lines >= ROW_GROUP_ROWS else chunk_lines
        self.max_line_bytes = max_line_bytes
        self.on_commit = on_commit  # called after each committed transaction with (report, last line number)
        self.workers = min(2, os.cpu_count() or 1) if workers is None else workers
        self.parallel_min_bytes = parallel_min_bytes
        self.block_bytes = block_bytes  # input bytes a block covers (~35k lines of ~930 bytes)
        self.hold_seconds = hold_seconds  # longest the warehouse lock is kept across transactions
        self._subjects = Subjects(store.keys)
        self._workers_pool: _Workers | None = None
        self._keep_workers = False
        with store.connect() as con:
            con.execute(QUARANTINE_SQL)

    def ingest_files(self, paths: Iterable[Path], *, progress: Callable[[int], None] | None = None) -> IngestReport:
        """Ingest files in order; worker processes, once started, serve all of them."""
        report = IngestReport()
        self._keep_workers = True
        try:
            for p in paths:
                report.files.append(self.ingest_file(Path(p), progress=progress))
        finally:
            self._keep_workers = False
            if self._workers_pool is not None:
                self._workers_pool.close()
                self._workers_pool = None
        return report

    def ingest_file(
        self,
        path: Path,
        *,
        start_offset: int = 0,
        end_offset: int | None = None,
        complete_lines_only: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> FileReport:
        """Ingest one file, or its byte range [start_offset, end_offset); returns its report."""
        path = Path(path).resolve()
        report = FileReport(str(path), next_offset=start_offset)
        appender = _Appender(self, report, self.commit_events, self.hold_seconds)
        try:
            self._ingest(path, report, appender, start_offset, end_offset, complete_lines_only, progress)
        finally:
            appender.close()  # after an error: roll back the open transaction, release the warehouse
        if report.truncated_gzip:
            report.reasons["file: truncated gzip stream (the rest of the file is missing)"] += 1
        report.check()
        return report

    def _ingest(
        self,
        path: Path,
        report: FileReport,
        appender: _Appender,
        start_offset: int,
        end_offset: int | None,
        complete_lines_only: bool,
        progress: Callable[[int], None] | None,
    ) -> None:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        if gz:
            if start_offset or end_offset is not None:
                raise ValueError(f"{path}: a gzip file cannot be read by byte range; ingest it whole")
            blocks = _gzip_blocks(
                path, report, block_bytes=self.block_bytes, max_line_bytes=self.max_line_bytes,
                complete_lines_only=complete_lines_only, progress=progress,
            )
            self._run_threaded(blocks, str(path), appender)
            appender.finish()
        else:
            mapped = _MappedFile(path)
            try:
                ranges, stop, end = mapped.plan(start_offset, end_offset, complete_lines_only, self.block_bytes)
                first = mapped.count_lines(start_offset) if start_offset else 0
                if self.workers and stop - start_offset >= self.parallel_min_bytes and len(ranges) > 1:
                    self._run_workers(mapped, ranges, first, path, appender, not complete_lines_only, progress)
                else:
                    blocks = _plain_blocks(mapped, ranges, first, self.max_line_bytes, not complete_lines_only)
                    self._run_threaded(_reporting(blocks, progress), str(path), appender)
                if progress and end > stop:
                    progress(end - stop)
                report.bytes_read = end - start_offset
                report.next_offset = stop
                appender.finish()  # conflicts found now still read their lines from the map
            finally:
                mapped.close()

    def _run_threaded(self, blocks: Iterator[Block], path: str, appender: _Appender) -> None:
        """A thread prepares blocks while this one appends them."""
        queue: Queue[_Part | BaseException | None] = Queue(maxsize=1)
        stop = threading.Event()

        def produce() -> None:
            try:
                for block in blocks:
                    if stop.is_set():
                        return
                    queue.put(prepare_block(block, path, self._subjects))
                queue.put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the appending thread, re-raised there
                queue.put(e)

        worker = threading.Thread(target=produce, name=f"ingest-prepare:{Path(path).name}", daemon=True)
        worker.start()
        try:
            while (item := queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                appender.add(item)
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    queue.get_nowait()
                except Empty:
                    pass
                worker.join(timeout=0.05)

    def _run_workers(
        self,
        mapped: _MappedFile,
        ranges: list[tuple[int, int]],
        first: int,
        path: Path,
        appender: _Appender,
        final_line: bool,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Workers prepare the ranges (two in flight each); parts are appended in file order."""
        workers = self._workers_pool or _Workers(self.workers, self.store.keys.path)
        self._workers_pool = None
        view = mapped.view

        def raw(start: int, length: int) -> bytes:
            return bytes(view[start : start + length])

        try:
            n = len(workers.procs)
            inflight: deque[tuple[int, int, int]] = deque()
            todo = iter(enumerate(ranges))

            def submit() -> None:
                item = next(todo, None)
                if item is not None:
                    k, (a, b) = item
                    workers.submit(k % n, {
                        "path": str(path), "start": a, "end": b, "final": final_line and k == len(ranges) - 1,
                        "max_line_bytes": self.max_line_bytes, "label": str(path),
                    })
                    inflight.append((k % n, a, b))

            for _ in range(2 * n):
                submit()
            number = first
            while inflight:
                w, a, b = inflight.popleft()
                part = workers.receive(w, raw)
                submit()
                part.shift(number)
                number += part.line_count
                if progress:
                    progress(b - a)
                appender.add(part)
        except BaseException:
            workers.close()
            raise
        if self._keep_workers:
            self._workers_pool = workers
        else:
            workers.close()

    def _write(
        self,
        con: duckdb.DuckDBPyConnection,
        path: str,
        pieces: list[tuple[pa.Table, _Part]],
        quarantine_parts: list[pa.Table],
        drift_pairs: list[tuple[int, str]],
    ) -> _Written:
        """Into the transaction open on `con`: the events of `pieces`, the quarantine rows, the drift counts."""
        written = _Written()
        batch = pa.concat_tables([t for t, _ in pieces]) if pieces else None
        quarantine = pa.concat_tables(quarantine_parts) if quarantine_parts else None
        drift = Counter(name for _, name in drift_pairs)
        first_line: dict[str, int] = {}
        for number, name in drift_pairs:
            first_line.setdefault(name, number)
        bad_reasons = quarantine.column("reason").to_pylist() if quarantine is not None else []
        if batch is not None:
            result = self.store.append_batch(batch, on_conflict="return", con=con)
            written.events = batch.num_rows
            written.appended, written.duplicates = result.appended, result.duplicates
            written.redacted = sum(t.column("pii").null_count for t, _ in pieces)
            if result.conflicts:
                conflicts = _conflict_lines(pieces, result.conflicts)
                bad_reasons.extend(b.reason for b in conflicts)
                extra_rows = _quarantine_rows(self.store.keys, conflicts, path)
                quarantine = pa.concat_tables([quarantine, extra_rows]) if quarantine is not None else extra_rows
        if quarantine is not None:
            con.register("_q", quarantine)
            con.execute("INSERT INTO quarantine SELECT * FROM _q ON CONFLICT (file, byte_offset) DO NOTHING")
            con.unregister("_q")
        for name, count in drift.items():
            con.execute(
                """
                INSERT INTO schema_drift VALUES (?, ?, ?, get_current_timestamp(), ?)
                ON CONFLICT (field) DO UPDATE SET records = schema_drift.records + excluded.records
                """,
                [name, path, first_line[name], count],
            )
        written.reasons = bad_reasons
        written.drift = drift
        return written


def _reporting(blocks: Iterator[Block], progress: Callable[[int], None] | None) -> Iterator[Block]:
    for block in blocks:
        if progress:
            progress(block.nbytes)
        yield block


def _conflict_lines(pieces: list[tuple[pa.Table, _Part]], rows: tuple[int, ...]) -> list[_Bad]:
    """Bad lines for batch rows whose event id is already stored with different content."""
    bounds = np.cumsum([0] + [t.num_rows for t, _ in pieces])
    out = []
    for i in rows:
        k = int(np.searchsorted(bounds, i, side="right") - 1)
        table, part = pieces[k]
        r = table.slice(i - int(bounds[k]), 1).to_pylist()[0]
        line = Line(r["_line"], r["_offset"], part.raw(r["_start"], r["_length"]))
        out.append(_Bad(line, f"event {r['event_id']} already recorded with different content (same id, different record)",
                        subject_id=r["subject_id"]))
    return out


def _quarantine_rows(keys: KeyStore, bad: list[_Bad], path: str) -> pa.Table | None:
    """Quarantine rows for bad lines, raw bytes encrypted.

    A line that names a user is encrypted under that subject's key (erasure reaches it); one that
    names nobody gets a key of its own, stable across re-runs, shredded with the row.
    """
    if not bad:
        return None
    named = keys.pseudonymize_many({b.user_id for b in bad if b.user_id})
    key_ids = [
        named[b.user_id] if b.user_id
        else b.subject_id or f"quarantine-{uuid.uuid5(uuid.NAMESPACE_URL, f'{path}:{b.line.offset}')}"
        for b in bad
    ]
    subject_keys = keys.keys_for(set(key_ids))
    raws: list[bytes | None] = []
    for b, kid in zip(bad, key_ids, strict=True):
        key = subject_keys.get(kid)
        raws.append(key.encrypt(b.line.raw, f"{path}:{b.line.offset}".encode()) if key is not None else None)
    now = datetime.now(UTC)
    return pa.table(
        {
            "file": [path] * len(bad),
            "byte_offset": [b.line.offset for b in bad],
            "line": [b.line.number for b in bad],
            "length": [len(b.line.raw) for b in bad],
            "reason": [b.reason for b in bad],
            "key_id": key_ids,
            "raw": pa.array(raws, pa.binary()),
            "raw_truncated": [b.line.truncated for b in bad],
            "quarantined_at": pa.array([now] * len(bad), pa.timestamp("us", tz="UTC")),
        }
    )


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary: 'field 'x': expected ...' → 'field 'x': expected'."""
    for sep in (" at ", ", got ", " (expected"):
        if sep in reason:
            return reason.split(sep)[0]
    return reason


def read_quarantine(store: EventStore, *, file: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Quarantined lines with their raw bytes decrypted (None where the key was shredded)."""
    with store.connect() as con:
        con.execute(QUARANTINE_SQL)
        sql = "SELECT * FROM quarantine"
        params: list[Any] = []
        if file:
            sql += " WHERE file = ?"
            params.append(str(Path(file).resolve()))
        sql += " ORDER BY file, byte_offset LIMIT ?"
        params.append(limit)
        rows = con.sql(sql, params=params).to_arrow_table().to_pylist()
    keys = store.keys.keys_for({r["key_id"] for r in rows}, create=False)
    for r in rows:
        key = keys.get(r["key_id"])
        blob = r.pop("raw")
        r["raw"] = key.decrypt(blob, f"{r['file']}:{r['byte_offset']}".encode()) if key and blob else None
    return rows

