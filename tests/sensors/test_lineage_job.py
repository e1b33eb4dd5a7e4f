"""Lineage queries from the Dagster UI: `lineage_query_job` answers in its run's output metadata."""

from __future__ import annotations

import pytest
from dagster import DagsterInstance

from assets.resources import WarehouseResource
from sensors.lineage import lineage_query_job
from tests.warehouse.test_lineage import World, build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("lineage-job"))


def _run(world: World, **config):
    result = lineage_query_job.execute_in_process(
        run_config={"ops": {"lineage_query": {"config": config}}},
        resources={"warehouse": WarehouseResource(home=str(world.home))}, instance=DagsterInstance.ephemeral(),
        raise_on_error=False)
    return result


def _metadata(result) -> dict:
    outputs = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    assert len(outputs) == 1
    return {k: v.value for k, v in outputs[0].step_output_data.metadata.items()}


def test_subject_lineage_shows_as_table_and_json_in_the_run(world: World) -> None:
    alice = world.subjects["alice"]
    result = _run(world, kind="subject", id=alice)
    assert result.success
    meta = _metadata(result)
    assert meta["result"]["query"]["subject_id"] == alice
    assert {d["doc_id"] for d in meta["result"]["documents"]} >= {world.docs["alice_d1"], world.docs["alice_d2"]}
    assert "shard versions" in meta["table"] and "documents" in meta["table"]


def test_model_lineage_and_an_unknown_kind(world: World) -> None:
    meta = _metadata(_run(world, kind="model", id="tiny-llm@3"))
    assert [c["model_version"] for c in meta["result"]["chain"]] == ["1", "2", "3"]
    bad = _run(world, kind="everything", id="x")
    assert not bad.success
    failure = next(e for e in bad.all_events if e.is_failure)
    assert "unknown lineage query kind 'everything'" in str(failure.event_specific_data.error)
