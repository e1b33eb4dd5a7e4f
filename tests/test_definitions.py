"""Dagster: the definitions load, the projection asset materializes, `dagster dev` serves the graph."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
from dagster import AssetKey, AssetMaterialization, DagsterInstance, materialize

from tests.conftest import ROOT


def test_definitions_load_and_list_the_projection_asset() -> None:
    from flywheel.definitions import defs

    keys = set(defs.resolve_asset_graph().get_all_asset_keys())
    assert AssetKey("event_log_projections") in keys


def test_projection_asset_materializes_on_a_real_store(home, store, tmp_path) -> None:
    import assets.warehouse
    from assets.resources import WarehouseResource
    from flywheel.samples import write_jsonl
    from warehouse.ingest import Ingester

    Ingester(store).ingest_file(write_jsonl(tmp_path / "t.jsonl", 300))
    result = materialize(
        [assets.warehouse.event_log_projections],
        resources={"warehouse": WarehouseResource(home=str(home))},
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success
    meta = result.asset_materializations_for_node("event_log_projections")[0].metadata
    assert meta["head_position"].value == 300
    assert meta["interactions"].value + meta["feedback"].value == 300
    # a second materialization applies nothing new and leaves the same state
    again = materialize(
        [assets.warehouse.event_log_projections],
        resources={"warehouse": WarehouseResource(home=str(home))},
        instance=DagsterInstance.ephemeral(),
    )
    meta2 = again.asset_materializations_for_node("event_log_projections")[0].metadata
    assert meta2["canonical_hash"].value == meta["canonical_hash"].value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def test_dagster_dev_serves_the_asset_graph_on_loopback(home: Path) -> None:
    port = free_port()
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    # `dagster dev` ignores SIGTERM from a non-interactive shell: own session, stopped by its PID group
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
                assert time.time() < deadline, "dagster dev did not answer within 120 s"
                time.sleep(1)
        data = graphql(port, "{ assetNodes { assetKey { path } groupName } }")
        nodes = {tuple(n["assetKey"]["path"]): n["groupName"] for n in data["data"]["assetNodes"]}
        assert nodes[("event_log_projections",)] == "warehouse"
        listening = {c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port}
        assert listening == {"127.0.0.1"}  # loopback only
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_declarative_automation_refreshes_health_after_the_projections(home) -> None:
    """event_log_projections is on a cron condition; production_health follows it eagerly."""
    import datetime as dt

    from dagster import DagsterInstance, Definitions, evaluate_automation_conditions

    import assets.loop
    import assets.warehouse
    from assets.resources import ProjectConfigResource, WarehouseResource

    defs_ = Definitions(assets=[assets.warehouse.event_log_projections, assets.loop.production_health],
                        resources={"warehouse": WarehouseResource(home=str(home)), "project": ProjectConfigResource()})
    # the cron condition: nothing before 10:10, one request when the cron tick passes
    instance = DagsterInstance.ephemeral()
    first = evaluate_automation_conditions(defs_, instance=instance,
                                           evaluation_time=dt.datetime(2026, 12, 6, 10, 9, tzinfo=dt.UTC))
    assert first.total_requested == 0
    ticked = evaluate_automation_conditions(defs_, instance=instance, cursor=first.cursor,
                                            evaluation_time=dt.datetime(2026, 12, 6, 10, 10, 1, tzinfo=dt.UTC))
    assert ticked.get_num_requested(AssetKey("event_log_projections")) == 1
    # eager: once the projections are materialized, production_health is requested (and only it)
    instance = DagsterInstance.ephemeral()
    before = evaluate_automation_conditions(defs_, instance=instance)
    assert before.get_num_requested(AssetKey("production_health")) == 0  # its dependency is missing
    instance.report_runless_asset_event(AssetMaterialization(AssetKey("event_log_projections")))
    after = evaluate_automation_conditions(defs_, instance=instance, cursor=before.cursor)
    assert after.get_num_requested(AssetKey("production_health")) == 1
    assert after.get_num_requested(AssetKey("event_log_projections")) == 0
