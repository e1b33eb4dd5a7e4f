"""The document type every curation step reads and writes: one Arrow schema, stable ids.

A document is a row of `DOC_SCHEMA`. Steps may add columns (quality signals, PII spans, dedup
cluster ids) but never drop these. `doc_id` is a stable hash of (source, source-local key), so the
same input always yields the same id and lineage can name it across runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import pyarrow as pa

DOC_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),  # stable: doc_id_for(source, key)
        ("source", pa.string()),  # the configured source name, e.g. "stackexchange_history"
        ("license", pa.string()),  # SPDX-like id from the source config, e.g. "CC-BY-SA-3.0"
        ("subject_id", pa.string()),  # pseudonymous data subject (keystore HMAC), when known
        ("created_at", pa.timestamp("us", tz="UTC")),  # when the source says the text was written
        ("text", pa.string()),
        ("url", pa.string()),
        ("title", pa.string()),
        ("parent_ids", pa.list_(pa.string())),  # documents this one derives from (comments → post)
        ("meta", pa.string()),  # JSON object with source-specific fields
    ]
)


def doc_id_for(source: str, key: str) -> str:
    """A stable document id: the first 128 bits of SHA-256 over `source` and the source-local key."""
    return hashlib.sha256(f"{source}\x1f{key}".encode()).hexdigest()[:32]


def documents_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts with DOC_SCHEMA's keys; missing ones are null) → an Arrow table of DOC_SCHEMA."""
    cols: dict[str, list[Any]] = {name: [] for name in DOC_SCHEMA.names}
    for r in rows:
        for name in DOC_SCHEMA.names:
            v = r.get(name)
            if name == "parent_ids" and v is None:
                v = []
            cols[name].append(v)
    return pa.table(cols, schema=DOC_SCHEMA)


def created(value: str | datetime | None) -> datetime | None:
    """Parse an ISO-8601 time (naive means UTC)."""
    if value is None or isinstance(value, datetime):
        return value
    from datetime import UTC

    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)
