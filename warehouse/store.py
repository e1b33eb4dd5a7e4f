"""The append-only event log in DuckDB: the system's source of truth.

Contract (see DESIGN.md):

- `events(position, event_id UNIQUE, stream_id, stream_version, type, schema_version, occurred_at,
  recorded_at, subject_id, payload JSON, pii BLOB)` with `UNIQUE(stream_id, stream_version)`.
- Appends are Arrow batches, all-or-nothing, with a global gap-free `position` and per-stream
  versions assigned by the store; optional expected versions give optimistic concurrency
  (`ConcurrencyError`); idempotent by `event_id`: the same id with the same content is a no-op, the
  same id with different content is an `EventConflictError`.
- DuckDB allows one process per database file at a time. Every access goes through `connect()`,
  which holds a cross-process `filelock` for the life of one short connection and retries with
  backoff if DuckDB's own file lock is held by a process outside this code path.

Personal fields are encrypted per subject before they reach this module's SQL; the events table
holds no plaintext personal data, so shredding a subject's key is enough to erase it from here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock

from warehouse.events import (
    EVENT_TYPES,
    Event,
    StoredEvent,
    UnknownEvent,
    canonical_json,
)
from warehouse.keystore import KeyStore

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS events (
    position        BIGINT      NOT NULL,
    event_id        UUID        NOT NULL UNIQUE,
    stream_id       VARCHAR     NOT NULL,
    stream_version  BIGINT      NOT NULL,
    type            VARCHAR     NOT NULL,
    schema_version  INTEGER     NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL,
    subject_id      VARCHAR,
    payload         JSON        NOT NULL,
    -- ciphertext does not compress; analysing it on every checkpoint halves append throughput
    pii             BLOB USING COMPRESSION uncompressed,
    UNIQUE (stream_id, stream_version)
);
CREATE TABLE IF NOT EXISTS store_meta (key VARCHAR PRIMARY KEY, value BIGINT NOT NULL);
INSERT OR IGNORE INTO store_meta VALUES ('head', 0);
"""

# The Arrow shape of a batch handed to `append_batch` (one row per event, in order).
BATCH_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("stream_id", pa.string()),
        ("type", pa.string()),
        ("schema_version", pa.int32()),
        ("occurred_at", pa.timestamp("us", tz="UTC")),
        ("subject_id", pa.string()),
        ("payload", pa.string()),
        ("pii", pa.binary()),
    ]
)

EVENT_COLUMNS = (
    "position, event_id, stream_id, stream_version, type, schema_version, occurred_at, recorded_at, "
    "subject_id, payload, pii"
)


SMALL_BATCH = 256  # below this, lookups use list parameters instead of registering Arrow tables


class StoreError(Exception):
    """Base class of event-store errors."""


class ConcurrencyError(StoreError):
    """A stream was not at the version the writer expected (another writer got there first)."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id!r}: expected version {expected}, found {actual}")
        self.stream_id, self.expected, self.actual = stream_id, expected, actual


class EventConflictError(StoreError):
    """An event id was appended again with different content."""

    def __init__(self, event_ids: Sequence[str]) -> None:
        shown = ", ".join(event_ids[:5]) + (f" (+{len(event_ids) - 5} more)" if len(event_ids) > 5 else "")
        super().__init__(f"event id reused with different content: {shown}")
        self.event_ids = list(event_ids)


class StoreBusyError(StoreError):
    """The warehouse stayed locked by another process for longer than the timeout."""


@dataclass(frozen=True)
class NewEvent:
    """An event to append: the fact plus where it goes."""

    data: Event
    stream_id: str
    occurred_at: datetime
    subject_id: str | None = None
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True)
class AppendResult:
    """What an append did. `positions` are those of the newly appended events, in input order."""

    appended: int
    duplicates: int
    conflicts: tuple[int, ...] = ()  # input row indices, when conflicts were returned, not raised
    first_position: int | None = None
    last_position: int | None = None
    stream_versions: Mapping[str, int] = field(default_factory=dict)


class EventStore:
    """The DuckDB event log. Safe to use from many threads and processes at once."""

    def __init__(
        self,
        path: Path | str,
        keystore: KeyStore | None = None,
        *,
        lock_timeout: float = 300.0,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keys = keystore or KeyStore(self.path.parent / "keys.db")
        self.lock_timeout = lock_timeout
        self._lock = FileLock(str(self.path) + ".lock", thread_local=False)
        self._local = threading.local()
        with self.connect() as con:
            con.execute(SCHEMA_SQL)
            from warehouse.projections import ensure_projection_tables  # circular at import time

            ensure_projection_tables(con)

    # --- connections -------------------------------------------------------------------------------

    @contextmanager
    def connect(self, *, checkpoint_on_close: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """One short-lived connection under the cross-process lock; re-entrant within a thread.

        DuckDB replays the WAL at every open, so by default a connection checkpoints when it closes.
        Bulk writers pass `checkpoint_on_close=False` for each chunk (a checkpoint rewrites the
        partial last row group every time: measured 2-3x slower appends) and call `checkpoint()`
        once at the end.
        """
        con = getattr(self._local, "con", None)
        if con is not None:
            yield con
            return
        if not self._lock.acquire(timeout=self.lock_timeout, poll_interval=0.002):  # pragma: no cover
            raise StoreBusyError(f"{self.path}: lock not acquired in {self.lock_timeout}s")
        try:
            con = self._open_with_backoff()
            if not checkpoint_on_close:
                con.execute("PRAGMA disable_checkpoint_on_shutdown")
            self._local.con = con
            try:
                yield con
            finally:
                self._local.con = None
                con.close()
        finally:
            self._lock.release()

    def _open_with_backoff(self) -> duckdb.DuckDBPyConnection:
        delay, deadline = 0.01, time.monotonic() + self.lock_timeout
        while True:
            try:
                # extensions we use (json, parquet, icu) are built in; autoloading costs ~7 ms per open
                return duckdb.connect(
                    str(self.path), config={"autoload_known_extensions": False, "autoinstall_known_extensions": False}
                )
            except duckdb.IOException as e:
                # Another process outside our lock (a DuckDB shell, a stray reader) holds the file.
                if "lock" not in str(e).lower() or time.monotonic() > deadline:
                    raise StoreBusyError(f"{self.path}: {e}") from e
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    # --- writing -----------------------------------------------------------------------------------

    def append(
        self,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = None,
        expected_versions: Mapping[str, int] | None = None,
    ) -> AppendResult:
        """Append typed events, all or nothing.

        `expected_version` applies to a batch whose events all share one stream; `expected_versions`
        maps stream ids to the version each must be at (0 = the stream must not exist yet).
        """
        if expected_version is not None:
            streams = {e.stream_id for e in events}
            if len(streams) != 1:
                raise ValueError("expected_version needs all events on one stream; use expected_versions")
            expected_versions = {streams.pop(): expected_version}
        return self.append_batch(self.encode(events), expected_versions=expected_versions)

    def encode(self, events: Sequence[NewEvent]) -> pa.Table:
        """Typed events → an Arrow batch: public fields to JSON, personal fields encrypted."""
        subjects = {e.subject_id for e in events if e.subject_id and e.data.PII_FIELDS | set(e.data.extra)}
        keys = self.keys.keys_for(subjects) if subjects else {}
        cols: dict[str, list[Any]] = {name: [] for name in BATCH_SCHEMA.names}
        for e in events:
            personal = {k: v for k, v in e.data.personal_fields().items() if v is not None}
            pii = None
            if personal:
                if e.subject_id is None:
                    raise ValueError(f"{e.data.type_name()} {e.event_id}: personal fields need a subject_id")
                key = keys.get(e.subject_id)
                if key is not None:  # a shredded subject's personal fields are not stored again
                    pii = key.encrypt(canonical_json(personal).encode(), e.event_id.encode())
            cols["event_id"].append(e.event_id)
            cols["stream_id"].append(e.stream_id)
            cols["type"].append(e.data.type_name())
            cols["schema_version"].append(e.data.SCHEMA_VERSION)
            cols["occurred_at"].append(e.occurred_at)
            cols["subject_id"].append(e.subject_id)
            cols["payload"].append(canonical_json(e.data.public_fields()))
            cols["pii"].append(pii)
        return pa.table(cols, schema=BATCH_SCHEMA)

    def append_batch(
        self,
        batch: pa.Table,
        *,
        expected_versions: Mapping[str, int] | None = None,
        on_conflict: str = "raise",
        con: duckdb.DuckDBPyConnection | None = None,
        checkpoint_on_close: bool = True,
    ) -> AppendResult:
        """Append an Arrow batch (BATCH_SCHEMA) in one transaction.

        on_conflict="raise" raises EventConflictError and appends nothing; "return" appends the
        rest and reports the conflicting row indices (ingestion quarantines them).
        Pass `con` to join a transaction the caller already opened (it must hold `connect()`).
        Bulk loaders pass `checkpoint_on_close=False` per batch and call `checkpoint()` once at the end.
        """
        if on_conflict not in ("raise", "return"):
            raise ValueError("on_conflict must be 'raise' or 'return'")
        batch = batch.select(BATCH_SCHEMA.names).cast(BATCH_SCHEMA)
        if con is not None:
            return _append(con, self.keys, batch, expected_versions or {}, on_conflict)
        with self.connect(checkpoint_on_close=checkpoint_on_close) as con:
            con.execute("BEGIN")
            try:
                result = _append(con, self.keys, batch, expected_versions or {}, on_conflict)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return result

    # --- reading -----------------------------------------------------------------------------------

    def head(self) -> int:
        """The position of the last appended event (0 for an empty log)."""
        with self.connect() as con:
            return con.execute("SELECT value FROM store_meta WHERE key='head'").fetchall()[0][0]

    def stream_version(self, stream_id: str) -> int:
        with self.connect() as con:
            row = con.execute(
                "SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = ?", [stream_id]
            ).fetchall()[0]
            return row[0]

    def read_arrow(
        self,
        *,
        after: int = 0,
        upto: int | None = None,
        stream_id: str | None = None,
        subject_id: str | None = None,
        types: Sequence[str] | None = None,
        limit: int | None = None,
        columns: str = EVENT_COLUMNS,
    ) -> pa.Table:
        """Raw events (ciphertext included) as Arrow, in position order. Filters combine with AND."""
        where, params = ["position > ?"], [after]
        if upto is not None:
            where.append("position <= ?")
            params.append(upto)
        if stream_id is not None:
            where.append("stream_id = ?")
            params.append(stream_id)
        if subject_id is not None:
            where.append("subject_id = ?")
            params.append(subject_id)
        if types:
            where.append("list_contains(?, type)")
            params.append(list(types))
        sql = f"SELECT {columns} FROM events WHERE {' AND '.join(where)} ORDER BY position"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self.connect() as con:
            return con.sql(sql, params=params).to_arrow_table()

    def read(self, **filters: Any) -> list[StoredEvent]:
        """Decoded events (personal fields decrypted where the subject's key exists)."""
        return self.decode(self.read_arrow(**filters))

    def read_stream(self, stream_id: str) -> list[StoredEvent]:
        return self.read(stream_id=stream_id)

    def read_subject(self, subject_id: str) -> list[StoredEvent]:
        return self.read(subject_id=subject_id)

    def decode(self, table: pa.Table) -> list[StoredEvent]:
        rows = table.to_pylist()
        subjects = {r["subject_id"] for r in rows if r["subject_id"] and r["pii"] is not None}
        keys = self.keys.keys_for(subjects, create=False) if subjects else {}
        out = []
        for r in rows:
            payload = orjson.loads(r["payload"])
            personal: dict[str, Any] | None = {}
            redacted = False
            if r["pii"] is not None:
                key = keys.get(r["subject_id"])
                if key is None:
                    personal, redacted = None, True
                else:
                    personal = orjson.loads(key.decrypt(r["pii"], str(r["event_id"]).encode()))
            cls = EVENT_TYPES.get(r["type"])
            data = cls.decode(payload, personal) if cls else UnknownEvent(r["type"], payload, personal)
            out.append(
                StoredEvent(
                    position=r["position"],
                    event_id=str(r["event_id"]),
                    stream_id=r["stream_id"],
                    stream_version=r["stream_version"],
                    type=r["type"],
                    schema_version=r["schema_version"],
                    occurred_at=r["occurred_at"],
                    recorded_at=r["recorded_at"],
                    subject_id=r["subject_id"],
                    data=data,
                    redacted=redacted,
                )
            )
        return out

    def checkpoint(self) -> None:
        """Fold the WAL into the database file (after bulk loads, before copying the file)."""
        with self.connect() as con:
            con.execute("CHECKPOINT")

    def shred_subject(self, subject_id: str, request_id: str | None = None) -> bool:
        """Crypto-shred a subject: destroy their key, record `SubjectShredded`, catch projections up.

        Returns True if a key existed. Reading the subject's events afterwards yields redacted
        personal fields.
        """
        from warehouse.events import SubjectShredded
        from warehouse.projections import catch_up

        existed = self.keys.shred(subject_id, request_id)
        self.append(
            [
                NewEvent(
                    SubjectShredded(request_id=request_id),
                    stream_id=f"subject-{subject_id}",
                    occurred_at=datetime.now(UTC),
                    subject_id=subject_id,
                    event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"shred:{subject_id}:{request_id}")),
                )
            ]
        )
        catch_up(self)
        return existed


def _append(
    con: duckdb.DuckDBPyConnection,
    keys: KeyStore,
    batch: pa.Table,
    expected_versions: Mapping[str, int],
    on_conflict: str,
) -> AppendResult:
    """The one write path. Runs inside the caller's transaction, under the store lock.

    Vectorized throughout: one join finds ids already in the log, one semi-join finds the current
    version of the batch's streams, positions and stream versions are computed with numpy, and the
    rows go in with a single INSERT from Arrow.
    """
    n = batch.num_rows
    status = np.zeros(n, dtype=np.int8)  # 0 new, 1 duplicate, 2 conflict
    batch = batch.append_column("idx", pa.array(np.arange(n, dtype=np.int64)))
    small = n <= SMALL_BATCH
    if not small:
        con.register("_batch", batch)
    try:
        # Ids already in the log. Personal data is compared by decrypting both sides: ciphertexts
        # differ by nonce, and the log keeps no plaintext fingerprint that could outlive the key.
        for idx, same_public, event_id, subject_id, old_pii, new_pii in _existing(con, batch, small):
            same = same_public and _same_personal(keys, event_id, subject_id, old_pii, new_pii)
            status[idx] = 1 if same else 2
        _classify_in_batch(batch, status, keys)

        conflicts = tuple(int(i) for i in np.flatnonzero(status == 2))
        if conflicts and on_conflict == "raise":
            raise EventConflictError([batch.column("event_id")[i].as_py() for i in conflicts])
        new_idx = np.flatnonzero(status == 0)
        duplicates = int((status == 1).sum())
        if not len(new_idx):  # a pure replay: nothing to append, so nothing to check either
            return AppendResult(0, duplicates, conflicts)

        new = batch.take(pa.array(new_idx)) if len(new_idx) < n else batch
        new = new.drop_columns(["idx"])
        if small:
            streams = sorted(set(new.column("stream_id").to_pylist()) | set(expected_versions))
            sql = "SELECT stream_id, max(stream_version) FROM events WHERE stream_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY 1"
            current = dict(con.execute(sql, [streams]).fetchall())
        else:
            con.register("_new", new)
            current = dict(
                con.execute(
                    """
                    SELECT stream_id, max(stream_version) FROM events
                    WHERE stream_id IN (SELECT stream_id FROM _new UNION ALL SELECT unnest(?::VARCHAR[]))
                    GROUP BY stream_id
                    """,
                    [list(expected_versions)],
                ).fetchall()
            )
        for stream_id, expected in expected_versions.items():
            if current.get(stream_id, 0) != expected:
                raise ConcurrencyError(stream_id, expected, current.get(stream_id, 0))

        head = con.execute("SELECT value FROM store_meta WHERE key='head'").fetchall()[0][0]
        m = new.num_rows
        positions = np.arange(head + 1, head + m + 1, dtype=np.int64)
        versions = _stream_versions(new.column("stream_id"), current)
        full = new.add_column(0, "position", pa.array(positions)).add_column(
            3, "stream_version", pa.array(versions)
        )
        con.register("_rows", full)
        con.execute(
            f"""
            INSERT INTO events ({EVENT_COLUMNS})
            SELECT position, event_id::UUID, stream_id, stream_version, type, schema_version, occurred_at,
                   get_current_timestamp(), subject_id, payload, pii
            FROM _rows
            """
        )
        con.execute("UPDATE store_meta SET value = ? WHERE key = 'head'", [head + m])
        stream_versions = _StreamVersions(full.column("stream_id"), full.column("stream_version"))
        return AppendResult(m, duplicates, conflicts, head + 1, head + m, stream_versions)
    finally:
        for name in ("_batch", "_new", "_rows"):
            try:
                con.unregister(name)
            except Exception:  # noqa: BLE001 - not registered on early exits
                pass


def _existing(con: duckdb.DuckDBPyConnection, batch: pa.Table, small: bool) -> list[tuple]:
    """(idx, same public content, event_id, subject_id, stored pii, new pii) for ids already stored.

    Small batches (a server logging one request, a promotion) look ids up with a list parameter
    (the UNIQUE index answers); big ones join the registered Arrow batch.
    """
    if not small:
        return con.execute(
            """
            WITH hit AS (SELECT b.idx FROM _batch b SEMI JOIN events e ON e.event_id = b.event_id::UUID)
            SELECT b.idx, e.type = b.type AND e.stream_id = b.stream_id AND e.payload::VARCHAR = b.payload,
                   b.event_id, b.subject_id, e.pii, b.pii
            FROM _batch b JOIN hit USING (idx) JOIN events e ON e.event_id = b.event_id::UUID
            """
        ).fetchall()
    rows = batch.select(["idx", "event_id", "type", "stream_id", "payload", "subject_id", "pii"]).to_pylist()
    stored = {
        r[0]: r[1:]
        for r in con.execute(
            "SELECT event_id::VARCHAR, type, stream_id, payload::VARCHAR, pii FROM events "
            "WHERE event_id IN (SELECT unnest(?::UUID[]))",
            [[r["event_id"] for r in rows]],
        ).fetchall()
    }
    out = []
    for r in rows:
        hit = stored.get(r["event_id"])
        if hit is not None:
            same = (hit[0], hit[1], hit[2]) == (r["type"], r["stream_id"], r["payload"])
            out.append((r["idx"], same, r["event_id"], r["subject_id"], hit[3], r["pii"]))
    return out


def _same_personal(keys: KeyStore, event_id: str, subject_id: str | None, old: bytes | None, new: bytes | None) -> bool:
    if old is None or new is None:
        return True  # one side carries no personal data (e.g. the subject was shredded meanwhile)
    try:
        key = keys.key_for(subject_id)
    except LookupError:
        return True  # key shredded: nothing left to compare, and nothing may come back
    aad = str(event_id).encode()
    return key.decrypt(old, aad) == key.decrypt(new, aad)


def _classify_in_batch(batch: pa.Table, status: np.ndarray, keys: KeyStore) -> None:
    """Repeated ids within the batch: later copies are duplicates (same content) or conflicts."""
    ids = batch.column("event_id")
    if pc.count_distinct(ids).as_py() == batch.num_rows:
        return
    first: dict[str, int] = {}
    rows = batch.select(["event_id", "type", "stream_id", "payload", "subject_id", "pii"]).to_pylist()
    for i, r in enumerate(rows):
        j = first.setdefault(r["event_id"], i)
        if j == i or status[i]:
            continue
        a = rows[j]
        same = (a["type"], a["stream_id"], a["payload"]) == (r["type"], r["stream_id"], r["payload"])
        same = same and _same_personal(keys, r["event_id"], r["subject_id"], a["pii"], r["pii"])
        status[i] = 1 if same else 2


class _StreamVersions(Mapping[str, int]):
    """{stream: its version after the append}, built on first use (bulk appends never ask, and a
    dict of every stream of a 100k-event batch costs more than the rest of the bookkeeping)."""

    def __init__(self, streams: pa.ChunkedArray, versions: pa.ChunkedArray) -> None:
        self._columns: tuple[pa.ChunkedArray, pa.ChunkedArray] | None = (streams, versions)
        self._dict: dict[str, int] = {}

    def _built(self) -> dict[str, int]:
        if self._columns is not None:
            streams, versions = self._columns
            self._dict = dict(zip(streams.to_pylist(), versions.to_pylist(), strict=True))  # last wins
            self._columns = None
        return self._dict

    def __getitem__(self, key: str) -> int:
        return self._built()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())

    def __repr__(self) -> str:
        return repr(self._built())


def _stream_versions(streams: pa.ChunkedArray, current: Mapping[str, int]) -> np.ndarray:
    """Per-row stream version: the stream's current version + the row's rank within the batch."""
    enc = pc.dictionary_encode(streams).combine_chunks()
    codes = enc.indices.to_numpy()
    base = np.zeros(len(enc.dictionary), dtype=np.int64)
    if current:  # usually few: streams that already had events (feedback on earlier interactions)
        known = pa.array(list(current), pa.string())
        hit = pc.index_in(enc.dictionary, known)
        where = np.flatnonzero(hit.is_valid().to_numpy(zero_copy_only=False))
        base[where] = np.array(list(current.values()), dtype=np.int64)[hit.drop_null().to_numpy()]
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - run_start + 1
    return base[codes] + rank
