"""The training chain as Dagster assets on the demo data: MLflow runs, registry, lineage events."""

from __future__ import annotations

import pyarrow.parquet as pq

from models.registry import Tracking
from warehouse.store import EventStore


def meta(result, node: str) -> dict:
    md = result.asset_materializations_for_node(node)[0].metadata
    return {k: getattr(v, "value", v) for k, v in md.items()}


def test_chain_materializes_with_checks_passing(trained_state) -> None:
    result = trained_state.training_result
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"tokenizer_inflation": True, "preference_pairs_quality": True}
    assert meta(result, "training_mixture")["samples"] > 0
    assert meta(result, "dpo_checkpoint")["alias"] == "challenger"


def test_every_training_asset_is_an_mlflow_run_with_a_falling_loss(trained_state) -> None:
    tracking = Tracking.local(trained_state.home)
    runs = {r.info.run_name: r for r in tracking.client.search_runs([tracking.experiment_id])}
    assert {"tokenizer", "base_checkpoint", "sft_checkpoint", "dpo_checkpoint"} <= set(runs)
    losses = [m.value for m in tracking.client.get_metric_history(runs["base_checkpoint"].info.run_id, "loss")]
    assert len(losses) >= 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    base = runs["base_checkpoint"]
    assert base.inputs.dataset_inputs and base.inputs.dataset_inputs[0].dataset.name == "training_mixture"
    arts = {a.path for a in tracking.client.list_artifacts(base.info.run_id)}
    assert {"checkpoint", "plots"} <= arts
    assert "tokenizer" in {a.path for a in tracking.client.list_artifacts(runs["tokenizer"].info.run_id)}


def test_registry_versions_carry_lineage_tags_and_the_candidate_is_challenger(trained_state) -> None:
    tracking = Tracking.local(trained_state.home)
    versions = {v.tags["stage"]: v for v in tracking.versions("tiny-llm")}
    assert set(versions) >= {"pretrain", "sft", "dpo"}
    for v in versions.values():
        assert v.tags["dagster_run_id"] and v.tags["checkpoint_md5"].endswith(".dir") and v.tags["data_versions"]
    assert tracking.alias("tiny-llm", "challenger").version == versions["dpo"].version
    assert (tracking.local_path(versions["dpo"]) / "model.safetensors").exists()


def test_checkpoint_trained_events_name_every_sample_seen(trained_state) -> None:
    home = trained_state.home
    events = {e.data.stage: e.data for e in EventStore(home / "warehouse.duckdb").read(types=["CheckpointTrained"])}
    assert set(events) >= {"tokenizer", "pretrain", "sft", "dpo"}
    base = events["pretrain"]
    manifest = pq.read_table(base.inputs_manifest)
    assert manifest.num_rows == base.samples > 0
    shard_ids = set()
    import assets.curation as cur

    for source in cur.source_partitions.get_partition_keys():
        shard_ids |= set(pq.read_table(home / "dvc" / "shards" / "dedup" / source / "manifest.parquet").column("sample_id").to_pylist())
    assert set(manifest.column("sample_id").to_pylist()) <= shard_ids
    assert set(manifest.column("shard_md5").to_pylist()) and all(m.endswith(".dir") for m in manifest.column("shard_md5").to_pylist())
    assert events["sft"].parent_model_version == base.model_version
    assert events["dpo"].parent_model_version == events["sft"].model_version
