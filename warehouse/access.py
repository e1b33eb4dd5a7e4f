"""The data-subject access export (GDPR Art. 15): a copy of every record about one subject, as JSON.

    export = access_export(store, home, subject_id)
    write_access_export(store, home, subject_id, Path("access-<subject>.json"))   # mode 0600

What the export holds (docs/lineage.md has the format):

- `confirmation` — whether the flywheel processes data about the subject;
- `events` — every event recorded under the subject, personal fields decrypted (interactions with
  their messages and responses, feedback with corrections and comments, DSR requests);
- `documents` — their documents and samples, with the text of the *current* shard versions that hold
  them (older versions are listed by id), the PII span *types* found in each (never the values),
  and their own documents the curation excluded (with the stage and reason);
- `shard_versions`, `models` (model versions and checkpoints trained on their samples, directly or
  through a parent checkpoint), `evals` (those models' eval runs, aggregated per suite and slice);
- `synthetic` — samples generated from their interactions (text only when no one else's data is in
  them; parent ids restricted to their own events);
- `quarantine` — ingestion lines attributed to them, decrypted;
- `processing` — purposes, sources with license and retention (from the sources config),
  recipients (none) and retention.

Nothing about anyone else: records are selected by the subject's id, never by stream, shard or
interaction, so neighbours in the same shards or feedback on the same interactions stay out;
near-duplicate copies of their text held in other people's documents are left to the erasure plan.

Once the subject is crypto-shredded the export holds only the tombstone: the pseudonymous id, when
it was shredded and the request ids.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from warehouse.lineage import (
    Catalog,
    Predicate,
    SubjectReach,
    checkpoints_for,
    eval_runs,
    events_at,
    exclusion_rows,
    has_table,
    json_safe,
    model_versions,
    pred_eq,
    pred_in,
    scan_parquet,
    shard_versions_for,
    subject_events,
    subject_reach,
)

if TYPE_CHECKING:
    from warehouse.store import EventStore

FORMAT_VERSION = 1
# The events columns the export decodes (event_id as text, so lineage can match parent ids).
ACCESS_EVENT_COLUMNS = (
    "position, event_id::VARCHAR AS event_id, stream_id, stream_version, type, schema_version, occurred_at, "
    "recorded_at, subject_id, payload::VARCHAR AS payload, pii"
)
DSR_EVENT_TYPES = ("ErasureRequested", "AccessRequested", "SubjectShredded", "ErasureCompleted")
SAMPLE_FIELDS: dict[str, str] = {
    "sample_id": "VARCHAR",
    "doc_id": "VARCHAR",
    "source": "VARCHAR",
    "license": "VARCHAR",
    "subject_id": "VARCHAR",
    "text": "VARCHAR",
    "title": "VARCHAR",
    "url": "VARCHAR",
    "created_at": "TIMESTAMPTZ",
    "pii_spans": 'STRUCT("type" VARCHAR, "start" INTEGER, "end" INTEGER)[]',
    "subject_ids": "VARCHAR[]",
}
PURPOSES: tuple[dict[str, str], ...] = (
    {"purpose": "serving", "data": "interactions",
     "description": "answering the requests you sent to the model"},
    {"purpose": "quality monitoring", "data": "interactions, feedback",
     "description": "latency, error and feedback statistics; detecting failed answers"},
    {"purpose": "model improvement", "data": "documents, feedback corrections, failed interactions",
     "description": "curated documents train the models listed under `models`; failed interactions and "
                    "corrections become synthetic training samples listed under `synthetic`"},
    {"purpose": "data-subject requests", "data": "request records",
     "description": "recording and carrying out access and erasure requests"},
)  # fmt: skip


def access_export(store: EventStore, home: Path | str, subject_id: str, *,
                  sources_config: Path | str | None = None, request_id: str | None = None) -> dict[str, Any]:
    """Every record about `subject_id` (see the module docstring); JSON-serializable."""
    home = Path(home)
    now = datetime.now(UTC)
    header = {"kind": "access_export", "format_version": FORMAT_VERSION, "subject_id": subject_id,
              "generated_at": now, "request_id": request_id}
    if store.keys.is_shredded(subject_id):
        with store.connect() as con:
            tombstone = _tombstone(store, con, home, subject_id)
        return json_safe({
            **header,
            "confirmation": {"processed": False, "erased": True,
                             "statement": "Your personal data was erased (its key destroyed); only this "
                                          "record of the erasure remains."},
            "tombstone": tombstone,
        })
    with store.connect() as con:
        reach = subject_reach(con, store, home, subject_id)
        raw_events = events_at(con, [e["position"] for e in reach.events], ACCESS_EVENT_COLUMNS)
        documents = _documents(con, reach, subject_id)
        synthetic = _synthetic(con, reach, subject_id)
        checkpoints = checkpoints_for(reach.catalog, reach.own_rows + [r for r in reach.child_rows if _only_theirs(r, reach)])
        models = model_versions(checkpoints)
        evals = eval_runs(con, reach.catalog, [(m["model_name"], m["model_version"]) for m in models])
        quarantine = _quarantine(store, con, subject_id)
    events = [_event_out(e) for e in store.decode(raw_events)]
    sources = sorted({d["source"] for d in documents if d["source"]} | {s["source"] for s in synthetic if s["source"]})
    processed = bool(events or documents or synthetic or quarantine)
    return json_safe({
        **header,
        "confirmation": {
            "processed": processed, "erased": False,
            "statement": ("We process personal data about you; every record is copied below."
                          if processed else "We hold no personal data about you."),
        },
        "events": events,
        "documents": documents,
        "shard_versions": shard_versions_for(reach.catalog, reach.own_rows),
        "synthetic": synthetic,
        "models": models,
        "checkpoints": [{k: c[k] for k in ("event_id", "stage", "model_name", "model_version", "trained_at", "via")}
                        for c in checkpoints],
        "evals": evals,
        "quarantine": quarantine,
        "processing": processing_information(sources, sources_config),
        "counts": {"events": len(events), "documents": len(documents),
                   "samples": sum(len(d["samples"]) for d in documents), "synthetic": len(synthetic),
                   "models": len(models), "quarantine": len(quarantine)},
    })  # fmt: skip


def write_access_export(store: EventStore, home: Path | str, subject_id: str, out_path: Path | str,
                        **kwargs: Any) -> dict[str, Any]:
    """Write the export as JSON (atomically, readable by the owner only); returns it."""
    import json

    export = access_export(store, home, subject_id, **kwargs)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(export, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return export


def dsr_access_cmd(subject_id: str, out: Path, home: Path | None = None) -> dict[str, Any]:
    """`flywheel dsr access SUBJECT --out FILE`: writes the export, returns a summary to print."""
    from flywheel.config import Paths
    from warehouse.store import EventStore

    paths = Paths(Path(home).resolve()) if home else Paths.from_env()
    store = EventStore(paths.ensure().warehouse)
    export = write_access_export(store, paths.home, subject_id, out)
    return {"out": str(out), "subject_id": subject_id, **export["confirmation"],
            **export.get("counts", {}), **({"tombstone": export["tombstone"]} if "tombstone" in export else {})}


# --------------------------------------------------------------------------------------------------------
# Parts


def _event_out(e: Any) -> dict[str, Any]:
    data = e.data
    if hasattr(data, "payload"):  # UnknownEvent: its raw public and personal parts
        fields = {**dict(data.payload), **dict(data.personal or {})}
        extra: dict[str, Any] = {}
    else:
        fields = {k: v for k, v in vars(data).items() if k != "extra"}
        extra = dict(data.extra or {})
    return {"event_id": e.event_id, "type": e.type, "position": e.position, "stream_id": e.stream_id,
            "occurred_at": e.occurred_at, "recorded_at": e.recorded_at, "redacted": e.redacted,
            "data": fields, **({"extra": extra} if extra else {})}


def _current_rows(con: duckdb.DuckDBPyConnection, catalog: Catalog, partitions: Sequence[tuple[str, str]],
                  predicate: Predicate, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of the current data files (dvc/<path>/part-00000.parquet) of `partitions` matching
    `predicate`, with the PII span types of each (never the values)."""
    current = catalog.current_shards()
    files: dict[str, tuple[str, str, str]] = {}
    for key in partitions:
        s = current.get(key)
        if s is None or not s["path"]:
            continue
        data = catalog.home / "dvc" / s["path"] / "part-00000.parquet"
        if data.is_file():
            files[str(data)] = (key[0], key[1], s["dvc_md5"])
    rows = scan_parquet(con, list(files), [predicate], params, SAMPLE_FIELDS).to_pylist() if files else []
    for r in rows:
        r["stage"], r["partition_source"], r["dvc_md5"] = files[r.pop("file")]
        r["pii_types"] = sorted({span["type"] for span in r.pop("pii_spans") or ()})
    return rows


def _documents(con: duckdb.DuckDBPyConnection, reach: SubjectReach, subject_id: str) -> list[dict[str, Any]]:
    """The subject's documents: samples per stage with current text and PII types, versions, exclusions."""
    partitions = sorted({(v["stage"], v["source"]) for v in shard_versions_for(reach.catalog, reach.own_rows)})
    current = _current_rows(con, reach.catalog, partitions, pred_eq("subject_id", "s"), {"s": subject_id})
    versions = reach.catalog.shard_versions_by_manifest()
    docs: dict[str, dict[str, Any]] = {}

    def doc(doc_id: str, source: str | None, license_: str | None) -> dict[str, Any]:
        return docs.setdefault(doc_id, {"doc_id": doc_id, "source": source, "license": license_, "samples": {},
                                        "excluded": []})

    for r in reach.own_rows:
        v = versions.get(r["file"])
        if v is None or not r["doc_id"]:
            continue  # a checkpoint's inputs row: reported under models
        s = doc(r["doc_id"], r["source"], r["license"])["samples"].setdefault(
            r["sample_id"], {"sample_id": r["sample_id"], "stages": set(), "shard_versions": [], "text": None,
                             "text_from": None, "pii_types": None})
        s["stages"].add(v["stage"])
        s["shard_versions"].append({"stage": v["stage"], "source": v["source"], "dvc_md5": v["dvc_md5"],
                                    "materialized_at": v["materialized_at"], "position": v["position"]})
    for r in current:
        s = doc(r["doc_id"], r["source"], r["license"])["samples"].setdefault(
            r["sample_id"], {"sample_id": r["sample_id"], "stages": {r["stage"]}, "shard_versions": []})
        s.update(text=r["text"], text_from=f"current {r['stage']}/{r['partition_source']} shard ({r['dvc_md5']})",
                 pii_types=r["pii_types"], title=r["title"], url=r["url"], created_at=r["created_at"])
    excluded = exclusion_rows(con, reach.catalog, [pred_eq("subject_id", "s")], {"s": subject_id}, with_text=True)
    own_docs = set(docs) | {r["doc_id"] for r in excluded}
    for r in excluded:
        doc(r["doc_id"], r["source"], r["license"])["excluded"].append({
            "stage": r["partition_stage"], "pipeline_stage": r["stage"], "reason": r["reason"], "text": r["text"],
            # a duplicate's detail names the document it duplicates: shown only when that one is theirs too
            "duplicate_of": r["kept_doc_id"] if r["kept_doc_id"] in own_docs else None,
            "similarity": r["similarity"],
        })
    out = []
    for d in sorted(docs.values(), key=lambda d: d["doc_id"]):
        samples = []
        for s in sorted(d["samples"].values(), key=lambda s: (min(map(_rank, s["stages"])), s["sample_id"])):
            if s.get("text") is None:
                s["text_from"] = "not in a current shard version (kept in earlier versions until erased)"
            s["shard_versions"].sort(key=lambda v: (_rank(v["stage"]), v["position"]))
            samples.append({**s, "stages": sorted(s["stages"], key=_rank)})
        out.append({**d, "samples": samples})
    return out


def _only_theirs(row: Mapping[str, Any], reach: SubjectReach) -> bool:
    """A derived row holds only this subject's data: every parent event and listed subject is theirs."""
    own_events = {e["event_id"] for e in reach.events}
    own_ids = own_events | {r["doc_id"] for r in reach.own_rows} | {r["sample_id"] for r in reach.own_rows}
    subjects = set(row.get("subject_ids") or ())
    return set(row.get("parent_ids") or ()) <= own_ids and subjects <= {reach.subject_id}


def _synthetic(con: duckdb.DuckDBPyConnection, reach: SubjectReach, subject_id: str) -> list[dict[str, Any]]:
    """Samples derived from the subject's interactions or documents; others' ids never shown."""
    own_events = {e["event_id"] for e in reach.events}
    own_ids = own_events | {r["doc_id"] for r in reach.own_rows} | {r["sample_id"] for r in reach.own_rows}
    rows_by_id: dict[str, list[Mapping[str, Any]]] = {}
    for r in reach.child_rows:
        rows_by_id.setdefault(r["sample_id"], []).append(r)
    theirs = {sid for sid, rs in rows_by_id.items() if all(_only_theirs(r, reach) for r in rs)}
    partitions = sorted({(v["stage"], v["source"]) for c in reach.children for v in c["shard_versions"]})
    texts = {r["sample_id"]: r for r in _current_rows(con, reach.catalog, partitions, pred_in("sample_id", "ids"),
                                                      {"ids": sorted(theirs)})} if theirs else {}
    out = []
    for c in reach.children:
        mine = c["sample_id"] in theirs
        t = texts.get(c["sample_id"]) if mine else None
        out.append({
            "sample_id": c["sample_id"], "kind": c["kind"], "source": c["source"], "license": c["license"],
            "derived_from": sorted(set(c["parent_ids"]) & own_ids),
            "contains_other_peoples_data": not mine,
            "text": t["text"] if t else None, "pii_types": t["pii_types"] if t else None,
            "shard_versions": c["shard_versions"],
            "models": sorted({(k["model_name"], k["model_version"]) for k in c["checkpoints"] if k["model_version"]}),
        })  # fmt: skip
    return out


def _quarantine(store: EventStore, con: duckdb.DuckDBPyConnection, subject_id: str) -> list[dict[str, Any]]:
    """Ingestion lines quarantined under the subject's key, decrypted (same scheme as read_quarantine)."""
    if not has_table(con, "quarantine"):
        return []
    rows = con.sql(
        "SELECT file, byte_offset, line, length, reason, raw, raw_truncated, quarantined_at FROM quarantine "
        "WHERE key_id = ? ORDER BY file, byte_offset", params=[subject_id],
    ).to_arrow_table().to_pylist()
    if not rows:
        return rows
    key = store.keys.keys_for([subject_id], create=False).get(subject_id)
    for r in rows:
        blob = r.pop("raw")
        raw = key.decrypt(blob, f"{r['file']}:{r['byte_offset']}".encode()) if key and blob else None
        r["raw"] = raw.decode("utf-8", errors="replace") if raw is not None else None
    return rows


def _tombstone(store: EventStore, con: duckdb.DuckDBPyConnection, home: Path, subject_id: str) -> dict[str, Any]:
    """The pseudonymous id, when the key was destroyed, and the ids of the subject's requests."""
    shredded_at, request_ids = None, []
    # the keystore's own tombstone row (read-only; KeyStore has no accessor for it)
    uri = f"file:{store.keys.path}?mode=ro"
    with sqlite3.connect(uri, uri=True) as kcon:
        row = kcon.execute("SELECT shredded_at, request_id FROM tombstones WHERE subject_id = ?", [subject_id]).fetchone()
    if row:
        shredded_at = row[0]
        if row[1]:
            request_ids.append(row[1])
    positions = [e["position"] for e in subject_events(con, home, subject_id) if e["type"] in DSR_EVENT_TYPES]
    requests = events_at(con, positions, "type, occurred_at, payload->>'request_id' AS request_id").to_pylist()
    request_ids += [r["request_id"] for r in requests if r["request_id"]]
    unique = list(dict.fromkeys(request_ids))
    completed = con.execute(
        "SELECT payload->>'request_id', occurred_at FROM events WHERE type = 'ErasureCompleted' "
        "AND payload->>'request_id' IN (SELECT unnest($ids::VARCHAR[]))", {"ids": unique},
    ).fetchall() if unique else []
    return {"subject_id": subject_id, "shredded_at": shredded_at, "request_ids": unique,
            "requests": [{"type": r["type"], "request_id": r["request_id"], "at": r["occurred_at"]} for r in requests],
            "erasure_completed": [{"request_id": r[0], "at": r[1]} for r in completed]}


def processing_information(sources: Sequence[str], sources_config: Path | str | None = None) -> dict[str, Any]:
    """Art. 15(1)(a)-(h): purposes, categories and origin (sources with license and retention),
    recipients, retention."""
    declared: dict[str, Any] = {}
    note = None
    try:
        from flywheel.curation.sources import load_sources

        path = Path(sources_config) if sources_config else _sources_file()
        declared = {s.name: s for s in load_sources(path, Path("/nonexistent"), allow_missing=True)}
    except Exception as e:  # noqa: BLE001 - the export must not fail for want of the config
        note = f"sources config not readable: {e}"
    listed = []
    for name in sources:
        s = declared.get(name)
        listed.append({"source": name, "license": s.license if s else None, "domain": s.domain if s else None,
                       "retention_days": s.retention_days if s else None, "declared": s is not None})
    return {
        "controller_purposes": list(PURPOSES),
        "categories": ["interactions (prompts and answers)", "feedback (ratings, corrections, comments)",
                       "documents you wrote in the curated corpora", "derived training samples"],
        "sources": [{"source": "production logs", "license": None, "retention_days": None, "declared": True,
                     "origin": "your use of the service"}] + listed,
        "recipients": [],
        "recipients_statement": "none: no data is disclosed to third parties",
        "retention": {
            "events": "until erasure: personal fields are encrypted with a key of your own, destroyed on erasure",
            "documents": "per source (retention_days above; none = until erasure or the source is withdrawn)",
            "models": "model versions trained on your data are retrained without it after an erasure request",
        },
        "automated_decision_making": False,
        **({"note": note} if note else {}),
    }


def _sources_file() -> Path:
    """The sources config the curation assets read: $FLYWHEEL_SOURCES, else [curation] sources."""
    from flywheel.config import PROJECT_ROOT, Config

    name = os.environ.get("FLYWHEEL_SOURCES") or Config.load().section("curation").get("sources", "sources.demo.toml")
    p = Path(name)
    return p if p.is_absolute() else PROJECT_ROOT / p


def _rank(stage: str) -> int:
    return ("raw", "clean", "dedup").index(stage) if stage in ("raw", "clean", "dedup") else 3
