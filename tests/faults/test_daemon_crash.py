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
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.faults

TICK_PAUSE_S = 2.0
START_TIMEOUT_S = 30  # a run still STARTING after this is failed by run monitoring (and retried)

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


def setup_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **queue: int) -> tuple[Path, Path, Daemon]:
    """A FLYWHEEL_HOME with a landing directory, a DAGSTER_HOME and a workspace for `DEFS`.

    The instance is the project's dagster.yaml with run monitoring sped up for a test (a run left
    STARTING is failed after START_TIMEOUT_S rather than 180 s); `queue` overrides `run_queue` keys.
    """
    home, dagster_home, markers = tmp_path / "home", tmp_path / "dagster", tmp_path / "markers"
    (home / "landing").mkdir(parents=True)
    dagster_home.mkdir()
    write_instance_config(dagster_home, **queue)
    (tmp_path / "crash_defs.py").write_text(DEFS)
    (tmp_path / "workspace.yaml").write_text(
        f"load_from:\n  - python_file:\n      relative_path: {tmp_path / 'crash_defs.py'}\n"
        f"      working_directory: {ROOT}\n      location_name: crash_test\n")
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "DAGSTER_HOME": str(dagster_home),
           "CRASH_TEST_MARKERS": str(markers), "CRASH_TEST_TICK_PAUSE_S": str(TICK_PAUSE_S),
           "DAGSTER_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(ROOT)}
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    return home, markers, Daemon(tmp_path, env)


def write_instance_config(dagster_home: Path, **queue: int) -> None:
    config = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    assert config["run_monitoring"]["enabled"] and config["run_retries"]["enabled"]  # what the tests rely on
    config["run_monitoring"].update(start_timeout_seconds=START_TIMEOUT_S, poll_interval_seconds=2)
    config["run_queue"].update(queue)
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config))


def sensor_runs(instance):
    from dagster import RunsFilter

    return instance.get_runs(filters=RunsFilter(tags={"dagster/sensor_name": "production_log_sensor"}))


def config_of(run) -> dict:
    return run.run_config["ops"]["ingest_log_range"]["config"]


def wait_until_ingested(instance, landing: Path, timeout: float = 420.0) -> list:
    """Wait until successful runs cover every byte of every landing file and no run is in flight."""
    from dagster import DagsterRunStatus

    sizes = {str(p.resolve()): p.stat().st_size for p in landing.glob("*.jsonl")}
    deadline = time.monotonic() + timeout
    while True:
        runs = sensor_runs(instance)
        covered = Counter()
        for r in runs:
            if r.status == DagsterRunStatus.SUCCESS:
                covered[config_of(r)["path"]] += config_of(r)["end"] - config_of(r)["start"]
        busy = [(r.run_id, r.status.value) for r in runs if not r.is_finished]
        if dict(covered) == sizes and not busy:
            return runs
        assert time.monotonic() < deadline, f"not done: covered {dict(covered)} of {sizes}, in flight {busy}"
        time.sleep(1)


def assert_each_range_ingested_once(runs: list, home: Path, total: int) -> None:
    """One run (plus its crash retries) per run key, one success per key, ranges tiling each file."""
    from dagster import DagsterRunStatus

    from warehouse.store import EventStore

    first = [r for r in runs if "dagster/parent_run_id" not in r.tags]
    keys = Counter(r.tags["dagster/run_key"] for r in first)
    assert keys and max(keys.values()) == 1, keys  # the sensor asked once per key, across kills and restarts
    succeeded = [r for r in runs if r.status == DagsterRunStatus.SUCCESS]
    assert Counter(r.tags["dagster/run_key"] for r in succeeded) == Counter(keys), \
        [(r.run_id, r.status, r.tags.get("dagster/parent_run_id")) for r in runs]
    for r in runs:  # a run that did not succeed crashed and was retried under its own key
        if r.status != DagsterRunStatus.SUCCESS:
            assert r.status == DagsterRunStatus.FAILURE, (r.run_id, r.status)
            assert any(c.tags.get("dagster/parent_run_id") == r.run_id for c in runs), r.run_id
    ranges = sorted((config_of(r)["path"], config_of(r)["start"], config_of(r)["end"]) for r in succeeded)
    for (p1, _, e1), (p2, s2, _) in itertools.pairwise(ranges):
        assert p1 != p2 or e1 == s2, ranges  # ranges of one file tile it: none read twice, none skipped
    store = EventStore(home / "warehouse.duckdb")
    with store.connect() as con:
        n, distinct = con.execute("SELECT count(*), count(DISTINCT payload->>'request_id') FROM events "
                                  "WHERE type = 'InteractionLogged'").fetchone()
    assert n == distinct == total  # every record once: no range ingested twice


def test_daemon_killed_mid_tick_launches_each_range_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster import DagsterInstance

    home, markers, daemon = setup_daemon(tmp_path, monkeypatch)
    landing = home / "landing"
    rng = random.Random(6)
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

        runs = wait_until_ingested(DagsterInstance.get(), landing)
        daemon.remember_children()
    finally:
        daemon.stop()

    assert daemon.starts == 4
    assert_each_range_ingested_once(runs, home, total)


def test_run_left_starting_by_a_killed_daemon_is_failed_and_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state a daemon leaves when killed between marking a run STARTING and launching it.

    The queue is closed (no slots) while the sensor submits a run, the daemon is stopped, and the run
    is marked STARTING exactly as `DagsterInstance.launch_run` does before it calls the launcher. With
    the queue open again, run monitoring must fail the run after its start timeout and run retries
    must launch it again, so the range the sensor's cursor already moved past is still ingested once.
    """
    from dagster import DagsterEvent, DagsterEventType, DagsterInstance, DagsterRunStatus

    home, _, daemon = setup_daemon(tmp_path, monkeypatch, max_concurrent_runs=0)
    (home / "landing" / "a.jsonl").write_bytes(records("a", 120))
    instance = DagsterInstance.get()
    try:
        daemon.start()
        deadline = time.monotonic() + 180
        while [r.status for r in sensor_runs(instance)] != [DagsterRunStatus.QUEUED]:
            assert time.monotonic() < deadline, "the sensor queued no run; see the daemon logs"
            time.sleep(0.5)
        daemon.stop()
        [run] = sensor_runs(instance)
        instance.report_dagster_event(
            DagsterEvent(event_type_value=DagsterEventType.PIPELINE_STARTING.value, job_name=run.job_name),
            run_id=run.run_id)
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTING

        write_instance_config(tmp_path / "dagster", max_concurrent_runs=2)
        daemon.start()
        runs = wait_until_ingested(instance, home / "landing")
        daemon.remember_children()
    finally:
        daemon.stop()

    stuck = instance.get_run_record_by_id(run.run_id).dagster_run
    assert stuck.status == DagsterRunStatus.FAILURE
    assert stuck.tags.get("dagster/failure_reason") == "START_TIMEOUT", stuck.tags
    [retry] = [r for r in runs if r.tags.get("dagster/parent_run_id") == run.run_id]
    assert retry.status == DagsterRunStatus.SUCCESS and retry.tags["dagster/run_key"] == run.tags["dagster/run_key"]
    assert_each_range_ingested_once(runs, home, 120)
