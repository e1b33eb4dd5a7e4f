"""SIGKILL an ingest process at random points; the store must stay exact.

After every kill: the store reopens; every acknowledged line's event is present exactly once; a re-run
completes the file without duplicates; incremental projections equal a rebuild (canonical hash).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from flywheel.samples import BROKEN_LINES, generate_records
from tests.conftest import ROOT
from warehouse import projections
from warehouse.ingest import Ingester
from warehouse.store import EventStore

pytestmark = pytest.mark.faults


def make_log(path: Path, n: int) -> tuple[Path, dict[int, str], int]:
    """A log of n records with a broken line every 97; returns (path, line → event key, bad count)."""
    keys: dict[int, str] = {}
    bad = 0
    with open(path, "wb") as f:
        number = 0
        for i, rec in enumerate(generate_records(n, seed=11)):
            number += 1
            f.write(orjson.dumps(rec) + b"\n")
            keys[number] = rec.get("feedback_id") or rec["request_id"]
            if i % 97 == 50:
                number += 1
                bad += 1
                f.write(BROKEN_LINES[i % len(BROKEN_LINES)] + b"\n")
    return path, keys, bad


def run_and_kill(db: Path, log: Path, rng: random.Random, commits: int) -> list[int]:
    """Start an acking ingest and SIGKILL it at a random point; return the acknowledged line numbers.

    The point is chosen in units of progress, not seconds, so it lands mid-ingest however busy the
    machine is: after a random number of acknowledged commits (0 = while starting up), plus a
    random few milliseconds (often inside the next commit).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.workers", "ingest_acking", str(db), str(log), "150"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    target = rng.randint(0, commits - 1)
    jitter = rng.uniform(0.0, 0.06)
    acked: list[int] = []
    reached = threading.Event()

    def read() -> None:
        for out in proc.stdout:  # type: ignore[union-attr]
            if out.startswith("ACK "):
                acked.append(int(out.split()[1]))
                if len(acked) >= target:
                    reached.set()
        reached.set()

    reader = threading.Thread(target=read)
    reader.start()
    if target == 0:
        time.sleep(rng.uniform(0.05, 0.8))  # during start-up or the first chunk
    else:
        reached.wait(timeout=300)
    time.sleep(jitter)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join()
    return acked


def check_after_kill(db: Path, log: Path, keys: dict[int, str], total_events: int, acked: list[int]) -> None:
    store = EventStore(db)  # reopens after the kill (WAL replayed)
    rows = store.read_arrow(columns="event_id::VARCHAR AS event_id, type, payload->>'request_id' AS rid, payload->>'feedback_id' AS fid").to_pylist()
    seen = [r["fid"] or r["rid"] for r in rows]
    assert len(seen) == len(set(seen)), "an event was stored twice"
    last_acked = max(acked, default=0)
    acked_keys = {k for n, k in keys.items() if n <= last_acked}
    assert acked_keys <= set(seen), "an acknowledged event is missing"
    projections.catch_up(store)
    report = Ingester(store, chunk_lines=500).ingest_file(log)  # the re-run completes the file
    assert report.ingested + report.duplicates == total_events
    assert report.ingested == total_events - len(seen)
    assert store.head() == total_events
    projections.catch_up(store)
    incremental = projections.canonical_hash(store)
    projections.rebuild(store)
    assert projections.canonical_hash(store) == incremental


def kill_iterations(tmp_path: Path, iterations: int) -> None:
    log, keys, bad = make_log(tmp_path / "traffic.jsonl", 6000)
    total_events = len(keys)
    rng = random.Random(20261129)
    killed_mid_run = 0
    for i in range(iterations):
        db = tmp_path / f"w{i}.duckdb"
        EventStore(db)
        acked = run_and_kill(db, log, rng, commits=len(keys) // 150)
        if acked and max(acked) < max(keys):
            killed_mid_run += 1
        check_after_kill(db, log, keys, total_events, acked)
        for f in tmp_path.glob(f"w{i}.duckdb*"):
            f.unlink()
    assert killed_mid_run >= iterations // 2, f"only {killed_mid_run} of {iterations} kills landed mid-ingest"


def test_sigkill_ingest_fifty_times(tmp_path: Path) -> None:
    kill_iterations(tmp_path, 50)


@pytest.mark.slow
def test_sigkill_ingest_two_hundred_times(tmp_path: Path) -> None:
    kill_iterations(tmp_path, 200)
