"""Ingest throughput and event-log read latency.

    .venv/bin/python benchmarks/bench_ingest.py            # 1M events ingested, reads at 1M and 10M
    .venv/bin/python benchmarks/bench_ingest.py --quick    # 100k events, reads at 100k and 1M

1. End-to-end ingest (JSONL → parse, validate, pseudonymize, encrypt, append) of realistic interaction
   and feedback records (`flywheel.samples`, ~930 bytes a record), through `warehouse.ingest.Ingester`.
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
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flywheel.samples import write_jsonl  # noqa: E402
from warehouse.events import derive_event_id  # noqa: E402
from warehouse.ingest import Ingester  # noqa: E402
from warehouse.keystore import KeyStore, NonceSequence  # noqa: E402
from warehouse.store import BATCH_SCHEMA, SCHEMA_SQL, EventStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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
        with store.connect(checkpoint_on_close=False) as con:
            con.execute("BEGIN")
            store.append_batch(batch, con=con)
            con.execute("COMMIT")
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
    args = parser.parse_args(argv)
    n = args.events or (100_000 if args.quick else 1_000_000)
    large = args.large or (1_000_000 if args.quick else 10_000_000)
    work = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    log = write_jsonl(work / "traffic.jsonl", n, seed=3, users=50_000)
    print(f"{n:,} records, {log.stat().st_size / 1e6:.0f} MB in {log}")

    store = EventStore(work / "warehouse.duckdb")
    t0 = time.perf_counter()
    report = Ingester(store).ingest_file(log)
    ingest_s = time.perf_counter() - t0
    ingest_rate = report.ingested / ingest_s

    naive_db = work / "naive.duckdb"
    naive_rate = naive_ingest(log, naive_db, KeyStore(work / "naive-keys.db"), args.naive_events)

    subject = store.read_arrow(limit=1, columns="subject_id").column(0)[0].as_py()
    subj_small, range_small, n_subject_small = time_reads(store, subject)
    with store.connect() as con:
        subjects = [r[0] for r in con.execute("SELECT DISTINCT subject_id FROM events WHERE subject_id IS NOT NULL").fetchall()]
    print(f"bulk-filling to {large:,} events for the large reads ...")
    bulk_fill(store, large, subjects)
    subj_large, range_large, n_subject_large = time_reads(store, subject)

    results = {
        "events": report.ingested,
        "ingest_seconds": ingest_s,
        "ingest_events_per_s": ingest_rate,
        "ingest_mb_per_s": log.stat().st_size / 1e6 / ingest_s,
        "naive_events": args.naive_events,
        "naive_events_per_s": naive_rate,
        "ingest_speedup_vs_naive": ingest_rate / naive_rate,
        "subject_events_small": n_subject_small,
        "subject_events_large": n_subject_large,
        ("subject_query_s_100k" if args.quick else "subject_query_s_1m"): subj_small,
        ("subject_query_s_1m" if args.quick else "subject_query_s_10m"): subj_large,
        ("range_read_s_100k" if args.quick else "range_read_s_1m"): range_small,
        ("range_read_s_1m" if args.quick else "range_read_s_10m"): range_large,
        "large_events": large,
    }
    print()
    print(f"{'measure':<34}{'value':>16}")
    for k, v in results.items():
        print(f"{k:<34}{v:>16,.4f}" if isinstance(v, float) else f"{k:<34}{v:>16,}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_ingest.json").write_text(json.dumps(results, indent=2) + "\n")
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return results


if __name__ == "__main__":
    main()
