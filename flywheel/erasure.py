"""Erasure (GDPR Art. 17) and retention: follow a subject's data through lineage into every store,
remove it, and receipt what was found, removed and verified.

    request_erasure(store, [forum_id, logs_id], reason="user request")   # ErasureRequested per subject id
    receipt = run_erasure(store, paths, [forum_id, logs_id], request_id, hooks=hooks)   # the job body
    hits = scan_stores(paths.home, needles)                           # the byte-level verification scan

`run_erasure` is pure flywheel logic: what needs the orchestrator (re-materializing a shard partition
or a derived dataset, deleting a Dagster run) arrives as callables in `ErasureHooks`, supplied by the
Dagster job in `sensors/erasure.py` (or by a test). The steps, in order:

A person may have several subject ids (their identifiers in different sources): one request names
them all and one run erases them together. The steps, in order:

1. **plan** — `warehouse.lineage.erasure_plan` per subject id: events, documents and samples,
   near-duplicate cluster members carrying the subject's text, synthetic children, checkpoints, model
   versions, quarantined lines.
2. **fingerprints** — while the key still exists: the decrypted personal fields, the sentences of their
   documents, the PII span values the curation scrubber finds there and identifier-like tokens, minus
   what other people's remaining documents also contain; in memory only (never logged or written).
3. **shred** — destroy the subject keys (`EventStore.shred_subject`), leaving the tombstones.
4. **re-materialize** — near-duplicate members go on the erased-documents list
   (`$FLYWHEEL_HOME/erasure/erased_documents.parquet`: doc ids and request ids only), which the
   curation read step drops like an erased subject's documents; the affected curation partitions are
   re-materialized (raw → clean → dedup, new versions), then every derived dataset whose live version
   still names the subject (mixture, SFT set, preference pairs); the loop's synthetic samples are
   rewritten without rows whose `parent_ids` name the subject's events.
5. **tokenizer** — a vocabulary entry the tokenizer could only have learned from the subject's text
   (it occurs in their text, fewer than `min_frequency` times in the remaining mixture) makes the
   tokenizer retrain.
6. **purge** — projections rebuilt; every DVC object (cache and remote) no live version references
   that belongs to an affected version or holds the subject, by object hash (live objects are never
   touched); landing files rewritten without the subject's lines; MLflow runs whose artifacts hold the
   subject deleted and `mlflow gc` run; Dagster runs whose event log or compute logs hold the subject
   deleted and the SQLite files vacuumed.
7. **taint** — `CheckpointTainted` for every model version trained on the subject's data (directly,
   through a near-duplicate or a synthetic child, or from a tainted parent); a tainted champion is
   replaced by the latest untainted earlier champion through the promotion ledger (audited), or its
   alias withdrawn; the retrain sensor turns the taint into a retrain run, and once a clean successor
   is champion `remove_tainted_versions` retires the tainted versions (registry, runs, DVC).
8. **verify and receipt** — the stores scanned byte by byte (`scan_stores`: gzip and Parquet
   decompressed, DuckDB and SQLite read value by value), and `ErasureCompleted` (one per subject id)
   carries the receipt: per store, found and removed counts, and the scan result.

Retention (`[retention]` in flywheel.toml) runs through the same machinery: production-log subjects
inactive longer than the window get an `ErasureRequested` (reason "retention"), and corpus documents
older than their source's window are added to the erased-documents list and their partitions
re-materialized and purged.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flywheel.config import Paths

if TYPE_CHECKING:
    from warehouse.store import EventStore

ERASED_DOCUMENTS = Path("erasure") / "erased_documents.parquet"
ERASED_DOCUMENTS_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("request_id", pa.string()),
                                     ("reason", pa.string()), ("erased_at", pa.timestamp("us", tz="UTC"))])
# Derived datasets tracked under the DVC repository, and the asset that rebuilds each.
DERIVED_DATASETS = {"mixtures/current": "training_mixture", "datasets/sft": "sft_dataset",
                    "datasets/preferences": "preference_pairs"}
FILTERED_DATASETS = ("synthetic/current",)  # rewritten without the subject's rows (regenerating needs the teacher)
CURATION_STAGES = ("raw", "clean", "dedup")
MIN_SENTENCE = 24  # shorter sentences are too common to be the subject's own
MAX_NEEDLES = 5000
ID_COLUMNS = ("subject_id", "doc_id", "sample_id", "origin_event_id")


# --------------------------------------------------------------------------------------------------------
# Requests and what the sensors read


def request_erasure(store: EventStore, subject_ids: str | Sequence[str], *, reason: str | None = None,
                    requested_by: str | None = None, request_id: str | None = None) -> dict[str, Any]:
    """Append `ErasureRequested` for a person: one event per subject id (their identifiers in different
    sources), one batch, one request id (idempotent per request and subject); returns ids and position."""
    from warehouse.events import ErasureRequested
    from warehouse.store import NewEvent

    subjects = [subject_ids] if isinstance(subject_ids, str) else list(dict.fromkeys(subject_ids))
    request_id = request_id or f"erase-{uuid.uuid4()}"
    now = datetime.now(UTC)
    events = [NewEvent(ErasureRequested(request_id=request_id, reason=reason, requested_by=requested_by),
                       stream_id=f"subject-{s}", occurred_at=now, subject_id=s,
                       event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"erasure-requested:{s}:{request_id}")))
              for s in subjects]
    ids = {"ids": [e.event_id for e in events]}
    sql = "SELECT event_id::VARCHAR, position FROM events WHERE event_id IN (SELECT unnest($ids::UUID[]))"
    with store.connect() as con:
        known = dict(con.execute(sql, ids).fetchall())
    new = [e for e in events if e.event_id not in known]  # a repeated request is recorded once
    if new:
        store.append(new)
    with store.connect() as con:
        position = max(p for _, p in con.execute(sql, ids).fetchall())
    return {"subject_ids": subjects, "request_id": request_id, "event_id": events[0].event_id, "position": position}


def pending_erasure_requests(store: EventStore, after_position: int, limit: int = 100) -> list[dict[str, Any]]:
    """`ErasureRequested` after a log position, one entry per request id (its subject ids, first event
    id and last position), oldest first: the erasure sensor's query."""
    with store.connect() as con:
        rows = con.execute(
            "SELECT payload->>'request_id' AS request_id, list(subject_id ORDER BY position), "
            "arg_min(event_id::VARCHAR, position), max(position) FROM events "
            "WHERE type = 'ErasureRequested' AND position > ? GROUP BY 1 ORDER BY 4 LIMIT ?", [after_position, limit],
        ).fetchall()
    return [{"request_id": r, "subject_ids": list(dict.fromkeys(s)), "event_id": e, "position": p} for r, s, e, p in rows]


def pending_retrains(store: EventStore, after_position: int, limit: int = 1000) -> list[dict[str, Any]]:
    """One retrain per erasure request that tainted checkpoints, after a log position (the retrain
    sensor's query): request id, the tainted model versions and the last position seen."""
    with store.connect() as con:
        rows = con.execute(
            "SELECT payload->>'request_id' AS request_id, max(position), "
            "list(DISTINCT (payload->>'model_name') || '/' || (payload->>'model_version') ORDER BY 1) "
            "FROM events WHERE type = 'CheckpointTainted' AND position > ? GROUP BY 1 ORDER BY 2 LIMIT ?",
            [after_position, limit],
        ).fetchall()
    return [{"request_id": r, "position": p, "models": list(m)} for r, p, m in rows]


def completed_requests(store: EventStore) -> set[str]:
    with store.connect() as con:
        rows = con.execute("SELECT payload->>'request_id' FROM events WHERE type = 'ErasureCompleted'").fetchall()
    return {r[0] for r in rows}


# --------------------------------------------------------------------------------------------------------
# The erased-documents list (read by the curation read step)


def erased_documents(paths: Paths) -> set[str]:
    """Doc ids erased as someone else's near-duplicate copy or expired by retention."""
    path = paths.home / ERASED_DOCUMENTS
    if not path.exists():
        return set()
    return set(pq.read_table(path, columns=["doc_id"]).column("doc_id").to_pylist())


def add_erased_documents(paths: Paths, rows: Sequence[Mapping[str, Any]]) -> int:
    """Append (doc_id, source, request_id, reason) rows to the list; returns how many were new."""
    from flywheel.shards import write_parquet_atomic

    path = paths.home / ERASED_DOCUMENTS
    known = pq.read_table(path) if path.exists() else ERASED_DOCUMENTS_SCHEMA.empty_table()
    have = set(known.column("doc_id").to_pylist())
    now = datetime.now(UTC)
    new = [{"doc_id": r["doc_id"], "source": r.get("source"), "request_id": r.get("request_id"),
            "reason": r.get("reason"), "erased_at": now} for r in rows if r["doc_id"] not in have]
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(pa.concat_tables([known, pa.Table.from_pylist(new, ERASED_DOCUMENTS_SCHEMA)]), path)
    return len({r["doc_id"] for r in new})


ERASED_REASONS = ("erased_subject", "erased_document")
CONTENT_COLUMNS = ("text", "title", "url", "meta", "pii_spans")  # blanked in erased rows; ids and reason stay


def blank_erased_rows(excluded: pa.Table | None) -> pa.Table | None:
    """Exclusion rows of erased subjects or documents keep ids and the reason only: text, title, URL,
    metadata and PII spans become null (a question title is the asker's text too)."""
    if excluded is None or excluded.num_rows == 0 or "reason" not in excluded.column_names:
        return excluded
    erased = pc.fill_null(pc.is_in(excluded.column("reason"), pa.array(ERASED_REASONS)), False)
    if not pc.any(erased).as_py():
        return excluded
    for c in CONTENT_COLUMNS:
        if c in excluded.column_names:
            i = excluded.schema.get_field_index(c)
            col = excluded.column(c)
            excluded = excluded.set_column(i, excluded.schema.field(i),
                                           pc.if_else(erased, pa.nulls(len(col), col.type), col))
    return excluded


def drop_erased_documents(kept: pa.Table, excluded: pa.Table | None, doc_ids: set[str]) -> tuple[pa.Table, pa.Table | None, int]:
    """The read step's filter: documents on the erased list leave `kept` and are excluded with their
    id and the reason only, like an erased subject's documents (whose rows are blanked here too)."""
    n = 0
    if doc_ids and kept.num_rows:
        gone_mask = pc.fill_null(pc.is_in(kept.column("doc_id"), pa.array(sorted(doc_ids), pa.string())), False)
        gone = kept.filter(gone_mask)
        if gone.num_rows:
            from flywheel.curation.pipeline import _concat, _excluded

            rows = _excluded(gone, "read", ["erased_document"] * gone.num_rows)
            excluded = _concat([t for t in (excluded, rows) if t is not None])
            kept, n = kept.filter(pc.invert(gone_mask)), gone.num_rows
    return kept, blank_erased_rows(excluded), n


# --------------------------------------------------------------------------------------------------------
# Fingerprints and the byte-level scan


_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def text_fingerprints(texts: Iterable[str], *, min_chars: int = MIN_SENTENCE) -> set[str]:
    """Sentences (and short whole texts of distinctive length) that identify a subject's text."""
    out: set[str] = set()
    for t in texts:
        if not t:
            continue
        t = t.strip()
        for s in _SENTENCE.split(t):
            s = s.strip()
            if len(s) >= min_chars:
                out.add(s)
    return out


_RARE_TOKEN = re.compile(r"[\w.@+-]{10,}")


def rare_tokens(texts: Iterable[str]) -> set[str]:
    """Identifier-like tokens (a handle, a code, an address): 10+ characters with a digit and a
    letter, or an @ — unlikely to be anyone else's text."""
    out = set()
    for t in texts:
        for tok in _RARE_TOKEN.findall(t or ""):
            tok = tok.strip(".-+")
            if len(tok) >= 10 and ("@" in tok or (any(c.isdigit() for c in tok) and any(c.isalpha() for c in tok))):
                out.add(tok)
    return out


def pii_values(texts: Iterable[str], *, min_chars: int = 6) -> set[str]:
    """The values of the PII spans (names, e-mails, phones, …) the curation scrubber finds in texts."""
    from flywheel.curation.pii import default_scrubber

    scrubber = default_scrubber()
    out = set()
    for t in texts:
        if t:
            out |= {t[sp.start:sp.end] for sp in scrubber.scrub(t).spans if sp.end - sp.start >= min_chars}
    return out


def subject_fingerprints(store: EventStore, paths: Paths, subject_id: str) -> dict[str, set[str]]:
    """What identifies the subject's data, read while their key exists, from their decrypted events
    and their documents in the current shards: the personal strings themselves, the sentences,
    the PII span values (their name and e-mail as the scrubber finds them) and identifier-like
    tokens. Held in memory for the verification scan; never logged or written."""
    personal: set[str] = set()
    for e in store.read_subject(subject_id):
        data = e.data
        fields = data.personal_fields() if hasattr(data, "personal_fields") else dict(getattr(data, "personal", None) or {})
        personal |= {s.strip() for s in _strings(fields) if len(s.strip()) >= 8}
    texts: list[str] = list(personal)
    for f in sorted((paths.dvc_repo / "shards").glob("*/*/part-00000.parquet")):
        t = pq.read_table(f)
        mine = t.filter(pc.fill_null(pc.equal(t.column("subject_id"), subject_id), False))
        for c in ("text", "title"):
            if c in mine.column_names:
                texts += [x for x in mine.column(c).to_pylist() if x]
    return {"personal": personal, "text": text_fingerprints(texts), "pii": pii_values(texts),
            "tokens": rare_tokens(texts)}


def _parquet_plain(data: bytes) -> bytes | None:
    """The values of a Parquet file, decompressed, as Arrow IPC bytes (strings contiguous)."""
    try:
        t = pq.read_table(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - a truncated or foreign file is scanned raw only
        return None
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue()


def byte_views(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The raw bytes, then every decompressed form this scan knows (gzip, Parquet, SQLite rows)."""
    yield "raw", data
    if data[:2] == b"\x1f\x8b":
        try:
            inner = gzip.decompress(data)
        except Exception:  # noqa: BLE001 - a partial gzip is scanned raw only
            inner = None
        if inner is not None:
            yield from ((f"gzip+{k}", v) for k, v in byte_views(inner))
    if data[:4] == b"PAR1":
        plain = _parquet_plain(data)
        if plain is not None:
            yield "parquet", plain


def _sqlite_values(path: Path) -> bytes | None:
    """Every text and blob value of a SQLite file, concatenated (values split across overflow pages
    are whole here)."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    out = bytearray()
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()]
        for t in tables:
            qt = t.replace('"', '""')
            for row in con.execute(f'SELECT * FROM "{qt}"'):
                for v in row:
                    if isinstance(v, str):
                        out += v.encode("utf-8", "replace") + b"\x00"
                    elif isinstance(v, bytes):
                        out += v + b"\x00"
                        if v[:2] == b"\x1f\x8b" or v[:2] in (b"x\x9c", b"x\x01", b"x\xda"):
                            try:
                                out += (gzip.decompress(v) if v[:2] == b"\x1f\x8b" else __import__("zlib").decompress(v)) + b"\x00"
                            except Exception:  # noqa: BLE001, S110 - not compressed after all: raw is scanned
                                pass
    except sqlite3.Error:
        return None
    finally:
        con.close()
    return bytes(out)


def _duckdb_values(path: Path, store: EventStore | None = None) -> bytes | None:
    """Every VARCHAR/JSON/BLOB value of a DuckDB file (its storage compresses strings, so the raw
    bytes alone prove nothing). The event store's own file is read through its lock."""
    import duckdb

    if store is not None and Path(store.path).resolve() == Path(path).resolve():
        with store.connect() as con:
            return _duckdb_read(con)
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:
        return None
    try:
        return _duckdb_read(con)
    finally:
        con.close()


def _duckdb_read(con: Any) -> bytes:
    out = bytearray()
    cols = con.execute("SELECT table_name, column_name FROM information_schema.columns WHERE data_type IN "
                       "('VARCHAR', 'JSON', 'BLOB') OR data_type LIKE 'VARCHAR%' OR data_type LIKE 'STRUCT%' "
                       "OR data_type LIKE '%[]'").fetchall()
    for table, column in cols:
        qt, qc = table.replace('"', '""'), column.replace('"', '""')
        arr = con.execute(f'SELECT "{qc}"::VARCHAR AS v FROM "{qt}"').to_arrow_table().column("v")
        for chunk in arr.chunks:
            for buf in chunk.buffers()[1:]:
                if buf is not None:
                    out += buf.to_pybytes()
    return bytes(out)


def store_of(rel: Path) -> str:
    """Which store a file under the home belongs to (the receipt's and the scan's keys)."""
    parts = rel.parts
    name = rel.name
    if name.startswith("warehouse.duckdb"):
        return "duckdb"
    if name.startswith("keys.db"):
        return "keystore"
    if name.startswith("mlflow.db"):
        return "mlflow_db"
    top = parts[0] if parts else ""
    if top == "dvc" and len(parts) > 1:
        if parts[1] == ".dvc":
            return "dvc_cache"
        return {"shards": "shards", "exclusions": "shards", "checkpoints": "checkpoints", "tokenizers": "tokenizers",
                "mixtures": "datasets", "datasets": "datasets"}.get(parts[1], "dvc_other")
    return {"dvc-remote": "dvc_remote", "mlartifacts": "mlflow_artifacts", "dagster": "dagster", "work": "checkpoints",
            "landing": "logs", "logs": "logs", "quarantine": "quarantine", "lineage": "lineage", "indexes": "indexes",
            "erasure": "erasure"}.get(top, "other")


LARGE_FILE = 256 << 20  # larger files are scanned raw, in chunks (a checkpoint's weights, not a container)


def _scan_large(p: Path, rx: re.Pattern[bytes], overlap: int) -> bool:
    tail = b""
    with open(p, "rb") as f:
        while chunk := f.read(64 << 20):
            if rx.search(tail + chunk):
                return True
            tail = chunk[-overlap:]
    return False


def scan_stores(home: Path, needles: Iterable[str | bytes], *, exclude: Sequence[Path] = (),
                store: EventStore | None = None) -> dict[str, Any]:
    """Scan every file under `home` (except `exclude`) for any needle: raw bytes, gzip and Parquet
    decompressed, SQLite and DuckDB files read value by value. Returns per store the files and bytes
    scanned and the files with hits (paths and views only — never the needle)."""
    pats = sorted({n.encode() if isinstance(n, str) else bytes(n) for n in needles if n}, key=len, reverse=True)
    home = Path(home)
    excluded = [Path(e).resolve() for e in exclude]
    stores: dict[str, dict[str, Any]] = {}
    if not pats:
        return {"needles": 0, "stores": stores, "hits": 0, "clean": True}
    rx = re.compile(b"|".join(re.escape(p) for p in pats))
    for root, dirs, files in os.walk(home):
        rp = Path(root).resolve()
        if any(rp == e or e in rp.parents for e in excluded):
            dirs[:] = []
            continue
        for f in files:
            p = Path(root) / f
            if p.is_symlink() or not p.is_file():
                continue
            rel = p.relative_to(home)
            s = stores.setdefault(store_of(rel), {"files": 0, "bytes": 0, "hits": []})
            try:
                size = p.stat().st_size
                if size > LARGE_FILE and not p.name.endswith((".parquet", ".gz", ".db", ".duckdb")):
                    s["files"] += 1
                    s["bytes"] += size
                    if _scan_large(p, rx, max(len(x) for x in pats)):
                        s["hits"].append({"path": str(rel), "views": ["raw"]})
                    continue
                data = p.read_bytes()
            except OSError:
                continue
            s["files"] += 1
            s["bytes"] += len(data)
            views = list(byte_views(data))
            if data[:16] == b"SQLite format 3\x00":
                v = _sqlite_values(p)
                if v is not None:
                    views.append(("sqlite", v))
            elif f.endswith(".duckdb") and data[8:12] == b"DUCK":
                v = _duckdb_values(p, store)
                if v is not None:
                    views.append(("duckdb", v))
            hit_views = [k for k, v in views if rx.search(v)]
            if hit_views:
                s["hits"].append({"path": str(rel), "views": hit_views})
    total = sum(len(s["hits"]) for s in stores.values())
    return {"needles": len(pats), "stores": stores, "hits": total, "clean": total == 0}


def holds_any(data: bytes, rx: re.Pattern[bytes]) -> bool:
    return any(rx.search(v) for _, v in byte_views(data))


def _needle_regex(needles: Iterable[str]) -> re.Pattern[bytes] | None:
    pats = sorted({n.encode() for n in needles if n}, key=len, reverse=True)
    return re.compile(b"|".join(re.escape(p) for p in pats)) if pats else None


# --------------------------------------------------------------------------------------------------------
# DVC: live references and the purge


def live_hashes(repo_root: Path, cache: Path, remote: Path) -> set[str]:
    """Every object hash referenced by a live `.dvc` file (directory listings expanded)."""
    import yaml

    live: set[str] = set()
    for dvc_file in Path(repo_root).rglob("*.dvc"):
        if ".dvc" in dvc_file.relative_to(repo_root).parts[:-1] or not dvc_file.is_file():
            continue
        try:
            outs = yaml.safe_load(dvc_file.read_text()).get("outs", [])
        except Exception:  # noqa: BLE001, S112 - a broken .dvc file protects nothing
            continue
        for out in outs:
            md5 = out.get("md5")
            if not md5:
                continue
            live.add(md5)
            if md5.endswith(".dir"):
                for base in (cache, remote):
                    listing = _object_path(base, md5)
                    if listing.exists():
                        live.update(e["md5"] for e in json.loads(listing.read_text()))
                        break
    return live


def _object_path(base: Path, md5: str) -> Path:
    return base / "files" / "md5" / md5[:2] / md5[2:]


def _objects(base: Path) -> Iterator[tuple[str, Path]]:
    root = base / "files" / "md5"
    if not root.exists():
        return
    for d in root.iterdir():
        if d.is_dir():
            for f in d.iterdir():
                yield d.name + f.name, f


def _holds_ids(data: bytes, ids: set[str]) -> bool:
    """A Parquet object whose id columns (subject, doc, sample, origin event) name any of `ids`."""
    if not ids or data[:4] != b"PAR1":
        return False
    try:
        f = pq.ParquetFile(io.BytesIO(data))
        cols = [c for c in (*ID_COLUMNS, "parent_ids", "subject_ids") if c in f.schema_arrow.names]
        if not cols:
            return False
        t = f.read(columns=cols)
    except Exception:  # noqa: BLE001
        return False
    values = pa.array(sorted(ids), pa.string())
    return bool(_id_hits(t, values, cols).true_count)


def _id_hits(t: pa.Table, values: pa.Array, cols: Sequence[str]) -> pa.Array:
    """Per row: does any id column (or any parent id) name one of `values`?"""
    hit = pa.array([False] * t.num_rows, pa.bool_())
    for c in cols:
        col = t.column(c)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            flat = pc.list_flatten(col)
            parents = pc.list_parent_indices(col)
            rows = pc.unique(pc.filter(parents, pc.fill_null(pc.is_in(flat.cast(pa.string()), values), False)))
            mask = pc.is_in(pa.array(range(t.num_rows), pa.int64()), rows.cast(pa.int64()))
        else:
            mask = pc.fill_null(pc.is_in(col.cast(pa.string()), values), False)
        hit = pc.or_(hit, mask)
    return hit.combine_chunks() if isinstance(hit, pa.ChunkedArray) else hit


def purge_dvc(paths: Paths, *, versions: Iterable[str], ids: set[str], rx: re.Pattern[bytes] | None) -> dict[str, Any]:
    """Delete every DVC object (cache and remote) not referenced by a live version that belongs to an
    affected version (`versions`: directory hashes) or holds the subject (ids in a Parquet id column,
    or a fingerprint in its bytes); then every directory listing that names a deleted object."""
    cache, remote = paths.dvc_repo / ".dvc" / "cache", paths.home / "dvc-remote"
    live = live_hashes(paths.dvc_repo, cache, remote)
    doomed: set[str] = set()
    scanned = 0
    listings: dict[str, list[str]] = {}
    for base in (cache, remote):
        for md5, p in _objects(base):
            if md5.endswith(".dir"):
                try:
                    listings.setdefault(md5, [e["md5"] for e in json.loads(p.read_text())])
                except (OSError, ValueError):
                    pass
    for v in versions:
        if v and v not in live:
            doomed.add(v)
            doomed.update(h for h in listings.get(v, []) if h not in live)
    live_hits: set[str] = set()
    for base in (cache, remote):
        for md5, p in _objects(base):
            if md5.endswith(".dir") or md5 in doomed:
                continue
            scanned += 1
            data = p.read_bytes()
            if _holds_ids(data, ids) or (rx is not None and holds_any(data, rx)):
                (live_hits if md5 in live else doomed).add(md5)
    for md5, entries in listings.items():
        if md5 not in live and doomed.intersection(entries):
            doomed.add(md5)
    from flywheel.versioning import DvcRepo

    removed = DvcRepo(paths.dvc_repo, remote).purge(sorted(doomed))
    return {"objects_scanned": scanned, "objects_purged": len(doomed), "removed": removed,
            "live_objects_holding_subject": sorted(live_hits)}


# --------------------------------------------------------------------------------------------------------
# Production-log files, MLflow, Dagster storage


def scrub_landing(paths: Paths, pseudonymize: Callable[[str], str], subject_ids: set[str]) -> dict[str, int]:
    """Rewrite landing files (JSONL, optionally gzip) without the subjects' lines (atomically)."""
    found = files = 0
    for p in sorted(paths.landing.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        raw = p.read_bytes()
        gz = raw[:2] == b"\x1f\x8b"
        try:
            text = gzip.decompress(raw) if gz else raw
        except Exception:  # noqa: BLE001, S112 - not a log file we can read
            continue
        kept, dropped = [], 0
        for line in text.splitlines(keepends=True):
            try:
                rec = json.loads(line)
                uid = rec.get("user_id") if isinstance(rec, dict) else None
            except ValueError:
                uid = None
            if uid is not None and pseudonymize(str(uid)) in subject_ids:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            body = b"".join(kept)
            tmp = p.with_name(f".{p.name}.erasure-tmp")
            tmp.write_bytes(gzip.compress(body, mtime=0) if gz else body)
            os.replace(tmp, p)
            found += dropped
            files += 1
    return {"found": found, "removed": found, "files_rewritten": files}


def mlflow_cleanup(paths: Paths, *, run_ids: Iterable[str], rx: re.Pattern[bytes] | None) -> dict[str, Any]:
    """Delete MLflow runs whose artifacts hold the subject (plus `run_ids`), then `mlflow gc` them."""
    db = paths.home / "mlflow.db"
    if not db.exists():
        return {"runs_found": 0, "runs_deleted": 0}
    from models.registry import Tracking

    tracking = Tracking.local(paths.home)
    doomed = set(run_ids)
    art = paths.home / "mlartifacts"
    if rx is not None and art.exists():
        run_re = re.compile(r"[0-9a-f]{32}")
        for run_dir in [*art.glob("*"), *art.glob("*/*")]:  # <run>/artifacts or <experiment>/<run>/artifacts
            if not run_re.fullmatch(run_dir.name) or not (run_dir / "artifacts").is_dir():
                continue
            for f in (run_dir / "artifacts").rglob("*"):
                if f.is_file() and holds_any(f.read_bytes(), rx):
                    doomed.add(run_dir.name)
                    break
    deleted = []
    for rid in sorted(doomed):
        try:
            tracking.client.delete_run(rid)
            deleted.append(rid)
        except Exception:  # noqa: BLE001, S112 - a run that is not in this store
            continue
    gc = {"returncode": None}
    if deleted:
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.uri}
        cmd = [str(Path(sys.executable).parent / "mlflow"), "gc", "--backend-store-uri", tracking.uri,
               "--run-ids", ",".join(deleted)]
        r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
        gc = {"returncode": r.returncode, "stderr_tail": r.stderr[-400:] if r.returncode else ""}
        for rid in deleted:  # gc empties a run's artifact directory; leave no empty shell named by it
            for d in sorted(art.rglob(rid), key=lambda x: len(x.parts), reverse=True):
                if d.is_dir() and not any(f.is_file() for f in d.rglob("*")):
                    shutil.rmtree(d, ignore_errors=True)
        _vacuum(db)
    return {"runs_found": len(doomed), "runs_deleted": len(deleted), "gc": gc}


def _vacuum(db: Path) -> None:
    con = sqlite3.connect(db, timeout=60)
    try:
        con.execute("VACUUM")
    finally:
        con.close()


def dagster_runs_holding(dagster_home: Path, rx: re.Pattern[bytes] | None) -> set[str]:
    """Dagster runs whose event log (per-run or index SQLite) or compute logs hold the subject."""
    runs: set[str] = set()
    if rx is None or not dagster_home.exists():
        return runs
    uuid_re = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    for p in dagster_home.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(dagster_home)
        run_part = next((part for part in rel.parts if uuid_re.fullmatch(part.removesuffix(".db"))), None)
        data = p.read_bytes()
        if data[:16] == b"SQLite format 3\x00" and run_part is None:
            runs |= _sqlite_run_ids_with(p, rx)
        elif run_part is not None:
            values = _sqlite_values(p) if data[:16] == b"SQLite format 3\x00" else None
            if holds_any(data, rx) or (values is not None and rx.search(values)):
                runs.add(run_part.removesuffix(".db"))
    return runs


def _sqlite_run_ids_with(path: Path, rx: re.Pattern[bytes]) -> set[str]:
    out: set[str] = set()
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return out
    try:
        for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            cols = [r[1] for r in con.execute(f'PRAGMA table_info("{t}")').fetchall()]
            if "run_id" not in cols:
                continue
            for row in con.execute(f'SELECT * FROM "{t}"'):
                blob = b"\x00".join(v.encode("utf-8", "replace") if isinstance(v, str) else v
                                    for v in row if isinstance(v, str | bytes))
                if rx.search(blob):
                    out.add(row[cols.index("run_id")])
    except sqlite3.Error:
        pass
    finally:
        con.close()
    return out


def vacuum_sqlite_under(directory: Path) -> int:
    """VACUUM every SQLite database under a directory (freed pages keep deleted rows' bytes)."""
    n = 0
    for p in directory.rglob("*.db"):
        try:
            if p.read_bytes()[:16] == b"SQLite format 3\x00":
                _vacuum(p)
                n += 1
        except (OSError, sqlite3.Error):
            continue
    return n


# --------------------------------------------------------------------------------------------------------
# Tokenizer and checkpoints


def tokenizer_learned_from(tokenizer_json: Path, subject_texts: Iterable[str], remaining_texts: Iterable[str], *,
                           min_frequency: int = 2, min_chars: int = 4) -> list[str]:
    """Vocabulary entries the tokenizer can only have learned from the subject: they occur in the
    subject's texts and fewer than `min_frequency` times in the texts that remain after erasure."""
    if not tokenizer_json.exists():
        return []
    vocab = json.loads(tokenizer_json.read_text()).get("model", {}).get("vocab", {})
    decode = _byte_level_decoder()
    subject = "\n".join(subject_texts)
    if not subject:
        return []
    remaining = "\n".join(remaining_texts)
    learned = []
    for token in vocab:
        s = decode(token).strip()
        if len(s) < min_chars or s not in subject:
            continue
        if remaining.count(s) < min_frequency:
            learned.append(s)
    return sorted(set(learned))


def _byte_level_decoder() -> Callable[[str], str]:
    """GPT-2 byte-level alphabet back to text (the BPE vocab stores bytes as printable characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = {chr(c): b for b, c in zip(bs, cs, strict=True)}

    def decode(token: str) -> str:
        if any(ch not in table for ch in token):
            return token
        return bytes(table[ch] for ch in token).decode("utf-8", errors="replace")

    return decode


def taint_checkpoints(store: EventStore, plan: Mapping[str, Any], request_id: str) -> list[dict[str, Any]]:
    """`CheckpointTainted` per model version in the plan (idempotent per request and version)."""
    from warehouse.events import CheckpointTainted
    from warehouse.store import NewEvent

    events, out = [], []
    now = datetime.now(UTC)
    seen = set()
    for c in plan.get("checkpoints", []):
        if not c.get("model_name") or c.get("model_version") is None:
            continue
        key = (c["model_name"], str(c["model_version"]))
        if key in seen:
            continue
        seen.add(key)
        reason = f"trained on erased data ({c.get('via', 'direct')}, stage {c.get('stage')})"
        events.append(NewEvent(CheckpointTainted(model_name=key[0], model_version=key[1], request_id=request_id,
                                                 reason=reason),
                               stream_id=f"model-{key[0]}-{key[1]}", occurred_at=now,
                               event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"tainted:{request_id}:{key[0]}:{key[1]}"))))
        out.append({"model_name": key[0], "model_version": key[1], "stage": c.get("stage"), "via": c.get("via")})
    if events:
        store.append(events)
    return out


def tainted_versions(store: EventStore, model: str) -> set[str]:
    with store.connect() as con:
        rows = con.execute("SELECT DISTINCT payload->>'model_version' FROM events WHERE type = 'CheckpointTainted' "
                           "AND payload->>'model_name' = ?", [model]).fetchall()
    return {r[0] for r in rows}


def guard_champion(store: EventStore, paths: Paths, models: Iterable[str], request_id: str) -> list[dict[str, Any]]:
    """Never leave a tainted champion serving: promote (audited, forced, actor "erasure") the latest
    untainted earlier champion, else withdraw the alias. An explicit override — a later forced
    `ModelPromoted` of the tainted version by a person — is respected by later runs, not undone here."""
    from models.promotion import ledger, promote
    from models.registry import Tracking

    out = []
    tracking = None
    for model in sorted(set(models)):
        state = ledger(store, model)
        tainted = tainted_versions(store, model)
        if state.champion is None or state.champion not in tainted:
            out.append({"model": model, "champion": state.champion, "action": "none"})
            continue
        tracking = tracking or Tracking.local(paths.home)
        clean = [v for v in state.history if v not in tainted]
        if clean:
            promote(store, tracking, model, clean[-1], None, forced=True, actor="erasure",
                    reason=f"champion {state.champion} tainted by erasure {request_id}", expected_version=state.version)
            out.append({"model": model, "champion": state.champion, "action": "replaced", "by": clean[-1]})
        else:
            tracking.delete_alias(model, "champion")
            out.append({"model": model, "champion": state.champion, "action": "alias_withdrawn"})
    return out


def removable_tainted_versions(store: EventStore, paths: Paths, model: str) -> list[str]:
    """Tainted versions that may leave the registry: a clean (untainted) champion has been promoted,
    and the version is neither the champion nor behind another alias."""
    from models.promotion import ledger
    from models.registry import Tracking

    champion = ledger(store, model).champion
    tainted = tainted_versions(store, model)
    if champion is None or champion in tainted or not tainted:
        return []
    tracking = Tracking.local(paths.home)
    aliased = {ref.version for a in ("champion", "challenger") if (ref := tracking.alias(model, a)) is not None}
    registered = {v.version for v in tracking.versions(model)}
    return sorted((v for v in tainted if v in registered and v not in aliased), key=lambda v: (len(v), v))


def promotions_after(store: EventStore, after_position: int) -> list[dict[str, Any]]:
    """`ModelPromoted` events after a log position (the registry-cleanup sensor's query)."""
    with store.connect() as con:
        rows = con.execute("SELECT position, event_id::VARCHAR, payload->>'model_name', payload->>'model_version' "
                           "FROM events WHERE type = 'ModelPromoted' AND position > ? ORDER BY position",
                           [after_position]).fetchall()
    return [{"position": p, "event_id": e, "model": m, "version": v} for p, e, m, v in rows]


def remove_tainted_versions(store: EventStore, paths: Paths, model: str) -> dict[str, Any]:
    """Once a clean successor is champion: delete the tainted versions from the registry, their MLflow
    runs (then `mlflow gc`) and their checkpoint versions from the DVC cache and remote (objects a live
    version still references are kept)."""
    from models.registry import Tracking

    versions = removable_tainted_versions(store, paths, model)
    if not versions:
        return {"model": model, "removed_versions": [], "runs_deleted": 0, "dvc": {}}
    tracking = Tracking.local(paths.home)
    run_ids = []
    for v in versions:
        ref = tracking.version(model, v)
        if ref.run_id:
            run_ids.append(ref.run_id)
        tracking.client.delete_model_version(model, v)
    with store.connect() as con:
        md5s = [r[0] for r in con.execute(
            "SELECT DISTINCT payload->>'checkpoint_md5' FROM events WHERE type = 'CheckpointTrained' AND "
            "payload->>'model_name' = $m AND payload->>'model_version' IN (SELECT unnest($v::VARCHAR[]))",
            {"m": model, "v": versions}).fetchall() if r[0]]
    ml = mlflow_cleanup(paths, run_ids=run_ids, rx=None)
    dvc = purge_dvc(paths, versions=md5s, ids=set(), rx=None)
    return {"model": model, "removed_versions": versions, "runs_deleted": ml["runs_deleted"],
            "gc": ml.get("gc"), "dvc": {k: v for k, v in dvc.items() if k != "live_objects_holding_subject"}}


# --------------------------------------------------------------------------------------------------------
# The erasure job


@dataclass
class ErasureHooks:
    """What the erasure needs from the orchestrator. Each may be None (the step is then reported as
    skipped). `rematerialize_partitions(sources)` rebuilds raw → clean → dedup for each source;
    `rematerialize_assets(names)` rebuilds named unpartitioned assets in order; `delete_runs(ids)`
    deletes orchestrator runs (event logs and compute logs); `current_run_id` is never deleted."""

    rematerialize_partitions: Callable[[list[str]], Any] | None = None
    rematerialize_assets: Callable[[list[str]], Any] | None = None
    delete_runs: Callable[[list[str]], int] | None = None
    current_run_id: str | None = None
    exclude_from_scan: list[Path] = field(default_factory=list)


def _data_root(paths: Paths) -> Path:
    from flywheel.config import Config

    configured = os.environ.get("FLYWHEEL_DATA_ROOT") or Config.load().section("curation").get("data_root")
    return Path(configured).expanduser().resolve() if configured else paths.home / "demo-data"


def _live_dataset_holds(paths: Paths, rel: str, ids: set[str], rx: re.Pattern[bytes] | None) -> bool:
    d = paths.dvc_repo / rel
    if not d.exists():
        return False
    for f in d.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            if _holds_ids(data, ids) or (rx is not None and holds_any(data, rx)):
                return True
    return False


def filter_dataset(paths: Paths, rel: str, ids: set[str]) -> int:
    """Rewrite a DVC-tracked dataset directory without the rows naming `ids` (in an id column or in
    `parent_ids`), and track the result as a new version; returns the rows removed. For derived sets
    that cannot be regenerated cheaply (synthetic samples need the teacher)."""
    from flywheel.shards import write_parquet_atomic
    from flywheel.versioning import DvcRepo

    d = paths.dvc_repo / rel
    if not d.exists() or not ids:
        return 0
    values = pa.array(sorted(ids), pa.string())
    removed = 0
    for f in sorted(d.rglob("*.parquet")):
        t = pq.read_table(f)
        cols = [c for c in (*ID_COLUMNS, "parent_ids", "subject_ids") if c in t.column_names]
        if not cols:
            continue
        hit = _id_hits(t, values, cols)
        if hit.true_count:
            write_parquet_atomic(t.filter(pc.invert(hit)), f)
            removed += hit.true_count
    if removed and d.with_name(d.name + ".dvc").exists():
        DvcRepo.open(paths.dvc_repo, remote=paths.home / "dvc-remote").track(d)
    return removed


def _mixture_texts(paths: Paths) -> list[str]:
    f = paths.dvc_repo / "mixtures" / "current" / "mixture.parquet"
    return [t for t in pq.read_table(f, columns=["text"]).column("text").to_pylist() if t] if f.exists() else []


def _all_sources(paths: Paths) -> list[str]:
    raw = paths.dvc_repo / "shards" / "raw"
    return sorted(p.name for p in raw.iterdir() if p.is_dir()) if raw.exists() else []


def _current_texts(paths: Paths, sources: Iterable[str]) -> str:
    """The text, title and metadata of the remaining documents of `sources`: a string of the subject's
    that someone else's remaining document also contains (a quotation) is theirs too and is left."""
    out = []
    for s in sources:
        f = paths.dvc_repo / "shards" / "raw" / s / "part-00000.parquet"
        if f.exists():
            t = pq.read_table(f)
            for c in ("text", "title", "meta"):
                if c in t.column_names:
                    out += [str(x) for x in t.column(c).to_pylist() if x]
    return "\n".join(out)


def merge_plans(plans: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One erasure plan for several subject ids of the same person (counts summed, lists joined)."""
    counts: dict[str, int] = {}
    for p in plans:
        for k, v in p["counts"].items():
            counts[k] = counts.get(k, 0) + v
    joined = {k: [x for p in plans for x in p[k]] for k in ("near_duplicates", "rematerialize", "shard_versions",
                                                             "documents", "synthetic", "checkpoints")}
    return {**joined, "counts": counts, "quarantine_rows": sum(p["quarantine_rows"] for p in plans),
            "dvc_versions": list(dict.fromkeys(v for p in plans for v in p["dvc_versions"])),
            "events": {"event_ids": [e for p in plans for e in p["events"]["event_ids"]]}}


def run_erasure(store: EventStore, paths: Paths, subject_ids: str | Sequence[str], request_id: str, *,
                hooks: ErasureHooks | None = None, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Erase a person (one or more subject ids: their identifiers in different sources) everywhere
    lineage reaches; append `ErasureCompleted` per subject id; return the receipt.

    Idempotent: a second run for the same request finds nothing left to remove and receipts that."""
    from flywheel.config import Config
    from warehouse.events import ErasureCompleted
    from warehouse.lineage import erasure_plan
    from warehouse.projections import rebuild
    from warehouse.store import NewEvent

    subjects = [subject_ids] if isinstance(subject_ids, str) else list(dict.fromkeys(subject_ids))
    hooks = hooks or ErasureHooks()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: list[float] = [t0]) -> None:  # noqa: B006 - a running clock
        now = time.perf_counter()
        timings[name] = round(now - since[0], 3)
        since[0] = now

    plan = merge_plans([erasure_plan(store, paths.home, s) for s in subjects])
    lap("plan")
    fp: dict[str, set[str]] = {}
    for s in subjects:
        for k, v in subject_fingerprints(store, paths, s).items():
            fp[k] = fp.get(k, set()) | v
    lap("fingerprints")
    log(f"erasure {request_id}: {plan['counts']}")

    receipt: dict[str, Any] = {"request_id": request_id, "subject_ids": subjects, "plan_counts": plan["counts"],
                               "stores": {}}
    stores = receipt["stores"]

    existed = sum(bool(store.shred_subject(s, request_id)) for s in subjects)
    stores["keystore"] = {"found": existed, "removed": existed, "tombstones": len(subjects)}
    stores["events"] = {"found": plan["counts"]["events"], "removed": 0,
                        "crypto_shredded": plan["counts"]["events"], "quarantine_rows_shredded": plan["quarantine_rows"]}
    lap("shred")

    members = [{"doc_id": d["doc_id"], "source": d.get("source"), "request_id": request_id, "reason": "near_duplicate"}
               for d in plan["near_duplicates"] if d.get("doc_id")]
    receipt["erased_documents_added"] = add_erased_documents(paths, members)

    sources = sorted({p["source"] for p in plan["rematerialize"] if p["stage"] in CURATION_STAGES})
    shard_store = {"found": len(plan["shard_versions"]), "partitions": sources, "removed": 0,
                   "other_partitions": sorted({f"{p['stage']}/{p['source']}" for p in plan["rematerialize"]
                                               if p["stage"] not in CURATION_STAGES})}
    if sources and hooks.rematerialize_partitions is not None:
        hooks.rematerialize_partitions(sources)
        shard_store["removed"] = len(plan["shard_versions"])
    elif sources:
        shard_store["skipped"] = "no rematerialize_partitions hook"
    stores["shards"] = shard_store
    lap("rematerialize_partitions")

    # Strings that other people's remaining documents also contain are not the subject's own.
    shared_text = _current_texts(paths, _all_sources(paths))
    candidates = set().union(*fp.values())
    needles = sorted((n for n in candidates if n not in shared_text), key=len, reverse=True)[:MAX_NEEDLES]
    rx = _needle_regex(needles)
    ids = set(subjects) | {d["doc_id"] for d in plan["documents"]} | {m["doc_id"] for m in members} \
        | {c["sample_id"] for c in plan["synthetic"] if c.get("sample_id")} \
        | {s for v in plan["shard_versions"] for s in v.get("samples", [])} | set(plan["events"]["event_ids"])

    rebuilt = [name for rel, name in DERIVED_DATASETS.items() if _live_dataset_holds(paths, rel, ids, rx)]
    if rebuilt and hooks.rematerialize_assets is not None:
        hooks.rematerialize_assets(rebuilt)
    filtered = {rel: filter_dataset(paths, rel, ids) for rel in FILTERED_DATASETS}
    stores["datasets"] = {"found": len(rebuilt) + sum(1 for n in filtered.values() if n),
                          "removed": (len(rebuilt) if hooks.rematerialize_assets else 0)
                          + sum(1 for n in filtered.values() if n),
                          "rebuilt": rebuilt, "rows_filtered": {k: v for k, v in filtered.items() if v}}
    lap("rematerialize_datasets")

    tok_cfg = Config.load().section("tokenizer")
    tok_json = paths.dvc_repo / "tokenizers" / "current" / "tokenizer.json"
    learned = tokenizer_learned_from(tok_json, sorted(candidates), _mixture_texts(paths),
                                     min_frequency=int(tok_cfg.get("min_frequency", 2)))
    retrained = False
    if learned and hooks.rematerialize_assets is not None:
        hooks.rematerialize_assets(["tokenizer"])
        retrained = True
    stores["tokenizers"] = {"found": len(learned), "removed": len(learned) if retrained else 0, "retrained": retrained,
                            "checked": tok_json.exists()}
    if learned:
        rx = _needle_regex(needles + [t for t in learned if len(t) >= 8]) or rx
    lap("tokenizer")

    receipt["projections"] = rebuild(store)
    lap("projections")

    dvc = purge_dvc(paths, versions=plan["dvc_versions"], ids=ids, rx=rx)
    stores["dvc_cache"] = {"found": dvc["objects_purged"], "removed": dvc["removed"]["cache"]}
    stores["dvc_remote"] = {"found": dvc["objects_purged"], "removed": dvc["removed"]["remote"],
                            "live_objects_referencing_subject_ids": len(dvc["live_objects_holding_subject"])}
    lap("dvc_purge")

    stores["logs"] = scrub_landing(paths, store.keys.pseudonymize, set(subjects))
    lap("landing")

    ml = mlflow_cleanup(paths, run_ids=[], rx=rx)
    stores["mlflow"] = {"found": ml["runs_found"], "removed": ml["runs_deleted"], "gc": ml.get("gc")}
    lap("mlflow")

    dag_home = paths.dagster_home
    runs = sorted(dagster_runs_holding(dag_home, rx) - {hooks.current_run_id})
    deleted = 0
    if runs and hooks.delete_runs is not None:
        deleted = hooks.delete_runs(runs)
        for r in runs:  # compute logs of a deleted run, wherever the local manager put them
            for d in dag_home.rglob(r):
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
                elif d.is_file():
                    d.unlink(missing_ok=True)
        vacuum_sqlite_under(dag_home)
    stores["dagster"] = {"found": len(runs), "removed": deleted}
    lap("dagster")

    tainted = taint_checkpoints(store, plan, request_id)
    champions = guard_champion(store, paths, {t["model_name"] for t in tainted}, request_id) if tainted else []
    stores["checkpoints"] = {"found": len(plan["checkpoints"]), "tainted": len(tainted), "removed": 0,
                             "retrain_requested": bool(tainted), "champions": champions}
    receipt["tainted"] = tainted
    lap("taint")

    store.checkpoint()
    scan = scan_stores(paths.home, needles + [t for t in learned if len(t) >= 8],
                       exclude=[_data_root(paths), *hooks.exclude_from_scan], store=store)
    receipt["verification"] = {
        "needles": scan["needles"], "clean": scan["clean"], "hits": scan["hits"],
        "stores": {k: {"files": v["files"], "bytes": v["bytes"], "hits": len(v["hits"])} for k, v in scan["stores"].items()},
        "hit_paths": [h["path"] for v in scan["stores"].values() for h in v["hits"]][:50],
        "not_scanned": ["the source corpora under the data root (upstream input; the read step drops the subject)"],
    }
    lap("verify")
    receipt["timings_s"] = timings
    receipt["wall_s"] = round(time.perf_counter() - t0, 3)
    completed = ErasureCompleted(request_id=request_id, receipt=_json_safe(receipt), verified=bool(scan["clean"]))
    stamp = time.time_ns()
    store.append([NewEvent(completed, stream_id=f"subject-{s}", occurred_at=datetime.now(UTC), subject_id=s,
                           event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"erasure-completed:{request_id}:{s}:{stamp}")))
                  for s in subjects])
    from warehouse.projections import catch_up

    catch_up(store)
    store.checkpoint()
    log(f"erasure {request_id}: verified={scan['clean']} in {receipt['wall_s']} s")
    return _json_safe(receipt)


def _json_safe(obj: Any) -> Any:
    from warehouse.lineage import json_safe

    return json_safe(obj)


# --------------------------------------------------------------------------------------------------------
# Retention


def retention_settings() -> dict[str, Any]:
    from flywheel.config import Config

    return Config.load().section("retention")


def source_retention_days(settings: Mapping[str, Any]) -> dict[str, int]:
    """Days per source: `[retention.sources]`, else the sources config's `retention_days`."""
    days: dict[str, int] = {}
    try:
        from flywheel.curation.sources import load_sources
        from warehouse.access import _sources_file

        for s in load_sources(_sources_file(), Path("/nonexistent"), allow_missing=True):
            if getattr(s, "retention_days", None):
                days[s.name] = int(s.retention_days)
    except Exception:  # noqa: BLE001, S110 - no sources config: only explicit windows apply
        pass
    days.update({k: int(v) for k, v in dict(settings.get("sources", {})).items() if v})
    return days


def expired_subjects(store: EventStore, days: int, now: datetime | None = None) -> list[str]:
    """Production-log subjects whose last event is older than the window and who are not shredded."""
    if not days:
        return []
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    with store.connect() as con:
        rows = con.execute(
            "SELECT subject_id FROM events WHERE subject_id IS NOT NULL AND type IN ('InteractionLogged', 'FeedbackGiven') "
            "GROUP BY subject_id HAVING max(occurred_at) < ? ORDER BY subject_id", [cutoff],
        ).fetchall()
    shredded = store.keys.shredded_subjects()
    return [r[0] for r in rows if r[0] not in shredded]


def expired_documents(paths: Paths, days_by_source: Mapping[str, int], now: datetime | None = None) -> list[dict[str, Any]]:
    """Documents of the current raw shards created before their source's retention window."""
    now = now or datetime.now(UTC)
    out = []
    for source, days in sorted(days_by_source.items()):
        f = paths.dvc_repo / "shards" / "raw" / source / "part-00000.parquet"
        if not f.exists() or not days:
            continue
        t = pq.read_table(f, columns=["doc_id", "created_at"])
        cutoff = pa.scalar(now - timedelta(days=days), pa.timestamp("us", tz="UTC"))
        old = t.filter(pc.fill_null(pc.less(t.column("created_at"), cutoff), False))
        out += [{"doc_id": d, "source": source} for d in old.column("doc_id").to_pylist()]
    return out


def apply_retention(store: EventStore, paths: Paths, *, hooks: ErasureHooks | None = None,
                    now: datetime | None = None) -> dict[str, Any]:
    """Expire data past its window through the erasure machinery: subjects → ErasureRequested (the
    sensor runs the erasure job), documents → erased list, partitions re-materialized, old versions
    purged. Returns what was expired."""
    settings = retention_settings()
    hooks = hooks or ErasureHooks()
    now = now or datetime.now(UTC)
    run_id = f"retention-{now:%Y%m%d}"
    subjects = expired_subjects(store, int(settings.get("production_logs_days", 0) or 0), now)
    requests = [request_erasure(store, s, reason="retention", requested_by="retention schedule",
                                request_id=f"{run_id}-{s[:12]}") for s in subjects]
    docs = expired_documents(paths, source_retention_days(settings), now)
    added = add_erased_documents(paths, [{**d, "request_id": run_id, "reason": "retention"} for d in docs])
    sources = sorted({d["source"] for d in docs})
    purged: dict[str, Any] = {}
    if added and hooks.rematerialize_partitions is not None:
        versions = _shard_versions_of(store, sources)
        hooks.rematerialize_partitions(sources)
        ids = {d["doc_id"] for d in docs}
        rebuilt = [name for rel, name in DERIVED_DATASETS.items() if _live_dataset_holds(paths, rel, ids, None)]
        for rel in FILTERED_DATASETS:
            filter_dataset(paths, rel, ids)
        if rebuilt and hooks.rematerialize_assets is not None:
            hooks.rematerialize_assets(rebuilt)
        purged = purge_dvc(paths, versions=versions, ids=ids, rx=None)
    return {"subjects": len(subjects), "erasure_requests": [r["request_id"] for r in requests],
            "documents": len(docs), "documents_added": added, "partitions": sources,
            "dvc": {k: v for k, v in purged.items() if k != "live_objects_holding_subject"}}


def _shard_versions_of(store: EventStore, sources: Sequence[str]) -> list[str]:
    if not sources:
        return []
    with store.connect() as con:
        rows = con.execute("SELECT DISTINCT payload->>'dvc_md5' FROM events WHERE type = 'ShardMaterialized' "
                           "AND payload->>'source' IN (SELECT unnest($s::VARCHAR[]))", {"s": list(sources)}).fetchall()
    return [r[0] for r in rows if r[0]]
