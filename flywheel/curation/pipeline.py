"""The curation stages, composed from the steps: read → clean → dedup. Pure functions over tables.

    raw   = read_stage(source, pseudonymize=keys.pseudonymize)        # documents + bad records
    clean = clean_stage(raw.kept)                                     # normalize, boilerplate,
                                                                      # quality filters, PII scrub
    final = dedup_stage(clean.kept, index=MinHashIndex(dir), eval_index=EvalNgramIndex(dir),
                        batch_id=source.name)                         # firewall, exact + near dedup

Each stage returns what it kept, what it excluded (with a `reason` per row — nothing vanishes), and
flat metrics for asset metadata. Excluded rows keep their text PII-scrubbed: a dropped page is still
a copy of someone's data. Documents of erased subjects are dropped at the read stage and excluded
without their text (only the id and the reason remain).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flywheel.curation.documents import DOC_SCHEMA, documents_table
from flywheel.shards import with_sample_ids

EXCLUDED_EXTRA = [("stage", pa.string()), ("reason", pa.string()), ("detail", pa.string())]


@dataclass
class StageResult:
    kept: pa.Table
    excluded: pa.Table
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, pa.Table] = field(default_factory=dict)


def _excluded(table: pa.Table, stage: str, reasons: Iterable[str], details: Iterable[str | None] | None = None) -> pa.Table:
    """Documents (DOC_SCHEMA columns) + stage, reason, detail."""
    base = table.select([n for n in DOC_SCHEMA.names if n in table.column_names])
    reasons = list(reasons)
    details = list(details) if details is not None else [None] * len(reasons)
    return (
        base.append_column("stage", pa.array([stage] * base.num_rows, pa.string()))
        .append_column("reason", pa.array(reasons, pa.string()))
        .append_column("detail", pa.array(details, pa.string()))
    )


def empty_excluded() -> pa.Table:
    return pa.schema(list(DOC_SCHEMA) + [pa.field(n, t) for n, t in EXCLUDED_EXTRA]).empty_table()


def _concat(tables: list[pa.Table]) -> pa.Table:
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return empty_excluded()
    return pa.concat_tables([t.select(empty_excluded().schema.names).cast(empty_excluded().schema) for t in tables])


def _scrub_texts(table: pa.Table) -> pa.Table:
    from flywheel.curation.pii import scrub_table

    if not table.num_rows:
        return table
    scrubbed, _ = scrub_table(table)
    return scrubbed.drop_columns([c for c in ("pii_spans",) if c in scrubbed.column_names])


# --- read -----------------------------------------------------------------------------------------


def read_stage(
    source,
    *,
    pseudonymize: Callable[[str], str] | None = None,
    erased_subjects: set[str] | frozenset[str] = frozenset(),
) -> StageResult:
    """Every document of a configured source; bad records and erased subjects' documents excluded."""
    from flywheel.curation.readers import read_source

    bad: list[dict[str, Any]] = []

    def on_bad(record) -> None:
        bad.append({"path": str(record.path), "offset": getattr(record, "offset", None), "reason": record.reason})

    docs = documents_table(read_source(source, pseudonymize=pseudonymize, on_bad_record=on_bad))
    excluded = []
    if erased_subjects and docs.num_rows:
        erased = pc.is_in(docs.column("subject_id"), pa.array(sorted(erased_subjects), pa.string()))
        erased = pc.fill_null(erased, False)
        gone = docs.filter(erased)
        if gone.num_rows:
            blank = gone.set_column(gone.schema.get_field_index("text"), "text", pa.nulls(gone.num_rows, pa.string()))
            excluded.append(_excluded(blank, "read", ["erased_subject"] * gone.num_rows))
        docs = docs.filter(pc.invert(erased))
    if bad:
        rows = documents_table(
            {"doc_id": f"bad:{b['path']}:{b['offset']}", "source": source.name, "license": source.license} for b in bad
        )
        excluded.append(_excluded(rows, "read", ["bad_record"] * len(bad), [json.dumps(b) for b in bad]))
    return StageResult(
        kept=docs,
        excluded=_concat(excluded),
        metrics={
            "documents": docs.num_rows,
            "bad_records": len(bad),
            "erased_subject_documents": sum(t.num_rows for t in excluded if t.column("reason")[0].as_py() == "erased_subject"),
            "subjects": len(set(docs.column("subject_id").drop_null().to_pylist())),
            "files": len(source.paths),
        },
    )


# --- clean ----------------------------------------------------------------------------------------


def clean_stage(raw: pa.Table, *, min_boilerplate_docs: int = 3, quality: dict[str, Any] | None = None,
                boilerplate: bool = True) -> StageResult:
    """Normalize → strip boilerplate → quality filters → PII scrub. Kept rows become samples.

    `quality` overrides the filters per source (`QualityFilters.from_config`); `boilerplate=False`
    keeps repeated lines (structured text, where short lines like "Answer: 12" repeat legitimately).
    """
    from flywheel.curation.boilerplate import BoilerplateReport, remove_boilerplate
    from flywheel.curation.filters import QualityFilters, run_filters
    from flywheel.curation.normalize import normalize_table
    from flywheel.curation.pii import find_residual_pii, scrub_table

    normalized = normalize_table(raw)
    if boilerplate:
        stripped, boiler = remove_boilerplate(normalized, min_docs=min_boilerplate_docs)
    else:
        stripped, boiler = normalized, BoilerplateReport(documents=normalized.num_rows)
    filtered = run_filters(stripped, QualityFilters.from_config(quality or {}))
    scrubbed, pii_counts = scrub_table(filtered.kept)
    residual = [bool(find_residual_pii(t or "")) for t in scrubbed.column("text").to_pylist()]
    if any(residual):  # defence in depth: never ship a sample the residual check still flags
        keep_mask = pa.array([not r for r in residual])
        leftover = scrubbed.filter(pc.invert(keep_mask))
        scrubbed = scrubbed.filter(keep_mask)
    else:
        leftover = scrubbed.slice(0, 0)
    kept = with_sample_ids(scrubbed)
    excluded = _concat([
        _excluded(_scrub_texts(filtered.excluded), "clean", filtered.excluded.column("filter_reason").to_pylist()),
        _excluded(_scrub_texts(leftover), "clean", ["residual_pii"] * leftover.num_rows),
    ])
    words = np.array([len((t or "").split()) for t in kept.column("text").to_pylist()], dtype=np.int64)
    return StageResult(
        kept=kept,
        excluded=excluded,
        metrics={
            "documents_in": raw.num_rows,
            "documents_out": kept.num_rows,
            "dropped_by_reason": dict(Counter(excluded.column("reason").to_pylist())),
            "pii_spans_by_type": dict(pii_counts),
            "boilerplate": boiler.as_metadata(),
            "words": int(words.sum()),
            "token_estimate": int(sum(len(t or "") for t in kept.column("text").to_pylist()) / 4),
            "signal_columns": list(filtered.signal_columns),
        },
    )


# --- dedup + contamination firewall ---------------------------------------------------------------


def dedup_stage(clean: pa.Table, *, index, eval_index=None, batch_id: str, threshold: float = 0.8) -> StageResult:
    """Contamination firewall first (a leaked eval item must not anchor a cluster), then exact +
    near dedup against every earlier batch in the persistent index (this batch replaces its own
    earlier version there)."""
    from flywheel.curation.decontam import decontaminate_table
    from flywheel.curation.dedup import dedup_table

    excluded: list[pa.Table] = []
    contaminated_n = 0
    if eval_index is not None and clean.num_rows:
        clean, contaminated = decontaminate_table(clean, eval_index)
        contaminated_n = contaminated.num_rows
        if contaminated_n:
            details = [
                json.dumps({k: r.get(k) for k in ("eval_set", "eval_item_id", "ngram_hits", "items_hit", "similarity") if k in r},
                           default=str)
                for r in contaminated.to_pylist()
            ]
            excluded.append(_excluded(contaminated, "dedup", contaminated.column("reason").to_pylist(), details))
    index.remove_batch(batch_id)  # re-materializing a partition replaces its earlier version
    result = dedup_table(clean, index, threshold, batch_id=batch_id)
    if result.excluded.num_rows:
        details = [json.dumps({"kept_doc_id": r["kept_doc_id"], "kept_batch_id": r["kept_batch_id"],
                               "similarity": r["similarity"]}) for r in result.excluded.to_pylist()]
        excluded.append(_excluded(result.excluded, "dedup", result.excluded.column("reason").to_pylist(), details))
    sizes = Counter(result.clusters.column("cluster_id").to_pylist()) if result.clusters.num_rows else Counter()
    return StageResult(
        kept=result.kept,
        excluded=_concat(excluded),
        metrics={
            "documents_in": clean.num_rows + contaminated_n,
            "documents_out": result.kept.num_rows,
            "contaminated": contaminated_n,
            "exact_duplicates": int(result.stats.get("exact_duplicates", 0)),
            "near_duplicates": int(result.stats.get("near_duplicates", 0)),
            "dedup_rate": 1 - result.kept.num_rows / max(clean.num_rows, 1),
            "clusters": len(sizes),
            "largest_cluster": max(sizes.values(), default=0),
            "cluster_size_histogram": dict(Counter(sizes.values())),
        },
        extra={"clusters": result.clusters, "pairs": result.pairs},
    )
