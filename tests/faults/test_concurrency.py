"""Concurrent writers in real processes against one DuckDB file."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import ROOT
from warehouse.store import EventStore

pytestmark = pytest.mark.faults


def run_workers(args_list: list[list[str]]) -> list[subprocess.CompletedProcess]:
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.faults.workers", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for args in args_list
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1800)
        assert p.returncode == 0, stderr
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.timeout(1800)
def test_eight_processes_times_a_thousand_appends(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    EventStore(db)  # create the schema once
    workers, per_worker, streams = 8, 1000, 5
    run_workers([["append_many", str(db), str(w), str(per_worker), str(streams)] for w in range(workers)])
    rows = EventStore(db).read_arrow(columns="position, event_id::VARCHAR AS event_id, stream_id, stream_version").to_pylist()
    assert len(rows) == workers * per_worker
    assert len({r["event_id"] for r in rows}) == workers * per_worker
    positions = [r["position"] for r in rows]
    assert positions == list(range(1, workers * per_worker + 1))  # strictly increasing, gap-free
    versions: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        versions[r["stream_id"]].append(r["stream_version"])
    for stream, vs in versions.items():
        assert vs == list(range(1, len(vs) + 1)), stream  # contiguous, in position order


def test_two_writers_with_the_same_expected_version_exactly_one_wins(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from warehouse.events import ErasureRequested
    from warehouse.store import NewEvent

    for attempt in range(3):
        db = tmp_path / f"w{attempt}.duckdb"
        EventStore(db).append([NewEvent(ErasureRequested(request_id="seed"), "promotion", datetime.now(UTC))])
        start_at = time.time() + 2.0  # both processes are up and waiting by then
        results = run_workers([["compete", str(db), str(w), str(start_at)] for w in range(2)])
        assert sorted(r.stdout.strip() for r in results) == ["LOST", "WON"]
        assert EventStore(db).stream_version("promotion") == 2
