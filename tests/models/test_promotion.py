"""The promotion ledger on a real event store and a real MLflow registry (SQLite in tmp_path).

Two promoters racing from the same ledger state in two processes: exactly one wins, the loser gets
`PromotionConflict`, and the MLflow alias names the winner. Forced promotions and rollbacks are
audited through the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.cli import app
from models.promotion import PromotionConflict, ledger, promote, rollback, stream_id, sync_alias
from models.registry import Tracking
from tests.conftest import ROOT
from warehouse.events import ModelPromoted, ModelRolledBack, PromotionRejected
from warehouse.store import EventStore

MODEL = "tiny-llm"


@pytest.fixture(scope="module")
def registry_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose registry holds versions 1..4 of MODEL (tiny placeholder files: no weights needed)."""
    home = tmp_path_factory.mktemp("promotion") / "home"
    home.mkdir()
    tracking = Tracking.local(home)
    for _ in range(4):
        with tracking.run("candidate") as run:
            f = home / "weights.txt"
            f.write_text("w")
            run.log_file(f, "checkpoint")
            run.register(MODEL, "checkpoint")
    return home


@pytest.fixture
def home(registry_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh event store beside the shared registry (the registry's aliases are reset per test)."""
    monkeypatch.setenv("FLYWHEEL_HOME", str(registry_home))
    tracking = Tracking.local(registry_home)
    for alias in ("champion", "challenger"):
        tracking.delete_alias(MODEL, alias)
    db = registry_home / "warehouse.duckdb"
    for p in registry_home.glob("warehouse.duckdb*"):
        p.unlink()
    for p in registry_home.glob("keystore*"):
        p.unlink()
    assert not db.exists()
    return registry_home


class _Decision:
    """A gate decision as flywheel.gates returns it (only the fields the ledger reads)."""

    def __init__(self, ok: bool) -> None:
        from flywheel.gates import GateResult

        self.promote = ok
        self.gates = [GateResult("primary:json_validity", ok, observed=0.9 if ok else 0.1, threshold=0.3)]
        self.reason = "all gates passed" if ok else "primary:json_validity below floor"


def test_ledger_promote_reject_rollback_and_alias_follow(home: Path) -> None:
    store, tracking = EventStore(home / "warehouse.duckdb"), Tracking.local(home)
    promote(store, tracking, MODEL, "1", _Decision(True))
    rejected = promote(store, tracking, MODEL, "2", _Decision(False))
    assert isinstance(rejected, PromotionRejected) and rejected.champion_version == "1"
    assert tracking.alias(MODEL, "champion").version == "1"  # a rejection never moves the alias
    promote(store, tracking, MODEL, "3", _Decision(True))
    assert tracking.alias(MODEL, "champion").version == "3"
    state = ledger(store, MODEL)
    assert (state.champion, state.history, state.version) == ("3", ["1", "3"], 3)
    back = rollback(store, tracking, MODEL, actor="bob", reason="regression")
    assert (back.from_version, back.to_version) == ("3", "1")
    assert tracking.alias(MODEL, "champion").version == "1"
    with pytest.raises(ValueError, match="no previous champion"):
        rollback(store, tracking, MODEL, actor="bob", reason="again")
    # a stale decision (made against an older ledger version) loses
    with pytest.raises(PromotionConflict, match="expected version 2"):
        promote(store, tracking, MODEL, "4", _Decision(True), expected_version=2)
    assert tracking.alias(MODEL, "champion").version == "1"
    # the alias is derived from the ledger: a crash between append and alias move is repaired
    tracking.set_alias(MODEL, "champion", "4")
    assert sync_alias(store, tracking, MODEL) == "1"
    assert tracking.alias(MODEL, "champion").version == "1"
    kinds = [type(e.data).__name__ for e in store.read_stream(stream_id(MODEL))]
    assert kinds == ["ModelPromoted", "PromotionRejected", "ModelPromoted", "ModelRolledBack"]


RACER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from models.promotion import PromotionConflict, ledger, promote
    from models.registry import Tracking
    from warehouse.store import EventStore

    home, version, barrier = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    store, tracking = EventStore(home / "warehouse.duckdb"), Tracking.local(home)
    read = ledger(store, "tiny-llm")             # both racers read the same ledger version ...
    (barrier / f"ready-{version}").touch()
    while len(list(barrier.glob("ready-*"))) < 2:
        time.sleep(0.01)
    try:                                         # ... and both try to append against it
        promote(store, tracking, "tiny-llm", version, None, forced=True, actor=f"racer-{version}",
                reason="race", expected_version=read.version)
        print(json.dumps({"version": version, "won": True}))
    except PromotionConflict as e:
        print(json.dumps({"version": version, "won": False, "error": str(e)}))
    """
)


def test_two_concurrent_promoters_in_two_processes_cannot_both_win(home: Path, tmp_path: Path) -> None:
    store, tracking = EventStore(home / "warehouse.duckdb"), Tracking.local(home)
    promote(store, tracking, MODEL, "1", _Decision(True))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLYWHEEL_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(home), v, str(barrier)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for v in ("2", "3")]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    winners = [r["version"] for r in results if r["won"]]
    losers = [r for r in results if not r["won"]]
    assert len(winners) == 1, results
    assert "another promotion or rollback won" in losers[0]["error"]
    promoted = [e.data for e in store.read_stream(stream_id(MODEL)) if isinstance(e.data, ModelPromoted)]
    assert [p.model_version for p in promoted] == ["1", winners[0]]
    assert tracking.alias(MODEL, "champion").version == winners[0] == ledger(store, MODEL).champion


def test_cli_forced_promotion_rollback_history_and_canary(home: Path) -> None:
    runner = CliRunner()
    refused = runner.invoke(app, ["promote", "2"])
    assert refused.exit_code != 0 and "--force" in refused.output
    anonymous = runner.invoke(app, ["promote", "2", "--force"])
    assert anonymous.exit_code != 0 and "--actor" in anonymous.output
    unknown = runner.invoke(app, ["promote", "99", "--force", "--actor", "alice", "--reason", "x"])
    assert unknown.exit_code != 0 and "no version '99'" in unknown.output
    for v in ("1", "2"):
        ok = runner.invoke(app, ["promote", v, "--force", "--actor", "alice", "--reason", f"hotfix {v}"])
        assert ok.exit_code == 0, ok.output
    tracking = Tracking.local(home)
    assert tracking.alias(MODEL, "champion").version == "2"
    back = runner.invoke(app, ["rollback", "--actor", "bob", "--reason", "regression"])
    assert back.exit_code == 0, back.output
    assert "2 → 1" in back.output
    assert tracking.alias(MODEL, "champion").version == "1"
    history = runner.invoke(app, ["promotions", "--json"])
    assert history.exit_code == 0, history.output
    data = json.loads(history.output)
    assert data["champion"] == "1"
    assert [(r["event"], r["version"], r["actor"], r["forced"]) for r in data["ledger"]] == [
        ("ModelPromoted", "1", "alice", True), ("ModelPromoted", "2", "alice", True),
        ("ModelRolledBack", "2→1", "bob", False)]
    events = EventStore(home / "warehouse.duckdb").read_stream(stream_id(MODEL))
    assert isinstance(events[-1].data, ModelRolledBack) and events[-1].data.reason == "regression"
    table = runner.invoke(app, ["promotions"])
    assert table.exit_code == 0 and "champion 1" in table.output


def test_canary_view_feedback_rates_per_model_version(store: EventStore) -> None:
    """Interactions answered by two versions, feedback on some: rates per version in the projection."""
    from datetime import UTC, datetime

    from warehouse.events import FeedbackGiven, InteractionLogged
    from warehouse.projections import feedback_by_model
    from warehouse.store import NewEvent

    now = datetime.now(UTC)
    events = []
    for i in range(10):
        version = "tiny-llm@1" if i < 6 else "tiny-llm@2"
        events.append(NewEvent(InteractionLogged(
            request_id=f"r{i}", model_version=version, session_id=None, latency_ms=10.0 * (i + 1), prompt_tokens=3,
            completion_tokens=2, status="ok", labels=None, user_id=None, messages=None, response=None),
            f"interaction-r{i}", now))
    for i, thumbs in [(0, 1), (1, 1), (2, -1), (6, -1), (7, -1), (8, 1)]:
        events.append(NewEvent(FeedbackGiven(
            feedback_id=f"f{i}", request_id=f"r{i}", thumbs=thumbs, rating=None, has_correction=False, labels=None,
            user_id=None, correction=None, comment=None), f"interaction-r{i}", now))
    store.append(events)
    rows = {r["model_version"]: r for r in feedback_by_model(store)}
    assert rows["tiny-llm@1"]["interactions"] == 6 and rows["tiny-llm@2"]["interactions"] == 4
    assert (rows["tiny-llm@1"]["thumbs_up"], rows["tiny-llm@1"]["thumbs_down"]) == (2, 1)
    assert rows["tiny-llm@1"]["thumbs_up_rate"] == pytest.approx(2 / 3)
    assert rows["tiny-llm@2"]["thumbs_up_rate"] == pytest.approx(1 / 3)
    assert rows["tiny-llm@2"]["rated"] == 3
    assert rows["tiny-llm@1"]["latency_p50_ms"] == pytest.approx(35.0)
