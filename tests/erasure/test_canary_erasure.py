"""The test that matters: a canary subject erased from every store, verified byte by byte.

The demo forum has a canary user (name, e-mail and a unique message string in their posts and
comments); the trained state has curated them (raw → clean → dedup), sampled them into the mixture
and trained the tokenizer and pretrain → SFT → DPO on it. Here the same person also appears in
production logs (one line quarantined) and in an MLflow artifact of per-item outputs, and the
current model is champion. The erasure goes through the real path: `ErasureRequested` → the
erasure sensor → the erasure job in-process on a real Dagster instance. Then every file under the
home — DuckDB file and WAL, keystore, shards of all versions, DVC cache and remote, MLflow DB and
artifacts, Dagster storage and compute logs, checkpoints, tokenizer files, landing logs,
quarantine — is scanned by this test's own scanner (raw bytes; gzip and Parquet decompressed;
SQLite and DuckDB read value by value). Zero hits. The source corpora under demo-data/ (the
upstream input, not a store of ours) still hold the canary: proof the scan would see it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sqlite3
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from dagster import RunRequest, SkipReason, build_sensor_context

from flywheel import demo_data
from flywheel.config import Paths
from warehouse.store import EventStore

NEEDLES = [demo_data.CANARY_USER["name"], demo_data.CANARY_USER["email"], demo_data.CANARY_TEXT,
           demo_data.CANARY_TITLE]  # the canary's question title: other people's answers reply to that question


# --------------------------------------------------------------------------------------------------------
# An independent scanner (not flywheel.erasure.scan_stores: the system under test does not grade itself)


def _views(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out = [data]
    if data[:2] == b"\x1f\x8b":
        out.append(gzip.decompress(data))
    if data[:4] == b"PAR1":
        out.append(json.dumps(pq.read_table(io.BytesIO(data)).to_pylist(), default=str).encode())
    if data[:16] == b"SQLite format 3\x00":
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            rows = con.execute(f'SELECT * FROM "{t}"').fetchall()
            out.append(repr(rows).encode())
            out += [gzip.decompress(v) for r in rows for v in r if isinstance(v, bytes) and v[:2] == b"\x1f\x8b"]
        con.close()
    if path.suffix == ".duckdb":
        con = duckdb.connect(str(path), read_only=True)
        for (t,) in con.execute("SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'").fetchall():
            out.append(repr(con.execute(f'SELECT * FROM "{t}"').fetchall()).encode())
        con.close()
    return out


def scan(home: Path, needles: list[str], *, skip: tuple[str, ...] = ("demo-data",)) -> dict[str, list[str]]:
    """needle → files under `home` holding it (in any view)."""
    hits: dict[str, list[str]] = {n: [] for n in needles}
    encoded = {n: (n.encode(), n.encode("unicode_escape")) for n in needles}
    for root, dirs, files in os.walk(home):
        rel_root = Path(root).relative_to(home)
        if rel_root.parts[:1] and rel_root.parts[0] in skip:
            dirs[:] = []
            continue
        for f in files:
            p = Path(root) / f
            if p.is_symlink() or not p.is_file() or p.suffix == ".lock":
                continue
            views = _views(p)
            for n, forms in encoded.items():
                if any(form in v for v in views for form in forms):
                    hits[n].append(str(p.relative_to(home)))
    return hits


# --------------------------------------------------------------------------------------------------------


def canary_logs(landing: Path) -> Path:
    """Production traffic from the canary (by e-mail) and a neighbour, one canary line malformed."""
    c = demo_data.CANARY_USER
    recs = [{"type": "interaction", "request_id": f"canary-{i}", "user_id": c["email"], "session_id": "s-canary",
             "model_version": "tiny-llm@3", "timestamp": f"2026-11-02T09:00:0{i}Z",
             "messages": [{"role": "user", "content": f"I am {c['name']}, mail {c['email']}. {demo_data.CANARY_TEXT} #{i}"}],
             "response": "Noted.", "latency_ms": 100.0, "prompt_tokens": 12, "completion_tokens": 2, "status": "ok"}
            for i in range(3)]
    recs.append({"type": "feedback", "feedback_id": "fb-canary-0", "request_id": "canary-0", "user_id": c["email"],
                 "timestamp": "2026-11-02T09:00:30Z", "thumbs": -1, "comment": f"{demo_data.CANARY_TEXT} was wrong"})
    recs.append({"type": "interaction", "request_id": "neighbour-1", "user_id": "neighbour@example.com",
                 "session_id": "s-n", "model_version": "tiny-llm@3", "timestamp": "2026-11-02T09:01:00Z",
                 "messages": [{"role": "user", "content": "NEIGHBOUR-KEEP what is 2+2?"}], "response": "4",
                 "latency_ms": 90.0, "prompt_tokens": 5, "completion_tokens": 1, "status": "ok"})
    bad = dict(recs[0], request_id="canary-bad", latency_ms="very slow")  # quarantined under the canary's key
    landing.mkdir(parents=True, exist_ok=True)
    path = landing / "server-20261102.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in [*recs, bad]).encode()))
    return path


def plant_eval_outputs(home: Path) -> str:
    """An MLflow run whose artifact holds per-item model outputs that quote the canary's prompt."""
    from models.registry import Tracking

    out = home / "work" / "eval-outputs.jsonl.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(gzip.compress(json.dumps({"prompt": f"{demo_data.CANARY_USER['name']} asks", "output": "ok"}).encode()))
    with Tracking.local(home).run("eval-outputs", tags={"asset": "eval_scores"}) as run:
        run.log_file(out, "items")
    out.unlink()
    return run.run_id


def test_canary_is_erased_from_every_store(state_copy) -> None:
    from dagster import DagsterInstance

    from flywheel.definitions import defs
    from flywheel.erasure import request_erasure
    from models.promotion import ledger, promote
    from models.registry import Tracking
    from sensors.erasure import erasure_sensor, retrain_after_erasure_sensor
    from warehouse.access import access_export
    from warehouse.ingest import Ingester

    home = state_copy.home
    paths = Paths(home)
    store = EventStore(paths.warehouse)
    report = Ingester(store).ingest_file(canary_logs(paths.landing))
    assert (report.ingested, report.quarantined) == (5, 1)
    eval_run = plant_eval_outputs(home)
    tracking = Tracking.local(home)
    promote(store, tracking, "tiny-llm", "3", None, forced=True, actor="test", reason="champion before the erasure")

    forum = store.keys.pseudonymize(f"stackexchange:demo.forum:{demo_data.CANARY_USER['id']}")
    logs = store.keys.pseudonymize(demo_data.CANARY_USER["email"])
    forum_versions = {e.data.dvc_md5 for e in store.read(types=["ShardMaterialized"]) if e.data.source == "demo_forum"}
    before = scan(home, NEEDLES)
    assert all(before.values()), before  # the canary is there to be found, in every form
    stores_before = {p.split("/")[0] for hits in before.values() for p in hits}
    assert {"landing", "dvc", "dvc-remote", "dagster", "mlartifacts"} <= stores_before, stores_before
    assert access_export(store, home, forum)["confirmation"]["processed"] is True

    # ErasureRequested (both identifiers of the person, one request) → the sensor → the job
    req = request_erasure(store, [forum, logs], reason="Art. 17 request", requested_by="test")
    warehouse = state_copy.resources()["warehouse"]
    context = build_sensor_context(instance=state_copy.instance, cursor="0", resources={"warehouse": warehouse})
    tick = erasure_sensor(context)
    (run_request,) = tick.run_requests
    assert isinstance(run_request, RunRequest) and run_request.run_key == req["event_id"]
    assert run_request.run_config["ops"]["erase_subject"]["config"] == {"subject_ids": [forum, logs],
                                                                         "request_id": req["request_id"]}
    again = erasure_sensor(build_sensor_context(instance=state_copy.instance, cursor=tick.cursor,
                                                resources={"warehouse": warehouse}))
    assert isinstance(again, SkipReason)

    instance = DagsterInstance.from_config(str(home / "dagster"))
    result = defs.resolve_job_def("erasure_job").execute_in_process(
        run_config=run_request.run_config, instance=instance, tags=run_request.tags)
    assert result.success
    (output,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    shown = output.event_specific_data.metadata  # what the UI shows on the erasure run
    assert shown["verified"].value is True and "dvc_remote" in shown["stores"].value

    # the receipt: per store found/removed, the verification scan clean
    completed = [e for e in store.read(types=["ErasureCompleted"])]
    assert {e.subject_id for e in completed} == {forum, logs}
    receipt = completed[-1].data.receipt
    assert completed[-1].data.verified is True and receipt["verification"]["clean"] is True, receipt["verification"]
    assert receipt["verification"]["needles"] > 3 and receipt["verification"]["hits"] == 0
    s = receipt["stores"]
    assert s["keystore"] == {"found": 1, "removed": 1, "tombstones": 2}  # the forum id never had events, so no key
    assert s["shards"]["partitions"] == ["demo_forum"] and s["shards"]["removed"] >= 3
    assert s["datasets"]["rebuilt"] == ["training_mixture"]
    assert s["dvc_cache"]["removed"] > 0 and s["dvc_remote"]["removed"] > 0
    assert s["logs"] == {"found": 5, "removed": 5, "files_rewritten": 1}
    assert s["mlflow"]["removed"] >= 1 and s["mlflow"]["gc"]["returncode"] == 0
    assert s["dagster"]["removed"] >= 1
    assert s["tokenizers"]["checked"] is True
    assert s["events"]["quarantine_rows_shredded"] == 1
    assert s["checkpoints"]["tainted"] == 3 and s["checkpoints"]["retrain_requested"] is True
    assert s["checkpoints"]["champions"] == [{"model": "tiny-llm", "champion": "3", "action": "alias_withdrawn"}]
    assert "CANARY" not in json.dumps(receipt) and demo_data.CANARY_USER["email"] not in json.dumps(receipt)

    # zero hits for the canary anywhere under the home, by this test's own scan
    after = scan(home, NEEDLES)
    assert after == {n: [] for n in NEEDLES}, after
    assert all(scan(home / "demo-data", NEEDLES, skip=()).values())  # the upstream corpora still do: the scan sees

    # every earlier version of the forum partitions is gone from the DVC cache and remote, by hash
    from flywheel.versioning import DvcRepo

    repo = DvcRepo(home / "dvc", home / "dvc-remote")
    for md5 in forum_versions:
        assert repo.has_object(md5) == {"cache": False, "remote": False}, md5

    # what remains: the neighbour, new shard versions without the subject, a tombstone, a retrain request
    assert "NEIGHBOUR-KEEP" in gzip.decompress((paths.landing / "server-20261102.jsonl.gz").read_bytes()).decode()
    raw = pq.read_table(home / "dvc" / "shards" / "raw" / "demo_forum" / "part-00000.parquet")
    assert forum not in raw.column("subject_id").to_pylist() and raw.num_rows > 100
    excluded = pq.read_table(home / "dvc" / "exclusions" / "raw" / "demo_forum" / "excluded.parquet").to_pylist()
    erased_rows = [r for r in excluded if r["reason"] == "erased_subject"]
    assert erased_rows and all(r["subject_id"] == forum and r["text"] is None and r["title"] is None for r in erased_rows)
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST|not found|No Run"):
        tracking.client.get_run(eval_run)
    assert not [p for p in (home / "mlartifacts").rglob(eval_run)]  # mlflow gc removed its artifacts
    assert tracking.alias("tiny-llm", "champion") is None
    assert ledger(store, "tiny-llm").champion == "3"  # the ledger keeps the history; serving has no champion

    for subject in (forum, logs):
        export = access_export(store, home, subject)
        assert set(export) == {"kind", "format_version", "subject_id", "generated_at", "request_id", "confirmation",
                               "tombstone"}
        assert export["confirmation"]["processed"] is False and export["confirmation"]["erased"] is True
        assert export["tombstone"]["request_ids"] == [req["request_id"]]
        assert export["tombstone"]["erasure_completed"][0]["request_id"] == req["request_id"]

    tainted = sorted(e.data.model_version for e in store.read(types=["CheckpointTainted"]))
    assert tainted == ["1", "2", "3"]
    retrain = retrain_after_erasure_sensor(build_sensor_context(instance=state_copy.instance, cursor="0",
                                                                resources={"warehouse": warehouse}))
    (rr,) = retrain.run_requests
    assert rr.run_key == f"retrain-{req['request_id']}"
    assert retrain_after_erasure_sensor.job_name == "retrain_after_erasure_job"


@pytest.mark.slow
def test_retrain_after_erasure_then_a_clean_champion_retires_the_tainted_versions(state_copy) -> None:
    """The rest of the taint path, executed: the retrain run the sensor requests, a clean successor
    promoted, then the tainted versions leave the registry, MLflow and DVC."""
    from flywheel.cli_dsr import run_erasure_job
    from flywheel.definitions import defs
    from flywheel.erasure import request_erasure
    from models.promotion import promote
    from models.registry import Tracking
    from sensors.erasure import retrain_after_erasure_sensor, tainted_versions_sensor
    from warehouse.lineage import lineage_model

    home = state_copy.home
    store = EventStore(Paths(home).warehouse)
    forum = store.keys.pseudonymize(f"stackexchange:demo.forum:{demo_data.CANARY_USER['id']}")
    tracking = Tracking.local(home)
    old_runs = {v.version: v.run_id for v in tracking.versions("tiny-llm")}
    req = request_erasure(store, [forum], reason="slow test")
    assert run_erasure_job([forum], req["request_id"])["verification"]["clean"]

    resources = {"warehouse": state_copy.resources()["warehouse"]}
    (retrain,) = retrain_after_erasure_sensor(build_sensor_context(cursor="0", resources=resources)).run_requests
    result = defs.resolve_job_def("retrain_after_erasure_job").execute_in_process(instance=state_copy.instance,
                                                                                tags=retrain.tags)
    assert result.success
    new = [e.data for e in store.read(types=["CheckpointTrained"]) if e.data.stage == "dpo"][-1].model_version
    assert new not in {"1", "2", "3"}
    clean = lineage_model(store, home, "tiny-llm", new)
    assert clean["subjects"]["erased"] == [] and not clean["flags"]  # the successor never saw the subject
    promote(store, tracking, "tiny-llm", new, None, forced=True, actor="test", reason="clean successor")

    (cleanup,) = tainted_versions_sensor(build_sensor_context(cursor="0", resources=resources)).run_requests
    assert defs.resolve_job_def("remove_tainted_versions_job").execute_in_process(
        run_config=cleanup.run_config, instance=state_copy.instance).success
    remaining = {v.version for v in tracking.versions("tiny-llm")}
    assert not remaining & {"1", "2", "3"} and new in remaining
    for version in ("1", "2", "3"):
        with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST|not found|No Run"):
            tracking.client.get_run(old_runs[version])
    assert scan(home, NEEDLES) == {n: [] for n in NEEDLES}
    assert tainted_versions_sensor(build_sensor_context(cursor="0", resources=resources)).run_requests == []  # done
