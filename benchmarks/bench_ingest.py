"""Ingest throughput and event-log read latency.

    .venv/bin/python benchmarks/bench_ingest.py            # 1M events ingested, reads at 1M and 10M
    .venv/bin/python benchmarks/bench_ingest.py --quick    # 100k events, reads at 100k and 1M
    .venv/bin/python benchmarks/bench_ingest.py --compare  # + side by side: previous pipeline, in-process

1. End-to-end ingest (JSONL → parse, validate, pseudonymize, encrypt, append) of realistic interaction
   and feedback records (`flywheel.samples`, ~930 bytes a record), through `warehouse.ingest.Ingester`
   (worker processes for a file this size), median of `--repeats` runs, each into a fresh warehouse.
   With `--compare`, the same file in the same run, interleaved: `workers=0` (everything in this
   process: one preparing thread, one appending) and the previous pipeline (`warehouse/ingest.py` as of
   commit PREVIOUS_INGEST, loaded from git, if the history has it). The machine is shared, so ratios
   measured side by side are what count; the load average is recorded with each run.
   `--baseline REV` runs `warehouse/ingest.py` as of git REV the same way, interleaved (A/B of a change).
   `--stages` measures CPU per event of each step on one core (split, parse+validate, build, encrypt,
   IPC hand-over, append).
2. The naive path in the same run: the same work row by row (json.loads, per-row validation,
   HMAC, AES-GCM) and `executemany` INSERTs into the same events schema. It is measured on a slice
   (it would take hours at 1M) and reported per event.
3. Reads: all events of one subject (decrypted, via `EventStore.read_subject`) and a 10,000-position
   range read (`read_arrow`), median of 7, at the ingested size and after bulk-appending synthetic
   events up to the large size (a 300-byte personal part encrypted under each row's subject key, the
   same subjects; same schema and indexes).

Writes benchmarks/results/bench_ingest.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flywheel.samples import write_jsonl
from warehouse.events import derive_event_id
from warehouse.ingest import Ingester
from warehouse.keystore import KeyStore, NonceSequence
from warehouse.store import BATCH_SCHEMA, SCHEMA_SQL, EventStore

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PREVIOUS_INGEST = "774f4bf"  # the last commit with the single-process, chunk-per-transaction pipeline


def previous_ingester_class(rev: str = PREVIOUS_INGEST) -> type | None:
    """`Ingester` of `warehouse/ingest.py` as of git revision `rev` (None where git or the revision is
    missing). It runs against today's `warehouse.store`."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:warehouse/ingest.py"], cwd=ROOT, check=True,
                                capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    name = f"ingest_at_{rev.replace('~', '_').replace('^', '_')}"
    # A package of its own beside today's modules, so the worker processes it starts (which import
    # `warehouse.ingest` from the directory above the module's file) run that revision too.
    package = Path(tempfile.mkdtemp(prefix="previous_ingest_")) / "warehouse"
    package.mkdir()
    for module in (ROOT / "warehouse").glob("*.py"):
        if module.name != "ingest.py":
            (package / module.name).symlink_to(module)
    path = package / "ingest.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.Ingester


def timed_ingest(make: object, log: Path, work: Path, name: str) -> dict[str, float]:
    """One ingest of `log` into a fresh warehouse; wall time, CPU of this process and its workers."""
    home = work / name
    shutil.rmtree(home, ignore_errors=True)
    store = EventStore(home / "warehouse.duckdb")
    ingester = make(store)  # type: ignore[operator]
    load = os.getloadavg()[0]
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    report = ingester.ingest_file(log)
    elapsed = time.perf_counter() - t0
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(b, f) - getattr(a, f) for a, b in ((r0, r1), (c0, c1)) for f in ("ru_utime", "ru_stime"))
    return {"events": report.ingested, "seconds": elapsed, "events_per_s": report.ingested / elapsed,
            "cpu_us_per_event": cpu / report.ingested * 1e6, "load": load, "home": str(home)}


class _Clock:
    """Adds the CPU time of a `with` block to `cost[name]` (when `on`)."""

    def __init__(self, cost: dict[str, float]) -> None:
        self.cost, self.on, self.name, self.start = cost, False, "", 0.0

    def __call__(self, name: str) -> _Clock:
        self.name = name
        return self

    def __enter__(self) -> None:
        self.start = time.process_time()

    def __exit__(self, *exc: object) -> None:
        if self.on:
            self.cost[self.name] += time.process_time() - self.start


def stage_costs(log: Path, work: Path, lines: int) -> dict[str, float]:
    """CPU µs per event of each step, one core, on about `lines` lines after a warm-up block (the first
    block creates every subject's key: not the steady state)."""

    from warehouse import ingest as wi

    store = EventStore(work / "stages" / "warehouse.duckdb")
    subjects = wi.Subjects(store.keys)
    wi._scratch_db().execute("SET threads=1")
    mapped = wi._MappedFile(log)
    ranges, _, _ = mapped.plan(0, None, False, 32 << 20)
    cost = dict.fromkeys(("split", "parse_validate", "pseudonymize_keys", "build_sql", "encrypt", "ipc_handover", "append"), 0.0)
    clock = _Clock(cost)
    handover = work / "stages" / "handover.arrow"
    pending: list[pa.Table] = []
    events = 0
    for k, (a, b) in enumerate(ranges):
        clock.on = k > 0
        with clock("split"):
            block = wi.split_lines(mapped.view[a:b], offset=a, first_number=0, max_line_bytes=64 << 20, final=False)
        with clock("parse_validate"):
            records = wi.parse_block(block, use_threads=False)[0]
        with clock("pseudonymize_keys"):
            subject_col, codes, aeads = subjects.resolve(records.column("user_id"))
        con = wi._scratch_db()
        con.register("_records", records.append_column("subject_id", subject_col))
        with clock("build_sql"):
            built = con.sql(wi._PLAINTEXT_SQL).to_arrow_table()
        con.unregister("_records")
        with clock("encrypt"):
            pii, _ = wi.encrypt_rows(built.column("plaintext"), built.column("event_id"), codes, aeads)
        batch = built.select(["event_id", "stream_id", "type", "schema_version", "occurred_at", "subject_id", "payload"])
        batch = batch.append_column("pii", pii).cast(BATCH_SCHEMA)
        with clock("ipc_handover"):
            with pa.OSFile(str(handover), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
                writer.write_table(batch)
            pending.append(pa.ipc.open_file(pa.memory_map(str(handover))).read_all())
            handover.unlink()
        if k:
            events += batch.num_rows
        while sum(t.num_rows for t in pending) >= wi.ROW_GROUP_ROWS or (events >= lines and pending):
            whole = pa.concat_tables(pending)
            rows = min(whole.num_rows, wi.ROW_GROUP_ROWS)
            pending = [whole.slice(rows)] if whole.num_rows > rows else []
            with clock("append"), store.connect(checkpoint_on_close=rows == wi.ROW_GROUP_ROWS) as con2:
                con2.execute("SET threads=1")
                con2.execute("BEGIN")
                store.append_batch(whole.slice(0, rows), on_conflict="return", con=con2)
                con2.execute("COMMIT")
        if events >= lines:
            break
    out = {f"stage_{name}_us": v / max(events, 1) * 1e6 for name, v in cost.items()}
    out["stage_total_us"] = sum(out.values())
    out["stage_events"] = events
    return out


def naive_ingest(path: Path, db: Path, keys: KeyStore, limit: int) -> float:
    """Row by row: parse, validate, pseudonymize, encrypt, executemany one row at a time. Events/s."""
    import duckdb

    con = duckdb.connect(str(db))
    con.execute(SCHEMA_SQL)
    required = ("request_id", "user_id", "model_version", "timestamp", "messages", "response", "latency_ms")
    n = 0
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        for position, line in enumerate(f, start=1):
            if position > limit:
                break
            rec = json.loads(line)
            if rec["type"] == "interaction":
                if any(rec.get(k) is None for k in required):
                    continue
                kind, key = "interaction", rec["request_id"]
                public = {k: rec.get(k) for k in ("request_id", "model_version", "session_id", "latency_ms",
                                                  "prompt_tokens", "completion_tokens", "status")}
                personal = {k: rec[k] for k in ("user_id", "messages", "response")}
                event_type, stream = "InteractionLogged", f"interaction-{rec['request_id']}"
            else:
                kind, key = "feedback", rec["feedback_id"]
                public = {k: rec.get(k) for k in ("feedback_id", "request_id", "thumbs", "rating")}
                personal = {k: rec.get(k) for k in ("user_id", "correction")}
                event_type, stream = "FeedbackGiven", f"interaction-{rec['request_id']}"
            subject = keys.pseudonymize(rec["user_id"])
            key_obj = keys.key_for(subject, create=True)
            event_id = derive_event_id(kind, key)
            pii = key_obj.encrypt(json.dumps(personal, sort_keys=True).encode(), event_id.encode())
            version = con.execute("SELECT coalesce(max(stream_version), 0) + 1 FROM events WHERE stream_id = ?",
                                  [stream]).fetchall()[0][0]
            con.executemany(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?, 1, ?, now(), ?, ?, ?)",
                [[position, event_id, stream, version, event_type, rec["timestamp"], subject,
                  json.dumps(public, sort_keys=True), pii]],
            )
            n += 1
    elapsed = time.perf_counter() - t0
    con.close()
    return n / elapsed


def bulk_fill(store: EventStore, target: int, subjects: list[str]) -> None:
    """Append synthetic events until the log holds `target` events (row-group-sized batches)."""
    rng = np.random.default_rng(1)
    batch_rows = 245_760
    now = datetime.now(UTC)
    keys = store.keys.keys_for(subjects)
    plaintext = json.dumps({"messages": [{"role": "user", "content": "x" * 200}], "response": "y" * 60,
                            "user_id": "bulk"}).encode()
    payload = ('{"completion_tokens":120,"labels":null,"latency_ms":123.4,"model_version":"tiny-llm@3",'
               '"prompt_tokens":30,"request_id":"x","session_id":null,"status":"ok"}')
    while (head := store.head()) < target:
        n = min(batch_rows, target - head)
        ids = [str(uuid.uuid4()) for _ in range(n)]
        row_subjects = np.array(subjects, dtype=object)[rng.integers(0, len(subjects), n)]
        nonce = NonceSequence()
        pii = [keys[s].encrypt(plaintext, eid.encode(), nonce()) for s, eid in zip(row_subjects, ids, strict=True)]
        batch = pa.table(
            {
                "event_id": ids,
                "stream_id": [f"interaction-bulk-{head + i}" for i in range(n)],
                "type": ["InteractionLogged"] * n,
                "schema_version": pa.array(np.ones(n, dtype=np.int32)),
                "occurred_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
                "subject_id": pa.array(row_subjects, pa.string()),
                "payload": [payload] * n,
                "pii": pa.array(pii, pa.binary()),
            },
            schema=BATCH_SCHEMA,
        )
        store.append_batch(batch, checkpoint_on_close=False)
        print(f"  filled to {store.head():,}", flush=True)
    store.checkpoint()


def time_reads(store: EventStore, subject: str, repeats: int = 7) -> tuple[float, float, int]:
    head = store.head()
    subj, rng_reads = [], []
    n_events = 0
    for _ in range(repeats):
        t = time.perf_counter()
        n_events = len(store.read_subject(subject))
        subj.append(time.perf_counter() - t)
        start = random.randint(0, max(0, head - 10_000))
        t = time.perf_counter()
        store.read_arrow(after=start, upto=start + 10_000)
        rng_reads.append(time.perf_counter() - t)
    return statistics.median(subj), statistics.median(rng_reads), n_events


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k events ingested, reads up to 1M")
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--large", type=int, default=None, help="size for the large read measurement")
    parser.add_argument("--naive-events", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3, help="ingest runs per pipeline (the median is reported)")
    parser.add_argument("--compare", action="store_true", help="also run workers=0 and the previous pipeline")
    parser.add_argument("--baseline", metavar="REV", help="also run warehouse/ingest.py as of git REV, interleaved "
                        "(A/B of a change on this shared machine)")
    parser.add_argument("--stages", action="store_true", help="CPU per event of each step, on one core")
    parser.add_argument("--no-reads", action="store_true", help="skip the naive path and the read measurements")
    args = parser.parse_args(argv)
    n = args.events or (100_000 if args.quick else 1_000_000)
    large = args.large or (1_000_000 if args.quick else 10_000_000)
    work = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    os.chdir(work)  # worker processes import `warehouse` from PYTHONPATH, not from a checkout in the cwd
    log = write_jsonl(work / "traffic.jsonl", n, seed=3, users=50_000)
    print(f"{n:,} records, {log.stat().st_size / 1e6:.0f} MB in {log}")

    pipelines: dict[str, object] = {"new": lambda store: Ingester(store)}
    if args.compare:
        pipelines["new_workers0"] = lambda store: Ingester(store, workers=0)
        previous = previous_ingester_class()
        if previous is None:
            print(f"previous pipeline ({PREVIOUS_INGEST}) not in this checkout's history: not compared")
        else:
            pipelines["previous"] = lambda store: previous(store)
    if args.baseline:
        baseline = previous_ingester_class(args.baseline)
        if baseline is None:
            parser.error(f"--baseline {args.baseline}: no warehouse/ingest.py at that revision")
        pipelines["baseline"] = lambda store: baseline(store)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in pipelines}
    for r in range(args.repeats):
        for name, make in pipelines.items():
            run = timed_ingest(make, log, work, name)
            runs[name].append(run)
            print(f"  run {r + 1} {name:<13} {run['events_per_s']:>10,.0f} events/s  {run['seconds']:6.1f} s  "
                  f"cpu {run['cpu_us_per_event']:5.1f} µs/event  load {run['load']:.1f}", flush=True)
            if not (r == args.repeats - 1 and name == "new"):
                shutil.rmtree(run["home"], ignore_errors=True)
    results: dict[str, float] = {}
    for name, rs in runs.items():
        prefix = "ingest" if name == "new" else f"ingest_{name.removeprefix('new_')}"
        results[f"{prefix}_events_per_s"] = statistics.median(x["events_per_s"] for x in rs)
        results[f"{prefix}_cpu_us_per_event"] = statistics.median(x["cpu_us_per_event"] for x in rs)
        results[f"{prefix}_runs"] = len(rs)
    results["ingest_load_avg"] = statistics.median(x["load"] for rs in runs.values() for x in rs)
    for name, rs in runs.items():
        if name != "new":
            results[f"ingest_speedup_vs_{name.removeprefix('new_')}"] = statistics.median(
                a["events_per_s"] / b["events_per_s"] for a, b in zip(runs["new"], rs, strict=True))
    best = runs["new"][-1]
    results["events"] = best["events"]
    results["ingest_seconds"] = statistics.median(x["seconds"] for x in runs["new"])
    results["ingest_mb_per_s"] = log.stat().st_size / 1e6 / results["ingest_seconds"]
    if args.stages:
        results.update(stage_costs(log, work, min(n, 400_000)))

    if not args.no_reads:
        store = EventStore(Path(best["home"]) / "warehouse.duckdb")
        naive_db = work / "naive.duckdb"
        naive_rate = naive_ingest(log, naive_db, KeyStore(work / "naive-keys.db"), args.naive_events)
        results["naive_events"] = args.naive_events
        results["naive_events_per_s"] = naive_rate
        results["ingest_speedup_vs_naive"] = results["ingest_events_per_s"] / naive_rate
        subject = store.read_arrow(limit=1, columns="subject_id").column(0)[0].as_py()
        subj_small, range_small, n_subject_small = time_reads(store, subject)
        with store.connect() as con:
            subjects = [r[0] for r in con.execute("SELECT DISTINCT subject_id FROM events WHERE subject_id IS NOT NULL").fetchall()]
        print(f"bulk-filling to {large:,} events for the large reads ...")
        bulk_fill(store, large, subjects)
        subj_large, range_large, n_subject_large = time_reads(store, subject)
        results.update({
            "subject_events_small": n_subject_small,
            "subject_events_large": n_subject_large,
            ("subject_query_s_100k" if args.quick else "subject_query_s_1m"): subj_small,
            ("subject_query_s_1m" if args.quick else "subject_query_s_10m"): subj_large,
            ("range_read_s_100k" if args.quick else "range_read_s_1m"): range_small,
            ("range_read_s_1m" if args.quick else "range_read_s_10m"): range_large,
            "large_events": large,
        })
    print()
    print(f"{'measure':<36}{'value':>16}")
    for k, v in results.items():
        print(f"{k:<36}{v:>16,.4f}" if isinstance(v, float) else f"{k:<36}{v:>16,}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_ingest.json").write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
