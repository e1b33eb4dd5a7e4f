"""Lineage and DSR query latency at 1M and 10M events (target: < 1 s each at 10M).

    .venv/bin/python benchmarks/bench_lineage.py            # 1M and 10M events (~10 min to build)
    .venv/bin/python benchmarks/bench_lineage.py --quick    # 100k and 1M events, smaller manifests
    .venv/bin/python benchmarks/bench_lineage.py --keep /tmp/lineage-bench   # reuse a built state
    .venv/bin/python benchmarks/bench_lineage.py --quick --erasure   # + the demo erasure (~2 min more)

`erasure_wall_s_demo` (run by default, by `--quick` only with `--erasure`): the demo state built as the
test suite builds it (demo data with the canary user → curation of every source → mixture → tokenizer →
pretrain → SFT → DPO, with the test-size step counts; model size as configured), the canary also in
production logs, then one erasure request for both of the canary's subject ids run through
`erasure_job` in-process on a real Dagster instance: the wall time from launch to `ErasureCompleted`,
the receipt's per-step timings, and whether its verification scan came back clean.

The state, built through the real store API in a temporary `$FLYWHEEL_HOME`:

- events: bulk-appended `InteractionLogged` (85%) and `FeedbackGiven` (15%) over 50,000 subjects
  (uniform: every subject is active over the whole log, the worst case for the subject scan), each with
  a 300-byte personal part encrypted under its subject's key; `EventStore.append_batch(..., checkpoint_on_close=False)`
  in batches of 245,760 rows, one `checkpoint()` at the end (as
  bench_ingest.py's `bulk_fill`); 200 subjects shredded (keystore + `SubjectShredded`);
- shards: 4 sources × raw/clean/dedup (1M raw documents, a quarter with a subject; clean keeps 92%,
  dedup 95%), forum's clean and dedup materialized twice, a synthetic shard of 5,000 samples whose
  parents are interaction events (two of them the probe subject's); manifests written as
  `flywheel.shards.write_shard` writes them (zstd, 64k-row groups), exclusion files with dedup's
  `kept_doc_id` details (some of the probe's documents anchor near-duplicates), one
  `ShardMaterialized` per version;
- checkpoints: pretrain (all dedup samples, ~0.9M), SFT (100k incl. the synthetic ones, parent
  pretrain), DPO (50k, parent SFT), a second pretrain on 0.5M; 3 `EvalScored` runs each with 1,000 items.

Timed (median of `--repeats`, each in its own `connect()`), for one probe subject with documents,
near-duplicates and synthetic children: `lineage_subject`, `lineage_sample` (the probe's raw sample
through 5 shard versions and 3 checkpoints), `lineage_model` (the DPO model through its chain: 1.05M
input rows) and `erasure_plan`. Peers, side by side: the same subject's manifest rows read with
pyarrow (`pq.read_table(..., filters=...)`) vs the DuckDB scan the queries use, and the subject's
events read with `EventStore.read_arrow(subject_id=...)` (the store's own path).

Writes benchmarks/results/bench_lineage.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flywheel.shards import write_parquet_atomic
from warehouse.events import CheckpointTrained, EvalScored, ShardMaterialized, SubjectShredded
from warehouse.keystore import NonceSequence
from warehouse.lineage import (
    build_lineage_index,
    ensure_index,
    erasure_plan,
    lineage_model,
    lineage_sample,
    lineage_subject,
    load_catalog,
    lookup,
    subject_events,
)
from warehouse.store import BATCH_SCHEMA, EventStore, NewEvent

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_ROWS = 245_760
T0 = datetime(2026, 11, 1, tzinfo=UTC)
SOURCES = {"web": ("CC0-1.0", 0.35), "forum": ("CC-BY-SA-4.0", 0.25), "books": ("CC0-1.0", 0.15), "code": ("MIT", 0.25)}


# --------------------------------------------------------------------------------------------------------
# Building the state


def bulk_events(store: EventStore, target: int, subjects: list[str], seed: int) -> None:
    """Append synthetic interactions and feedback until the log holds `target` events."""
    rng = np.random.default_rng(seed)
    keys = store.keys.keys_for(subjects, create=False) or store.keys.keys_for(subjects)
    subject_arr = np.array(subjects, dtype=object)
    plaintext = json.dumps({"messages": [{"role": "user", "content": "x" * 200}], "response": "y" * 60,
                            "user_id": "bulk"}).encode()
    interaction = ('{"completion_tokens":120,"labels":null,"latency_ms":123.4,"model_version":"tiny-llm@3",'
                   '"prompt_tokens":30,"request_id":"x","session_id":null,"status":"ok"}')
    feedback = '{"feedback_id":"f","has_correction":false,"labels":null,"rating":null,"request_id":"x","thumbs":-1}'
    while (head := store.head()) < target:
        n = min(BATCH_ROWS, target - head)
        ids = [str(uuid.uuid4()) for _ in range(n)]
        rows = subject_arr[rng.integers(0, len(subjects), n)]
        is_feedback = rng.random(n) < 0.15
        nonce = NonceSequence()
        # a shredded subject's new events carry no personal part (as EventStore.encode does)
        pii = [keys[s].encrypt(plaintext, e.encode(), nonce()) if s in keys else None
               for s, e in zip(rows, ids, strict=True)]
        batch = pa.table(
            {
                "event_id": ids,
                "stream_id": [f"interaction-bulk-{head + i}" for i in range(n)],
                "type": np.where(is_feedback, "FeedbackGiven", "InteractionLogged").tolist(),
                "schema_version": pa.array(np.ones(n, dtype=np.int32)),
                "occurred_at": pa.array([T0 + timedelta(seconds=head)] * n, pa.timestamp("us", tz="UTC")),
                "subject_id": pa.array(rows, pa.string()),
                "payload": np.where(is_feedback, feedback, interaction).tolist(),
                "pii": pa.array(pii, pa.binary()),
            },
            schema=BATCH_SCHEMA,
        )
        store.append_batch(batch, checkpoint_on_close=False)
        print(f"  events: {store.head():,}", flush=True)
    store.checkpoint()


def _version_masks(keep: np.ndarray, versions: int, rng: np.random.Generator):
    """The kept-rows mask of each version of a shard: later versions drop 0.1% more (the probe's stay)."""
    for v in range(versions):
        k = keep.copy()
        if v:
            k[rng.random(len(k)) < 0.001] = False
            k[:3] = True
        yield k


def _hex_ids(prefix: str, n: int) -> list[str]:
    return [hashlib.sha256(f"{prefix}:{i}".encode()).hexdigest()[:32] for i in range(n)]


def _manifest(doc_ids: np.ndarray, sample_ids: np.ndarray, source: str, license_: str,
              subject_ids: np.ndarray, parents: list[list[str]] | None = None) -> pa.Table:
    n = len(doc_ids)
    return pa.table({
        "sample_id": pa.array(sample_ids, pa.string()), "doc_id": pa.array(doc_ids, pa.string()),
        "source": pa.array([source] * n, pa.string()), "license": pa.array([license_] * n, pa.string()),
        "subject_id": pa.array(subject_ids, pa.string()), "origin_event_id": pa.nulls(n, pa.string()),
        "parent_ids": pa.array(parents if parents is not None else [[]] * n, pa.list_(pa.string())),
    })  # fmt: skip


def build_lineage_state(store: EventStore, home: Path, subjects: list[str], docs_total: int,
                        probe: str) -> dict[str, Any]:
    """Shards, manifests, exclusions, synthetic samples, checkpoints and evals (see the docstring)."""
    rng = np.random.default_rng(7)
    shards: dict[tuple[str, str], list[dict[str, Any]]] = {}
    events: list[NewEvent] = []
    probe_docs: list[str] = []

    def publish(stage: str, source: str, table: pa.Table, minute: int) -> dict[str, Any]:
        md5 = hashlib.md5(f"{stage}:{source}:{minute}:{table.num_rows}".encode()).hexdigest() + ".dir"
        path = home / "lineage" / "manifests" / stage / source / f"{md5.removesuffix('.dir')}.parquet"
        write_parquet_atomic(table, path)
        ev = ShardMaterialized(stage=stage, source=source, path=f"shards/{stage}/{source}", dvc_md5=md5,
                               content_digest=md5, sample_ids_digest=md5, rows=table.num_rows, manifest=str(path),
                               data_version=md5)
        events.append(NewEvent(ev, f"shard-{stage}-{source}", T0 + timedelta(minutes=minute)))
        info = {"stage": stage, "source": source, "dvc_md5": md5, "manifest": path, "table": table}
        shards.setdefault((stage, source), []).append(info)
        return info

    minute = 0
    for source, (license_, share) in SOURCES.items():
        n = int(docs_total * share)
        doc_ids = np.array(_hex_ids(f"doc:{source}", n), dtype=object)
        if source == "forum":  # a quarter of all documents have a subject
            subj = np.array(subjects, dtype=object)[rng.integers(0, len(subjects), n)]
            subj[:3] = probe  # the probe wrote at least three posts
            probe_docs = doc_ids[:3].tolist()
        else:
            subj = np.full(n, None, dtype=object)
        raw_ids = np.array(_hex_ids(f"raw:{source}", n), dtype=object)
        publish("raw", source, _manifest(doc_ids, raw_ids, source, license_, subj), minute := minute + 1)
        keep_clean = rng.random(n) < 0.92
        keep_clean[:3] = True
        clean_ids = np.array(_hex_ids(f"clean:{source}", n), dtype=object)
        dropped = np.flatnonzero(~keep_clean)
        excl_clean = pa.table({"doc_id": pa.array(doc_ids[dropped], pa.string()), "source": [source] * len(dropped),
                               "license": [license_] * len(dropped), "subject_id": pa.array(subj[dropped], pa.string()),
                               "text": ["dropped text"] * len(dropped), "stage": ["clean"] * len(dropped),
                               "reason": ["gopher_short"] * len(dropped), "detail": pa.nulls(len(dropped), pa.string())})
        write_parquet_atomic(excl_clean, home / "dvc" / "exclusions" / "clean" / source / "excluded.parquet")
        versions = 2 if source == "forum" else 1
        for k in _version_masks(keep_clean, versions, rng):
            publish("clean", source, _manifest(doc_ids[k], clean_ids[k], source, license_, subj[k]), minute := minute + 1)
        keep_dedup = keep_clean & (rng.random(n) < 0.95)
        keep_dedup[:3] = True
        near = np.flatnonzero(keep_clean & ~keep_dedup)
        kept_pool = np.flatnonzero(keep_dedup)
        kept_for = doc_ids[kept_pool[rng.integers(0, len(kept_pool), len(near))]]
        if source == "forum":
            kept_for[:4] = probe_docs[0]  # four copies of the probe's first post were dropped for it
        excl_dedup = pa.table({
            "doc_id": pa.array(doc_ids[near], pa.string()), "source": [source] * len(near),
            "license": [license_] * len(near), "subject_id": pa.array(subj[near], pa.string()),
            "text": ["near copy"] * len(near), "stage": ["dedup"] * len(near), "reason": ["near_duplicate"] * len(near),
            "detail": [json.dumps({"kept_doc_id": k, "kept_batch_id": source, "similarity": 0.9}) for k in kept_for],
        })  # fmt: skip
        write_parquet_atomic(excl_dedup, home / "dvc" / "exclusions" / "dedup" / source / "excluded.parquet")
        for k in _version_masks(keep_dedup, versions, rng):
            publish("dedup", source, _manifest(doc_ids[k], clean_ids[k], source, license_, subj[k]), minute := minute + 1)

    # synthetic samples from failing interactions: two of the probe's, the rest random events
    with store.connect() as con:
        probe_events = [r[0] for r in con.execute(
            "SELECT event_id::VARCHAR FROM events WHERE subject_id = ? AND type = 'InteractionLogged' "
            "ORDER BY position LIMIT 2", [probe]).fetchall()]
        others = [r[0] for r in con.execute(
            "SELECT event_id::VARCHAR FROM events USING SAMPLE 4998 ROWS").fetchall()]
    parents = [[e] for e in probe_events + others]
    n_syn = len(parents)
    syn_ids = np.array(_hex_ids("synthetic", n_syn), dtype=object)
    synthetic = publish("synthetic", "synthetic", _manifest(
        np.full(n_syn, None, dtype=object), syn_ids, "synthetic", "LicenseRef-flywheel-synthetic",
        np.full(n_syn, None, dtype=object), parents), minute := minute + 1)

    def inputs(name: str, parts: list[tuple[dict[str, Any], int | None]]) -> Path:
        tables = []
        for shard, take in parts:
            t = shard["table"]
            if take is not None and take < t.num_rows:
                idx = np.sort(rng.choice(t.num_rows, take, replace=False))
                idx[:3] = np.arange(3)  # the first rows (the probe's posts in forum) stay in
                t = t.take(pa.array(np.unique(idx)))
            n = t.num_rows
            tables.append(t.append_column("shard_stage", pa.array([shard["stage"]] * n, pa.string()))
                          .append_column("shard_source", pa.array([shard["source"]] * n, pa.string()))
                          .append_column("shard_md5", pa.array([shard["dvc_md5"]] * n, pa.string())))
        path = home / "lineage" / "checkpoints" / f"{name}.parquet"
        write_parquet_atomic(pa.concat_tables(tables), path)
        return path

    dedup_latest = {src: shards[("dedup", src)][-1] for src in SOURCES}
    scale = docs_total / 1_000_000
    plan = [
        ("pretrain", "1", None, [(dedup_latest[s], None) for s in SOURCES]),
        ("sft", "2", "1", [(synthetic, None), (dedup_latest["forum"], int(60_000 * scale)),
                           (dedup_latest["web"], int(35_000 * scale))]),
        ("dpo", "3", "2", [(synthetic, None), (dedup_latest["forum"], int(45_000 * scale))]),
        ("pretrain", "4", None, [(shards[("dedup", "forum")][0], None), (dedup_latest["web"], int(250_000 * scale))]),
    ]
    items = pa.table({"suite": ["exact_match"] * 1000, "slice": [f"s{i % 7}" for i in range(1000)],
                      "item_id": [f"i{i}" for i in range(1000)], "metric": ["exact_match"] * 1000,
                      "value": rng.random(1000), "correct": rng.random(1000) < 0.5})
    inputs_rows = {}
    for stage, version, parent, parts in plan:
        path = inputs(f"tiny-llm-{version}", parts)
        inputs_rows[version] = pq.read_metadata(path).num_rows
        ck = CheckpointTrained(stage=stage, model_name="tiny-llm", model_version=version,
                               checkpoint_path=f"checkpoints/{stage}/{version}", checkpoint_md5=None,
                               inputs_manifest=str(path), inputs_digest="-", samples=inputs_rows[version],
                               parent_model_version=parent)
        events.append(NewEvent(ck, f"checkpoint-{version}", T0 + timedelta(hours=int(version))))
        for suite in ("exact_match", "json_validity", "safety"):
            ipath = home / "evals" / f"tiny-llm-{version}-{suite}.parquet"
            write_parquet_atomic(items, ipath)
            ev = EvalScored(model_name="tiny-llm", model_version=version, suite=suite, summary={"score": 0.5},
                            items_path=str(ipath), items_digest="-", eval_set_digest="-", contamination_check_passed=True)
            events.append(NewEvent(ev, f"eval-{version}-{suite}", T0 + timedelta(hours=int(version), minutes=5)))
    # 200 erased subjects (not the probe)
    for s in subjects[-200:]:
        store.keys.shred(s, f"dsr-{s[:8]}")
        events.append(NewEvent(SubjectShredded(request_id=f"dsr-{s[:8]}"), f"subject-{s}", T0, subject_id=s))
    store.append(events)
    return {
        "probe": probe, "probe_raw_sample": shards[("raw", "forum")][0]["table"].column("sample_id")[0].as_py(),
        "manifest_rows": sum(i["table"].num_rows for v in shards.values() for i in v),
        "shard_versions": sum(len(v) for v in shards.values()), "inputs_rows": inputs_rows,
    }


# --------------------------------------------------------------------------------------------------------
# Timing


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def measure(store: EventStore, home: Path, state: dict[str, Any], repeats: int) -> dict[str, float]:
    probe = state["probe"]
    out: dict[str, float] = {}
    # the index sidecars new since the last size (event spans; manifests the first time), built once
    t = time.perf_counter()
    built = build_lineage_index(store, home)
    out["index_build_s"] = time.perf_counter() - t
    out["lineage_subject_s"], subj = median_time(lambda: lineage_subject(store, home, probe), repeats)
    out["lineage_sample_s"], sample = median_time(lambda: lineage_sample(store, home, state["probe_raw_sample"]), repeats)
    out["lineage_model_s"], model = median_time(
        lambda: lineage_model(store, home, "tiny-llm", "3", allowed_licenses=["CC0-1.0", "CC-BY-SA-4.0"]), repeats)
    out["erasure_plan_s"], plan = median_time(lambda: erasure_plan(store, home, probe), repeats)

    # the parts side by side with their peers: the subject's events, its manifest rows
    def events_indexed() -> int:
        with store.connect() as con:
            return len(subject_events(con, home, probe))

    out["subject_events_index_s"], n_events = median_time(events_indexed, repeats)
    out["peer_subject_events_scan_s"], scanned = median_time(
        lambda: store.read_arrow(subject_id=probe, columns="position, event_id::VARCHAR AS event_id, type, occurred_at"),
        repeats)
    assert scanned.num_rows == n_events
    with store.connect() as con:
        catalog = load_catalog(con, home)
    files = catalog.shard_manifests + catalog.input_manifests

    def manifests_indexed() -> int:
        with store.connect() as con:
            return len(lookup(con, ensure_index(con, catalog), [probe], "u"))

    def manifests_duckdb() -> int:
        with store.connect() as con:
            return con.sql("SELECT count(*) FROM read_parquet($f, union_by_name = true) WHERE subject_id = $s",
                           params={"f": files, "s": probe}).fetchall()[0][0]

    def manifests_pyarrow() -> int:
        return sum(pq.read_table(f, columns=["sample_id", "subject_id"], filters=[("subject_id", "=", probe)]).num_rows
                   for f in files)

    out["subject_manifest_rows_index_s"], n_idx = median_time(manifests_indexed, repeats)
    out["peer_subject_manifest_rows_duckdb_scan_s"], n_dd = median_time(manifests_duckdb, repeats)
    out["peer_subject_manifest_rows_pyarrow_s"], n_pa = median_time(manifests_pyarrow, repeats)
    assert n_idx == n_dd == n_pa, (n_idx, n_dd, n_pa)
    # what the answers held (sanity: the probe's data is found at every size)
    assert subj["events"]["total"] == n_events > 0
    assert len(subj["documents"]) >= 3 and len(subj["children"]) >= 2 and len(subj["near_duplicates"]) >= 4
    assert len(sample["shard_versions"]) == 5, [v["stage"] for v in sample["shard_versions"]]
    assert {c["model_version"] for c in sample["checkpoints"]} >= {"1", "2", "3"}
    assert [c["stage"] for c in model["chain"]] == ["pretrain", "sft", "dpo"]
    assert plan["counts"]["models"] >= 3
    out.update({"probe_events": n_events, "probe_manifest_rows": n_idx, "index_event_sidecars": built["event_sidecars"],
                "model_input_rows": sum(c["samples"] for c in model["chain"]),
                "model_erased_subjects_flagged": len(model["subjects"]["erased"])})
    return out


def measure_erasure_demo(work: Path) -> dict[str, Any]:
    """Build the demo state under `work` and time one full erasure of the canary (see the docstring)."""
    import gzip
    import os

    from dagster import AssetSelection, DagsterInstance, materialize

    from flywheel import demo_data
    from flywheel.config import PROJECT_ROOT

    base = work / "demo"
    shutil.rmtree(base, ignore_errors=True)
    home = base / "home"
    (home / "dagster").mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster" / "dagster.yaml")
    from tests.assets.conftest import small_config  # the test suite's step counts: the erasure does not train

    os.environ.update(FLYWHEEL_HOME=str(home), DAGSTER_HOME=str(home / "dagster"),
                      FLYWHEEL_CONFIG=str(small_config(base / "flywheel.toml")))
    import assets.curation as cur
    import assets.training as tr
    import assets.warehouse as wh
    from assets.resources import DvcResource, ProjectConfigResource, WarehouseResource
    from flywheel.definitions import defs
    from flywheel.erasure import request_erasure
    from sensors.erasure import _definitions
    from warehouse.ingest import Ingester

    t = time.perf_counter()
    instance = DagsterInstance.get()
    resources = {"warehouse": WarehouseResource(home=str(home)), "dvc": DvcResource(home=str(home)),
                 "project": ProjectConfigResource()}
    definitions = _definitions()

    def run(selection: AssetSelection, partition_key: str | None = None) -> None:
        assert materialize(definitions, selection=selection, resources=resources, instance=instance,
                           partition_key=partition_key).success

    demo_data.write_all(home / "demo-data")
    run(AssetSelection.assets(cur.sealed_eval_index, wh.event_log_projections))
    for source in cur.source_partitions.get_partition_keys():
        run(AssetSelection.assets(cur.raw_documents, cur.cleaned_documents, cur.dedup_shards), source)
    chain = [tr.training_mixture, tr.tokenizer, tr.base_checkpoint, tr.sft_dataset, tr.sft_checkpoint,
             tr.preference_pairs, tr.dpo_checkpoint]
    run(AssetSelection.assets(*chain) | AssetSelection.checks_for_assets(*chain))
    store = EventStore(home / "warehouse.duckdb")
    c = demo_data.CANARY_USER
    landing = home / "landing" / "server.jsonl.gz"
    landing.parent.mkdir(parents=True, exist_ok=True)
    landing.write_bytes(gzip.compress("".join(json.dumps(
        {"type": "interaction", "request_id": f"canary-{i}", "user_id": c["email"], "model_version": "tiny-llm@3",
         "timestamp": f"2026-11-02T09:00:0{i}Z", "messages": [{"role": "user", "content": f"I am {c['name']}. {i}"}],
         "response": "ok", "latency_ms": 10.0, "prompt_tokens": 3, "completion_tokens": 1}) + "\n" for i in range(3)).encode()))
    Ingester(store).ingest_file(landing)
    build_s = time.perf_counter() - t
    subjects = [store.keys.pseudonymize(f"stackexchange:demo.forum:{c['id']}"), store.keys.pseudonymize(c["email"])]
    req = request_erasure(store, subjects, reason="benchmark")
    t = time.perf_counter()
    result = defs.resolve_job_def("erasure_job").execute_in_process(
        run_config={"ops": {"erase_subject": {"config": {"subject_ids": subjects, "request_id": req["request_id"]}}}},
        instance=instance)
    wall = time.perf_counter() - t
    assert result.success
    (done, *_) = [e for e in store.read(types=["ErasureCompleted"]) if e.data.request_id == req["request_id"]]
    receipt = done.data.receipt
    return {"demo_build_s": round(build_s, 1), "erasure_wall_s_demo": wall, "erasure_receipt_wall_s_demo": receipt["wall_s"],
            "erasure_verified_demo": bool(done.data.verified), "erasure_fingerprints_demo": receipt["verification"]["needles"],
            "erasure_files_scanned_demo": sum(v["files"] for v in receipt["verification"]["stores"].values()),
            "erasure_steps_s_demo": receipt["timings_s"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k and 1M events, 200k documents")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--keep", type=Path, default=None, help="build into / reuse this directory")
    parser.add_argument("--erasure", action=argparse.BooleanOptionalAction, default=None,
                        help="time a full erasure on the demo state (default: on, off with --quick)")
    parser.add_argument("--only-erasure", action="store_true", help="only the demo erasure (keeps other figures)")
    args = parser.parse_args(argv)
    if args.only_erasure:
        work = args.keep or Path(tempfile.mkdtemp(prefix="bench-erasure-"))
        path = RESULTS / "bench_lineage.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        results.update(measure_erasure_demo(work))
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({k: v for k, v in results.items() if "demo" in k}, indent=2))
        return results
    sizes = (100_000, 1_000_000) if args.quick else (1_000_000, 10_000_000)
    labels = ("100k", "1m") if args.quick else ("1m", "10m")
    docs_total = 200_000 if args.quick else 1_000_000
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-lineage-"))
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    store = EventStore(home / "warehouse.duckdb")
    subjects = sorted(store.keys.pseudonymize_many([f"user-{i}@example.org" for i in range(50_000)]).values())
    probe = subjects[7]
    state_file = work / "state.json"
    results: dict[str, Any] = {"subjects": len(subjects), "documents": docs_total, "repeats": args.repeats}
    for size, label in zip(sizes, labels, strict=True):
        t = time.perf_counter()
        bulk_events(store, size - (500 if not state_file.exists() else 0), subjects, seed=size)
        if not state_file.exists():
            state = build_lineage_state(store, home, subjects, docs_total, probe)
            state_file.write_text(json.dumps(state))
            bulk_events(store, size, subjects, seed=size + 1)
        state = json.loads(state_file.read_text())
        print(f"built {store.head():,} events in {time.perf_counter() - t:.0f}s; measuring", flush=True)
        for k, v in measure(store, home, state, args.repeats).items():
            results[f"{k}_{label}"] = v
        results[f"events_{label}"] = store.head()
        results.update({k: state[k] for k in ("manifest_rows", "shard_versions")})
        results["inputs_rows"] = state["inputs_rows"]
    if args.erasure or (args.erasure is None and not args.quick):
        results.update(measure_erasure_demo(work))
    print()
    print(f"{'measure':<44}{'value':>14}")
    for k, v in results.items():
        print(f"{k:<44}{v:>14.4f}" if isinstance(v, float) else f"{k:<44}{v!s:>14}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_lineage.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.keep is None:
        shutil.rmtree(work)
    return results


if __name__ == "__main__":
    main()
