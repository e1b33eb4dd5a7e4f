"""Production health from the event log: serving metrics, feedback rates, prompt drift, and alerts.

    metrics = production_metrics(store, after=0, window="1 hour")   # one row per model version × window
    drift = prompt_drift(recent_prompts, reference_texts)          # DriftResult: js, baseline, excess, p
    fired = alerts(metrics, DEFAULT_THRESHOLDS) + alerts({"prompt_drift": drift.excess}, DEFAULT_THRESHOLDS)
    # every alert is {"kind", "metric", "value", "threshold", "detail"}: AlertRaised(**alert) records it

Metrics (`production_metrics`, SQL over `proj_interactions`/`proj_feedback`, plus decrypted responses
for the refusal rate; interactions with position in `(after, upto]`, grouped by model version and a
`time_bucket` of `occurred_at` in UTC):

| column | definition |
|---|---|
| `requests`, `errors`, `error_rate` | interactions; `status = 'error'`; their ratio |
| `latency_p50_ms`, `latency_p95_ms` | `quantile_cont` (linear interpolation, = `numpy.percentile`) of `latency_ms` over answered (non-error) requests |
| `tokens_per_s` | Σ completion tokens / Σ latency seconds over answered requests (null when latency is 0) |
| `refusals`, `refusal_rate` | answered requests whose response `looks_like_refusal`, / answered requests |
| `thumbs_up`, `thumbs_down`, `thumbs_up_share`, `thumbs_down_share` | feedback events (position ≤ upto) on these interactions; share of thumbs votes |
| `feedback_rate`, `mean_rating` | interactions with any feedback / requests; mean of the ratings given |

Prompt drift (`prompt_drift`): the Jensen–Shannon divergence (bits, 0–1) between the unigram+bigram
distributions (lowercased `\\w+` tokens) of recent prompts and a reference sample; n-grams seen fewer
than `min_count` times in both together share one "<rare>" bin, and both distributions get additive
(Lidstone) smoothing `alpha` over the shared vocabulary. Two finite samples of one distribution differ
by chance, so the raw JS is above 0; `baseline` is the mean JS of `permutations` random re-splits of
the pooled prompts (same sizes, seeded), `excess = js − baseline` is the drift beyond sampling noise
(≈ 0 when nothing changed), `z` the same in units of the re-splits' spread, `p_value` the permutation
p-value. `drift_by_domain` does the same per domain (plus the JS of the domain mix);
docs/flywheel-loop.md has measured values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from flywheel.failures import last_user_message, looks_like_refusal

if TYPE_CHECKING:
    from warehouse.store import EventStore

# Starting points, to tune per deployment. A number is an upper bound; {"min": x} a lower bound.
DEFAULT_THRESHOLDS: dict[str, float | dict[str, float]] = {
    "error_rate": 0.05,
    "latency_p95_ms": 2000.0,
    "refusal_rate": 0.2,
    "thumbs_down_share": 0.5,
    "tokens_per_s": {"min": 1.0},
    "prompt_drift": 0.02,
}

METRICS_SQL = """
WITH i AS (
    SELECT i.*, coalesce(r.refused, false) AS refused
    FROM proj_interactions i LEFT JOIN refusal_flags r ON r.event_id = i.event_id::VARCHAR
    WHERE i.position > $after AND i.position <= $upto
),
f AS (
    SELECT request_id, count(*) FILTER (thumbs = 1) AS up, count(*) FILTER (thumbs = -1) AS down,
           count(*) AS events, sum(rating) AS rating_sum, count(rating) AS ratings
    FROM proj_feedback WHERE position <= $upto GROUP BY request_id
)
SELECT {group_model} AS model_version,
       {group_window} AS window_start,
       count(*) AS requests,
       count(*) FILTER (i.status = 'error') AS errors,
       count(*) FILTER (i.status = 'error') / count(*) AS error_rate,
       quantile_cont(i.latency_ms, 0.5) FILTER (i.status IS DISTINCT FROM 'error') AS latency_p50_ms,
       quantile_cont(i.latency_ms, 0.95) FILTER (i.status IS DISTINCT FROM 'error') AS latency_p95_ms,
       sum(i.completion_tokens) FILTER (i.status IS DISTINCT FROM 'error')
           / nullif(sum(i.latency_ms) FILTER (i.status IS DISTINCT FROM 'error') / 1000.0, 0) AS tokens_per_s,
       count(*) FILTER (i.refused) AS refusals,
       count(*) FILTER (i.refused) / nullif(count(*) FILTER (i.status IS DISTINCT FROM 'error'), 0) AS refusal_rate,
       coalesce(sum(f.up), 0)::BIGINT AS thumbs_up,
       coalesce(sum(f.down), 0)::BIGINT AS thumbs_down,
       sum(f.up)::DOUBLE / nullif(sum(f.up) + sum(f.down), 0) AS thumbs_up_share,
       sum(f.down)::DOUBLE / nullif(sum(f.up) + sum(f.down), 0) AS thumbs_down_share,
       count(f.request_id) / count(*) AS feedback_rate,
       sum(f.rating_sum)::DOUBLE / nullif(sum(f.ratings), 0) AS mean_rating
FROM i LEFT JOIN f USING (request_id)
GROUP BY ALL
ORDER BY model_version, window_start
"""


def _refusal_flags(store: EventStore, after: int, upto: int, batch: int = 20_000) -> pa.Table:
    """(event_id, refused) for every readable answered interaction in the window (decrypts responses)."""
    ids: list[str] = []
    flags: list[bool] = []
    pos = after
    while pos < upto:
        table = store.read_arrow(types=["InteractionLogged"], after=pos, upto=upto, limit=batch)
        if table.num_rows == 0:
            break
        events = store.decode(table)
        for ev in events:
            if not ev.redacted and getattr(ev.data, "status", "ok") != "error":
                ids.append(ev.event_id)
                flags.append(looks_like_refusal(ev.data.response))
        pos = events[-1].position
    return pa.table({"event_id": pa.array(ids, pa.string()), "refused": pa.array(flags, pa.bool_())})


def production_metrics(
    store: EventStore, after: int = 0, upto: int | None = None, *, window: str | None = "1 hour",
    by_model: bool = True, refusals: bool = True, catch_up: bool = True,
) -> pa.Table:
    """Serving and feedback metrics per model version (`by_model`) and time window (module docstring).

    `window` is a DuckDB interval ("15 minutes", "1 day"); None gives one row per model version over the
    whole range. `refusals=False` skips decryption (`refusals` is then 0 and `refusal_rate` null).
    """
    if catch_up:
        from warehouse import projections

        projections.catch_up(store)
    upto = store.head() if upto is None else upto
    flags = _refusal_flags(store, after, upto) if refusals else pa.table(
        {"event_id": pa.array([], pa.string()), "refused": pa.array([], pa.bool_())})
    sql = METRICS_SQL.format(
        group_model="i.model_version" if by_model else "'*'",
        group_window=(
            "timezone('UTC', time_bucket(CAST($window AS INTERVAL), timezone('UTC', i.occurred_at)))"
            if window else "CAST(NULL AS TIMESTAMPTZ)"
        ),
    )
    params: dict[str, Any] = {"after": after, "upto": upto}
    if window:
        params["window"] = window
    with store.connect() as con:
        con.register("refusal_flags", flags)
        try:
            table = con.sql(sql, params=params).to_arrow_table()
        finally:
            con.unregister("refusal_flags")
    if not refusals:
        table = table.set_column(table.schema.get_field_index("refusal_rate"), "refusal_rate",
                                 pa.nulls(table.num_rows, pa.float64()))
    return table


def prompts(store: EventStore, after: int = 0, upto: int | None = None, *, model_version: str | None = None,
            limit: int | None = None) -> list[str]:
    """The last user message of every readable interaction in `(after, upto]` (decrypted), in log order."""
    out: list[str] = []
    for ev in store.read(types=["InteractionLogged"], after=after, upto=upto):
        if ev.redacted or (model_version is not None and ev.data.model_version != model_version):
            continue
        p = last_user_message(ev.data.messages)
        if p:
            out.append(p)
            if limit is not None and len(out) >= limit:
                break
    return out


# --------------------------------------------------------------------------------------------------------
# Prompt drift


@dataclass(frozen=True)
class DriftResult:
    js: float  # Jensen–Shannon divergence in bits, 0..1
    baseline: float  # mean JS of random re-splits of the pooled sample (sampling noise at these sizes)
    excess: float  # js − baseline: the drift score the alert uses ("prompt_drift")
    z: float  # excess / standard deviation of the re-split JS: the same in noise units
    p_value: float  # share of re-splits with JS ≥ js (permutation test, +1 smoothed)
    n_recent: int
    n_reference: int
    vocabulary: int
    top_terms: list[tuple[str, float]] = field(default_factory=list)  # (n-gram, p_recent − p_reference)

    def to_dict(self) -> dict[str, Any]:
        return {"js": self.js, "baseline": self.baseline, "excess": self.excess, "z": self.z, "p_value": self.p_value,
                "n_recent": self.n_recent, "n_reference": self.n_reference, "vocabulary": self.vocabulary,
                "top_terms": [list(t) for t in self.top_terms]}  # fmt: skip


def _js_bits(p: np.ndarray, q: np.ndarray) -> float:
    m = 0.5 * (p + q)
    kl = lambda a: float(np.sum(a * (np.log2(a) - np.log2(m))))  # entries are > 0: smoothed
    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def _smooth(counts: np.ndarray, alpha: float) -> np.ndarray:
    c = counts.astype(np.float64) + alpha
    return c / c.sum()


def prompt_drift(
    recent: Sequence[str], reference: Sequence[str], *, alpha: float = 0.01, min_count: int = 3,
    permutations: int = 50, seed: int = 0, top: int = 10, min_docs: int = 5,
) -> DriftResult:
    """Jensen–Shannon drift of `recent` prompts from `reference` texts, with a permutation baseline.

    n-grams seen fewer than `min_count` times in both samples together are pooled into one "rare" bin
    (they say little about a distribution and dominate the noise). Needs at least `min_docs` texts on
    each side (ValueError otherwise: a divergence of three prompts is noise).
    """
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import CountVectorizer

    recent, reference = [t for t in recent if t], [t for t in reference if t]
    if len(recent) < min_docs or len(reference) < min_docs:
        raise ValueError(f"prompt_drift needs ≥ {min_docs} texts on each side, got {len(recent)} recent and "
                         f"{len(reference)} reference")
    vec = CountVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b", lowercase=True, dtype=np.int64)
    x = vec.fit_transform(list(recent) + list(reference)).tocsr()
    names = np.append(vec.get_feature_names_out(), "<rare>")
    keep = np.asarray(x.sum(axis=0)).ravel() >= min_count
    x = hstack([x[:, keep], csr_matrix(x[:, ~keep].sum(axis=1))]).tocsr()
    names = names[np.append(np.flatnonzero(keep), len(names) - 1)]
    nr = len(recent)
    a = np.asarray(x[:nr].sum(axis=0)).ravel()
    b = np.asarray(x[nr:].sum(axis=0)).ravel()
    p, q = _smooth(a, alpha), _smooth(b, alpha)
    js = _js_bits(p, q)
    rng = np.random.default_rng(seed)
    total = a + b
    xt = x.T.tocsr()
    null = np.empty(permutations)
    for k in range(permutations):
        pick = np.zeros(x.shape[0])
        pick[rng.permutation(x.shape[0])[:nr]] = 1.0
        a_k = xt @ pick  # counts of a random re-split's "recent" side
        null[k] = _js_bits(_smooth(a_k, alpha), _smooth(total - a_k, alpha))
    baseline = float(null.mean()) if permutations else 0.0
    spread = float(null.std()) if permutations > 1 else float("nan")
    diff = p - q
    order = np.argsort(-np.abs(diff), kind="stable")[:top]
    return DriftResult(
        js=js, baseline=baseline, excess=js - baseline,
        z=(js - baseline) / spread if spread and spread > 0 else float("nan"),
        p_value=float((1 + np.sum(null >= js)) / (1 + permutations)) if permutations else float("nan"),
        n_recent=nr, n_reference=len(reference), vocabulary=int(keep.sum()),
        top_terms=[(str(names[i]), float(diff[i])) for i in order],
    )


def keyword_domains(mapping: Mapping[str, Sequence[str]], default: str = "other") -> Callable[[str], str]:
    """A `domain_of` from {domain: [keywords]}: the first domain with a keyword (word match, any case)."""
    compiled = [(d, re.compile(r"\b(?:" + "|".join(re.escape(k) for k in kws) + r")\b", re.IGNORECASE))
                for d, kws in mapping.items() if kws]

    def domain_of(text: str) -> str:
        for d, rx in compiled:
            if rx.search(text):
                return d
        return default

    return domain_of


def drift_by_domain(
    recent: Sequence[str], reference: Sequence[str], domain_of: Callable[[str], str], *, min_docs: int = 5,
    **kwargs: Any,
) -> dict[str, Any]:
    """Drift overall, per domain (domains with ≥ `min_docs` texts on both sides) and of the domain mix.

    Returns {"all": DriftResult, "domains": {domain: DriftResult}, "skipped": {domain: (n_recent,
    n_reference)}, "mix_js": JS in bits between the two domain distributions, "mix": {domain: (share
    recent, share reference)}}.
    """
    rd = [domain_of(t) for t in recent]
    fd = [domain_of(t) for t in reference]
    names = sorted(set(rd) | set(fd))
    out: dict[str, Any] = {"all": prompt_drift(recent, reference, min_docs=min_docs, **kwargs), "domains": {},
                           "skipped": {}}
    for d in names:
        r = [t for t, x in zip(recent, rd, strict=True) if x == d]
        f = [t for t, x in zip(reference, fd, strict=True) if x == d]
        if len(r) >= min_docs and len(f) >= min_docs:
            out["domains"][d] = prompt_drift(r, f, min_docs=min_docs, **kwargs)
        else:
            out["skipped"][d] = (len(r), len(f))
    rc = np.array([rd.count(d) for d in names], dtype=np.float64)
    fc = np.array([fd.count(d) for d in names], dtype=np.float64)
    out["mix_js"] = _js_bits(_smooth(rc, 0.5), _smooth(fc, 0.5))
    out["mix"] = {d: (rc[i] / max(rc.sum(), 1), fc[i] / max(fc.sum(), 1)) for i, d in enumerate(names)}
    return out


# --------------------------------------------------------------------------------------------------------
# Alerts

_GROUP_KEYS = ("model_version", "window_start", "domain")


def _bound(threshold: float | Mapping[str, float]) -> tuple[str, float]:
    if isinstance(threshold, Mapping):
        if len(threshold) != 1 or next(iter(threshold)) not in ("min", "max"):
            raise ValueError(f"threshold {threshold!r}: use a number (upper bound), {{'max': x}} or {{'min': x}}")
        (k, v), = threshold.items()
        return k, float(v)
    return "max", float(threshold)


def alerts(
    metrics: Mapping[str, Any] | pa.Table | Sequence[Mapping[str, Any]],
    thresholds: Mapping[str, float | Mapping[str, float]] = DEFAULT_THRESHOLDS,
    *, min_requests: int = 20,
) -> list[dict[str, Any]]:
    """Every metric beyond its threshold, as AlertRaised fields: kind, metric, value, threshold, detail.

    `metrics` is one mapping or rows (a table from `production_metrics`, or dicts); a row's group keys
    (model_version, window_start, domain) go into `detail`. Rows with a `requests` count below
    `min_requests` are skipped (a rate over a handful of requests is noise); missing or NaN values never fire.
    """
    rows: list[Mapping[str, Any]]
    if isinstance(metrics, pa.Table):
        rows = metrics.to_pylist()
    elif isinstance(metrics, Mapping):
        rows = [metrics]
    else:
        rows = list(metrics)
    out: list[dict[str, Any]] = []
    for row in rows:
        if "requests" in row and row["requests"] is not None and row["requests"] < min_requests:
            continue
        group = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()
                 if k in _GROUP_KEYS and v is not None}
        for metric, threshold in thresholds.items():
            value = row.get(metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            direction, bound = _bound(threshold)
            if (direction == "max" and value > bound) or (direction == "min" and value < bound):
                detail = {"direction": "above" if direction == "max" else "below", **group}
                if "requests" in row:
                    detail["requests"] = row["requests"]
                out.append({
                    "kind": "drift" if "drift" in metric else "health", "metric": metric, "value": float(value),
                    "threshold": bound, "detail": detail,
                })  # fmt: skip
    return out
