"""eval_scores → its blocking checks → promotion, materialized by Dagster on a copy of the trained state.

Turn 1 has no champion: the challenger is held to the absolute floors, the ledger records the
decision with every gate's numbers, and only a promotion moves the `champion` alias. A second
evaluation of the same version is a no-op; a tampered sealed set fails the blocking check and
promotion does not run.
"""

from __future__ import annotations

import json
import shutil
import sys
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


def test_flywheel_serve_follows_the_champion_alias_and_logs_traffic_that_ingests(evaluated, tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`flywheel serve` (a real subprocess) answers the TGI protocol for the champion; an audited
    `flywheel promote --force` moves the alias and the server reloads; its traffic log ingests into
    the event log and the canary view shows both versions."""
    import httpx
    from text_generation import Client
    from typer.testing import CliRunner

    from flywheel.cli import app
    from tests.serving.conftest import ServerProcess
    from tests.serving.test_server import wait_for
    from warehouse.projections import feedback_by_model

    source, _ = evaluated
    home = tmp_path / "home"
    shutil.copytree(source, home, ignore=shutil.ignore_patterns("*.lock"))
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    runner = CliRunner()
    tracking = Tracking.local(home)
    stages = {v.tags["stage"]: v.version for v in tracking.versions("tiny-llm")}
    if tracking.alias("tiny-llm", "champion") is None:  # turn 1 rejected: an audited override makes one
        forced = runner.invoke(app, ["promote", stages["dpo"], "--force", "--actor", "test", "--reason", "serve test"])
        assert forced.exit_code == 0, forced.output
    first = tracking.alias("tiny-llm", "champion").version
    second = stages["sft"] if first != stages["sft"] else stages["pretrain"]

    flywheel = str(Path(sys.executable).parent / "flywheel")
    proc = ServerProcess(None, "--poll-interval", "0.3", "--canary-share", "0", log_path=tmp_path / "serve.log",
                         command=[flywheel, "serve"])
    try:
        proc.wait_healthy()
        assert httpx.get(f"{proc.url}/info").json()["model_version"] == f"tiny-llm@{first}"
        client = Client(proc.url, headers={"X-Request-Id": "serve-1", "X-User-Id": "alice"}, timeout=60)
        answer = client.generate("What is 2+2?", max_new_tokens=8, decoder_input_details=True)
        assert answer.details.generated_tokens == len(answer.details.tokens) > 0
        r = httpx.post(f"{proc.url}/feedback", json={"request_id": "serve-1", "thumbs": -1}, headers={"X-User-Id": "alice"})
        assert r.status_code == 200, r.text
        moved = runner.invoke(app, ["promote", second, "--force", "--actor", "test", "--reason", "reload test"])
        assert moved.exit_code == 0, moved.output
        wait_for(lambda: httpx.get(f"{proc.url}/info").json()["model_version"] == f"tiny-llm@{second}", timeout=60,
                 what="the server reloads the new champion")
        Client(proc.url, headers={"X-Request-Id": "serve-2", "X-User-Id": "bob"}, timeout=60).generate(
            "Hello", max_new_tokens=4)
    finally:
        proc.stop()
    logs = sorted((home / "landing" / "server").glob("*.jsonl"))
    assert logs, "the server logged no traffic"
    ingested = runner.invoke(app, ["ingest", *map(str, logs)])
    assert ingested.exit_code == 0, ingested.output
    rows = {r["model_version"]: r for r in feedback_by_model(EventStore(home / "warehouse.duckdb"))}
    assert rows[f"tiny-llm@{first}"]["interactions"] >= 1 and rows[f"tiny-llm@{first}"]["thumbs_down"] == 1
    assert rows[f"tiny-llm@{second}"]["interactions"] >= 1
    kinds = [(type(e.data).__name__, e.data.forced) for e in
             EventStore(home / "warehouse.duckdb").read_stream(stream_id("tiny-llm")) if isinstance(e.data, ModelPromoted)]
    assert kinds[-1] == ("ModelPromoted", True)
