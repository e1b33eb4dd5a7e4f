"""Production health: metrics against numpy on known traffic, OASST feedback totals, prompt drift, alerts."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from datetime import datetime

import numpy as np
import pytest

from flywheel.failures import looks_like_refusal
from flywheel.health import (
    DEFAULT_THRESHOLDS,
    alerts,
    drift_by_domain,
    keyword_domains,
    production_metrics,
    prompt_drift,
    prompts,
)
from tests.conftest import shared
from tests.loop.conftest import oasst_replies, traffic_records
from warehouse.events import AlertRaised


def expected_groups(window_hours: bool) -> dict[tuple[str, object], dict]:
    """The metrics recomputed from the raw records with numpy."""
    recs = traffic_records()
    inter = [r for r in recs if r["type"] == "interaction"]
    fb = defaultdict(list)
    for r in recs:
        if r["type"] == "feedback":
            fb[r["request_id"]].append(r)
    groups: dict[tuple[str, object], list[dict]] = defaultdict(list)
    for r in inter:
        t = datetime.fromisoformat(r["timestamp"])
        groups[(r["model_version"], t.replace(minute=0, second=0) if window_hours else None)].append(r)
    out = {}
    for key, rows in groups.items():
        ok = [r for r in rows if r["status"] == "ok"]
        lat = np.array([r["latency_ms"] for r in ok])
        votes = [f["thumbs"] for r in rows for f in fb[r["request_id"]] if "thumbs" in f]
        ratings = [f["rating"] for r in rows for f in fb[r["request_id"]] if "rating" in f]
        out[key] = {
            "requests": len(rows), "errors": len(rows) - len(ok), "error_rate": (len(rows) - len(ok)) / len(rows),
            "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p95_ms": float(np.percentile(lat, 95)),
            "tokens_per_s": sum(r["completion_tokens"] for r in ok) / (lat.sum() / 1000),
            "refusals": sum(looks_like_refusal(r["response"]) for r in ok),
            "thumbs_up": votes.count(1), "thumbs_down": votes.count(-1),
            "thumbs_down_share": votes.count(-1) / len(votes) if votes else None,
            "feedback_rate": sum(bool(fb[r["request_id"]]) for r in rows) / len(rows),
            "mean_rating": float(np.mean(ratings)) if ratings else None,
        }  # fmt: skip
    return out


@pytest.mark.parametrize("window", [None, "1 hour"])
def test_metrics_match_numpy_on_known_traffic(traffic_store, window) -> None:
    table = production_metrics(traffic_store, window=window)
    expected = expected_groups(window is not None)
    got = {(r["model_version"], r["window_start"]): r for r in table.to_pylist()}
    assert set(got) == set(expected)
    for key, exp in expected.items():
        row = got[key]
        for name, value in exp.items():
            if value is None:
                assert row[name] is None, (key, name)
            else:
                assert row[name] == pytest.approx(value, rel=1e-9, abs=1e-9), (key, name)
        assert row["refusal_rate"] == pytest.approx(exp["refusals"] / (exp["requests"] - exp["errors"]))
    if window is None:  # the traffic was generated with a healthy and an unhealthy version
        good, bad = got[("tiny@1", None)], got[("tiny@2", None)]
        assert good["errors"] == 0 and bad["error_rate"] > 0.05
        assert bad["refusal_rate"] > 0.15 and good["refusal_rate"] == 0


def test_metrics_window_and_total(traffic_store) -> None:
    head = traffic_store.head()
    whole = production_metrics(traffic_store, window=None, by_model=False).to_pylist()
    assert len(whole) == 1 and whole[0]["model_version"] == "*" and whole[0]["requests"] == 240
    half = production_metrics(traffic_store, after=head // 2, window=None, by_model=False, refusals=False).to_pylist()[0]
    assert 0 < half["requests"] < 240 and half["refusal_rate"] is None


def test_oasst_feedback_rates_match_the_export(oasst_store) -> None:
    replies = oasst_replies()
    rows = production_metrics(oasst_store, window=None, by_model=False).to_pylist()
    (row,) = rows
    up, down = sum(r["up"] for r in replies), sum(r["down"] for r in replies)
    assert (row["requests"], row["thumbs_up"], row["thumbs_down"]) == (687, up, down) == (687, 854, 372)
    assert row["thumbs_down_share"] == pytest.approx(down / (up + down))
    assert row["feedback_rate"] == pytest.approx(sum(1 for r in replies if r["up"] or r["down"]) / 687)
    assert row["tokens_per_s"] is None  # the export has no latencies (recorded as 0)
    assert 0 < row["refusal_rate"] < 0.05


def lottery() -> list[str]:
    path = shared("logs/oasst_prompt_lottery_en_250_text.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def gsm8k_questions(n: int) -> list[str]:
    lines = shared("evals/gsm8k/train.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line)["question"] for line in lines]


def test_drift_is_zero_for_the_same_distribution_and_high_for_a_shift() -> None:
    prompts_ = lottery()
    random.Random(0).shuffle(prompts_)
    a, b = prompts_[:125], prompts_[125:]
    same = prompt_drift(a, b)
    assert abs(same.excess) < 0.01 and same.p_value > 0.05
    assert same.js < 0.1  # raw JS of two finite samples: small, and almost all of it is noise (= baseline)
    shifted = prompt_drift(gsm8k_questions(125), b)
    assert shifted.excess > 0.1 and shifted.p_value < 0.05 and shifted.z > 10
    partial = prompt_drift(a[:100] + gsm8k_questions(25), b)  # a fifth of the traffic changed
    assert same.excess < partial.excess < shifted.excess and partial.p_value < 0.05
    assert prompt_drift(a, b) == same  # seeded: deterministic
    assert {t for t, _ in shifted.top_terms} & {"how", "many", "how many", "she", "he"}  # word problems
    with pytest.raises(ValueError, match="needs ≥ 5"):
        prompt_drift(a[:3], b)


def test_drift_per_domain(oasst_store) -> None:
    reference = lottery()
    domain_of = keyword_domains({"code": ["python", "code", "program", "javascript", "function"],
                                 "math": ["how many", "calculate", "total", "each", "math", "number"]})
    same = drift_by_domain(reference[:125], reference[125:], domain_of)
    shifted = drift_by_domain(reference[:125] + gsm8k_questions(125), reference[125:], domain_of)
    # the word problems move the domain mix towards math ...
    assert shifted["mix"]["math"][0] > 10 * shifted["mix"]["math"][1]
    assert shifted["mix_js"] > 0.1 > 100 * same["mix_js"]
    # ... leave the code prompts as they were, and shift what falls in "other" (unmatched word problems)
    assert abs(shifted["domains"]["code"].excess) < 0.01 and shifted["domains"]["code"].p_value > 0.05
    assert shifted["domains"]["other"].excess > 0.02 > abs(same["domains"]["other"].excess)
    assert shifted["domains"]["other"].p_value < 0.05
    assert shifted["skipped"] == {"math": (96, 3)}  # 3 reference prompts are too few to compare
    # production prompts read from the log (decrypted) against the same reference: a different population
    recent = prompts(oasst_store)
    assert len(recent) == 687
    assert drift_by_domain(recent, reference, domain_of)["all"].excess > 0.1


def test_alerts_fire_above_thresholds_only(traffic_store) -> None:
    table = production_metrics(traffic_store, window=None)
    fired = alerts(table, {"error_rate": 0.05, "latency_p95_ms": 2000, "tokens_per_s": {"min": 1e6}})
    by = {(a["metric"], a["detail"]["model_version"]) for a in fired}
    assert by == {("error_rate", "tiny@2"), ("latency_p95_ms", "tiny@2"), ("tokens_per_s", "tiny@1"),
                  ("tokens_per_s", "tiny@2")}
    a = next(x for x in fired if x["metric"] == "error_rate")
    row = next(r for r in table.to_pylist() if r["model_version"] == "tiny@2")
    assert a["value"] == row["error_rate"] and a["threshold"] == 0.05 and a["detail"]["direction"] == "above"
    assert a["kind"] == "health" and a["detail"]["requests"] == 120
    assert AlertRaised(**a).metric == "error_rate"  # alert dicts are AlertRaised fields
    assert alerts(table, {"error_rate": 0.5}) == []
    assert alerts(table, {"error_rate": 0.05}, min_requests=1000) == []  # too few requests to judge
    # single mappings, None/NaN never fire, drift kind
    assert alerts({"prompt_drift": 0.3}, DEFAULT_THRESHOLDS) == [
        {"kind": "drift", "metric": "prompt_drift", "value": 0.3, "threshold": 0.02, "detail": {"direction": "above"}}]
    assert alerts({"prompt_drift": math.nan, "error_rate": None}, DEFAULT_THRESHOLDS) == []
    with pytest.raises(ValueError, match="threshold"):
        alerts({"x": 1.0}, {"x": {"above": 1.0}})
