"""The parallel ingest paths store exactly what the single-process path stores.

One messy log (bad lines at block boundaries, blank, CRLF and BOM lines, drift, a newer schema
version, an over-long line, an id repeated with the same and with different content, a last line
without terminator) is ingested by: one process in one big block; worker processes over small byte
ranges; one process committing every few events; a gzip copy. Events (positions, ids, streams and
versions, payloads, decrypted personal parts), quarantine rows, drift and reports must be identical.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from flywheel.samples import BROKEN_LINES, generate_records
from tests.conftest import ROOT
from warehouse.ingest import (
    ROW_GROUP_ROWS,
    FileReport,
    Ingester,
    _gzip_blocks,
    _shm_root,
    read_quarantine,
    split_lines,
)
from warehouse.keystore import KeyStore
from warehouse.store import EventStore


def messy_log(path: Path, n: int = 1500, *, conflicts: bool = True) -> Path:
    lines: list[bytes] = []
    records = list(generate_records(n, seed=5, users=40))
    for i, rec in enumerate(records):
        raw = orjson.dumps(rec)
        if i % 41 == 7:
            lines.append(BROKEN_LINES[i % len(BROKEN_LINES)])
        if i % 53 == 3:
            lines.append(b"")
        if i % 59 == 4:
            lines.append(b"  \t ")
        if i % 67 == 5:
            raw += b"\r"
        if i % 71 == 6:
            raw = b"\xef\xbb\xbf" + raw
        if i % 89 == 8:
            raw = orjson.dumps({**rec, "region": "eu", "tier": i % 3})
        if i % 97 == 9:
            raw = orjson.dumps({**rec, "schema_version": 2})
        lines.append(raw)
        if i % 113 == 10:
            lines.append(raw)  # the same record again: a duplicate
        if conflicts and i % 127 == 11 and rec["type"] == "interaction":
            lines.append(orjson.dumps({**rec, "response": "something else"}))  # same id, other content
    lines.insert(len(lines) // 2, orjson.dumps({**records[0], "request_id": "long", "response": "x" * 6000}))
    path.write_bytes(b"\n".join(lines))  # no terminator after the last line
    return path


def snapshot(store: EventStore, report) -> dict:
    events = store.read_arrow(
        columns="position, event_id::VARCHAR AS event_id, stream_id, stream_version, type, schema_version, "
        "occurred_at, subject_id, payload::VARCHAR AS payload"
    ).to_pylist()
    personal = [(e.event_id, e.data) for e in store.read()]
    quarantine = [{k: v for k, v in q.items() if k not in ("quarantined_at", "file", "key_id")} for q in read_quarantine(store, limit=10_000)]
    with store.connect() as con:
        drift = con.execute("SELECT field, first_line, records FROM schema_drift ORDER BY field").fetchall()
    counts = {k: getattr(report, k) for k in ("read", "ingested", "duplicates", "quarantined", "blank_lines", "bom_lines",
                                              "redacted", "bytes_read", "next_offset")}
    return {"events": events, "personal": personal, "quarantine": quarantine, "drift": drift, "counts": counts,
            "reasons": dict(report.reasons), "drift_fields": dict(report.drift_fields)}


def ingest(home: Path, name: str, keys: KeyStore, path: Path, **kw) -> dict:
    store = EventStore(home / f"{name}.duckdb", keystore=keys)
    report = Ingester(store, max_line_bytes=4096, **{"workers": 0, **kw}).ingest_file(path)
    return snapshot(store, report)


@pytest.fixture
def keys(home: Path) -> KeyStore:
    return KeyStore(home / "keys.db")


def test_workers_small_blocks_and_small_commits_store_the_same(tmp_path, home, keys) -> None:
    log = messy_log(tmp_path / "messy.jsonl")
    reference = ingest(home, "one", keys, log, block_bytes=64 << 20)
    assert reference["counts"]["quarantined"] > 40 and reference["counts"]["duplicates"] > 5
    assert reference["counts"]["blank_lines"] > 20 and reference["counts"]["bom_lines"] > 10
    assert any("longer than" in q["reason"] for q in reference["quarantine"])
    assert any("different content" in q["reason"] for q in reference["quarantine"])
    assert {"region", "tier", "schema_version=2"} <= set(reference["drift_fields"])
    assert reference["counts"]["next_offset"] == log.stat().st_size
    # events are stored in file order, whatever the blocks and transactions
    lines = [q["line"] for q in reference["quarantine"]]
    assert lines == sorted(lines)
    parallel = ingest(home, "workers", keys, log, workers=2, parallel_min_bytes=0, block_bytes=20_000)
    small_commits = ingest(home, "commits", keys, log, chunk_lines=37, block_bytes=9_000)
    for other in (parallel, small_commits):
        for key in reference:
            assert other[key] == reference[key], key


def test_gzip_stores_what_plain_stores(tmp_path, home, keys) -> None:
    log = messy_log(tmp_path / "messy.jsonl")
    gz = tmp_path / "messy.jsonl.gz"
    gz.write_bytes(gzip.compress(log.read_bytes()))
    plain = ingest(home, "plain", keys, log)
    zipped = ingest(home, "gz", keys, gz, block_bytes=5_000)
    for key in ("events", "personal", "quarantine", "drift", "counts", "reasons", "drift_fields"):
        assert zipped[key] == plain[key], key


@pytest.mark.parametrize("read_size", [997, 4096, 1 << 20])
@pytest.mark.parametrize("complete_lines_only", [False, True])
def test_gzip_blocks_cut_lines_like_the_plain_reader(tmp_path, read_size, complete_lines_only) -> None:
    """Lines (and the over-long one) straddling decompressed pieces come out as from one buffer."""
    data = messy_log(tmp_path / "messy.jsonl", n=300).read_bytes()
    gz = tmp_path / "messy.jsonl.gz"
    gz.write_bytes(gzip.compress(data))
    report = FileReport(str(gz))
    blocks = list(_gzip_blocks(gz, report, block_bytes=3_000, max_line_bytes=4096,
                               complete_lines_only=complete_lines_only, read_size=read_size))
    whole = split_lines(data, offset=0, first_number=0, max_line_bytes=4096, final=not complete_lines_only)

    def lines(bs: list) -> list:
        return [b.line(i) for b in bs for i in range(len(b))]

    assert lines(blocks) == lines([whole])  # with complete_lines_only, without the unterminated last line
    assert sum(b.line_count for b in blocks) == whole.line_count
    assert sum(b.bom_lines for b in blocks) == whole.bom_lines
    assert [n for b in blocks for n in b.blank_numbers] == whole.blank_numbers.tolist()
    assert report.next_offset == (data.rfind(b"\n") + 1 if complete_lines_only else len(data))
    assert any(b.truncated.any() for b in blocks)


def test_byte_ranges_with_workers(tmp_path, home, keys) -> None:
    log = messy_log(tmp_path / "messy.jsonl", n=600)
    size = log.stat().st_size
    whole = ingest(home, "whole", keys, log)
    store = EventStore(home / "ranges.duckdb", keystore=keys)
    ingester = Ingester(store, max_line_bytes=4096, workers=2, parallel_min_bytes=0, block_bytes=10_000)
    offset, reports = 0, []
    for end in (size // 3, size // 3 + 1, 2 * size // 3, size):  # cuts inside lines: complete lines only
        reports.append(ingester.ingest_file(log, start_offset=offset, end_offset=end, complete_lines_only=True))
        offset = reports[-1].next_offset
    reports.append(ingester.ingest_file(log, start_offset=offset))  # the unterminated last line
    again = ingester.ingest_files([log, log])  # one set of workers serves both files
    assert [f.duplicates for f in again.files] == [whole["counts"]["duplicates"] + whole["counts"]["ingested"]] * 2
    assert ingester._workers_pool is None
    assert reports[1].read == 0 and offset < size and reports[-1].read == 1
    assert sum(r.read for r in reports) == whole["counts"]["read"]
    assert snapshot(store, reports[-1])["events"] == whole["events"]
    assert snapshot(store, reports[-1])["quarantine"] == whole["quarantine"]


def test_commits_are_whole_row_groups_and_acknowledge_lines_in_order(tmp_path, home, keys) -> None:
    log = messy_log(tmp_path / "messy.jsonl", n=400, conflicts=False)
    store = EventStore(home / "acks.duckdb", keystore=keys)
    acks: list[tuple[int, int, int]] = []
    ingester = Ingester(store, max_line_bytes=4096, chunk_lines=25, block_bytes=7_000,
                        on_commit=lambda r, line: acks.append((line, r.ingested + r.duplicates, r.read)))
    report = ingester.ingest_file(log)
    assert ingester.commit_events == 25
    assert [a[0] for a in acks] == sorted({a[0] for a in acks})  # increasing, one per transaction
    sizes = [b[1] - a[1] for a, b in zip([(0, 0, 0), *acks], acks, strict=False)]
    assert all(s == 25 for s in sizes[:-1]) and 0 < sizes[-1] <= 25  # cut at exactly 25 events
    assert acks[-1][2] == report.read
    assert Ingester(store, chunk_lines=131_072).commit_events == ROW_GROUP_ROWS
    assert Ingester(store, chunk_lines=3 * ROW_GROUP_ROWS + 5).commit_events == 3 * ROW_GROUP_ROWS


PROBE = """
import sys
from pathlib import Path
from warehouse.store import EventStore
try:
    print(EventStore(Path(sys.argv[1]), lock_timeout=0.5).head())
except Exception as e:  # the lock's timeout, or the file held by the other process
    print(type(e).__name__)
"""


def read_from_another_process(db: Path) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, str(db)], cwd=ROOT, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_warehouse_is_held_across_commits_for_hold_seconds(tmp_path, home, keys) -> None:
    """Within `hold_seconds` the ingester keeps the warehouse between transactions (another process
    waits; the ingesting thread can still read it); with 0 it lets go after every commit."""
    log = messy_log(tmp_path / "messy.jsonl", n=300, conflicts=False)
    seen: dict[float, list[tuple[str, int, int]]] = {}
    for hold in (3600.0, 0.0):
        db = home / f"hold{hold:g}.duckdb"
        store = EventStore(db, keystore=keys)
        probes = seen[hold] = []

        def on_commit(report: FileReport, line: int, store=store, db=db, probes=probes) -> None:
            if len(probes) < 2:
                probes.append((read_from_another_process(db), store.head(), report.ingested))

        Ingester(store, chunk_lines=50, on_commit=on_commit, hold_seconds=hold).ingest_file(log)
        assert len(probes) == 2
        for other, head, ingested in probes:
            assert head == ingested  # this thread reads through the held connection
            assert other == ("Timeout" if hold else str(ingested)), (hold, other)
        wal = db.with_name(db.name + ".wal")
        assert not wal.exists() or wal.stat().st_size == 0  # the file is done: all in the database file
        assert read_from_another_process(db) == str(store.head())  # and the warehouse released


def test_a_worker_dying_mid_ingest_fails_it_and_releases_the_warehouse(tmp_path, home, keys) -> None:
    """The ingester holds the warehouse between transactions; an error in the pipeline (here a worker
    SIGKILLed) must end the ingest with a clear error and let the warehouse go, with every committed
    transaction intact, so a re-run completes the file exactly."""
    log = messy_log(tmp_path / "messy.jsonl")
    reference = ingest(home, "reference", keys, log)
    db = home / "victim.duckdb"
    store = EventStore(db, keystore=keys)
    killed: list[int] = []

    def kill_a_worker(report: FileReport, line: int) -> None:
        if not killed:  # this ingest's workers (other tests may have left children of this process)
            workers = [pid for pid in children_of(os.getpid()) if b"_worker_main" in cmdline(pid)]
            killed.append(workers[0])
            os.kill(killed[0], signal.SIGKILL)

    ingester = Ingester(store, max_line_bytes=4096, workers=2, parallel_min_bytes=0, block_bytes=20_000,
                        chunk_lines=50, hold_seconds=3600, on_commit=kill_a_worker)
    with pytest.raises(RuntimeError, match="ingest worker .* died") as failure:
        ingester.ingest_file(log)
    assert killed
    committed = read_from_another_process(db)  # not locked out, though the failed ingest is still referenced
    assert failure.value.__traceback__ is not None
    assert 0 < int(committed) < len(reference["events"])
    report = Ingester(store, max_line_bytes=4096, workers=0).ingest_file(log)
    assert report.duplicates >= int(committed)  # what was committed is not stored twice
    assert snapshot(store, report)["events"] == reference["events"]


KILLED_INGEST = """
import sys
from pathlib import Path
from warehouse.ingest import Ingester
from warehouse.store import EventStore
ack = lambda report, line: print(f"ACK {line}", flush=True)
Ingester(EventStore(Path(sys.argv[1])), chunk_lines=100, workers=2, parallel_min_bytes=0, block_bytes=40_000,
         on_commit=ack).ingest_file(Path(sys.argv[2]))
print("DONE", flush=True)
"""


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # exited meanwhile
        return b""


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.faults
def test_sigkill_during_parallel_ingest_leaves_workers_gone_and_the_store_exact(tmp_path) -> None:
    log = tmp_path / "traffic.jsonl"
    records = list(generate_records(3000, seed=11))
    log.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    keys_of_line = {i + 1: r.get("feedback_id") or r["request_id"] for i, r in enumerate(records)}
    for i, target in enumerate((1, 5, 12)):
        db = tmp_path / f"w{i}.duckdb"
        EventStore(db)
        proc = subprocess.Popen([sys.executable, "-c", KILLED_INGEST, str(db), str(log)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        acked: list[int] = []
        workers: list[int] = []
        for out in proc.stdout:  # type: ignore[union-attr]
            if out.startswith("ACK "):
                acked.append(int(out.split()[1]))
                workers = workers or children_of(proc.pid)
                if len(acked) >= target:
                    break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert workers, "the ingest ran without worker processes"
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2] for w in workers):
            assert time.monotonic() < deadline, "worker processes outlived the killed ingester"
            time.sleep(0.1)
        store = EventStore(db)
        seen = [r["k"] for r in store.read_arrow(columns="coalesce(payload->>'feedback_id', payload->>'request_id') AS k").to_pylist()]
        assert len(seen) == len(set(seen))
        assert {keys_of_line[n] for n in range(1, max(acked) + 1)} <= set(seen)
        report = Ingester(store, workers=2, parallel_min_bytes=0, block_bytes=40_000).ingest_file(log)
        assert report.ingested == len(records) - len(seen) and store.head() == len(records)
        assert not list(_shm_root().glob(f"flywheel-ingest-{proc.pid}-*")), "hand-over files left behind"
