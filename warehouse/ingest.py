"""Production-log ingestion: JSONL(.gz) files → validated, pseudonymized, encrypted events.

The record format is documented in docs/production-logs.md. The path, per chunk of lines:

1. **parse**: the whole chunk at once with pyarrow's JSON reader against `RECORD_SCHEMA`; if the chunk
   holds a bad line the parse fails and the chunk is bisected until the bad lines stand alone, so a
   clean chunk costs one vectorized parse and a dirty one a few more.
2. **validate** (vectorized masks): record type, required fields per type, value ranges.
3. **diagnose** each line that failed 1 or 2 with a strict per-line parser that names the problem
   (invalid UTF-8 at byte N, duplicate key, truncated JSON, wrong type for a field, ...).
4. **build** events in DuckDB SQL (name-based event ids, streams, canonical payload JSON), pseudonymize
   user ids (keyed HMAC), encrypt the personal fields per subject (AES-GCM).
5. **append** the events and **quarantine** the bad lines in one transaction, so a crash leaves both or
   neither. Quarantined raw bytes are encrypted too (under the subject's key when the line names a
   user, else under a key of their own) and keep file, line, byte offset and reason.

Every run reports, per file, `read = ingested + duplicates + quarantined` (read counts non-blank
lines); the invariant is checked after every file. Re-ingesting a file, or the rest of a file after a
crash, adds nothing twice: event ids derive from the records' own ids, quarantine rows are keyed by
(file, byte offset).

Fields a record carries beyond the schema (schema drift) are kept, encrypted with the personal part
(they may be personal), and flagged in the report and the `schema_drift` table.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
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

from warehouse.events import EVENT_NAMESPACE
from warehouse.keystore import KeyStore, NonceSequence
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


@dataclass
class Chunk:
    """A run of non-blank lines, as parallel lists (no per-line objects on the fast path)."""

    raws: list[bytes]
    offsets: list[int]
    numbers: list[int]
    truncated: set[int] = field(default_factory=set)  # indices of lines cut at max_line_bytes

    def line(self, i: int) -> Line:
        return Line(self.numbers[i], self.offsets[i], self.raws[i], i in self.truncated)


# --- reading files -------------------------------------------------------------------------------


def _decompressed_blocks(
    f: io.BufferedReader, gz: bool, report: FileReport, read_size: int, limit: int | None = None
) -> Iterator[bytes]:
    if not gz:
        remaining = limit
        while (remaining is None or remaining > 0) and (
            block := f.read(read_size if remaining is None else min(read_size, remaining))
        ):
            if remaining is not None:
                remaining -= len(block)
            yield block
        return
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


def iter_chunks(
    path: Path,
    report: FileReport,
    *,
    chunk_lines: int = 131_072,
    start_offset: int = 0,
    end_offset: int | None = None,
    max_line_bytes: int = 64 << 20,
    read_size: int = 8 << 20,
    complete_lines_only: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Chunk]:
    """Chunks of at most `chunk_lines` non-blank lines with their numbers and byte offsets.

    CR line endings and byte-order marks are stripped (and counted); blank lines are counted and
    skipped. A line longer than `max_line_bytes` is kept truncated and flagged, never held whole.
    With `complete_lines_only`, a last line without a terminator is left for a later run (a file
    still being written); `report.next_offset` says where to resume. `end_offset` stops reading
    there (a byte range of a growing file, as the production-log sensor hands out).
    """
    raws: list[bytes] = []
    offsets: list[int] = []
    numbers: list[int] = []
    truncated: set[int] = set()
    number = 0
    offset = start_offset  # offset of the first byte of `carry`
    carry = b""
    carry_len = 0  # true length of the pending line (carry may be truncated)

    def add(raw: bytes, off: int, length: int) -> None:
        nonlocal number
        number += 1
        cut = length > max_line_bytes
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
            report.bom_lines += 1
        if not raw.strip():
            report.blank_lines += 1
            return
        if cut:
            truncated.add(len(raws))
        raws.append(raw)
        offsets.append(off)
        numbers.append(number)

    def flush(limit: int) -> Chunk:
        """The first `limit` pending lines as a chunk; the rest stay pending."""
        nonlocal raws, offsets, numbers, truncated
        c = Chunk(raws[:limit], offsets[:limit], numbers[:limit], {i for i in truncated if i < limit})
        raws, offsets, numbers = raws[limit:], offsets[limit:], numbers[limit:]
        truncated = {i - limit for i in truncated if i >= limit}
        return c

    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
        if (start_offset or end_offset is not None) and gz:
            raise ValueError(f"{path}: a gzip file cannot be read by byte range; ingest it whole")
        remaining = start_offset  # line numbers count from the start of the file
        while remaining > 0 and (block := f.read(min(read_size, remaining))):
            number += block.count(b"\n")
            remaining -= len(block)
        f.seek(start_offset)
        last_pos = f.tell()
        limit = None if end_offset is None else max(0, end_offset - start_offset)
        for block in _decompressed_blocks(f, gz, report, read_size, limit):
            if progress:
                pos = f.tell()
                progress(pos - last_pos)
                last_pos = pos
            report.bytes_read += len(block)
            cut = block.rfind(b"\n")
            if cut < 0:  # no line ends in this block: the pending line grows
                if carry_len < max_line_bytes:
                    carry += block[: max_line_bytes - carry_len]
                carry_len += len(block)
                continue
            first_nl = block.find(b"\n")
            # the pending line ends at the first newline of this block
            head_len = carry_len + first_nl
            if carry_len < max_line_bytes:
                carry += block[: min(first_nl, max_line_bytes - carry_len)]
            add(carry, offset, head_len)
            offset += head_len + 1
            if cut > first_nl:
                body = block[first_nl + 1 : cut]
                for raw in body.split(b"\n"):
                    n = len(raw)
                    add(raw if n <= max_line_bytes else raw[:max_line_bytes], offset, n)
                    offset += n + 1
            tail = block[cut + 1 :]
            carry_len = len(tail)
            carry = tail[:max_line_bytes]
            while len(raws) >= chunk_lines:
                yield flush(chunk_lines)
        if carry_len and not complete_lines_only:
            add(carry, offset, carry_len)
            offset += carry_len
        report.next_offset = offset
        while raws:
            yield flush(chunk_lines)


# --- parsing and validation ------------------------------------------------------------------------


def _parse_block(raws: list[bytes]) -> tuple[list[pa.Table], list[int]]:
    """Vectorized parse; bisect around lines pyarrow rejects. Returns (tables, rejected indices).

    Each table has RECORD_SCHEMA's columns plus `_extra` (JSON of fields outside the schema, or
    null) and `_line` (index into `raws`).
    """
    tables: list[pa.Table] = []
    rejected: list[int] = []

    def parse(lo: int, hi: int) -> None:
        block = b"\n".join(raws[lo:hi])
        try:
            longest = max(map(len, raws[lo:hi]))
            t = pj.read_json(
                io.BytesIO(block),
                read_options=pj.ReadOptions(block_size=max(longest + 2, 4 << 20), use_threads=True),
                parse_options=pj.ParseOptions(explicit_schema=RECORD_SCHEMA, unexpected_field_behavior="infer"),
            )
            if t.num_rows != hi - lo:
                raise ValueError("row count mismatch")
            t.validate(full=True)  # the JSON reader does not check that strings are valid UTF-8
            t = _with_extras(t)
        except Exception:  # noqa: BLE001 - any rejection means: look closer
            if hi - lo == 1:
                rejected.append(lo)
                return
            mid = (lo + hi) // 2
            parse(lo, mid)
            parse(mid, hi)
            return
        tables.append(t.append_column("_line", pa.array(np.arange(lo, hi, dtype=np.int64))))

    if raws:
        parse(0, len(raws))
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
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
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


# --- building events -------------------------------------------------------------------------------

# UUID v5 from the hex SHA-1 of (namespace || name): identical to `warehouse.events.derive_event_id`.
_UUID5_MACRO = """
CREATE OR REPLACE TEMP MACRO uuid5_from_sha1(x) AS (
    substr(x, 1, 8) || '-' || substr(x, 9, 4) || '-5' || substr(x, 14, 3) || '-'
    || substr('89ab89ab89ab89ab', strpos('0123456789abcdef', substr(x, 17, 1)), 1)
    || substr(x, 18, 3) || '-' || substr(x, 21, 12))
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

_scratch = threading.local()


def _scratch_db() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB per thread for building events (no warehouse lock needed)."""
    con = getattr(_scratch, "con", None)
    if con is None:
        con = _scratch.con = duckdb.connect()
        con.execute(_UUID5_MACRO)
    return con


def build_events(records: pa.Table, keys: KeyStore) -> tuple[pa.Table, int]:
    """Valid records → an Arrow batch for `EventStore.append_batch`; returns (batch, redacted count).

    Rows keep the order of `records`.
    """
    user_ids = records.column("user_id")
    uniq = pc.unique(user_ids)
    mapping = keys.pseudonymize_many(uniq.to_pylist())
    subject_ids = pc.take(pa.array([mapping[u] for u in uniq.to_pylist()], pa.string()), pc.index_in(user_ids, uniq))
    con = _scratch_db()
    con.register("_records", records.append_column("subject_id", subject_ids))
    try:
        built = con.sql(_BUILD_SQL).to_arrow_table()

    finally:
        con.unregister("_records")
    subject_keys = keys.keys_for(set(mapping.values()))
    nonces = NonceSequence()
    pii: list[bytes | None] = []
    redacted = 0
    # The hot loop: one AES-GCM call per event; the string→binary casts are zero-copy.
    for aad, sid, plaintext, extra in zip(
        pc.cast(built.column("event_id"), pa.binary()).to_pylist(),
        built.column("subject_id").to_pylist(),
        pc.cast(built.column("personal"), pa.binary()).to_pylist(),
        built.column("_extra").to_pylist(),
        strict=True,
    ):
        key = subject_keys.get(sid)
        if key is None:  # shredded subject: the fact is kept, their personal data is not
            pii.append(None)
            redacted += 1
            continue
        if extra is not None:
            plaintext = plaintext[:-1] + b',"extra":' + extra.encode() + b"}"
        pii.append(key.encrypt(plaintext, aad, nonces()))
    batch = built.select(["event_id", "stream_id", "type", "schema_version", "occurred_at", "subject_id", "payload"])
    return batch.append_column("pii", pa.array(pii, pa.binary())).cast(BATCH_SCHEMA), redacted


def parse_chunk(chunk: Chunk) -> tuple[pa.Table | None, list[int], list[_Bad], Counter[str]]:
    """Parse + validate a chunk: (valid records, their line indices, bad lines, drift counts)."""
    tables, rejected = _parse_block(chunk.raws) if not chunk.truncated else _parse_block_skipping(chunk)
    bad: list[_Bad] = []
    rows: list[dict[str, Any]] = []
    row_idx: list[int] = []
    for i in sorted(set(rejected) | chunk.truncated):
        row, reason, user_id = _diagnose(chunk.line(i))
        if row is None:
            bad.append(_Bad(chunk.line(i), reason or "unparseable", user_id))
        else:
            rows.append(row)
            row_idx.append(i)
    parts = [t.drop_columns(["_line"]) for t in tables]
    line_idx = [i for t in tables for i in t.column("_line").to_pylist()] + row_idx
    if rows:
        parts.append(pa.Table.from_pylist(rows, schema=_PARSED_SCHEMA))
    if not parts:
        return None, [], bad, Counter()
    records = pa.concat_tables(parts).combine_chunks()
    reasons = _validate(records)
    drift: Counter[str] = Counter()
    if any(r is not None for r in reasons):
        user_ids = records.column("user_id").to_pylist()
        keep = [r is None for r in reasons]
        bad.extend(_Bad(chunk.line(line_idx[i]), r, user_ids[i]) for i, r in enumerate(reasons) if r is not None)
        records = records.filter(pa.array(keep))
        line_idx = [i for i, k in zip(line_idx, keep, strict=True) if k]
    if records.column("_extra").null_count < records.num_rows:
        for extra in records.column("_extra").drop_null().to_pylist():
            drift.update(orjson.loads(extra).keys())
    newer = pc.greater(records.column("schema_version"), SUPPORTED_SCHEMA_VERSION)
    for v in pc.filter(records.column("schema_version"), pc.fill_null(newer, False)).to_pylist():
        drift[f"schema_version={v}"] += 1
    return records.drop_columns(["schema_version"]), line_idx, bad, drift


def _parse_block_skipping(chunk: Chunk) -> tuple[list[pa.Table], list[int]]:
    """Parse a chunk that holds truncated (over-long) lines: those are diagnosed, not parsed."""
    keep = [i for i in range(len(chunk.raws)) if i not in chunk.truncated]
    tables, rejected = _parse_block([chunk.raws[i] for i in keep])
    remapped = [
        t.set_column(t.schema.get_field_index("_line"), "_line", pa.array([keep[i] for i in t.column("_line").to_pylist()], pa.int64()))
        for t in tables
    ]
    return remapped, [keep[i] for i in rejected]


_PARSED_SCHEMA = RECORD_SCHEMA.append(pa.field("_extra", pa.string()))


# --- the ingester ---------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """A chunk made ready off the writer's thread: events to append and lines to quarantine."""

    lines: int
    last_line: int
    batch: pa.Table | None
    batch_lines: list[Line]  # the source line of each batch row (for conflicts found at append)
    batch_user_ids: list[str | None]
    bad: list[_Bad]
    quarantine: pa.Table | None
    redacted: int
    drift: Counter[str]
    drift_first_line: dict[str, int]


class Ingester:
    """Ingests production-log files into an EventStore.

    Parsing, validation, pseudonymization and encryption of chunk k+1 run on a worker thread while
    chunk k is appended (DuckDB and pyarrow release the GIL), so both cores stay busy.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        chunk_lines: int = 131_072,
        max_line_bytes: int = 64 << 20,
        on_commit: Callable[[FileReport, int], None] | None = None,
    ) -> None:
        self.store = store
        # >= DuckDB's row-group size (122,880): big appends are written straight to the database
        # file instead of through the WAL, which doubles throughput.
        self.chunk_lines = chunk_lines
        self.max_line_bytes = max_line_bytes
        self.on_commit = on_commit  # called after each committed chunk with (report, last line number)
        with store.connect() as con:
            con.execute(QUARANTINE_SQL)

    def ingest_files(self, paths: Iterable[Path], *, progress: Callable[[int], None] | None = None) -> IngestReport:
        report = IngestReport()
        for p in paths:
            report.files.append(self.ingest_file(Path(p), progress=progress))
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
        chunks = iter_chunks(
            path,
            report,
            chunk_lines=self.chunk_lines,
            start_offset=start_offset,
            end_offset=end_offset,
            max_line_bytes=self.max_line_bytes,
            complete_lines_only=complete_lines_only,
            progress=progress,
        )
        queue: Queue[_Prepared | BaseException | None] = Queue(maxsize=1)
        stop = threading.Event()

        def produce() -> None:
            try:
                for chunk in chunks:
                    if stop.is_set():
                        return
                    queue.put(self._prepare(chunk, str(path)))
                queue.put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the writer thread, re-raised there
                queue.put(e)

        worker = threading.Thread(target=produce, name=f"ingest-prepare:{path.name}", daemon=True)
        worker.start()
        try:
            while (item := queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                self._commit(item, report)
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    queue.get_nowait()
                except Empty:
                    pass
                worker.join(timeout=0.05)
        self.store.checkpoint()
        if report.truncated_gzip:
            report.reasons["file: truncated gzip stream (the rest of the file is missing)"] += 1
        report.check()
        return report

    def _prepare(self, chunk: Chunk, path: str) -> _Prepared:
        records, line_idx, bad, drift = parse_chunk(chunk)
        batch, redacted, batch_lines, user_ids = None, 0, [], []
        first_line: dict[str, int] = {}
        if records is not None and records.num_rows:
            batch, redacted = build_events(records, self.store.keys)
            batch_lines = [chunk.line(i) for i in line_idx]
            user_ids = records.column("user_id").to_pylist()
            if drift:
                for i, extra in zip(line_idx, records.column("_extra").to_pylist(), strict=True):
                    if extra is not None:
                        for name in orjson.loads(extra):
                            first_line.setdefault(name, chunk.numbers[i])
        return _Prepared(
            lines=len(chunk.raws),
            last_line=chunk.numbers[-1],
            batch=batch,
            batch_lines=batch_lines,
            batch_user_ids=user_ids,
            bad=bad,
            quarantine=_quarantine_rows(self.store.keys, bad, path),
            redacted=redacted,
            drift=drift,
            drift_first_line=first_line,
        )

    def _commit(self, item: _Prepared, report: FileReport) -> None:
        bad = list(item.bad)
        quarantine = item.quarantine
        with self.store.connect(checkpoint_on_close=False) as con:
            con.execute("BEGIN")
            try:
                appended = duplicates = 0
                if item.batch is not None:
                    result = self.store.append_batch(item.batch, on_conflict="return", con=con)
                    appended, duplicates = result.appended, result.duplicates
                    if result.conflicts:
                        conflicts = [
                            _Bad(
                                item.batch_lines[i],
                                f"event {item.batch.column('event_id')[i]} already recorded with different "
                                "content (same id, different record)",
                                item.batch_user_ids[i],
                            )
                            for i in result.conflicts
                        ]
                        bad.extend(conflicts)
                        extra_rows = _quarantine_rows(self.store.keys, conflicts, report.path)
                        quarantine = pa.concat_tables([quarantine, extra_rows]) if quarantine is not None else extra_rows
                if quarantine is not None:
                    con.register("_q", quarantine)
                    con.execute("INSERT INTO quarantine SELECT * FROM _q ON CONFLICT (file, byte_offset) DO NOTHING")
                    con.unregister("_q")
                for name, count in item.drift.items():
                    con.execute(
                        """
                        INSERT INTO schema_drift VALUES (?, ?, ?, get_current_timestamp(), ?)
                        ON CONFLICT (field) DO UPDATE SET records = schema_drift.records + excluded.records
                        """,
                        [name, report.path, item.drift_first_line.get(name, item.last_line), count],
                    )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        report.read += item.lines
        report.ingested += appended
        report.duplicates += duplicates
        report.quarantined += len(bad)
        report.redacted += item.redacted
        report.drift_fields.update(item.drift)
        for b in bad:
            report.reasons[_reason_kind(b.reason)] += 1
        if self.on_commit:
            self.on_commit(report, item.last_line)


def _quarantine_rows(keys: KeyStore, bad: list[_Bad], path: str) -> pa.Table | None:
    """Quarantine rows for bad lines, raw bytes encrypted.

    A line that names a user is encrypted under that subject's key (erasure reaches it); one that
    names nobody gets a key of its own, stable across re-runs, shredded with the row.
    """
    if not bad:
        return None
    named = keys.pseudonymize_many({b.user_id for b in bad if b.user_id})
    key_ids = [
        named[b.user_id] if b.user_id else f"quarantine-{uuid.uuid5(uuid.NAMESPACE_URL, f'{path}:{b.line.offset}')}"
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

