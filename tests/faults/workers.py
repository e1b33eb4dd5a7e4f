"""Entry points the fault tests run as separate processes (python -m tests.faults.workers ...)."""

from __future__ import annotations

import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path


def append_many(db: str, worker: int, count: int, streams: int) -> None:
    """`count` single-event appends, each its own transaction, spread over a few shared streams."""
    from warehouse.events import ErasureRequested
    from warehouse.store import EventStore, NewEvent

    store = EventStore(Path(db))
    now = datetime.now(UTC)
    for i in range(count):
        event = NewEvent(ErasureRequested(request_id=f"w{worker}-{i}"), f"stream-{(worker + i) % streams}", now,
                         event_id=str(uuid.uuid5(uuid.NAMESPACE_OID, f"{worker}:{i}")))
        store.append([event])


def compete(db: str, worker: int, start_at: float) -> None:
    """Append to `promotion` expecting version 1; print WON or LOST."""
    from warehouse.events import ErasureRequested
    from warehouse.store import ConcurrencyError, EventStore, NewEvent

    store = EventStore(Path(db))
    while time.time() < start_at:
        time.sleep(0.001)
    try:
        store.append([NewEvent(ErasureRequested(request_id=f"w{worker}"), "promotion", datetime.now(UTC))], expected_version=1)
        print("WON", flush=True)
    except ConcurrencyError:
        print("LOST", flush=True)


def ingest_acking(db: str, path: str, chunk_lines: int) -> None:
    """Ingest a file; after each committed chunk print `ACK <last line number>`."""
    from warehouse.ingest import Ingester
    from warehouse.store import EventStore

    def ack(report, last_line: int) -> None:
        print(f"ACK {last_line}", flush=True)

    Ingester(EventStore(Path(db)), chunk_lines=chunk_lines, on_commit=ack).ingest_file(Path(path))
    print("DONE", flush=True)


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    if name == "append_many":
        append_many(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif name == "compete":
        compete(args[0], int(args[1]), float(args[2]))
    elif name == "ingest_acking":
        ingest_acking(args[0], args[1], int(args[2]))
    else:
        raise SystemExit(f"unknown worker {name}")
