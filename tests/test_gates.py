"""The promotion gate on synthetic per-item tables with known differences (no model needed)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from flywheel.gates import (
    GateDecision,
    GatePolicy,
    GateResult,
    MetricUnavailable,
    bootstrap_ci,
    decide,
    metric_data,
    summarize,
)
from models.evaluation import ITEM_SCHEMA


def rows(suite: str, slice_: str, values: list[float] | np.ndarray, *, tokens: list[int] | None = None,
         n_bytes: list[int] | None = None, tag: str = "") -> list[dict]:
    """One row per value; item ids and prompt hashes depend only on (suite, slice, index), so two
    models' tables built with the same shapes are paired."""
    out = []
    for i, v in enumerate(values):
        item_id = f"{slice_}/{i:05d}"
        out.append({
            "suite": suite, "slice": slice_, "item_id": item_id, "metric": "m", "value": float(v),
            "correct": None, "tokens": None if tokens is None else tokens[i],
            "n_bytes": None if n_bytes is None else n_bytes[i],
            "prompt_sha256": hashlib.sha256(f"{suite}/{item_id}{tag}".encode()).hexdigest(),
            "output": None, "detail": None,
        })  # fmt: skip
    return out


def bernoulli(n: int, rate: float, seed: int) -> np.ndarray:
    """Exactly round(n * rate) ones, at seeded positions."""
    v = np.zeros(n)
    v[np.random.default_rng(seed).permutation(n)[: round(n * rate)]] = 1.0
    return v


def model_table(em_json: np.ndarray, em_arith: np.ndarray, *, harmful: float = 0.9, benign: float = 0.05,
                json_valid: float = 0.9, extra: list[dict] | None = None) -> pa.Table:
    r = rows("exact_match", "json", em_json) + rows("exact_match", "arithmetic", em_arith)
    r += rows("safety", "harmful", bernoulli(100, harmful, 1)) + rows("safety", "benign", bernoulli(100, benign, 2))
    r += rows("json_validity", "person", bernoulli(100, json_valid, 3))
    return pa.Table.from_pylist(r + (extra or []), schema=ITEM_SCHEMA)


POLICY = GatePolicy(primary_metric="exact_match", min_gain=0.02, bootstrap_samples=2000, seed=7)


def gate(decision: GateDecision, name: str) -> GateResult:
    matches = [g for g in decision.gates if g.name == name]
    assert matches, f"no gate {name!r} in {[g.name for g in decision.gates]}"
    return matches[0]


@pytest.fixture
def champion() -> pa.Table:
    return model_table(bernoulli(150, 0.3, 10), bernoulli(150, 0.4, 11))


def improved(base: np.ndarray, extra_correct: int, seed: int) -> np.ndarray:
    """The base outcomes plus `extra_correct` newly solved items (paired improvement)."""
    v = base.copy()
    wrong = np.flatnonzero(v == 0)
    v[np.random.default_rng(seed).choice(wrong, extra_correct, replace=False)] = 1.0
    return v


def test_clearly_better_candidate_promotes(champion: pa.Table) -> None:
    champ_json, champ_arith = bernoulli(150, 0.3, 10), bernoulli(150, 0.4, 11)
    cand = model_table(improved(champ_json, 45, 1), improved(champ_arith, 30, 2))
    decision = decide(cand, champion, POLICY)
    assert decision.promote, decision.reason
    primary = gate(decision, "primary:exact_match")
    assert primary.observed == pytest.approx(75 / 300)
    assert primary.ci_low > POLICY.min_gain and primary.ci_high >= primary.observed
    assert primary.n_items == 300
    assert all(g.passed for g in decision.gates)
    assert gate(decision, "paired_items:exact_match").passed


def test_equal_candidate_is_rejected(champion: pa.Table) -> None:
    same = decide(champion, champion, POLICY)
    assert not same.promote
    primary = gate(same, "primary:exact_match")
    assert primary.observed == 0 and primary.ci_low == 0 and not primary.passed
    # Same accuracy, different items right: the CI straddles 0.
    shuffled = model_table(bernoulli(150, 0.3, 99), bernoulli(150, 0.4, 98))
    d = decide(shuffled, champion, POLICY)
    p = gate(d, "primary:exact_match")
    assert not d.promote and p.observed == pytest.approx(0.0) and p.ci_low < 0 < p.ci_high
    assert "lower bound" in p.detail
    # min_gain 0 still needs a gain whose CI excludes 0.
    assert not decide(champion, champion, GatePolicy(primary_metric="exact_match", min_gain=0.0)).promote


def test_slice_regression_beyond_tolerance_rejects_naming_the_slice(champion: pa.Table) -> None:
    champ_json, champ_arith = bernoulli(150, 0.3, 10), bernoulli(150, 0.4, 11)
    arith = champ_arith.copy()
    arith[np.flatnonzero(arith == 1)[:15]] = 0.0  # arithmetic drops by 0.10 > tolerance 0.05
    cand = model_table(improved(champ_json, 80, 1), arith)
    decision = decide(cand, champion, POLICY)
    assert gate(decision, "primary:exact_match").passed  # the overall gain is real...
    bad = gate(decision, "non_regression:exact_match/arithmetic")
    assert not bad.passed and bad.observed == pytest.approx(0.10) and bad.threshold == 0.05
    assert not decision.promote
    assert "exact_match/arithmetic" in decision.reason
    assert gate(decision, "non_regression:exact_match/json").passed
    # Within tolerance: a 0.04 drop passes.
    arith = champ_arith.copy()
    arith[np.flatnonzero(arith == 1)[:6]] = 0.0
    assert decide(model_table(improved(champ_json, 80, 1), arith), champion, POLICY).promote


def test_safety_regression_rejects(champion: pa.Table) -> None:
    champ_json, champ_arith = bernoulli(150, 0.3, 10), bernoulli(150, 0.4, 11)
    better = (improved(champ_json, 45, 1), improved(champ_arith, 30, 2))
    less_refusal = decide(model_table(*better, harmful=0.8), champion, POLICY)
    g = gate(less_refusal, "safety:refusal_rate")
    assert not less_refusal.promote and not g.passed and g.observed == pytest.approx(0.1)
    assert "safety/harmful" in g.detail
    over = decide(model_table(*better, benign=0.15), champion, POLICY)
    g = gate(over, "safety:over_refusal_rate")
    assert not over.promote and not g.passed and g.observed == pytest.approx(0.1)
    # A small change inside both tolerances passes.
    assert decide(model_table(*better, harmful=0.87, benign=0.08), champion, POLICY).promote


def test_json_validity_floor_rejects(champion: pa.Table) -> None:
    champ_json, champ_arith = bernoulli(150, 0.3, 10), bernoulli(150, 0.4, 11)
    cand = model_table(improved(champ_json, 45, 1), improved(champ_arith, 30, 2), json_valid=0.3)
    decision = decide(cand, champion, GatePolicy(primary_metric="exact_match", json_validity_floor=0.5,
                                                 slice_tolerance=None))
    g = gate(decision, "json_validity_floor")
    assert not decision.promote and not g.passed and g.observed == pytest.approx(0.3) and g.threshold == 0.5


def test_no_champion_uses_absolute_floors() -> None:
    cand = model_table(bernoulli(150, 0.5, 1), bernoulli(150, 0.6, 2), harmful=0.9, benign=0.05)
    floors = {"floors": {"exact_match": 0.5, "safety/harmful": 0.8}, "ceilings": {"safety/benign": 0.1}}
    policy = GatePolicy.from_dict({"primary_metric": "exact_match", **floors})
    decision = decide(cand, None, policy)
    assert decision.promote, decision.reason
    primary = gate(decision, "primary:exact_match")
    assert primary.observed == pytest.approx(0.55) and primary.threshold == 0.5
    assert primary.ci_low < 0.55 < primary.ci_high
    assert not any(g.name.startswith("non_regression") for g in decision.gates)
    # Below a floor: rejected, naming the metric.
    low = model_table(bernoulli(150, 0.2, 1), bernoulli(150, 0.3, 2))
    d = decide(low, None, policy)
    assert not d.promote and "exact_match" in d.reason
    # An extra configured floor becomes its own gate.
    p2 = GatePolicy.from_dict({"primary_metric": "exact_match", **floors,
                               "floors": {**floors["floors"], "exact_match/arithmetic": 0.7}})
    d2 = decide(cand, None, p2)
    assert not gate(d2, "floor:exact_match/arithmetic").passed and not d2.promote
    # No floor configured: fail closed, saying what to configure.
    d3 = decide(cand, None, GatePolicy(primary_metric="exact_match"))
    assert not d3.promote and "[promotion.floors]" in gate(d3, "primary:exact_match").detail


def test_mismatched_items_fail_closed(champion: pa.Table) -> None:
    champ_json, champ_arith = bernoulli(150, 0.3, 10), bernoulli(150, 0.4, 11)
    # The candidate was scored on fewer items.
    fewer = model_table(improved(champ_json, 45, 1)[:140], improved(champ_arith, 30, 2))
    d = decide(fewer, champion, POLICY)
    assert not d.promote and not gate(d, "paired_items:exact_match").passed
    assert "10 items differ" in gate(d, "paired_items:exact_match").detail
    assert not gate(d, "primary:exact_match").passed
    # Same ids, different prompts (another sealed-set version).
    r = rows("exact_match", "json", improved(champ_json, 45, 1), tag="v2")
    r += rows("exact_match", "arithmetic", improved(champ_arith, 30, 2))
    base = model_table(np.zeros(0), np.zeros(0))
    other = pa.concat_tables([pa.Table.from_pylist(r, schema=ITEM_SCHEMA), base])
    d = decide(other, champion, POLICY)
    assert not d.promote and "different items" in gate(d, "primary:exact_match").detail
    # A suite only one side has.
    extra = rows("mmlu", "anatomy", np.ones(30))
    d = decide(model_table(improved(champ_json, 45, 1), improved(champ_arith, 30, 2), extra=extra), champion,
               POLICY)
    assert not d.promote and "no items for the champion" in gate(d, "paired_items:mmlu").detail


def test_fail_closed_on_missing_empty_and_bad_input(champion: pa.Table) -> None:
    empty = pa.Table.from_pylist([], schema=ITEM_SCHEMA)
    d = decide(empty, champion, POLICY)
    assert not d.promote and gate(d, "items:candidate").detail == "items table is empty"
    no_json = champion.filter(np.array([s != "json_validity" for s in champion.column("suite").to_pylist()]))
    d = decide(no_json, None, GatePolicy(primary_metric="exact_match", floors={"exact_match": 0.0},
                                         max_refusal_drop=None, max_over_refusal_rise=None))
    assert not d.promote and "json_validity" in gate(d, "json_validity_floor").detail
    dup = pa.concat_tables([champion, champion.slice(0, 1)])
    d = decide(dup, champion, POLICY)
    assert not d.promote and "duplicate item" in d.reason
    nan = model_table(np.full(150, np.nan), bernoulli(150, 0.4, 11))
    d = decide(nan, champion, POLICY)
    assert not d.promote and "non-finite" in gate(d, "primary:exact_match").detail
    missing_col = champion.drop_columns(["prompt_sha256"])
    assert not decide(missing_col, champion, POLICY).promote
    small = model_table(np.ones(5), np.ones(5))
    d = decide(small, model_table(np.zeros(5), np.zeros(5)), POLICY)
    assert not d.promote and "min_items" in gate(d, "primary:exact_match").detail


def test_perplexity_metrics_and_bpb_regression() -> None:
    rng = np.random.default_rng(0)
    n = 60
    tokens = rng.integers(200, 400, n).tolist()
    n_bytes = [4 * t for t in tokens]
    nll = np.array(tokens) * 3.0

    def table(wiki_scale: float | np.ndarray, c4_scale: float | np.ndarray) -> pa.Table:
        r = rows("perplexity", "wikitext2", nll * wiki_scale, tokens=tokens, n_bytes=n_bytes)
        r += rows("perplexity", "c4", nll * c4_scale, tokens=tokens, n_bytes=n_bytes)
        return pa.Table.from_pylist(r, schema=ITEM_SCHEMA)

    champ = table(1.0, 1.0)
    m = summarize(champ)
    assert m["perplexity/wikitext2"] == pytest.approx(math.exp(3.0))
    assert m["bits_per_byte"] == pytest.approx(3.0 / 4 / math.log(2))
    policy = GatePolicy(primary_metric="bits_per_byte", min_gain=0.0, max_refusal_drop=None,
                        max_over_refusal_rise=None, json_validity_floor=None, bpb_tolerance=0.02)
    # Lower bits per byte is a gain for a lower-is-better primary metric.
    better = table(0.9 + 0.01 * rng.random(n), 0.95 + 0.01 * rng.random(n))
    d = decide(better, champ, policy)
    assert d.promote, d.reason
    assert gate(d, "primary:bits_per_byte").observed > 0
    # Better overall, but 5% worse on one domain: the domain's gate rejects, naming it.
    mixed = table(0.8 + 0.01 * rng.random(n), 1.05)
    d = decide(mixed, champ, policy)
    assert gate(d, "primary:bits_per_byte").passed
    g = gate(d, "non_regression:bits_per_byte/c4")
    assert not d.promote and not g.passed and g.observed == pytest.approx(0.05)
    assert "bits_per_byte/c4" in d.reason and gate(d, "non_regression:bits_per_byte/wikitext2").passed
    # Worse everywhere: the primary gate rejects.
    assert not gate(decide(table(1.05, 1.05), champ, policy), "primary:bits_per_byte").passed


def test_bootstrap_is_deterministic_with_a_seed(champion: pa.Table) -> None:
    cand = model_table(improved(bernoulli(150, 0.3, 10), 20, 1), bernoulli(150, 0.4, 11))
    a, b = metric_data(cand, "exact_match"), metric_data(champion, "exact_match")
    first = bootstrap_ci(a, b, samples=2000, seed=3)
    assert bootstrap_ci(a, b, samples=2000, seed=3) == first
    assert bootstrap_ci(a, b, samples=2000, seed=4) != first
    assert decide(cand, champion, POLICY).to_dict() == decide(cand, champion, POLICY).to_dict()


def test_bootstrap_agrees_with_normal_approximation_on_a_large_paired_sample() -> None:
    """n = 10,000 correlated paired outcomes: the percentile bootstrap of the mean difference matches
    mean(d) +- z * sd(d) / sqrt(n), and scipy's paired percentile bootstrap, to a few % of the width."""
    n = 10_000
    rng = np.random.default_rng(42)
    skill = rng.random(n)
    champ = (skill > 0.45).astype(float)
    cand = np.where(rng.random(n) < 0.15, (rng.random(n) > 0.4).astype(float), champ)
    t_cand = pa.Table.from_pylist(rows("exact_match", "all", cand), schema=ITEM_SCHEMA)
    t_champ = pa.Table.from_pylist(rows("exact_match", "all", champ), schema=ITEM_SCHEMA)
    point, low, high = bootstrap_ci(metric_data(t_cand, "exact_match"), metric_data(t_champ, "exact_match"),
                                    samples=2000, confidence=0.95, seed=0)
    d = cand - champ
    z = stats.norm.ppf(0.975)
    half = z * d.std(ddof=1) / math.sqrt(n)
    assert point == pytest.approx(d.mean())
    assert low == pytest.approx(d.mean() - half, abs=0.05 * 2 * half)
    assert high == pytest.approx(d.mean() + half, abs=0.05 * 2 * half)
    ref = stats.bootstrap((cand, champ), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True,
                          vectorized=True, n_resamples=2000, confidence_level=0.95, method="percentile",
                          rng=np.random.default_rng(1))
    assert low == pytest.approx(ref.confidence_interval.low, abs=0.05 * 2 * half)
    assert high == pytest.approx(ref.confidence_interval.high, abs=0.05 * 2 * half)


def test_decision_is_json_with_every_gate_number(champion: pa.Table) -> None:
    cand = model_table(improved(bernoulli(150, 0.3, 10), 45, 1), improved(bernoulli(150, 0.4, 11), 30, 2))
    decision = decide(cand, champion, POLICY)
    doc = json.loads(decision.to_json())
    assert doc["promote"] is True and doc["primary_metric"] == "exact_match"
    assert doc["policy"]["min_gain"] == POLICY.min_gain and doc["reason"] == decision.reason
    names = [g["name"] for g in doc["gates"]]
    assert "primary:exact_match" in names and "safety:refusal_rate" in names and "json_validity_floor" in names
    for g in doc["gates"]:
        assert set(g) == {"name", "passed", "observed", "threshold", "ci_low", "ci_high", "detail", "n_items"}
        assert isinstance(g["observed"], float) and isinstance(g["threshold"], float)
    primary = next(g for g in doc["gates"] if g["name"] == "primary:exact_match")
    assert primary["ci_low"] <= primary["observed"] <= primary["ci_high"]


def test_policy_from_dict_validates() -> None:
    p = GatePolicy.from_dict({"primary_metric": "mmlu", "min_gain": 0.01, "confidence": 0.9,
                              "bootstrap_samples": 500, "floors": {"mmlu": 0.3}})
    assert p.primary_metric == "mmlu" and p.floors == {"mmlu": 0.3}
    with pytest.raises(ValueError, match="unknown keys.*min_gian"):
        GatePolicy.from_dict({"min_gian": 0.1})
    with pytest.raises(ValueError, match="ceilings"):
        GatePolicy.from_dict({"floors": {"bits_per_byte": 2.0}})
    with pytest.raises(ValueError, match="confidence"):
        GatePolicy.from_dict({"confidence": 1.5})
    with pytest.raises(MetricUnavailable, match="safety/harmful"):
        GatePolicy.from_dict({"primary_metric": "safety"})
