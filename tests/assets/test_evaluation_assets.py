"""eval_scores → its blocking checks → promotion, materialized by Dagster on a copy of the trained state.

Turn 1 has no champion: the challenger is held to the absolute floors, the ledger records the
decision with every gate's numbers, and only a promotion moves the `champion` alias. A second
evaluation of the same version is a no-op; a tampered sealed set fails the blocking check and
promotion does not run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import AssetSelection, DagsterInstance, materialize

from assets.resources import DvcResource, ProjectConfigResource, WarehouseResource
from models.promotion import ledger, stream_id
from models.registry import Tracking
from tests.assets.conftest import all_definitions
from warehouse.events import ModelPromoted, PromotionRejected
from warehouse.store import EventStore


def _defs() -> list:
    import assets.evaluation

    return [*all_definitions(), assets.evaluation.eval_scores, assets.evaluation.promotion,
            assets.evaluation.candidate_inputs_uncontaminated, assets.evaluation.sealed_sets_unchanged]


def _run(home: Path, selection, *, ok: bool = True):
    resources = {"warehouse": WarehouseResource(home=str(home)), "dvc": DvcResource(home=str(home)),
                 "project": ProjectConfigResource()}
    result = materialize(_defs(), selection=selection, resources=resources, instance=DagsterInstance.ephemeral(),
                         raise_on_error=False)
    if ok:
        assert result.success, [e.event_specific_data for e in result.all_events if e.is_failure]
    return result


@pytest.fixture(scope="module")
def evaluated(trained_state, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the trained state with eval_scores, its checks and promotion materialized once."""
    import assets.evaluation as ev

    home = tmp_path_factory.mktemp("evaluated") / "home"
    shutil.copytree(trained_state.home, home, ignore=shutil.ignore_patterns("*.lock"))
    result = _run(home, AssetSelection.assets(ev.eval_scores, ev.promotion) | AssetSelection.checks_for_assets(ev.eval_scores))
    return home, result


def test_eval_scores_store_paired_items_events_and_mlflow_metrics(evaluated) -> None:
    home, result = evaluated
    meta = result.asset_materializations_for_node("eval_scores")[0].metadata
    assert meta["champion"].value == "none" and meta["firewall_passed"].value is True
    assert "| metric |" in meta["per_slice"].value and "data:image/png;base64," in meta["scores"].value
    state = json.loads((home / "evals" / "current" / "state.json").read_text())
    tracking = Tracking.local(home)
    candidate = tracking.version("tiny-llm", state["candidate"])
    items = pq.read_table(home / "evals" / f"tiny-llm@{candidate.version}" / "items.parquet")
    assert items.num_rows == meta["items"].value > 0
    assert {"suite", "item_id"} <= set(items.column_names)
    suites = set(items.column("suite").to_pylist())
    assert {"exact_match", "json_validity", "safety"} <= suites
    scored = [e.data for e in EventStore(home / "warehouse.duckdb").read(types=["EvalScored"])]
    assert {s.suite for s in scored} == set(state["digests"]) | {"perplexity"}
    assert all(s.model_version == candidate.version and s.contamination_check_passed for s in scored)
    assert all(s.items_path.endswith("items.parquet") and len(s.items_digest) == 64 for s in scored)
    metrics = tracking.client.get_run(candidate.run_id).data.metrics
    assert "eval/json_validity" in metrics and 0.0 <= metrics["eval/json_validity"] <= 1.0
    # every suite load was logged (who, which suite, for which model)
    access = [json.loads(line) for line in (home / "evals" / "access.jsonl").read_text().splitlines()]
    assert {a["suite"] for a in access} >= {"exact_match", "json_validity", "safety"}
    assert all(a["model_id"] == f"tiny-llm@{candidate.version}" for a in access)
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"candidate_inputs_uncontaminated": True, "sealed_sets_unchanged": True}


def test_promotion_records_every_gate_and_moves_the_alias_only_on_promotion(evaluated) -> None:
    home, result = evaluated
    meta = result.asset_materializations_for_node("promotion")[0].metadata
    store, tracking = EventStore(home / "warehouse.duckdb"), Tracking.local(home)
    events = store.read_stream(stream_id("tiny-llm"))
    assert len(events) == 1
    decision = events[0].data
    assert isinstance(decision, ModelPromoted | PromotionRejected)
    assert decision.gates and all({"name", "passed", "observed", "threshold"} <= set(g) for g in decision.gates)
    names = {g["name"] for g in decision.gates}
    assert any("json_validity" in n for n in names)
    champion = tracking.alias("tiny-llm", "champion")
    if isinstance(decision, ModelPromoted):
        assert meta["decision"].value == "promoted"
        assert all(g["passed"] for g in decision.gates) and not decision.forced
        assert champion is not None and champion.version == decision.model_version == ledger(store, "tiny-llm").champion
    else:
        assert meta["decision"].value == "rejected"
        assert not all(g["passed"] for g in decision.gates)
        assert champion is None


def test_tampered_sealed_set_blocks_promotion(evaluated, tmp_path: Path) -> None:
    import assets.evaluation as ev

    source, _ = evaluated
    home = tmp_path / "home"
    shutil.copytree(source, home, ignore=shutil.ignore_patterns("*.lock"))
    committed = home / "evals" / "committed.json"
    digests = json.loads(committed.read_text())
    digests["json_validity"] = "0" * 64  # as if the set had changed since it was committed
    committed.write_text(json.dumps(digests))
    before = len(EventStore(home / "warehouse.duckdb").read_stream(stream_id("tiny-llm")))
    result = _run(home, AssetSelection.assets(ev.eval_scores, ev.promotion) | AssetSelection.checks_for_assets(ev.eval_scores),
                  ok=False)
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["sealed_sets_unchanged"] is False
    assert not result.asset_materializations_for_node("promotion")
    assert len(EventStore(home / "warehouse.duckdb").read_stream(stream_id("tiny-llm"))) == before
