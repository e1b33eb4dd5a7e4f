"""SIGKILL `dagster-daemon` during production_log_sensor ticks and restart it: one run per run key, no
event ingested twice.

The test starts `dagster-daemon run` itself (its own session, its own DAGSTER_HOME and workspace) on a
small definitions module: the real `production_log_sensor` body and `ingest_landing_job`, wrapped by a
sensor that drops a marker file when a tick starts and then pauses, so a kill can be aimed inside the
evaluation (before the daemon stores the cursor or launches anything) and just after it (while runs are
being submitted). After the last restart the daemon must finish the work: every byte of every landing
file ingested by exactly one successful run, each run key used once, the event log holding each record
exactly once.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.faults

TICK_PAUSE_S = 2.0

DEFS = '''
"""production_log_sensor with a tick marker and a pause (tests/faults/test_daemon_crash.py)."""
import os
import time
from pathlib import Path

from dagster import DefaultSensorStatus, Definitions, SensorEvaluationContext, sensor

from assets.resources import WarehouseResource
from sensors.production_logs import ingest_landing_job, production_log_sensor

MARKERS = Path(os.environ["CRASH_TEST_MARKERS"])


@sensor(name="production_log_sensor", job=ingest_landing_job, minimum_interval_seconds=1,
        default_status=DefaultSensorStatus.RUNNING)
def marked_production_log_sensor(context: SensorEvaluationContext, warehouse: WarehouseResource):
    MARKERS.mkdir(parents=True, exist_ok=True)
    (MARKERS / f"tick-{time.time_ns()}").write_text(context.cursor or "")
    time.sleep(float(os.environ["CRASH_TEST_TICK_PAUSE_S"]))
    return production_log_sensor(context)


defs = Definitions(jobs=[ingest_landing_job], sensors=[marked_production_log_sensor],
                   resources={"warehouse": WarehouseResource()})
'''


def records(prefix: str, n: int) -> bytes:
    return b"".join(json.dumps({
        "type": "interaction", "request_id": f"{prefix}-{i}", "user_id": f"u{i % 5}@example.com", "model_version": "m@1",
        "timestamp": "2026-11-01T00:00:00Z", "messages": [{"role": "user", "content": f"question {prefix} {i}"}],
        "response": "answer", "latency_ms": 10, "prompt_tokens": 2, "completion_tokens": 1}).encode() + b"\n"
        for i in range(n))


class Daemon:
    """`dagster-daemon run` in its own session; killed by its PID, its children remembered for cleanup."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.children: set[int] = set()
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.tmp / f"daemon-{self.starts}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(self.tmp / "workspace.yaml")],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def remember_children(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.children |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}

    def kill(self) -> None:
        assert self.proc is not None
        self.remember_children()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.remember_children()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        for pid in self.children:  # code servers and run workers this test's daemons started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for_tick(markers: Path, seen: int, timeout: float = 180.0) -> float:
    """Block until a tick starts after `seen` markers; return when it started (monotonic, approx.)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if markers.exists() and len(list(markers.iterdir())) > seen:
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"no sensor tick within {timeout:.0f}s; see the daemon logs")


def test_daemon_killed_mid_tick_launches_each_range_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    from warehouse.store import EventStore

    home, dagster_home, markers = tmp_path / "home", tmp_path / "dagster", tmp_path / "markers"
    landing = home / "landing"
    landing.mkdir(parents=True)
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    (tmp_path / "crash_defs.py").write_text(DEFS)
    (tmp_path / "workspace.yaml").write_text(
        f"load_from:\n  - python_file:\n      relative_path: {tmp_path / 'crash_defs.py'}\n"
        f"      working_directory: {ROOT}\n      location_name: crash_test\n")
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "DAGSTER_HOME": str(dagster_home),
           "CRASH_TEST_MARKERS": str(markers), "CRASH_TEST_TICK_PAUSE_S": str(TICK_PAUSE_S),
           "DAGSTER_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(ROOT)}
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    rng = random.Random(6)
    daemon = Daemon(tmp_path, env)
    total = 0
    try:
        (landing / "a.jsonl").write_bytes(records("a", 300))
        total += 300
        # kill 1: inside the evaluation (the tick's pause), before the daemon has the result
        daemon.start()
        started = wait_for_tick(markers, 0)
        time.sleep(rng.uniform(0.2, TICK_PAUSE_S - 0.5) - (time.monotonic() - started))
        daemon.kill()
        # kill 2: new data, and a kill just after an evaluation returns (run submission, cursor update)
        with open(landing / "a.jsonl", "ab") as f:
            f.write(records("a2", 150))
        (landing / "b.jsonl").write_bytes(records("b", 200))
        total += 350
        seen = len(list(markers.iterdir()))
        daemon.start()
        started = wait_for_tick(markers, seen)
        time.sleep(max(0.0, TICK_PAUSE_S + rng.uniform(0.05, 0.6) - (time.monotonic() - started)))
        daemon.kill()
        # kill 3 at a random point of the next tick, then let a daemon finish everything
        (landing / "c.jsonl").write_bytes(records("c", 100))
        total += 100
        seen = len(list(markers.iterdir()))
        daemon.start()
        started = wait_for_tick(markers, seen)
        time.sleep(max(0.0, rng.uniform(0.1, TICK_PAUSE_S + 0.6) - (time.monotonic() - started)))
        daemon.kill()
        daemon.start()

        sizes = {str(p.resolve()): p.stat().st_size for p in landing.glob("*.jsonl")}
        instance = DagsterInstance.get()
        deadline = time.monotonic() + 240
        while True:
            runs = instance.get_runs(filters=RunsFilter(tags={"dagster/sensor_name": "production_log_sensor"}))
            covered = Counter()
            for r in runs:
                if r.status == DagsterRunStatus.SUCCESS:
                    cfg = r.run_config["ops"]["ingest_log_range"]["config"]
                    covered[cfg["path"]] += cfg["end"] - cfg["start"]
            busy = [r for r in runs if not r.is_finished]
            if dict(covered) == sizes and not busy:
                break
            assert time.monotonic() < deadline, f"not done: covered {dict(covered)} of {sizes}, {len(busy)} running"
            time.sleep(1)
        daemon.remember_children()
    finally:
        daemon.stop()

    assert daemon.starts == 4
    keys = Counter(r.tags["dagster/run_key"] for r in runs)
    assert keys and max(keys.values()) == 1, keys  # one run per run key, across kills and restarts
    assert all(r.status == DagsterRunStatus.SUCCESS for r in runs), [(r.run_id, r.status) for r in runs]
    ranges = sorted((r.run_config["ops"]["ingest_log_range"]["config"]["path"],
                     r.run_config["ops"]["ingest_log_range"]["config"]["start"],
                     r.run_config["ops"]["ingest_log_range"]["config"]["end"]) for r in runs)
    for (p1, _, e1), (p2, s2, _) in itertools.pairwise(ranges):
        assert p1 != p2 or e1 == s2, ranges  # ranges of one file tile it: none read twice, none skipped
    store = EventStore(home / "warehouse.duckdb")
    with store.connect() as con:
        n, distinct = con.execute("SELECT count(*), count(DISTINCT payload->>'request_id') FROM events "
                                  "WHERE type = 'InteractionLogged'").fetchone()
    assert n == distinct == total  # every record once: no range ingested twice
