"""The failure and health-alert sensors on real event stores, with build_sensor_context + an ephemeral
instance: one run per run key across repeated ticks, the cursor never passes work not launched, counts
accumulate below the threshold, and a tick that raises leaves the cursor where it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, SensorResult, SkipReason, build_sensor_context

from assets.resources import ProjectConfigResource, WarehouseResource
from sensors.failures import failure_sensor, flywheel_loop_job, retrain_schedule
from sensors.health import collect_failures_job, health_alert_sensor
from tests.conftest import ROOT


def record(i: int, *, thumbs: int | None = None, model: str = "tiny@1") -> list[dict[str, Any]]:
    rid = f"r{i:05d}"
    out: list[dict[str, Any]] = [{
        "type": "interaction", "request_id": rid, "user_id": f"u{i % 7}@example.com", "model_version": model,
        "timestamp": f"2026-11-01T00:{(i // 60) % 60:02d}:{i % 60:02d}Z",
        "messages": [{"role": "user", "content": f"How do I bake bread number {i} at home?"}],
        "response": f"Mix flour and water, knead, proof and bake loaf {i}.", "latency_ms": 100.0 + i,
        "prompt_tokens": 9, "completion_tokens": 12, "status": "ok"}]
    if thumbs is not None:
        out.append({"type": "feedback", "feedback_id": f"fb-{rid}", "request_id": rid, "user_id": f"u{i % 7}@example.com",
                    "timestamp": f"2026-11-01T01:{(i // 60) % 60:02d}:{i % 60:02d}Z", "thumbs": thumbs})
    return out


def ingest(home: Path, name: str, records: list[dict[str, Any]]) -> int:
    from warehouse import projections
    from warehouse.ingest import Ingester
    from warehouse.store import EventStore

    path = home / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    store = EventStore(home / "warehouse.duckdb")
    report = Ingester(store).ingest_file(path)
    assert report.quarantined == 0
    projections.catch_up(store)
    return store.head()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The project config with a failure threshold of 5 and a low request minimum."""
    text = (ROOT / "flywheel.toml").read_text()
    text = text.replace("failure_threshold = 20", "failure_threshold = 5").replace("min_requests = 20", "min_requests = 5")
    path = tmp_path / "flywheel.toml"
    path.write_text(text)
    return path


def evaluate(sensor, home: Path, config: Path, instance, cursor: str | None):
    ctx = build_sensor_context(instance=instance, cursor=cursor, resources={
        "warehouse": WarehouseResource(home=str(home)), "project": ProjectConfigResource(path=str(config))})
    return sensor(ctx), ctx


class Daemon:
    """What the sensor daemon does with a tick's result: launch each run key once, keep the cursor."""

    def __init__(self) -> None:
        self.cursor: str | None = None
        self.launched: list[str] = []

    def apply(self, result: Any) -> None:
        if isinstance(result, SensorResult):
            for r in result.run_requests or []:
                if r.run_key not in self.launched:
                    self.launched.append(r.run_key)
            if result.cursor is not None:
                self.cursor = result.cursor


def test_counts_accumulate_below_threshold_then_one_run_per_key(home: Path, config: Path) -> None:
    instance = DagsterInstance.ephemeral()
    daemon = Daemon()
    # three failures (and a thumbs-up): below the threshold of 5, the cursor does not move
    head = ingest(home, "a.jsonl", [r for i in range(4) for r in record(i, thumbs=-1 if i < 3 else 1)])
    result, _ = evaluate(failure_sensor, home, config, instance, daemon.cursor)
    assert isinstance(result, SkipReason) and "3 failing" in result.skip_message
    daemon.apply(result)
    assert daemon.cursor is None
    # two more failures: 5 in (0, head] — the earlier three still count
    head = ingest(home, "b.jsonl", [r for i in range(4, 6) for r in record(i, thumbs=-1)])
    for _ in range(3):  # the same tick evaluated again (e.g. the daemon restarted before storing it)
        result, _ = evaluate(failure_sensor, home, config, instance, None)
        (req,) = result.run_requests
        assert req.run_key == f"failures:0-{head}"
        assert req.tags["flywheel/failing"] == "5"
    daemon.apply(result)
    assert daemon.launched == [f"failures:0-{head}"]
    # the cursor is exactly the end of the launched window: nothing after it was claimed
    assert daemon.cursor == str(head)
    again, _ = evaluate(failure_sensor, home, config, instance, daemon.cursor)
    assert isinstance(again, SkipReason)
    # new failures after the cursor form their own window and key
    head2 = ingest(home, "c.jsonl", [r for i in range(6, 12) for r in record(i, thumbs=-1)])
    result, _ = evaluate(failure_sensor, home, config, instance, daemon.cursor)
    daemon.apply(result)
    assert daemon.launched == [f"failures:0-{head}", f"failures:{head}-{head2}"]
    assert daemon.cursor == str(head2)


def test_late_feedback_on_an_old_answer_counts_in_its_own_window(home: Path, config: Path) -> None:
    instance = DagsterInstance.ephemeral()
    head = ingest(home, "a.jsonl", [r for i in range(5) for r in record(i, thumbs=-1)])
    result, _ = evaluate(failure_sensor, home, config, instance, None)
    assert result.cursor == str(head)
    # thumbs-down arriving later on answers logged before the cursor are new signals
    late = [{"type": "feedback", "feedback_id": f"late-{i}", "request_id": f"r{i:05d}", "user_id": "u@example.com",
             "timestamp": "2026-11-02T00:00:00Z", "thumbs": -1} for i in range(5)]
    head2 = ingest(home, "late.jsonl", late)
    result2, _ = evaluate(failure_sensor, home, config, instance, result.cursor)
    (req,) = result2.run_requests
    assert req.run_key == f"failures:{head}-{head2}"


def test_a_tick_that_raises_does_not_move_the_cursor(home: Path, config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flywheel.failures

    instance = DagsterInstance.ephemeral()
    ingest(home, "a.jsonl", [r for i in range(6) for r in record(i, thumbs=-1)])

    def boom(*a: Any, **k: Any) -> dict[str, int]:
        raise OSError("warehouse unavailable")

    monkeypatch.setattr(flywheel.failures, "failure_signal_counts", boom)
    ctx = build_sensor_context(instance=instance, cursor="2", resources={
        "warehouse": WarehouseResource(home=str(home)), "project": ProjectConfigResource(path=str(config))})
    with pytest.raises(OSError):
        failure_sensor(ctx)
    assert ctx.cursor == "2"
    monkeypatch.undo()
    result, _ = evaluate(failure_sensor, home, config, instance, "2")
    assert [r.run_key.split(":")[1].split("-")[0] for r in result.run_requests] == ["2"]


def test_health_sensor_records_each_alert_once_and_waits_for_traffic(home: Path, config: Path) -> None:
    from warehouse.store import EventStore

    instance = DagsterInstance.ephemeral()
    store = EventStore(home / "warehouse.duckdb")
    ingest(home, "few.jsonl", [r for i in range(3) for r in record(i, thumbs=-1)])
    waiting, _ = evaluate(health_alert_sensor, home, config, instance, None)
    assert isinstance(waiting, SkipReason)  # 3 interactions < min_requests 5: the cursor stays
    head = ingest(home, "more.jsonl", [r for i in range(3, 12) for r in record(i, thumbs=-1)])
    results = [evaluate(health_alert_sensor, home, config, instance, None)[0] for _ in range(2)]
    assert {r.run_requests[0].run_key for r in results} == {f"health:0-{head}"}
    assert all(r.cursor == str(head) for r in results)
    assert all(r.run_requests[0].job_name in (None, collect_failures_job.name) for r in results)
    alerts = [e.data for e in store.read(types=["AlertRaised"])]
    assert "thumbs_down_share" in {a.metric for a in alerts}
    assert len(alerts) == len({a.metric for a in alerts})  # the repeated tick appended nothing
    assert all(a.detail["window"] == [0, head] for a in alerts)
    healthy = ingest(home, "good.jsonl", [r for i in range(12, 40) for r in record(i, thumbs=1)])
    ok, _ = evaluate(health_alert_sensor, home, config, instance, str(store.head()))
    assert isinstance(ok, SkipReason)  # nothing new after the cursor
    fine, _ = evaluate(health_alert_sensor, home, config, instance, str(head))
    assert not fine.run_requests and fine.cursor == str(healthy)


def test_jobs_and_schedule_select_the_loop() -> None:
    from flywheel.definitions import defs

    job = defs.resolve_job_def(flywheel_loop_job.name)
    order = [n.name for n in job.graph.nodes_in_topological_order]
    assert order.index("failure_cases") < order.index("synthetic_samples") < order.index("sft_dataset")
    assert order.index("synthetic_samples") < order.index("preference_pairs") < order.index("dpo_checkpoint")
    assert order.index("dpo_checkpoint") < order.index("eval_scores") < order.index("promotion")
    assert retrain_schedule.cron_schedule == "0 3 * * *" and retrain_schedule.job_name == flywheel_loop_job.name
    repo = defs.get_repository_def()
    assert {"failure_sensor", "health_alert_sensor", "production_log_sensor"} <= {s.name for s in repo.sensor_defs}
