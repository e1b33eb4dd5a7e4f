"""The curation graph materialized by Dagster on real files: the demo's own data and the shared corpora."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import AssetSelection, DagsterInstance, materialize

import assets.curation as cur
from assets.resources import DvcResource, ProjectConfigResource, WarehouseResource
from flywheel import demo_data
from tests.conftest import shared
from warehouse.store import EventStore

CURATION = [cur.raw_documents, cur.cleaned_documents, cur.dedup_shards, cur.sealed_eval_index, cur.dedup_shard_quality]


def resources(home: Path) -> dict:
    return {"warehouse": WarehouseResource(home=str(home)), "dvc": DvcResource(home=str(home)),
            "project": ProjectConfigResource()}


def run_partition(home: Path, instance, source: str):
    result = materialize(CURATION, selection=[cur.raw_documents, cur.cleaned_documents, cur.dedup_shards],
                         partition_key=source, resources=resources(home), instance=instance)
    assert result.success
    return result


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("curation") / "home"
    home.mkdir()
    old = os.environ.get("FLYWHEEL_HOME")
    os.environ["FLYWHEEL_HOME"] = str(home)
    demo_data.write_all(home / "demo-data")
    instance = DagsterInstance.ephemeral()
    assert materialize(CURATION, selection=[cur.sealed_eval_index], resources=resources(home), instance=instance).success
    results = {s: run_partition(home, instance, s) for s in ("demo_web", "demo_forum", "demo_books")}
    yield home, instance, results
    if old is None:
        os.environ.pop("FLYWHEEL_HOME", None)
    else:
        os.environ["FLYWHEEL_HOME"] = old


def meta(result, node: str) -> dict:
    md = result.asset_materializations_for_node(node)[0].metadata
    return {k: getattr(v, "value", v) for k, v in md.items()}


def test_demo_partitions_materialize_with_checks_passing(demo_home) -> None:
    home, _, results = demo_home
    web = results["demo_web"]
    checks = web.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks), [c.metadata for c in checks]
    m = meta(web, "dedup_shards")
    assert m["contaminated"] == 1  # the page quoting a sealed eval item
    assert m["exact_duplicates"] >= 30 and m["near_duplicates"] >= 5
    assert meta(web, "cleaned_documents")["documents_out"] < meta(web, "raw_documents")["rows"]
    shard = pq.read_table(home / "dvc" / "shards" / "dedup" / "demo_web" / "part-00000.parquet")
    assert shard.num_rows == m["rows"]
    assert shard.schema.names[:9] == ["sample_id", "doc_id", "source", "license", "subject_id", "origin_event_id",
                                      "parent_ids", "text", "pii_spans"]
    assert not any("@example.com" in t for t in shard.column("text").to_pylist())  # scrubbed


def test_exclusions_keep_every_drop_with_its_reason(demo_home) -> None:
    home, _, results = demo_home
    ex = pq.read_table(home / "dvc" / "exclusions" / "dedup" / "demo_web" / "excluded.parquet").to_pylist()
    reasons = {r["reason"] for r in ex}
    assert {"exact_duplicate", "near_duplicate"} <= reasons and any(r.startswith("eval_") for r in reasons)
    leak = next(r for r in ex if r["reason"].startswith("eval_"))
    assert json.loads(leak["detail"])["eval_set"] == "demo_tasks"
    dup = next(r for r in ex if r["reason"] == "exact_duplicate")
    assert json.loads(dup["detail"])["kept_doc_id"]
    m = meta(results["demo_web"], "dedup_shards")
    assert len(ex) == m["documents_in"] - m["documents_out"]
    clean_ex = pq.read_table(home / "dvc" / "exclusions" / "clean" / "demo_forum" / "excluded.parquet")
    assert clean_ex.num_rows == meta(results["demo_forum"], "cleaned_documents")["documents_in"] - \
        meta(results["demo_forum"], "cleaned_documents")["documents_out"]


def test_every_version_is_tracked_and_recorded(demo_home) -> None:
    home, _, _ = demo_home
    events = EventStore(home / "warehouse.duckdb").read(types=["ShardMaterialized"])
    assert {(e.data.stage, e.data.source) for e in events} == {
        (st, s) for st in ("raw", "clean", "dedup") for s in ("demo_web", "demo_forum", "demo_books")}
    for e in events:
        assert Path(e.data.manifest).exists()
        assert (home / "dvc" / e.data.path).with_suffix(".dvc").exists() or (home / "dvc" / (e.data.path + ".dvc")).exists()
        assert (home / "dvc-remote" / "files" / "md5" / e.data.dvc_md5[:2] / e.data.dvc_md5[2:]).exists()


def test_rematerializing_unchanged_data_in_a_new_run_records_it_again(demo_home) -> None:
    """Same data, new run: the same shard version (md5) is recorded once per run, never a conflict."""
    home, instance, _ = demo_home
    store = EventStore(home / "warehouse.duckdb")
    before = [e for e in store.read(types=["ShardMaterialized"]) if e.data.source == "demo_books"]
    result = run_partition(home, instance, "demo_books")
    after = [e for e in store.read(types=["ShardMaterialized"]) if e.data.source == "demo_books"]
    assert len(after) == len(before) + 3
    new = after[len(before):]
    assert {e.data.dagster_run_id for e in new} == {result.run_id}
    assert {(e.data.stage, e.data.dvc_md5) for e in new} == {(e.data.stage, e.data.dvc_md5) for e in before}


def test_forum_users_are_subjects_and_a_shredded_subject_leaves_on_rematerialization(demo_home) -> None:
    home, instance, _ = demo_home
    store = EventStore(home / "warehouse.duckdb")
    canary = store.keys.pseudonymize(f"stackexchange:demo.forum:{demo_data.CANARY_USER['id']}")
    raw = pq.read_table(home / "dvc" / "shards" / "raw" / "demo_forum" / "part-00000.parquet")
    assert canary in set(raw.column("subject_id").to_pylist())
    store.shred_subject(canary, "dsr-test")
    result = run_partition(home, instance, "demo_forum")
    raw2 = pq.read_table(home / "dvc" / "shards" / "raw" / "demo_forum" / "part-00000.parquet")
    assert canary not in set(raw2.column("subject_id").to_pylist())
    assert meta(result, "raw_documents")["erased_subject_documents"] > 0
    versions = [e for e in store.read(types=["ShardMaterialized"]) if e.data.source == "demo_forum" and e.data.stage == "raw"]
    assert len({v.data.dvc_md5 for v in versions}) == 2  # a new version; the old one is still reachable by hash


def test_the_blocking_check_fails_on_a_planted_eval_item(demo_home) -> None:
    home, instance, _ = demo_home
    from flywheel.shards import write_shard

    path = home / "dvc" / "shards" / "dedup" / "demo_books" / "part-00000.parquet"
    table = pq.read_table(path)
    item = json.loads((home / "demo-data" / "evals" / "demo_tasks.jsonl").read_text().splitlines()[3])
    planted = table.set_column(table.schema.get_field_index("text"), "text",
                               pa.array([t + f"\n{item['prompt']} {item['answer']}" for t in table.column("text").to_pylist()]))
    write_shard(planted, path.parent, stage="dedup", source="demo_books")
    result = materialize(CURATION, selection=AssetSelection.checks(cur.dedup_shard_quality), resources=resources(home),
                         instance=instance, raise_on_error=False)
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert "demo_books:no_eval_13gram" in check.metadata["failed"].value


def test_curation_group_on_the_shared_corpora(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = shared("corpora").parent
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("FLYWHEEL_SOURCES", "sources.toml")
    monkeypatch.setenv("FLYWHEEL_DATA_ROOT", str(root))
    monkeypatch.setenv("FLYWHEEL_EVAL_ROOT", str(root / "evals"))
    monkeypatch.setenv("FLYWHEEL_EVAL_SETS", "gsm8k,mmlu,truthfulqa,humaneval")
    try:
        _run_shared(home, None)
    finally:
        monkeypatch.undo()
        importlib.reload(cur)


def _run_shared(home: Path, sources: list[str] | None) -> None:
    importlib.reload(cur)  # the partitions come from FLYWHEEL_SOURCES
    sources = sources or cur.source_partitions.get_partition_keys()
    assert len(sources) >= 10
    curation = [cur.raw_documents, cur.cleaned_documents, cur.dedup_shards, cur.sealed_eval_index, cur.dedup_shard_quality]
    res = resources(home)
    instance = DagsterInstance.ephemeral()
    assert materialize(curation, selection=[cur.sealed_eval_index], resources=res, instance=instance).success
    for s in sources:
        r = materialize(curation, selection=curation[:3], partition_key=s, resources=res, instance=instance)
        assert r.success
        assert all(c.passed for c in r.get_asset_check_evaluations())
