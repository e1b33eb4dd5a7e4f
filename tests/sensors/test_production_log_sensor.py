"""The production-log sensor with an ephemeral instance: one run per range, cursor discipline."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from dagster import DagsterInstance, SkipReason, build_sensor_context

from assets.resources import WarehouseResource
from flywheel import landing
from sensors.production_logs import ingest_landing_job, production_log_sensor


def rec(i: int) -> bytes:
    return json.dumps({
        "type": "interaction", "request_id": f"s{i}", "user_id": "u@example.com", "model_version": "m",
        "timestamp": "2026-11-01T00:00:00Z", "messages": [{"role": "user", "content": f"q{i}"}], "response": "a",
        "latency_ms": 1, "prompt_tokens": 1, "completion_tokens": 1}).encode() + b"\n"


def evaluate(instance, home: Path, cursor: str | None):
    ctx = build_sensor_context(instance=instance, cursor=cursor, resources={"warehouse": WarehouseResource(home=str(home))})
    return production_log_sensor(ctx), ctx


def test_new_and_growing_files_give_one_run_per_range(home: Path) -> None:
    instance = DagsterInstance.ephemeral()
    log = home / "landing" / "day1.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(rec(1) + rec(2) + rec(3)[:20])  # the third line is still being written
    result, _ = evaluate(instance, home, None)
    (run,) = result.run_requests
    cfg = run.run_config["ops"]["ingest_log_range"]["config"]
    assert (cfg["start"], cfg["end"]) == (0, len(rec(1) + rec(2)))
    # re-evaluating the same tick (same cursor) yields the same run key: Dagster launches once
    again, _ = evaluate(instance, home, None)
    assert [r.run_key for r in again.run_requests] == [run.run_key]
    # the file grows: only the new complete lines are handed out
    log.write_bytes(rec(1) + rec(2) + rec(3) + rec(4))
    grown, _ = evaluate(instance, home, result.cursor)
    (run2,) = grown.run_requests
    cfg2 = run2.run_config["ops"]["ingest_log_range"]["config"]
    assert (cfg2["start"], cfg2["end"]) == (cfg["end"], len(rec(1) + rec(2) + rec(3) + rec(4)))
    assert run2.run_key != run.run_key
    # nothing new: skip, cursor unchanged
    idle, _ = evaluate(instance, home, grown.cursor)
    assert isinstance(idle, SkipReason)


def test_the_job_ingests_each_range_once_even_if_run_twice(home: Path) -> None:
    from warehouse.store import EventStore

    log = home / "landing" / "x.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"".join(rec(i) for i in range(5)))
    ranges = landing.scan(home / "landing", {})
    resources = {"warehouse": WarehouseResource(home=str(home))}
    for _ in range(2):
        for r in ranges:
            res = ingest_landing_job.execute_in_process(
                run_config={"ops": {"ingest_log_range": {"config": {"path": r.path, "start": r.start, "end": r.end}}}},
                resources=resources, instance=DagsterInstance.ephemeral(),
            )
            assert res.success
    assert EventStore(home / "warehouse.duckdb").head() == 5


def test_a_tick_that_raises_does_not_move_the_cursor(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    instance = DagsterInstance.ephemeral()
    log = home / "landing" / "y.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(rec(1))
    cursor = orjson.dumps({str(log.resolve()): 0}).decode()

    def boom(*a, **k):
        raise OSError("disk went away")

    monkeypatch.setattr(landing, "scan", boom)
    ctx = build_sensor_context(instance=instance, cursor=cursor, resources={"warehouse": WarehouseResource(home=str(home))})
    with pytest.raises(Exception, match="disk went away"):
        production_log_sensor(ctx)
    assert ctx.cursor == cursor


def test_gzip_files_wait_until_settled(home: Path) -> None:
    import gzip
    import os
    import time

    gz = home / "landing" / "z.jsonl.gz"
    gz.parent.mkdir(parents=True, exist_ok=True)
    gz.write_bytes(gzip.compress(rec(1)))
    assert landing.scan(home / "landing", {}, settle_seconds=60) == []
    os.utime(gz, (time.time() - 120, time.time() - 120))
    (r,) = landing.scan(home / "landing", {}, settle_seconds=60)
    assert (r.start, r.end) == (0, gz.stat().st_size)
    assert landing.scan(home / "landing", landing.advance({}, [r]), settle_seconds=60) == []
