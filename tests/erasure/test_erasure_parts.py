"""The erasure machinery part by part, on real stores: the read-step filter, the DVC purge that spares
live versions, MLflow run deletion + `mlflow gc`, landing-log scrubbing, the tokenizer check, the
verification scan, retention, the lineage world's near-duplicate path — and `flywheel dsr erase
--now` on the trained demo state (the CLI runs the erasure job in-process).
"""

from __future__ import annotations

import gzip
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import SkipReason, build_sensor_context

from flywheel import demo_data
from flywheel.config import Paths
from flywheel.curation.documents import documents_table
from flywheel.erasure import (
    ErasureHooks,
    add_erased_documents,
    apply_retention,
    drop_erased_documents,
    erased_documents,
    mlflow_cleanup,
    pending_erasure_requests,
    purge_dvc,
    run_erasure,
    scan_stores,
    scrub_landing,
    store_of,
    tokenizer_learned_from,
)
from warehouse.store import EventStore


def _docs(rows: list[dict]) -> pa.Table:
    return documents_table(rows)


def test_read_step_drops_erased_documents_and_blanks_erased_rows() -> None:
    from flywheel.curation.pipeline import _excluded

    kept = _docs([{"doc_id": d, "source": "forum", "license": "CC0-1.0", "text": f"text of {d}", "title": f"title {d}",
                   "subject_id": s} for d, s in (("d1", "s1"), ("d2", "s2"), ("d3", None))])
    erased_subject_row = _excluded(_docs([{"doc_id": "d0", "source": "forum", "license": "CC0-1.0", "subject_id": "s0",
                                           "text": None, "title": "ERASED-TITLE", "url": "https://x/0"}]),
                                   "read", ["erased_subject"])
    out, excluded, n = drop_erased_documents(kept, erased_subject_row, {"d2", "not-there"})
    assert n == 1 and out.column("doc_id").to_pylist() == ["d1", "d3"]
    rows = {r["doc_id"]: r for r in excluded.to_pylist()}
    assert rows["d2"]["reason"] == "erased_document" and rows["d0"]["reason"] == "erased_subject"
    for r in rows.values():  # ids and reason only
        assert r["text"] is None and r["title"] is None and r["url"] is None
    assert rows["d2"]["subject_id"] == "s2"
    same, unchanged, zero = drop_erased_documents(kept, None, set())
    assert zero == 0 and same.num_rows == 3 and unchanged is None


def test_erased_documents_list_is_ids_only_and_idempotent(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    rows = [{"doc_id": "a", "source": "web", "request_id": "r1", "reason": "near_duplicate"}]
    assert add_erased_documents(paths, rows) == 1
    assert add_erased_documents(paths, rows) == 0
    assert erased_documents(paths) == {"a"}
    assert set(pq.read_schema(tmp_path / "erasure" / "erased_documents.parquet").names) == {
        "doc_id", "source", "request_id", "reason", "erased_at"}


def test_dvc_purge_removes_earlier_versions_holding_the_subject_and_spares_live_objects(tmp_path: Path) -> None:
    from flywheel.versioning import DvcRepo

    paths = Paths(tmp_path)
    repo = DvcRepo.open(paths.dvc_repo, remote=tmp_path / "dvc-remote")
    shard = paths.dvc_repo / "shards" / "raw" / "forum"
    shard.mkdir(parents=True)
    (shard / "README.txt").write_text("same in every version")
    table = pa.table({"doc_id": ["d1", "d2"], "subject_id": ["SUBJ", "other"], "text": ["SECRET-SUBJECT-TEXT", "fine"]})
    pq.write_table(table, shard / "part-00000.parquet")
    v1 = repo.track(shard)
    old_objects = repo.objects(v1.md5)
    pq.write_table(table.slice(1), shard / "part-00000.parquet")
    v2 = repo.track(shard)
    readme = [h for h in repo.objects(v2.md5) if h in old_objects]
    assert len(readme) == 1  # the unchanged file is shared by both versions

    report = purge_dvc(paths, versions=[v1.md5], ids={"SUBJ"}, rx=None)
    gone = [v1.md5, *[h for h in old_objects if h not in readme]]
    for h in gone:
        assert repo.has_object(h) == {"cache": False, "remote": False}, h
    assert repo.has_object(readme[0]) == {"cache": True, "remote": True}
    assert report["removed"] == {"cache": len(gone), "remote": len(gone)}
    restored = repo.restore(v2.md5, tmp_path / "restored")
    assert pq.read_table(restored / "part-00000.parquet").column("doc_id").to_pylist() == ["d2"]
    assert scan_stores(tmp_path, ["SECRET-SUBJECT-TEXT"], exclude=[shard])["clean"]


def test_mlflow_cleanup_deletes_runs_whose_artifacts_hold_the_subject_then_gc(tmp_path: Path) -> None:
    import re

    from models.registry import Tracking

    paths = Paths(tmp_path)
    tracking = Tracking.local(tmp_path)
    runs = {}
    for name, text in (("holds", "eval item: SUBJECT-QUOTE here"), ("clean", "nothing personal")):
        f = tmp_path / f"{name}.jsonl.gz"
        f.write_bytes(gzip.compress(text.encode()))
        with tracking.run(name) as run:
            run.log_file(f, "items")
        runs[name] = run.run_id
        f.unlink()
    out = mlflow_cleanup(paths, run_ids=[], rx=re.compile(re.escape(b"SUBJECT-QUOTE")))
    assert (out["runs_found"], out["runs_deleted"], out["gc"]["returncode"]) == (1, 1, 0)
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST|not found|No Run"):
        tracking.client.get_run(runs["holds"])
    assert tracking.client.get_run(runs["clean"]).info.lifecycle_stage == "active"
    assert scan_stores(tmp_path, ["SUBJECT-QUOTE"])["clean"]


def test_scrub_landing_rewrites_only_the_subjects_lines(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.landing.mkdir(parents=True)
    lines = [json.dumps({"user_id": u, "n": i}) + "\n" for i, u in enumerate(["ann", "bob", "ann", "cy"])]
    (paths.landing / "a.jsonl").write_text("".join(lines) + "{broken\n")
    (paths.landing / "b.jsonl.gz").write_bytes(gzip.compress("".join(lines).encode()))
    (paths.landing / "c.jsonl").write_text(lines[1])
    before = (paths.landing / "c.jsonl").stat().st_mtime_ns
    out = scrub_landing(paths, lambda u: f"sid-{u}", {"sid-ann"})
    assert out == {"found": 4, "removed": 4, "files_rewritten": 2}
    assert (paths.landing / "a.jsonl").read_text() == lines[1] + lines[3] + "{broken\n"
    assert gzip.decompress((paths.landing / "b.jsonl.gz").read_bytes()).decode() == lines[1] + lines[3]
    assert (paths.landing / "c.jsonl").stat().st_mtime_ns == before


def test_scan_sees_through_gzip_parquet_and_sqlite_and_names_the_store(tmp_path: Path) -> None:
    home = tmp_path
    (home / "landing").mkdir()
    (home / "landing" / "x.gz").write_bytes(gzip.compress(b"..NEEDLE-ONE.."))
    (home / "dvc" / ".dvc" / "cache").mkdir(parents=True)
    pq.write_table(pa.table({"t": ["NEEDLE-TWO"] * 100}), home / "dvc" / ".dvc" / "cache" / "obj", compression="zstd")
    con = sqlite3.connect(home / "mlflow.db")
    con.execute("CREATE TABLE t (v BLOB)")
    con.execute("INSERT INTO t VALUES (?)", (gzip.compress(b"NEEDLE-THREE"),))
    con.commit()
    con.close()
    out = scan_stores(home, ["NEEDLE-ONE", "NEEDLE-TWO", "NEEDLE-THREE"])
    assert not out["clean"] and out["hits"] == 3
    assert {k for k, v in out["stores"].items() if v["hits"]} == {"logs", "dvc_cache", "mlflow_db"}
    assert store_of(Path("dvc-remote/files/md5/ab/cd")) == "dvc_remote"
    assert store_of(Path("warehouse.duckdb.wal")) == "duckdb"
    assert scan_stores(home, ["NOT-THERE"])["clean"]


def test_tokenizer_check_finds_a_vocabulary_entry_only_the_subject_taught(tmp_path: Path) -> None:
    from models.config import TokenizerConfig
    from models.tokenizer import save_tokenizer, train_tokenizer

    common = [demo_data.paragraph(__import__("random").Random(i), 3) for i in range(200)]
    subject = [f"{demo_data.CANARY_TEXT} says zebrowskiquentin again" for _ in range(6)]
    tok = train_tokenizer(common + subject, TokenizerConfig(vocab_size=1200, min_frequency=2))
    save_tokenizer(tok, tmp_path / "tok")
    learned = tokenizer_learned_from(tmp_path / "tok" / "tokenizer.json", subject, common, min_frequency=2)
    assert learned and all(t in subject[0] for t in learned)
    assert any("zebrowski" in t or "lantern" in t for t in learned)
    assert tokenizer_learned_from(tmp_path / "tok" / "tokenizer.json", subject, common + subject * 2) == []


def test_run_erasure_on_the_lineage_world_follows_near_duplicates_and_taints_the_chain(tmp_path: Path) -> None:
    from tests.warehouse.test_lineage import build_world

    world = build_world(tmp_path)
    alice = world.subjects["alice"]
    synthetic = world.home / "dvc" / "synthetic" / "current"  # the loop's synthetic samples (parents: event ids)
    synthetic.mkdir(parents=True)
    pq.write_table(pa.table({"sample_id": ["syn-a", "syn-b"], "text": ["from alice", "from bob"],
                             "parent_ids": [[world.events["r-alice-2"]], [world.events["r-bob-1"]]]}),
                   synthetic / "sft.parquet")
    calls: dict[str, list] = {"partitions": [], "assets": []}
    hooks = ErasureHooks(rematerialize_partitions=calls["partitions"].append,
                         rematerialize_assets=calls["assets"].append, delete_runs=lambda ids: len(ids))
    receipt = run_erasure(world.store, Paths(world.home), [alice], "dsr-alice", hooks=hooks)

    assert world.store.keys.is_shredded(alice)
    assert world.docs["web_w1"] in erased_documents(Paths(world.home))  # her post copied into a web page
    assert calls["partitions"] == [["forum", "web"]]  # the curation partitions, re-materialized by the hook
    assert receipt["stores"]["shards"]["other_partitions"] == ["synthetic/synthetic"]
    assert pq.read_table(synthetic / "sft.parquet").column("sample_id").to_pylist() == ["syn-b"]
    assert receipt["stores"]["datasets"]["rows_filtered"] == {"synthetic/current": 1}
    assert sorted(t["model_version"] for t in receipt["tainted"]) == ["1", "2", "3"]  # not 4: never saw her data
    assert {e.data.model_version for e in world.store.read(types=["CheckpointTainted"])} == {"1", "2", "3"}
    # no orchestrator re-materialized here, so her text is still in the shards: the scan says so
    assert receipt["verification"]["clean"] is False and receipt["verification"]["hits"] > 0
    (done,) = world.store.read(types=["ErasureCompleted"])
    assert done.data.verified is False and done.subject_id == alice
    text = json.dumps(receipt)
    assert "ALICE" not in text and "alice@example.com" not in text and "alice.w@" not in text


def test_retention_turns_expired_data_into_erasure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flywheel.config import PROJECT_ROOT
    from warehouse.events import InteractionLogged
    from warehouse.store import NewEvent

    config = tmp_path / "flywheel.toml"
    config.write_text((PROJECT_ROOT / "flywheel.toml").read_text().replace(
        "production_logs_days = 0 ", "production_logs_days = 30 ").replace(
        "[retention.sources]", "[retention.sources]\nforum = 365"))
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(config))
    paths = Paths(tmp_path / "home")
    store = EventStore(paths.ensure().warehouse)
    now = datetime(2026, 12, 1, tzinfo=UTC)

    def interaction(user: str, days_ago: int) -> NewEvent:
        data = InteractionLogged(request_id=f"r-{user}", model_version="m@1", session_id=None, latency_ms=1.0,
                                 prompt_tokens=1, completion_tokens=1, status="ok", labels=None, user_id=user,
                                 messages=[{"role": "user", "content": "hi"}], response="yo")
        return NewEvent(data, f"session-{user}", now - timedelta(days=days_ago), subject_id=store.keys.pseudonymize(user))

    store.append([interaction("old@example.com", 90), interaction("new@example.com", 2)])
    raw = paths.dvc_repo / "shards" / "raw" / "forum"
    raw.mkdir(parents=True)
    pq.write_table(_docs([{"doc_id": "old-doc", "source": "forum", "license": "CC0-1.0", "text": "a",
                           "created_at": now - timedelta(days=800)},
                          {"doc_id": "new-doc", "source": "forum", "license": "CC0-1.0", "text": "b",
                           "created_at": now - timedelta(days=10)}]), raw / "part-00000.parquet")
    calls: list = []
    report = apply_retention(store, paths, hooks=ErasureHooks(rematerialize_partitions=calls.append), now=now)
    assert report["subjects"] == 1 and report["documents"] == 1 and report["partitions"] == ["forum"]
    assert calls == [["forum"]] and erased_documents(paths) == {"old-doc"}
    (pending,) = pending_erasure_requests(store, 0)
    assert pending["subject_ids"] == [store.keys.pseudonymize("old@example.com")]
    again = apply_retention(store, paths, hooks=ErasureHooks(rematerialize_partitions=calls.append), now=now)
    assert again["documents_added"] == 0 and len(pending_erasure_requests(store, 0)) == 1  # idempotent per day


def test_sensors_skip_without_requests_and_the_schedule_reads_the_config(tmp_path: Path) -> None:
    from assets.resources import WarehouseResource
    from sensors.erasure import (
        erasure_sensor,
        retention_schedule,
        retrain_after_erasure_sensor,
        tainted_versions_sensor,
    )

    resources = {"warehouse": WarehouseResource(home=str(tmp_path))}
    for s in (erasure_sensor, retrain_after_erasure_sensor, tainted_versions_sensor):
        assert isinstance(s(build_sensor_context(cursor=None, resources=resources)), SkipReason)
    assert retention_schedule.cron_schedule == "30 2 * * *" and retention_schedule.job_name == "retention_job"


def test_dsr_erase_now_runs_the_erasure_job_and_lineage_flags_the_erased_subject(state_copy, monkeypatch) -> None:
    from typer.testing import CliRunner

    from flywheel.cli import app

    monkeypatch.setenv("COLUMNS", "200")
    store = EventStore(Paths(state_copy.home).warehouse)
    forum = store.keys.pseudonymize(f"stackexchange:demo.forum:{demo_data.CANARY_USER['id']}")
    runner = CliRunner()
    result = runner.invoke(app, ["dsr", "erase", forum, "--now", "--json", "--request-id", "dsr-now-1"])
    assert result.exit_code == 0, (result.output, result.exception)
    receipt = json.loads(result.stdout[result.stdout.index("{"):])
    assert receipt["request_id"] == "dsr-now-1" and receipt["verification"]["clean"] is True
    assert receipt["stores"]["shards"]["partitions"] == ["demo_forum"]
    model = json.loads(runner.invoke(app, ["lineage", "model", "tiny-llm@1", "--json"]).stdout)
    assert forum in {s["subject_id"] for s in model["subjects"]["erased"]}
    assert any(f["flag"] == "erased_subject" for f in model["flags"])
    subject = json.loads(runner.invoke(app, ["lineage", "subject", forum, "--json"]).stdout)
    assert subject["query"]["shredded"] is True
    table = runner.invoke(app, ["dsr", "plan", forum]).stdout
    assert "erasure plan" in table
