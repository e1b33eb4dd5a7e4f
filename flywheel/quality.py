"""Data-quality suites with great-expectations, run on Arrow tables (shards, preference sets).

Each suite is a list of expectations; `validate` runs them on an ephemeral GX context and returns one
`CheckOutcome` per expectation (passed, observed counts, a few unexpected values), which Dagster
asset checks turn into `AssetCheckResult`s. Derived columns (residual PII hits, eval 13-gram hits,
chosen == rejected) are computed here first, so every rule is an ordinary GX expectation over a
column and the report says exactly which rows failed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    observed: dict[str, Any] = field(default_factory=dict)


def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def validate(table: pa.Table, expectations: Sequence[tuple[str, Any]], *, name: str) -> list[CheckOutcome]:
    """Run `(check name, GX expectation)` pairs on `table`; one outcome per pair."""
    ctx = _context()
    asset = ctx.data_sources.add_pandas(f"{name}-source").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": table.to_pandas()})
    outcomes = []
    for check, expectation in expectations:
        result = batch.validate(expectation)
        r = result.result or {}
        observed = {k: r[k] for k in ("element_count", "unexpected_count", "unexpected_percent", "observed_value",
                                      "missing_count") if k in r}
        if r.get("partial_unexpected_list"):
            observed["examples"] = [str(x)[:120] for x in r["partial_unexpected_list"][:5]]
        outcomes.append(CheckOutcome(check, bool(result.success), observed))
    return outcomes


def shard_expectations(*, allowed_licenses: Sequence[str], min_chars: int, max_chars: int, columns: Sequence[str]):
    """The dedup-shard suite (issue: schema, ids, uniqueness, length, license, PII, eval n-grams)."""
    import great_expectations as gx

    E = gx.expectations
    return [
        ("schema", E.ExpectTableColumnsToMatchSet(column_set=list(columns), exact_match=False)),
        ("sample_id_not_null", E.ExpectColumnValuesToNotBeNull(column="sample_id")),
        ("doc_id_not_null", E.ExpectColumnValuesToNotBeNull(column="doc_id")),
        ("sample_id_unique", E.ExpectColumnValuesToBeUnique(column="sample_id")),
        ("text_length_bounds", E.ExpectColumnValueLengthsToBeBetween(column="text", min_value=min_chars, max_value=max_chars)),
        ("license_allowed", E.ExpectColumnValuesToBeInSet(column="license", value_set=list(allowed_licenses))),
        ("no_residual_pii", E.ExpectColumnValuesToBeBetween(column="residual_pii_hits", min_value=0, max_value=0)),
        ("no_eval_13gram", E.ExpectColumnValuesToBeBetween(column="eval_ngram_hits", min_value=0, max_value=0)),
    ]


def with_derived_columns(table: pa.Table, eval_index=None) -> pa.Table:
    """Add `residual_pii_hits` and `eval_ngram_hits` (exhaustive: every 13-gram of every row)."""
    import numpy as np

    from flywheel.curation.pii import find_residual_pii

    texts = table.column("text").to_pylist()
    residual = [len(find_residual_pii(t or "")) for t in texts]
    if eval_index is not None and texts:
        doc_rows, _, _ = eval_index.ngram_hits(texts)
        hits = np.bincount(np.asarray(doc_rows, dtype=np.int64), minlength=len(texts))
    else:
        hits = np.zeros(len(texts), dtype=np.int64)
    return table.append_column("residual_pii_hits", pa.array(residual, pa.int64())).append_column(
        "eval_ngram_hits", pa.array(hits, pa.int64())
    )


def preference_expectations(*, min_chars: int, max_chars: int):
    import great_expectations as gx

    E = gx.expectations
    return [
        ("non_empty", E.ExpectTableRowCountToBeBetween(min_value=1)),
        ("pair_id_unique", E.ExpectColumnValuesToBeUnique(column="pair_id")),
        ("chosen_differs_from_rejected", E.ExpectColumnValuesToBeInSet(column="chosen_equals_rejected", value_set=[False])),
        ("prompt_length", E.ExpectColumnValueLengthsToBeBetween(column="prompt_text", min_value=1, max_value=max_chars)),
        ("chosen_length", E.ExpectColumnValueLengthsToBeBetween(column="chosen_text", min_value=min_chars, max_value=max_chars)),
        ("rejected_length", E.ExpectColumnValueLengthsToBeBetween(column="rejected_text", min_value=min_chars, max_value=max_chars)),
        ("no_eval_13gram", E.ExpectColumnValuesToBeBetween(column="eval_ngram_hits", min_value=0, max_value=0)),
    ]
