"""Versioned Parquet shards with per-sample provenance, written atomically.

A shard is one Parquet file (zstd) of samples. Every row carries the lineage contract's columns
(`SAMPLE_COLUMNS`); a manifest next to it lists the sample ids with their document, source, license,
subject and origin, plus a content digest, so lineage queries can read manifests with DuckDB
(`read_parquet('.../manifest.parquet')`) without opening the data.

Writes are atomic: temp file in the same directory, fsync, rename, fsync of the directory — a reader
sees the old file or the new one, never half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PII_SPAN_TYPE = pa.list_(pa.struct([("type", pa.string()), ("start", pa.int32()), ("end", pa.int32())]))

# The lineage contract: every row of every shard has these columns (more may follow).
SAMPLE_COLUMNS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("license", pa.string()),
        ("subject_id", pa.string()),
        ("origin_event_id", pa.string()),
        ("parent_ids", pa.list_(pa.string())),
        ("text", pa.string()),
        ("pii_spans", PII_SPAN_TYPE),
    ]
)
MANIFEST_COLUMNS = ["sample_id", "doc_id", "source", "license", "subject_id", "origin_event_id", "parent_ids"]


def sample_id_for(doc_id: str, text: str) -> str:
    """A sample is a document's text as curated: the id changes when the curated text does."""
    return hashlib.sha256(f"{doc_id}\x1f{text}".encode()).hexdigest()[:32]


def with_sample_ids(table: pa.Table) -> pa.Table:
    ids = [sample_id_for(d, t) for d, t in zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist(), strict=True)]
    col = pa.array(ids, pa.string())
    if "sample_id" in table.column_names:
        return table.set_column(table.schema.get_field_index("sample_id"), "sample_id", col)
    return table.add_column(0, "sample_id", col)


def conform(table: pa.Table) -> pa.Table:
    """Order the lineage columns first (adding null ones that are missing), keep the rest after."""
    cols, fields = [], []
    for f in SAMPLE_COLUMNS:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type) if f.name != "parent_ids" else pa.array([[]] * table.num_rows, f.type))
        fields.append(f)
    for name in table.column_names:
        if name not in SAMPLE_COLUMNS.names:
            cols.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet_atomic(table: pa.Table, path: Path, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write `table` to `path` (zstd) atomically: temp file, fsync, rename, directory fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in metadata.items()}})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd", row_group_size=64_000)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def write_json_atomic(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


@dataclass(frozen=True)
class ShardInfo:
    """What was written: enough to name, verify and find this shard version again."""

    stage: str
    source: str
    directory: str
    data_file: str
    manifest_file: str
    rows: int
    content_digest: str  # sha256 over (sample_id, sha256(text)) in row order
    sample_ids_digest: str  # sha256 over the sorted sample ids

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def content_digest(table: pa.Table) -> str:
    h = hashlib.sha256()
    for sid, text in zip(table.column("sample_id").to_pylist(), table.column("text").to_pylist(), strict=True):
        h.update(sid.encode())
        h.update(hashlib.sha256((text or "").encode()).digest())
    return h.hexdigest()


def write_shard(table: pa.Table, directory: Path, *, stage: str, source: str) -> ShardInfo:
    """Write a shard (data + manifest) into `directory`, replacing what was there."""
    table = conform(table)
    if table.num_rows and pc.count_distinct(table.column("sample_id")).as_py() != table.num_rows:
        raise ValueError(f"{directory}: duplicate sample_id in shard for source {source!r}")
    digest = content_digest(table)
    data = write_parquet_atomic(table, directory / "part-00000.parquet", metadata={"flywheel.stage": stage, "flywheel.source": source})
    manifest = table.select(MANIFEST_COLUMNS)
    man = write_parquet_atomic(manifest, directory / "manifest.parquet")
    ids_digest = hashlib.sha256("\n".join(sorted(table.column("sample_id").to_pylist())).encode()).hexdigest()
    info = ShardInfo(stage, source, str(directory), str(data), str(man), table.num_rows, digest, ids_digest)
    write_json_atomic(info.to_dict(), directory / "shard.json")
    return info
