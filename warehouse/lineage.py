"""Lineage queries: from a sample, a model or a data subject to everything their data reached.

    with_sample = lineage_sample(store, home, "3f9c…")        # sample id, document id or event id
    model = lineage_model(store, home, "tiny-llm", "3", allowed_licenses=["CC0-1.0", ...])
    subject = lineage_subject(store, home, subject_id)
    plan = erasure_plan(store, home, subject_id)              # step 2 of erasure: every affected item
    console.print(render_table(subject))

The lineage graph is not a table of its own: it is read from what the system already records.

- **events** (`warehouse.duckdb`): `InteractionLogged`/`FeedbackGiven` carry the subject; one
  `ShardMaterialized` per shard version (stage, source, DVC md5, the path of a per-version copy of the
  shard's manifest); one `CheckpointTrained` per checkpoint (stage, model name and registry version,
  parent model version, the path of its *inputs manifest* — every sample it trained on with the shard
  version it came from); one `EvalScored` per (model version, suite) with a per-item Parquet.
- **manifests** (Parquet): shard manifests (`sample_id, doc_id, source, license, subject_id,
  origin_event_id, parent_ids`) and checkpoint inputs manifests (the same plus `shard_stage,
  shard_source, shard_md5`); `subject_ids` is read when a manifest has it (synthetic samples).
- **exclusions** (`$FLYWHEEL_HOME/dvc/exclusions/<stage>/<source>/excluded.parquet`): dropped
  documents with a reason; near-duplicates name the document they duplicate (`detail.kept_doc_id`).

Which files exist is read from the events (no blind globbing); every query is parameterized DuckDB
SQL over `events` and `read_parquet([...])` run inside one `EventStore.connect()` (the store's lock:
one process at a time), with no Python loop over events or manifest rows.

Lookups go through the **lineage index** (`$FLYWHEEL_HOME/lineage/index/`): per manifest, a sidecar
sorted by key (doc, sample, subject, origin event, parent id) and per sealed span of 2^19 log
positions, a sidecar of (subject, position, event) sorted by subject — small row groups with min/max
statistics and Bloom filters on the key, so DuckDB reads one row group per file that holds the key.
Manifests and sealed spans never change, so a sidecar is written once; queries build missing ones
(`build_lineage_index` does it ahead of time) and read the unsealed tail of the log directly.

Checkpoint chains (pretrain → SFT → DPO) follow `parent_model_version`: `"NAME/VERSION"` or
`"NAME@VERSION"` names a model version, a bare `"VERSION"` is one of the same model name (else of the
only model that has it), and a checkpoint path names that checkpoint. A model trained from a
checkpoint that saw a sample saw it too (`via: "parent"`).

Every result is a plain dict that serializes to JSON (`json.dumps(result)`); `render_table` shows one
in the terminal. See docs/lineage.md for the output formats and measured latencies.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import orjson
import pyarrow as pa

if TYPE_CHECKING:
    from rich.table import Table

    from warehouse.store import EventStore

SHARD_STAGES = ("raw", "clean", "dedup")
CHECKPOINT_STAGES = ("pretrain", "sft", "dpo")
LINEAGE_EVENT_TYPES = ("ShardMaterialized", "CheckpointTrained", "EvalScored")
IN_LIST_MAX = 2048  # row numbers per file fetched with a constant IN list (pushed down); more: a join

# Columns a manifest row may carry, with their DuckDB types. Absent ones read as NULL, so shard and
# checkpoint manifests (and older manifests without a column) go through one scan.
MANIFEST_FIELDS: dict[str, str] = {
    "sample_id": "VARCHAR",
    "doc_id": "VARCHAR",
    "source": "VARCHAR",
    "license": "VARCHAR",
    "subject_id": "VARCHAR",
    "origin_event_id": "VARCHAR",
    "parent_ids": "VARCHAR[]",
    "subject_ids": "VARCHAR[]",
    "shard_stage": "VARCHAR",
    "shard_source": "VARCHAR",
    "shard_md5": "VARCHAR",
}
EXCLUSION_FIELDS: dict[str, str] = {
    "doc_id": "VARCHAR",
    "source": "VARCHAR",
    "license": "VARCHAR",
    "subject_id": "VARCHAR",
    "stage": "VARCHAR",
    "reason": "VARCHAR",
    "detail": "VARCHAR",
}
EVAL_ITEM_FIELDS: dict[str, str] = {
    "suite": "VARCHAR",
    "slice": "VARCHAR",
    "item_id": "VARCHAR",
    "metric": "VARCHAR",
    "value": "DOUBLE",
    "correct": "BOOLEAN",
}


# --------------------------------------------------------------------------------------------------------
# The catalog: the few lineage events (one per shard version, checkpoint and eval run)


@dataclass(frozen=True)
class Catalog:
    """Shard versions, checkpoints and eval runs as recorded in the log, in position order."""

    home: Path
    shards: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    missing_files: list[str] = field(default_factory=list)  # named by an event, absent on disk

    @property
    def shard_manifests(self) -> list[str]:
        return _unique(s["manifest"] for s in self.shards if s["manifest_exists"])

    @property
    def input_manifests(self) -> list[str]:
        return _unique(c["inputs_manifest"] for c in self.checkpoints if c["manifest_exists"])

    def shard_versions_by_manifest(self) -> dict[str, dict[str, Any]]:
        """manifest path → the shard version it lists (first materialization; later ones counted)."""
        out: dict[str, dict[str, Any]] = {}
        for s in self.shards:
            if s["manifest"] in out:
                out[s["manifest"]]["materializations"] += 1
                out[s["manifest"]]["last_materialized_at"] = s["occurred_at"]
            else:
                out[s["manifest"]] = {**_shard_version(s), "materializations": 1, "last_materialized_at": s["occurred_at"]}
        return out

    def checkpoints_by_manifest(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for c in self.checkpoints:
            out[c["inputs_manifest"]].append(c)
        return out

    def current_shards(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(stage, source) → its latest materialization (the working copy under dvc/shards/)."""
        return {(s["stage"], s["source"]): s for s in self.shards}

    def exclusion_files(self) -> list[tuple[str, str, str]]:
        """(stage, source, path) of the exclusion files of every partition the log knows."""
        out = []
        for stage, source in sorted(self.current_shards(), key=lambda k: (_stage_rank(k[0]), k[1])):
            p = self.home / "dvc" / "exclusions" / stage / source / "excluded.parquet"
            if p.is_file():
                out.append((stage, source, str(p)))
        return out

    def parent(self, checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
        """The checkpoint this one was trained from (see the module docstring for the reference forms)."""
        ref = checkpoint.get("parent_model_version")
        if not ref:
            return None
        earlier = [c for c in self.checkpoints if c["position"] < checkpoint["position"]]
        by_path = [c for c in earlier if c["checkpoint_path"] == ref]
        if by_path:
            return by_path[-1]
        name, version = _split_ref(str(ref))
        if name is not None:
            hits = [c for c in earlier if c["model_name"] == name and c["model_version"] == version]
        else:
            hits = [c for c in earlier if c["model_name"] == checkpoint["model_name"] and c["model_version"] == version]
            if not hits:
                others = [c for c in earlier if c["model_version"] == version]
                hits = others if len({c["model_name"] for c in others}) == 1 else []
        return hits[-1] if hits else None

    def ancestors(self, checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The checkpoint and its parents, newest first (pretrain last)."""
        chain, seen = [dict(checkpoint)], {checkpoint["event_id"]}
        while (p := self.parent(chain[-1])) is not None and p["event_id"] not in seen:
            chain.append(p)
            seen.add(p["event_id"])
        return chain

    def descendants(self, event_ids: Iterable[str]) -> dict[str, str]:
        """event id → the event id of the checkpoint it inherits from, for every checkpoint trained
        (transitively) from one of `event_ids` (those themselves excluded)."""
        children: dict[str, list[str]] = defaultdict(list)
        for c in self.checkpoints:
            p = self.parent(c)
            if p is not None:
                children[p["event_id"]].append(c["event_id"])
        out: dict[str, str] = {}
        frontier = list(event_ids)
        start = set(frontier)
        while frontier:
            nxt = []
            for e in frontier:
                for child in children.get(e, ()):
                    if child not in out and child not in start:
                        out[child] = e
                        nxt.append(child)
            frontier = nxt
        return out

    def checkpoint(self, event_id: str) -> dict[str, Any]:
        return next(c for c in self.checkpoints if c["event_id"] == event_id)

    def find_model(self, model_name: str | None, version: str) -> dict[str, Any] | None:
        """The latest checkpoint registered as (model_name, version); model_name None: any name."""
        hits = [c for c in self.checkpoints if c["model_version"] == version
                and (model_name is None or c["model_name"] == model_name)]
        return hits[-1] if hits else None


def load_catalog(con: duckdb.DuckDBPyConnection, home: Path) -> Catalog:
    """Read every ShardMaterialized / CheckpointTrained / EvalScored event (a scan of `type` only)."""
    rows = con.execute(
        "SELECT position, event_id::VARCHAR, type, occurred_at, payload::VARCHAR FROM events "
        "WHERE type IN (SELECT unnest($types::VARCHAR[])) ORDER BY position",
        {"types": list(LINEAGE_EVENT_TYPES)},
    ).fetchall()
    home = Path(home)
    shards, checkpoints, evals, missing = [], [], [], []
    for position, event_id, type_, occurred_at, payload in rows:
        p = orjson.loads(payload)
        base = {"position": position, "event_id": event_id, "occurred_at": occurred_at}
        if type_ == "ShardMaterialized":
            manifest = _resolve(home, p.get("manifest"))
            exists = manifest is not None and os.path.isfile(manifest)
            if manifest and not exists:
                missing.append(manifest)
            shards.append({**base, "stage": p.get("stage"), "source": p.get("source"), "path": p.get("path"),
                           "dvc_md5": p.get("dvc_md5"), "content_digest": p.get("content_digest"),
                           "rows": p.get("rows"), "manifest": manifest, "manifest_exists": exists})
        elif type_ == "CheckpointTrained":
            manifest = _resolve(home, p.get("inputs_manifest"))
            exists = manifest is not None and os.path.isfile(manifest)
            if manifest and not exists:
                missing.append(manifest)
            checkpoints.append({**base, "stage": p.get("stage"), "model_name": p.get("model_name"),
                                "model_version": _str_or_none(p.get("model_version")),
                                "parent_model_version": _str_or_none(p.get("parent_model_version")),
                                "checkpoint_path": p.get("checkpoint_path"), "checkpoint_md5": p.get("checkpoint_md5"),
                                "inputs_manifest": manifest, "manifest_exists": exists, "samples": p.get("samples"),
                                "mlflow_run_id": p.get("mlflow_run_id")})
        else:
            items = _resolve(home, p.get("items_path"))
            exists = items is not None and os.path.isfile(items)
            if items and not exists:
                missing.append(items)
            evals.append({**base, "model_name": p.get("model_name"), "model_version": _str_or_none(p.get("model_version")),
                          "suite": p.get("suite"), "summary": p.get("summary"), "items_path": items,
                          "items_exist": exists, "contamination_check_passed": p.get("contamination_check_passed")})
    return Catalog(home, shards, checkpoints, evals, _unique(missing))


# --------------------------------------------------------------------------------------------------------
# SQL building blocks


@lru_cache(maxsize=4096)
def _parquet_columns(path: str, mtime_ns: int, size: int) -> frozenset[str]:
    import pyarrow.parquet as pq

    return frozenset(pq.read_schema(path).names)


def _columns(files: Sequence[str]) -> set[str]:
    """Union of the column names of Parquet files (footers cached per path, mtime and size)."""
    out: set[str] = set()
    for f in files:
        st = os.stat(f)
        out |= _parquet_columns(f, st.st_mtime_ns, st.st_size)
    return out


def normalized_parquet(files: Sequence[str], fields: Mapping[str, str]) -> str:
    """A subquery over `files` (the `$files` parameter) with exactly `fields` plus `file`; absent
    columns read as typed NULLs. Only names from `fields` (fixed in this module) reach the SQL text."""
    return f"(SELECT filename AS file, {_select_list(_columns(files), fields)} " \
           f"FROM read_parquet($files, filename = true, union_by_name = true))"


def _select_list(present: set[str] | frozenset[str], fields: Mapping[str, str]) -> str:
    return ", ".join(f'"{c}"::{t} AS "{c}"' if c in present else f'NULL::{t} AS "{c}"' for c, t in fields.items())


# A predicate: SQL over a Parquet file's own columns (values only as $parameters), and the columns it
# needs (a predicate on a column no file has cannot match and is skipped).
Predicate = tuple[str, tuple[str, ...]]
KEPT_DOC_ID = "CASE WHEN json_valid(detail) THEN json_extract_string(detail, '$.kept_doc_id') END"


def pred_eq(column: str, param: str) -> Predicate:
    return f'"{column}" = ${param}', (column,)


def pred_in(column: str, param: str) -> Predicate:
    return f'"{column}" IN (SELECT unnest(${param}::VARCHAR[]))', (column,)


def _locate(con: duckdb.DuckDBPyConnection, files: Sequence[str], predicates: Sequence[Predicate],
            params: Mapping[str, Any]) -> dict[str, list[int]]:
    """file → row numbers of the rows matching any predicate.

    Each predicate is a scan of its own (UNION ALL), returning only (file, row number): DuckDB
    pushes a single comparison into the Parquet reader and decodes just that column, where an OR
    over several columns, or selecting whole rows, decodes every projected column of every row —
    measured 3-6x slower on manifests whose ids are random 32-hex strings (docs/lineage.md).
    """
    present = _columns(files)
    usable = [sql for sql, cols in predicates if all(c in present for c in cols)]
    if not files or not usable:
        return {}
    scan = "SELECT filename AS file, file_row_number AS row FROM read_parquet($files, filename = true, " \
           "file_row_number = true, union_by_name = true) WHERE "
    sql = "SELECT DISTINCT file, row FROM (" + " UNION ALL ".join(scan + p for p in usable) + ") ORDER BY file, row"
    named = {m for p in usable for m in re.findall(r"\$(\w+)", p)}
    used = {k: v for k, v in params.items() if k in named}
    out: dict[str, list[int]] = defaultdict(list)
    for file, row in con.execute(sql, {"files": list(files), **used}).fetchall():
        out[file].append(row)
    return out


def _fetch(con: duckdb.DuckDBPyConnection, located: Mapping[str, Sequence[int]], fields: Mapping[str, str]) -> pa.Table:
    """The rows `_locate` found, with exactly `fields` plus `file` and `row`.

    One scan per file with its row numbers as a constant IN list, which DuckDB pushes into the reader
    so only the vectors holding those rows are decoded.
    """
    if not located:
        return _empty(fields)
    parts, params = [], []
    for file, rows in located.items():
        cols = _select_list(_columns([file]), fields)
        head = f"SELECT ?::VARCHAR AS file, file_row_number AS row, {cols} FROM read_parquet(?, file_row_number = true)"
        if len(rows) <= IN_LIST_MAX:
            parts.append(f"{head} WHERE file_row_number IN ({', '.join('?' * len(rows))})")
            params += [file, file, *rows]
        else:
            parts.append(f"{head} WHERE file_row_number IN (SELECT unnest(?::BIGINT[]))")
            params += [file, file, list(rows)]
    return con.sql(" UNION ALL ".join(parts), params=params).to_arrow_table()


def scan_parquet(con: duckdb.DuckDBPyConnection, files: Sequence[str], predicates: Sequence[Predicate],
          params: Mapping[str, Any], fields: Mapping[str, str] = MANIFEST_FIELDS) -> pa.Table:
    """Rows of the Parquet `files` matching any of `predicates`, normalized to `fields`, as Arrow."""
    return _fetch(con, _locate(con, files, predicates, params), fields)


def _empty(fields: Mapping[str, str]) -> pa.Table:
    types = {"VARCHAR": pa.string(), "VARCHAR[]": pa.list_(pa.string()), "DOUBLE": pa.float64(), "BOOLEAN": pa.bool_(),
             "TIMESTAMPTZ": pa.timestamp("us", tz="UTC")}
    schema = [("file", pa.string()), ("row", pa.int64())]
    return pa.schema(schema + [(c, types.get(t, pa.string())) for c, t in fields.items()]).empty_table()


# --------------------------------------------------------------------------------------------------------
# The lineage index: sorted Parquet sidecars whose row-group statistics DuckDB prunes
#
# Manifests list ids in shard order and the events table holds subjects in log order, so a lookup by
# id or subject would decode every row (measured 3-6 s per query at 10M events, docs/lineage.md). The
# index keeps copies sorted by key in small row groups: a lookup reads the one row group per file
# whose min/max can hold the key. Both sources are immutable — one manifest copy per shard version
# or checkpoint, a log position range once full — so a sidecar is written once (atomically) and never
# updated; sidecars nothing refers to any more (an erased shard version's) are deleted at the next build.
#
# Manifest sidecars hold (key, row, payload): key = a one-letter kind + the id — d(oc), s(ample),
# u (subject), o(rigin event), p(arent id), l (listed subject) — so the keys of one kind sort
# together and a lookup of many ids of one kind stays inside that kind's row groups; payload is the
# manifest row as JSON (one column: small footers, one decode per hit). Event sidecars hold
# (subject_id, position, event_id, type, occurred_at) sorted by subject.

INDEX_FORMAT = 3  # part of every sidecar's name: a new layout never reads an old file
INDEX_ROW_GROUP = 8192
EVENT_INDEX_SPAN = 1 << 19  # events per sealed sidecar; the unsealed tail is scanned in the events table
IN_CONSTANTS_MAX = 64  # up to this many keys a lookup is a constant IN list (pruned per key), then a join
MANIFEST_KINDS = {"d": "doc_id", "s": "sample_id", "u": "subject_id", "o": "origin_event_id"}
MANIFEST_LIST_KINDS = {"p": "parent_ids", "l": "subject_ids"}


@dataclass(frozen=True)
class LineageIndex:
    """The sidecars of the current catalog: manifest sidecar → manifest, and the event spans."""

    manifests: dict[str, str]
    events: list[str]
    events_upto: int  # positions ≤ this are in `events`; later ones are read from the events table


def index_dir(home: Path) -> Path:
    return Path(home) / "lineage" / "index"


def ensure_index(con: duckdb.DuckDBPyConnection, catalog: Catalog) -> LineageIndex:
    """Build the sidecars missing for `catalog` (and the full event spans), drop orphaned ones.

    Runs inside the caller's `EventStore.connect()` (the store's lock): one builder at a time.
    """
    root = index_dir(catalog.home)
    manifests: dict[str, str] = {}
    for manifest in catalog.shard_manifests + catalog.input_manifests:
        sidecar = _manifest_sidecar(root, manifest)
        if not sidecar.exists():
            _build_manifest_sidecar(con, manifest, sidecar)
        manifests[str(sidecar)] = manifest
    head = con.execute("SELECT value FROM store_meta WHERE key = 'head'").fetchall()[0][0]
    upto = head // EVENT_INDEX_SPAN * EVENT_INDEX_SPAN
    events = []
    for first in range(0, upto, EVENT_INDEX_SPAN):
        sidecar = root / "events" / f"v{INDEX_FORMAT}-{first + 1:012d}-{first + EVENT_INDEX_SPAN:012d}.parquet"
        if not sidecar.exists():
            table = con.sql(
                "SELECT subject_id, position, event_id::VARCHAR AS event_id, type, occurred_at FROM events "
                "WHERE position > ? AND position <= ? AND subject_id IS NOT NULL ORDER BY subject_id, position",
                params=[first, first + EVENT_INDEX_SPAN]).to_arrow_table()
            _write_sidecar(table, sidecar, "subject_id")
        events.append(str(sidecar))
    for directory, keep in ((root / "manifests", set(manifests)), (root / "events", set(events))):
        if directory.is_dir():
            for stale in directory.glob("*.parquet"):
                if str(stale) not in keep:
                    stale.unlink(missing_ok=True)
    return LineageIndex(manifests, events, upto)


def build_lineage_index(store: EventStore, home: Path | str) -> dict[str, int]:
    """Bring the index up to date now (after a shard version, a checkpoint or a bulk ingest), so the
    next query does not pay for it; queries build what is missing themselves."""
    with store.connect() as con:
        index = ensure_index(con, load_catalog(con, Path(home)))
    return {"manifest_sidecars": len(index.manifests), "event_sidecars": len(index.events),
            "events_indexed_upto": index.events_upto}


def _manifest_sidecar(root: Path, manifest: str) -> Path:
    import hashlib

    st = os.stat(manifest)
    key = f"{INDEX_FORMAT}\x1f{manifest}\x1f{st.st_size}\x1f{st.st_mtime_ns}"
    return root / "manifests" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.parquet"


def _build_manifest_sidecar(con: duckdb.DuckDBPyConnection, manifest: str, out: Path) -> None:
    """Every row once per key it can be found by, with the row as JSON, sorted by key."""
    present = _columns([manifest])
    fields = ", ".join(f'"{c}"' for c in MANIFEST_FIELDS)
    base = f"SELECT file_row_number AS row, {_select_list(present, MANIFEST_FIELDS)} " \
           f"FROM read_parquet($f, file_row_number = true)"
    parts = [f"SELECT '{k}' || \"{c}\" AS key, row, payload FROM b WHERE \"{c}\" IS NOT NULL"
             for k, c in MANIFEST_KINDS.items()]
    parts += [f"SELECT '{k}' || unnest(\"{c}\") AS key, row, payload FROM b WHERE len(\"{c}\") > 0"
              for k, c in MANIFEST_LIST_KINDS.items()]
    sql = (f"WITH b AS MATERIALIZED (SELECT *, to_json(struct_pack({fields}))::VARCHAR AS payload FROM ({base})) "
           f"SELECT * FROM ({' UNION ALL '.join(parts)}) ORDER BY key, row")
    _write_sidecar(con.sql(sql, params={"f": manifest}).to_arrow_table(), out, "key")


def _write_sidecar(table: pa.Table, out: Path, sort_column: str) -> None:
    """Atomically. The sort column gets min/max statistics (the only ones: smaller footers) and a
    Bloom filter per row group, so a key absent from a file costs no row-group read (measured 3x
    faster for 8 keys over 19 sidecars)."""
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd", row_group_size=INDEX_ROW_GROUP, write_statistics=[sort_column],
                   bloom_filter_options={sort_column: {"ndv": INDEX_ROW_GROUP, "fpp": 0.01}})
    os.replace(tmp, out)


def lookup(con: duckdb.DuckDBPyConnection, index: LineageIndex, values: Iterable[str],
           kinds: str = "dsuopl") -> list[dict[str, Any]]:
    """Manifest rows found by any of `values` as one of `kinds`, once per (manifest, row), with
    `file` = the manifest path and `row` its row number there."""
    keys = sorted({k + v for v in values if v for k in kinds})
    if not keys or not index.manifests:
        return []
    params: dict[str, Any] = {"files": list(index.manifests)}
    if len(keys) <= IN_CONSTANTS_MAX:  # constants: DuckDB checks each against every row group's min/max
        where = "key IN (" + ", ".join(f"$k{i}" for i in range(len(keys))) + ")"
        params.update({f"k{i}": k for i, k in enumerate(keys)})
    else:  # a join: its min/max (one kind's range) still skips the other kinds' row groups
        where, params["keys"] = "key IN (SELECT unnest($keys::VARCHAR[]))", keys
    rows = con.execute(f"SELECT filename, row, payload FROM read_parquet($files, filename = true) WHERE {where}",
                       params).fetchall()
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for sidecar, row, payload in rows:
        file = index.manifests[sidecar]
        if (file, row) not in out:
            out[(file, row)] = {"file": file, "row": row, **orjson.loads(payload)}
    return list(out.values())


def subject_events(con: duckdb.DuckDBPyConnection, home: Path, subject_id: str,
                   index: LineageIndex | None = None) -> list[dict[str, Any]]:
    """Every event of one subject (position, event_id, type, occurred_at), in position order: the
    sealed spans from the event sidecars (one row group each), the tail from the events table."""
    index = index or ensure_index(con, load_catalog(con, home))
    tail = "SELECT position, event_id::VARCHAR AS event_id, type, occurred_at FROM events " \
           "WHERE position > $upto AND subject_id = $s"
    params: dict[str, Any] = {"upto": index.events_upto, "s": subject_id}
    if index.events:
        sql = f"SELECT position, event_id, type, occurred_at FROM read_parquet($idx) WHERE subject_id = $s " \
              f"UNION ALL {tail} ORDER BY position"
        params["idx"] = index.events
    else:
        sql = tail + " ORDER BY position"
    return con.sql(sql, params=params).to_arrow_table().to_pylist()


def events_at(con: duckdb.DuckDBPyConnection, positions: Sequence[int], columns: str) -> pa.Table:
    """Whole events by position (the position column's zone maps and a semi-join), in order."""
    return con.sql(f"SELECT {columns} FROM events WHERE position IN (SELECT unnest($p::BIGINT[])) ORDER BY position",
                   params={"p": list(positions)}).to_arrow_table()


def exclusion_rows(con: duckdb.DuckDBPyConnection, catalog: Catalog, predicates: Sequence[Predicate],
                   params: Mapping[str, Any], with_text: bool = False) -> list[dict[str, Any]]:
    """Rows of the current exclusion files matching any predicate, with `kept_doc_id`/`similarity`
    read from the `detail` JSON (near/exact duplicates name the document they duplicate)."""
    files = catalog.exclusion_files()
    if not files:
        return []
    fields = dict(EXCLUSION_FIELDS, **({"text": "VARCHAR"} if with_text else {}))
    rows = scan_parquet(con, [f for _, _, f in files], predicates, params, fields).to_pylist()
    where_of = {f: (stage, source) for stage, source, f in files}
    for r in rows:
        r["partition_stage"], r["partition_source"] = where_of[r["file"]]
        try:
            detail = orjson.loads(r["detail"]) if r["detail"] else {}
        except orjson.JSONDecodeError:
            detail = {}
        detail = detail if isinstance(detail, dict) else {}
        r["kept_doc_id"], r["similarity"] = detail.get("kept_doc_id"), detail.get("similarity")
    return rows


def eval_runs(con: duckdb.DuckDBPyConnection, catalog: Catalog, models: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """EvalScored runs of these model versions with per-(suite, slice, metric) aggregates of their items."""
    wanted = set(models)
    runs = [e for e in catalog.evals if (e["model_name"], e["model_version"]) in wanted]
    files = _unique(e["items_path"] for e in runs if e["items_exist"])
    by_file: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if files:
        sql = (
            f"SELECT file, suite, slice, metric, count(*) AS items, avg(value) AS mean_value, "
            f"avg(correct::DOUBLE) AS accuracy FROM {normalized_parquet(files, EVAL_ITEM_FIELDS)} "
            f"GROUP BY ALL ORDER BY file, suite, slice, metric"
        )
        for r in con.sql(sql, params={"files": files}).to_arrow_table().to_pylist():
            by_file[r.pop("file")].append(r)
    out = []
    for e in runs:
        rows = by_file.get(e["items_path"], [])
        out.append({
            "event_id": e["event_id"], "model_name": e["model_name"], "model_version": e["model_version"],
            "suite": e["suite"], "scored_at": e["occurred_at"], "summary": e["summary"], "items_path": e["items_path"],
            "items": sum(r["items"] for r in rows) if rows else None, "slices": rows,
            "contamination_check_passed": e["contamination_check_passed"],
        })  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------------
# From manifest rows to versions, checkpoints and models


def shard_versions_for(catalog: Catalog, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Shard versions holding any of `rows` (shard-manifest rows), with what each holds of them."""
    versions = catalog.shard_versions_by_manifest()
    grouped: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["file"] in versions:
            grouped[r["file"]].append(r)
    out = []
    for file, rs in grouped.items():
        out.append({**versions[file], "samples": sorted({r["sample_id"] for r in rs}),
                    "doc_ids": sorted({r["doc_id"] for r in rs if r["doc_id"]})})
    out.sort(key=lambda v: (_stage_rank(v["stage"]), v["source"] or "", v["position"]))
    return out


def checkpoints_for(catalog: Catalog, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checkpoints whose inputs manifest lists any of `rows`, plus every checkpoint trained from one."""
    by_manifest = catalog.checkpoints_by_manifest()
    matched: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        for c in by_manifest.get(r["file"], ()):
            matched[c["event_id"]].append(r)
    out = []
    for event_id, rs in matched.items():
        c = catalog.checkpoint(event_id)
        out.append({**_checkpoint_ref(c), "via": "direct", "samples_matched": len({r["sample_id"] for r in rs}),
                    "shard_versions": sorted({(r["shard_stage"], r["shard_source"], r["shard_md5"]) for r in rs
                                              if r["shard_md5"]}, key=lambda t: (_stage_rank(t[0]), str(t[1]), t[2]))})
    for event_id, parent in catalog.descendants(matched).items():
        c = catalog.checkpoint(event_id)
        out.append({**_checkpoint_ref(c), "via": "parent", "inherits_from": parent, "samples_matched": 0,
                    "shard_versions": []})
    for c in out:
        c["shard_versions"] = [{"stage": s, "source": src, "dvc_md5": m} for s, src, m in c["shard_versions"]]
    out.sort(key=lambda c: c["position"])
    return out


def model_versions(checkpoints: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Registered model versions among `checkpoints` (direct wins over parent)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for c in checkpoints:
        if c["model_version"] is None:
            continue
        key = (c["model_name"], c["model_version"])
        if key not in out or (out[key]["via"] == "parent" and c["via"] == "direct"):
            out[key] = {"model_name": c["model_name"], "model_version": c["model_version"], "stage": c["stage"],
                        "via": c["via"], "checkpoint_event_id": c["event_id"]}
    return sorted(out.values(), key=lambda m: (m["model_name"], _version_key(m["model_version"])))


def _children(rows: Sequence[Mapping[str, Any]], catalog: Catalog, parents: set[str]) -> list[dict[str, Any]]:
    """Samples whose parent_ids name one of `parents`: synthetic samples and derived documents."""
    versions = catalog.shard_versions_by_manifest()
    by_manifest = catalog.checkpoints_by_manifest()
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        hit = sorted(parents.intersection(r["parent_ids"] or ()))
        if not hit:
            continue
        c = out.setdefault(r["sample_id"], {
            "sample_id": r["sample_id"], "doc_id": r["doc_id"], "source": r["source"], "license": r["license"],
            "kind": "synthetic" if r["source"] == "synthetic" or r["doc_id"] is None else "derived",
            "parent_ids": sorted(r["parent_ids"] or ()), "matched_parents": hit,
            "subject_ids": sorted(r["subject_ids"] or ()), "shard_versions": [], "checkpoints": [],
        })  # fmt: skip
        if r["file"] in versions:
            v = versions[r["file"]]
            c["shard_versions"].append({"stage": v["stage"], "source": v["source"], "dvc_md5": v["dvc_md5"]})
        for ck in by_manifest.get(r["file"], ()):
            c["checkpoints"].append({"event_id": ck["event_id"], "model_name": ck["model_name"],
                                     "model_version": ck["model_version"], "stage": ck["stage"]})
    return sorted(out.values(), key=lambda c: c["sample_id"])


def _near_duplicates(exclusions: Sequence[Mapping[str, Any]], docs: set[str]) -> list[dict[str, Any]]:
    """Near/exact-duplicate relations between `docs` and other documents, both directions."""
    out = []
    for r in exclusions:
        kept = r["kept_doc_id"]
        if not kept or kept == r["doc_id"]:
            continue
        if kept in docs and r["doc_id"] not in docs:
            out.append({"doc_id": r["doc_id"], "relation": "duplicate_of", "of_doc_id": kept, "reason": r["reason"],
                        "similarity": r["similarity"], "stage": r["partition_stage"], "source": r["partition_source"]})
        elif r["doc_id"] in docs and kept not in docs:
            out.append({"doc_id": kept, "relation": "kept_instead_of", "of_doc_id": r["doc_id"], "reason": r["reason"],
                        "similarity": r["similarity"], "stage": r["partition_stage"], "source": r["partition_source"]})
    return sorted(out, key=lambda d: (d["doc_id"], d["of_doc_id"]))


# --------------------------------------------------------------------------------------------------------
# lineage_sample


def lineage_sample(store: EventStore, home: Path | str, item_id: str) -> dict[str, Any]:
    """Where one sample, document or event went: event → documents → every shard version listing them
    → checkpoints and model versions that trained on them → their eval runs; plus near-duplicate
    cluster members (exclusions' `kept_doc_id`, both directions) and children (`parent_ids`)."""
    home = Path(home)
    with store.connect() as con:
        catalog = load_catalog(con, home)
        index = ensure_index(con, catalog)
        event = _event_by_id(con, item_id)
        first = lookup(con, index, [item_id], "dso")
        docs = {r["doc_id"] for r in first if r["doc_id"]}
        resolved = ("event_id" if event else None) or next(
            (kind for kind in ("sample_id", "doc_id", "origin_event_id") if any(r[kind] == item_id for r in first)), None)
        exclusions = exclusion_rows(
            con, catalog, [pred_in("doc_id", "docs"), (f"{KEPT_DOC_ID} IN (SELECT unnest($docs::VARCHAR[]))", ("detail",))],
            {"docs": sorted(docs | {item_id})})
        near = _near_duplicates(exclusions, docs | {item_id})
        members = {d["doc_id"] for d in near}
        samples = {r["sample_id"] for r in first if r["doc_id"] in docs or r["sample_id"] == item_id}
        parents = docs | samples | members | {item_id} | ({event["event_id"]} if event else set())
        rows = first + lookup(con, index, docs | members, "d") + lookup(con, index, parents, "p")
        rows = list({(r["file"], r["row"]): r for r in rows}.values())
        if resolved is None and exclusions:
            resolved = "doc_id (excluded only)"
        own = [r for r in rows if r["doc_id"] in docs or r["sample_id"] == item_id]
        member_rows = [r for r in rows if r["doc_id"] in members and r["doc_id"] not in docs]
        children = _children(rows, catalog, parents)
        child_rows = [r for r in rows if r["sample_id"] in {c["sample_id"] for c in children}]
        checkpoints = checkpoints_for(catalog, own + child_rows)
        models = model_versions(checkpoints)
        evals = eval_runs(con, catalog, [(m["model_name"], m["model_version"]) for m in models])
    documents = _documents(own)
    return json_safe({
        "kind": "sample_lineage",
        "query": {"id": item_id, "resolved_as": resolved},
        "event": event,
        "documents": documents,
        "shard_versions": shard_versions_for(catalog, own),
        "excluded": [_exclusion_out(r) for r in exclusions if r["doc_id"] in docs or r["doc_id"] == item_id],
        "near_duplicates": [{**d, "shard_versions": _version_refs(catalog, member_rows, d["doc_id"])} for d in near],
        "children": children,
        "checkpoints": checkpoints,
        "models": models,
        "evals": evals,
        "missing_files": catalog.missing_files,
    })


def _event_by_id(con: duckdb.DuckDBPyConnection, item_id: str) -> dict[str, Any] | None:
    """The event with this id (public fields only), via the events table's unique index."""
    import uuid

    try:
        uuid.UUID(item_id)
    except ValueError:
        return None
    rows = con.execute(
        "SELECT position, event_id::VARCHAR, type, stream_id, subject_id, occurred_at, payload::VARCHAR "
        "FROM events WHERE event_id = ?::UUID", [item_id],
    ).fetchall()
    if not rows:
        return None
    position, event_id, type_, stream_id, subject_id, occurred_at, payload = rows[0]
    return {"position": position, "event_id": event_id, "type": type_, "stream_id": stream_id,
            "subject_id": subject_id, "occurred_at": occurred_at, "payload": orjson.loads(payload)}


def _documents(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r["doc_id"]:
            continue
        d = docs.setdefault(r["doc_id"], {"doc_id": r["doc_id"], "source": r["source"], "license": r["license"],
                                          "subject_id": r["subject_id"], "origin_event_id": r["origin_event_id"],
                                          "sample_ids": set()})
        d["sample_ids"].add(r["sample_id"])
    out = []
    for d in docs.values():
        out.append({**d, "sample_ids": sorted(d["sample_ids"])})
    return sorted(out, key=lambda d: d["doc_id"])


def _version_refs(catalog: Catalog, rows: Sequence[Mapping[str, Any]], doc_id: str) -> list[dict[str, Any]]:
    versions = catalog.shard_versions_by_manifest()
    refs = {(versions[r["file"]]["stage"], versions[r["file"]]["source"], versions[r["file"]]["dvc_md5"])
            for r in rows if r["doc_id"] == doc_id and r["file"] in versions}
    return [{"stage": s, "source": src, "dvc_md5": m} for s, src, m in sorted(refs, key=lambda t: (_stage_rank(t[0]), t[1], t[2]))]


def _exclusion_out(r: Mapping[str, Any]) -> dict[str, Any]:
    return {"doc_id": r["doc_id"], "source": r["source"], "subject_id": r["subject_id"], "stage": r["partition_stage"],
            "pipeline_stage": r["stage"], "reason": r["reason"], "kept_doc_id": r["kept_doc_id"],
            "similarity": r["similarity"], "file": r["file"]}


# --------------------------------------------------------------------------------------------------------
# lineage_model


def lineage_model(store: EventStore, home: Path | str, model_name: str | None, version: str, *,
                  allowed_licenses: Sequence[str] | None = None) -> dict[str, Any]:
    """What a model version saw, through its own inputs and its parents' (pretrain → SFT → DPO):
    sources, licenses, subjects (counts) and shard versions; flags licenses outside
    `allowed_licenses` (when given) and subjects erased since (keystore tombstones or
    `SubjectShredded` events), including those behind synthetic samples' parent events."""
    home = Path(home)
    with store.connect() as con:
        catalog = load_catalog(con, home)
        target = catalog.find_model(model_name, str(version))
        if target is None:
            known = sorted({f"{c['model_name']}/{c['model_version']}" for c in catalog.checkpoints if c["model_version"]})
            raise LookupError(f"no CheckpointTrained event for model {model_name or '*'} version {version}; "
                              f"known model versions: {', '.join(known) or 'none'}")
        chain = catalog.ancestors(target)
        files = _unique(c["inputs_manifest"] for c in chain if c["manifest_exists"])
        erased = _erased_subjects(con, store)
        agg = _model_aggregates(con, ensure_index(con, catalog), files, erased)
    ck_by_file = {c["inputs_manifest"]: c for c in chain}
    stages = []
    for c in reversed(chain):
        per = agg["per_file"].get(c["inputs_manifest"], {})
        stages.append({**_checkpoint_ref(c), "inputs_manifest": c["inputs_manifest"],
                       "manifest_exists": c["manifest_exists"], "samples": per.get("samples"),
                       "samples_with_subject": per.get("with_subject"), "synthetic_samples": per.get("synthetic")})
    licenses, erased_hits = agg["licenses"], agg["erased"]
    versions = catalog.shard_versions_by_manifest()
    by_md5 = {(v["stage"], v["source"], v["dvc_md5"]): v for v in versions.values()}
    shard_out = []
    for r in agg["shard_versions"]:
        v = by_md5.get((r["shard_stage"], r["shard_source"], r["shard_md5"]))
        shard_out.append({"stage": r["shard_stage"], "source": r["shard_source"], "dvc_md5": r["shard_md5"],
                          "samples": r["samples"], "checkpoint_stage": ck_by_file[r["file"]]["stage"],
                          "materialized_at": v["materialized_at"] if v else None, "known": v is not None})
    allowed = set(allowed_licenses) if allowed_licenses is not None else None
    bad = [lic for lic in licenses if allowed is not None and lic["license"] not in allowed]
    flags = []
    for lic in bad:
        flags.append({"flag": "license_not_allowed", "license": lic["license"], "samples": lic["samples"],
                      "sources": lic["sources"]})
    for s in erased_hits:
        flags.append({"flag": "erased_subject", "subject_id": s["subject_id"], "samples": s["samples"], "via": s["via"]})
    return json_safe({
        "kind": "model_lineage",
        "query": {"model_name": target["model_name"], "model_version": target["model_version"],
                  "allowed_licenses": sorted(allowed) if allowed is not None else None},
        "chain": stages,
        "sources": agg["sources"],
        "licenses": licenses,
        "subjects": {**agg["subjects"], "erased": erased_hits},
        "synthetic": agg["synthetic"],
        "shard_versions": shard_out,
        "flags": flags,
        "ok": not flags,
        "missing_files": catalog.missing_files,
    })


def _erased_subjects(con: duckdb.DuckDBPyConnection, store: EventStore) -> list[str]:
    shredded = con.execute(
        "SELECT DISTINCT subject_id FROM events WHERE type = 'SubjectShredded' AND subject_id IS NOT NULL").fetchall()
    return sorted(store.keys.shredded_subjects() | {r[0] for r in shredded})


def _model_aggregates(con: duckdb.DuckDBPyConnection, index: LineageIndex, files: Sequence[str],
                      erased: Sequence[str]) -> dict[str, Any]:
    """Counts over the chain's inputs manifests, without decoding any id column but `subject_id`:
    one GROUP BY over the low-cardinality columns, one over subjects, the synthetic rows' parents."""
    out: dict[str, Any] = {"per_file": {}, "sources": [], "licenses": [], "shard_versions": [],
                           "subjects": {"distinct": 0, "samples_with_subject": 0}, "erased": [],
                           "synthetic": {"samples": 0, "parent_events": 0}}
    if not files:
        return out
    src = normalized_parquet(files, MANIFEST_FIELDS)
    params = {"files": list(files)}
    groups = con.execute(
        f"SELECT file, source, license, shard_stage, shard_source, shard_md5, count(*), count(subject_id), "
        f"count(*) FILTER (len(parent_ids) > 0) FROM {src} GROUP BY ALL", params).fetchall()
    per_file: dict[str, Counter] = defaultdict(Counter)
    sources: dict[tuple[str, str], Counter] = defaultdict(Counter)
    licenses: dict[str, dict[str, Any]] = {}
    versions: dict[tuple, int] = Counter()
    for file, source, license_, sh_stage, sh_source, sh_md5, n, with_subject, derived in groups:
        per_file[file].update(samples=n, with_subject=with_subject, synthetic=derived)
        sources[(source, license_)].update(samples=n, with_subject=with_subject)
        lic = licenses.setdefault(license_, {"license": license_, "samples": 0, "sources": set()})
        lic["samples"] += n
        lic["sources"].add(source)
        if sh_md5 is not None:
            versions[(file, sh_stage, sh_source, sh_md5)] += n
    out["per_file"] = {f: dict(c) for f, c in per_file.items()}
    out["sources"] = sorted(({"source": s, "license": lic, "samples": c["samples"], "samples_with_subject": c["with_subject"]}
                             for (s, lic), c in sources.items()), key=lambda r: (-r["samples"], str(r["source"])))
    out["licenses"] = sorted(({**v, "sources": sorted(map(str, v["sources"]))} for v in licenses.values()),
                             key=lambda r: (-r["samples"], str(r["license"])))
    out["shard_versions"] = [{"file": k[0], "shard_stage": k[1], "shard_source": k[2], "shard_md5": k[3], "samples": n}
                             for k, n in sorted(versions.items(), key=lambda kv: (_stage_rank(kv[0][1]), str(kv[0][2]), kv[0][3]))]
    rows = con.execute(
        f"""
        WITH s AS MATERIALIZED (SELECT subject_id, count(*) AS n FROM {src} WHERE subject_id IS NOT NULL GROUP BY 1)
        SELECT subject_id, n FROM s WHERE subject_id IN (SELECT unnest($erased::VARCHAR[]))
        UNION ALL SELECT NULL, count(*) FROM s
        """, {**params, "erased": list(erased)}).fetchall()
    out["subjects"] = {"distinct": next(n for sid, n in rows if sid is None),
                       "samples_with_subject": sum(c["with_subject"] for c in per_file.values())}
    direct = [(sid, n) for sid, n in rows if sid is not None]
    listed = con.execute(
        f"SELECT x, count(*) FROM (SELECT unnest(subject_ids) AS x FROM {src} WHERE len(subject_ids) > 0) "
        f"WHERE x IN (SELECT unnest($erased::VARCHAR[])) GROUP BY 1", {**params, "erased": list(erased)}).fetchall()
    # synthetic samples name the events they derive from; whose events those are decides erasure
    pairs = con.execute(f"SELECT DISTINCT sample_id, unnest(parent_ids) FROM {src} WHERE len(parent_ids) > 0",
                        params).fetchall()
    parents = sorted({p for _, p in pairs if _is_uuid(p)})
    out["synthetic"] = {"samples": sum(c["synthetic"] for c in per_file.values()), "parent_events": len(parents)}
    via_parents: Counter = Counter()
    if parents and erased:
        erased_set = set(erased)
        # the erased subjects' events among the parents: event sidecars (sorted by subject) + the tail
        tail = ("SELECT event_id::VARCHAR AS event_id, subject_id FROM events WHERE position > $upto "
                "AND subject_id IN (SELECT unnest($erased::VARCHAR[])) AND event_id::VARCHAR IN (SELECT unnest($p::VARCHAR[]))")
        sql, params = tail, {"upto": index.events_upto, "erased": list(erased), "p": parents}
        if index.events:
            sql = ("SELECT event_id, subject_id FROM read_parquet($idx) WHERE subject_id IN (SELECT unnest($erased::VARCHAR[])) "
                   "AND event_id IN (SELECT unnest($p::VARCHAR[])) UNION ALL " + tail)
            params["idx"] = index.events
        owner = {e: sid for e, sid in con.execute(sql, params).fetchall() if sid in erased_set}
        samples_of: dict[str, set[str]] = defaultdict(set)
        for sample, parent in pairs:
            if parent in owner:
                samples_of[owner[parent]].add(sample)
        via_parents.update({sid: len(v) for sid, v in samples_of.items()})
    hits: dict[str, dict[str, Any]] = {}
    for via, found in (("subject_id", direct), ("subject_ids", listed), ("parent_event", sorted(via_parents.items()))):
        for sid, n in found:
            h = hits.setdefault(sid, {"subject_id": sid, "samples": 0, "via": []})
            h["samples"] += n
            h["via"].append(via)
    out["erased"] = sorted(hits.values(), key=lambda h: h["subject_id"])
    return out


def _is_uuid(value: str | None) -> bool:
    import uuid

    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------
# lineage_subject and erasure_plan


@dataclass
class SubjectReach:
    """Everything one subject's data reached, as raw rows (shared by lineage, erasure and access)."""

    subject_id: str
    catalog: Catalog
    events: list[dict[str, Any]]
    own_rows: list[dict[str, Any]]  # manifest rows whose subject_id is the subject
    child_rows: list[dict[str, Any]]  # manifest rows derived from the subject's events or samples
    member_rows: list[dict[str, Any]]  # manifest rows of near-duplicate cluster members
    exclusions: list[dict[str, Any]]  # exclusion rows of the subject's docs and of their members
    near_duplicates: list[dict[str, Any]]
    children: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]
    models: list[dict[str, Any]]
    evals: list[dict[str, Any]]

    @property
    def doc_ids(self) -> set[str]:
        return {r["doc_id"] for r in self.own_rows if r["doc_id"]} | {
            r["doc_id"] for r in self.exclusions if r["subject_id"] == self.subject_id and r["doc_id"]}


def subject_reach(con: duckdb.DuckDBPyConnection, store: EventStore, home: Path, subject_id: str) -> SubjectReach:
    """The subject query proper: index lookups (events, manifests by subject, event, document) and
    the exclusion files."""
    catalog = load_catalog(con, home)
    index = ensure_index(con, catalog)
    events = subject_events(con, home, subject_id, index)
    event_ids = [e["event_id"] for e in events]
    first = lookup(con, index, [subject_id], "ul") + lookup(con, index, event_ids, "op")
    own = [r for r in first if r["subject_id"] == subject_id]
    docs = {r["doc_id"] for r in own if r["doc_id"]}
    exclusions = exclusion_rows(
        con, catalog,
        [pred_eq("subject_id", "s"), pred_in("doc_id", "docs"), (f"{KEPT_DOC_ID} IN (SELECT unnest($docs::VARCHAR[]))", ("detail",))],
        {"s": subject_id, "docs": sorted(docs)},
    )
    docs |= {r["doc_id"] for r in exclusions if r["subject_id"] == subject_id and r["doc_id"]}
    near = _near_duplicates(exclusions, docs)
    members = {d["doc_id"] for d in near} - docs
    samples = {r["sample_id"] for r in own}
    parents = set(event_ids) | docs | samples
    member_rows: list[dict[str, Any]] = []
    second: list[dict[str, Any]] = []
    if members or docs:
        # near-duplicate members' rows in every version, and samples derived from the subject's
        # documents (not findable by subject or event id); only rows with parents are list-checked
        second = lookup(con, index, members, "d") + lookup(con, index, docs | samples, "p")
        member_rows = [r for r in second if r["doc_id"] in members]
        if members:
            # members' own exclusion rows (a member dropped at another stage is still a copy)
            exclusions += [r for r in exclusion_rows(con, catalog, [pred_in("doc_id", "m")], {"m": sorted(members)})
                           if r not in exclusions]
    rows = {(r["file"], r["row"]): r for r in first + second}
    children = _children(list(rows.values()), catalog, parents)
    child_ids = {c["sample_id"] for c in children}
    # subject_ids naming the subject makes a row the subject's child even without a parent match
    for r in rows.values():
        if subject_id in (r["subject_ids"] or ()) and r["subject_id"] != subject_id and r["sample_id"] not in child_ids:
            children.append({"sample_id": r["sample_id"], "doc_id": r["doc_id"], "source": r["source"],
                             "license": r["license"], "kind": "synthetic", "parent_ids": sorted(r["parent_ids"] or ()),
                             "matched_parents": [], "subject_ids": sorted(r["subject_ids"] or ()),
                             "shard_versions": [], "checkpoints": []})
            child_ids.add(r["sample_id"])
    child_rows = [r for r in rows.values() if r["sample_id"] in child_ids and r["subject_id"] != subject_id]
    checkpoints = checkpoints_for(catalog, own + child_rows + member_rows)
    for c in checkpoints:
        ck_files = {ck["inputs_manifest"] for ck in catalog.checkpoints if ck["event_id"] == c["event_id"]}
        c["own_samples"] = len({r["sample_id"] for r in own if r["file"] in ck_files})
        c["child_samples"] = len({r["sample_id"] for r in child_rows if r["file"] in ck_files})
        c["member_samples"] = len({r["sample_id"] for r in member_rows if r["file"] in ck_files})
    models = model_versions(checkpoints)
    evals = eval_runs(con, catalog, [(m["model_name"], m["model_version"]) for m in models])
    return SubjectReach(subject_id, catalog, events, own, child_rows, member_rows, exclusions, near, children,
                        checkpoints, models, evals)


def lineage_subject(store: EventStore, home: Path | str, subject_id: str) -> dict[str, Any]:
    """Everything a subject's data reached: events by type, documents and samples, shard versions,
    near-duplicate members, synthetic children, checkpoints and model versions, eval runs."""
    with store.connect() as con:
        reach = subject_reach(con, store, Path(home), subject_id)
    by_type = Counter(e["type"] for e in reach.events)
    return json_safe({
        "kind": "subject_lineage",
        "query": {"subject_id": subject_id, "shredded": store.keys.is_shredded(subject_id)},
        "events": {"by_type": dict(sorted(by_type.items())), "total": len(reach.events),
                   "first_position": reach.events[0]["position"] if reach.events else None,
                   "last_position": reach.events[-1]["position"] if reach.events else None,
                   "items": reach.events},
        "documents": _documents(reach.own_rows),
        "shard_versions": shard_versions_for(reach.catalog, reach.own_rows),
        "excluded": [_exclusion_out(r) for r in reach.exclusions if r["subject_id"] == subject_id],
        "near_duplicates": [{**d, "shard_versions": _version_refs(reach.catalog, reach.member_rows, d["doc_id"])}
                            for d in reach.near_duplicates],
        "children": reach.children,
        "checkpoints": reach.checkpoints,
        "models": reach.models,
        "evals": reach.evals,
        "missing_files": reach.catalog.missing_files,
    })


def erasure_plan(store: EventStore, home: Path | str, subject_id: str) -> dict[str, Any]:
    """Step 2 of erasure: every item the subject's erasure must reach, and the partitions to rebuild.

    Items: the subject's events (crypto-shredding covers them); their documents and samples in every
    shard version and exclusion file; near-duplicate cluster members that carry their text; synthetic
    samples derived from their interactions; checkpoints and model versions trained on any of those
    (and every checkpoint trained from one); eval runs of those models; quarantined lines under their
    key. `rematerialize` lists the (stage, source) partitions whose current or past versions hold any
    of it; `dvc_versions` every shard version (md5) to purge from the DVC cache and remote.
    """
    with store.connect() as con:
        reach = subject_reach(con, store, Path(home), subject_id)
        quarantined = _quarantine_count(con, subject_id)
    cat = reach.catalog
    versions = cat.shard_versions_by_manifest()
    affected: dict[str, dict[str, Any]] = {}

    def add(rows: Iterable[Mapping[str, Any]], why: str) -> None:
        for r in rows:
            v = versions.get(r["file"])
            if v is None:
                continue
            a = affected.setdefault(r["file"], {**v, "samples": set(), "doc_ids": set(), "why": set()})
            a["samples"].add(r["sample_id"])
            if r["doc_id"]:
                a["doc_ids"].add(r["doc_id"])
            a["why"].add(why)

    add(reach.own_rows, "subject")
    add(reach.member_rows, "near_duplicate")
    add(reach.child_rows, "synthetic_child")
    shard_versions = sorted(
        ({**a, "samples": sorted(a["samples"]), "doc_ids": sorted(a["doc_ids"]), "why": sorted(a["why"])}
         for a in affected.values()),
        key=lambda v: (_stage_rank(v["stage"]), v["source"], v["position"]))
    current = cat.current_shards()
    partitions: dict[tuple[str, str], set[str]] = defaultdict(set)
    for v in shard_versions:
        partitions[(v["stage"], v["source"])].update(v["why"])
    exclusions = []
    for r in reach.exclusions:
        why = "subject" if r["subject_id"] == subject_id else "near_duplicate"
        partitions[(r["partition_stage"], r["partition_source"])].add(f"exclusions:{why}")
        exclusions.append({**_exclusion_out(r), "why": why})
    rematerialize = []
    for (stage, source), why in sorted(partitions.items(), key=lambda kv: (_stage_rank(kv[0][0]), kv[0][1])):
        cur = current.get((stage, source))
        holds_now = any(v["stage"] == stage and v["source"] == source and cur is not None
                        and v["dvc_md5"] == cur["dvc_md5"] for v in shard_versions)
        rematerialize.append({"stage": stage, "source": source, "why": sorted(why), "current_version_affected": holds_now,
                              "current_dvc_md5": cur["dvc_md5"] if cur else None})
    by_type = Counter(e["type"] for e in reach.events)
    models = reach.models
    return json_safe({
        "kind": "erasure_plan",
        "query": {"subject_id": subject_id, "shredded": store.keys.is_shredded(subject_id)},
        "events": {"by_type": dict(sorted(by_type.items())), "total": len(reach.events),
                   "event_ids": [e["event_id"] for e in reach.events]},
        "documents": _documents(reach.own_rows),
        "shard_versions": shard_versions,
        "dvc_versions": _unique(v["dvc_md5"] for v in shard_versions),
        "exclusions": exclusions,
        "near_duplicates": reach.near_duplicates,
        "synthetic": reach.children,
        "checkpoints": reach.checkpoints,
        "models": models,
        "evals": [{k: e[k] for k in ("event_id", "model_name", "model_version", "suite", "items_path", "items")}
                  for e in reach.evals],
        "quarantine_rows": quarantined,
        "rematerialize": rematerialize,
        "counts": {
            "events": len(reach.events), "documents": len(reach.doc_ids), "samples": len({r["sample_id"] for r in reach.own_rows}),
            "shard_versions": len(shard_versions), "exclusion_rows": len(exclusions),
            "near_duplicate_members": len({d["doc_id"] for d in reach.near_duplicates}),
            "synthetic_samples": len(reach.children), "checkpoints": len(reach.checkpoints), "models": len(models),
            "eval_runs": len(reach.evals), "quarantine_rows": quarantined, "partitions": len(rematerialize),
        },
        "missing_files": cat.missing_files,
    })


def _quarantine_count(con: duckdb.DuckDBPyConnection, subject_id: str) -> int:
    if not has_table(con, "quarantine"):
        return 0
    return con.execute("SELECT count(*) FROM quarantine WHERE key_id = ?", [subject_id]).fetchall()[0][0]


def has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchall()[0][0])


# --------------------------------------------------------------------------------------------------------
# Output


def render_table(result: Mapping[str, Any]) -> Table:
    """A terminal table of any result above: one row per section, its size and the first items."""
    from rich.table import Table

    kind = result.get("kind", "lineage")
    q = result.get("query", {})
    title = f"{kind.replace('_', ' ')}: " + ", ".join(f"{k}={v}" for k, v in q.items() if v not in (None, [], False))
    table = Table(title=title, show_lines=False)
    table.add_column("section")
    table.add_column("count", justify="right")
    table.add_column("details")

    def row(name: str, items: Any, fmt: Any) -> None:
        if isinstance(items, Mapping):
            table.add_row(name, "", ", ".join(f"{k}: {v}" for k, v in items.items()))
            return
        items = list(items or [])
        shown = "; ".join(fmt(x) for x in items[:4]) + (f"; … (+{len(items) - 4})" if len(items) > 4 else "")
        table.add_row(name, str(len(items)), shown)

    short = lambda s: (s or "")[:12]
    version = lambda v: f"{v['stage']}/{v['source']}@{short(v['dvc_md5'])}"
    model = lambda m: f"{m['model_name']}/{m['model_version']} ({m['via']})"
    if kind == "model_lineage":
        row("chain", result["chain"], lambda c: f"{c['stage']} {c['model_name']}/{c['model_version']}: {c['samples']} samples")
        row("sources", result["sources"], lambda s: f"{s['source']} [{s['license']}] {s['samples']}")
        row("licenses", result["licenses"], lambda s: f"{s['license']} {s['samples']}")
        row("subjects", {k: v for k, v in result["subjects"].items() if k != "erased"}, None)
        row("erased subjects", result["subjects"]["erased"], lambda s: f"{short(s['subject_id'])} ({s['samples']})")
        row("shard versions", result["shard_versions"], version)
        row("flags", result["flags"], lambda f: f"{f['flag']}: {f.get('license') or short(f.get('subject_id'))}")
        return table
    if result.get("events"):
        row("events", result["events"].get("by_type", {}), None)
    if result.get("event"):
        e = result["event"]
        table.add_row("event", "1", f"{e['type']} at {e['position']} ({e['stream_id']})")
    row("documents", result.get("documents", []), lambda d: f"{short(d['doc_id'])} {d['source']}")
    row("shard versions", result.get("shard_versions", []), version)
    row("excluded", result.get("excluded", result.get("exclusions", [])), lambda x: f"{short(x['doc_id'])} {x['reason']}")
    row("near duplicates", result.get("near_duplicates", []), lambda d: f"{short(d['doc_id'])} {d['relation']}")
    row("children", result.get("children", result.get("synthetic", [])), lambda c: f"{short(c['sample_id'])} {c['kind']}")
    row("checkpoints", result.get("checkpoints", []), lambda c: f"{c['stage']} {c['model_name']}/{c['model_version']} ({c['via']})")
    row("models", result.get("models", []), model)
    row("evals", result.get("evals", []), lambda e: f"{e['model_name']}/{e['model_version']} {e['suite']}")
    if kind == "erasure_plan":
        row("rematerialize", result["rematerialize"], lambda p: f"{p['stage']}/{p['source']}")
        table.add_row("quarantine rows", str(result["quarantine_rows"]), "")
    if result.get("missing_files"):
        row("missing files", result["missing_files"], str)
    return table


# --------------------------------------------------------------------------------------------------------
# CLI entry points (the typer commands in flywheel/cli.py call these)


def lineage_sample_cmd(item_id: str, home: Path | None = None) -> dict[str, Any]:
    """`flywheel lineage sample ID`: the result dict (print as JSON or `render_table`)."""
    store, home = _open(home)
    return lineage_sample(store, home, item_id)


def lineage_model_cmd(version: str, model_name: str | None = None, *, allowed_licenses: Sequence[str] | None = None,
                      home: Path | None = None) -> dict[str, Any]:
    """`flywheel lineage model VERSION`: VERSION may be `NAME/VERSION` or `NAME@VERSION`; licenses
    default to `[curation] allowed_licenses` of flywheel.toml."""
    name, ver = _split_ref(version)
    if allowed_licenses is None:
        from flywheel.config import Config

        configured = Config.load().section("curation").get("allowed_licenses")
        allowed_licenses = list(configured) if configured else None
    store, home = _open(home)
    return lineage_model(store, home, name or model_name, ver, allowed_licenses=allowed_licenses)


def lineage_subject_cmd(subject_id: str, home: Path | None = None) -> dict[str, Any]:
    """`flywheel lineage subject ID`."""
    store, home = _open(home)
    return lineage_subject(store, home, subject_id)


def erasure_plan_cmd(subject_id: str, home: Path | None = None) -> dict[str, Any]:
    store, home = _open(home)
    return erasure_plan(store, home, subject_id)


def _open(home: Path | None) -> tuple[EventStore, Path]:
    from flywheel.config import Paths
    from warehouse.store import EventStore

    paths = Paths(Path(home).resolve()) if home else Paths.from_env()
    return EventStore(paths.ensure().warehouse), paths.home


# --------------------------------------------------------------------------------------------------------
# Helpers


def _shard_version(s: Mapping[str, Any]) -> dict[str, Any]:
    return {"stage": s["stage"], "source": s["source"], "dvc_md5": s["dvc_md5"], "materialized_at": s["occurred_at"],
            "position": s["position"], "event_id": s["event_id"], "manifest": s["manifest"], "rows": s["rows"],
            "path": s["path"]}


def _checkpoint_ref(c: Mapping[str, Any]) -> dict[str, Any]:
    return {"event_id": c["event_id"], "position": c["position"], "stage": c["stage"], "model_name": c["model_name"],
            "model_version": c["model_version"], "parent_model_version": c["parent_model_version"],
            "trained_at": c["occurred_at"], "checkpoint_path": c["checkpoint_path"]}


def _split_ref(ref: str) -> tuple[str | None, str]:
    """"name/3" or "name@3" → ("name", "3"); "3" → (None, "3")."""
    for sep in ("@", "/"):
        if sep in ref:
            name, _, version = ref.rpartition(sep)
            if name and version:
                return name, version
    return None, ref


def _stage_rank(stage: str | None) -> int:
    order = SHARD_STAGES + CHECKPOINT_STAGES
    return order.index(stage) if stage in order else len(order)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)


def _resolve(home: Path, path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    return str(p if p.is_absolute() else home / p)


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(i for i in items if i is not None))


def json_safe(obj: Any) -> Any:
    """Datetimes to ISO-8601, sets and tuples to sorted lists / lists: `json.dumps` takes the result."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return sorted(json_safe(v) for v in obj)
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    return obj
