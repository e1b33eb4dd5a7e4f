"""Crypto-shredding, proven on the bytes: after `dsr shred` no key material is left anywhere."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from warehouse import projections
from warehouse.ingest import Ingester, read_quarantine

CANARY = "CANARY-q8Zt-4471-zebra"
EMAIL = "canary.person.4471@example.org"


def files_under(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file()]


def occurrences(needle: bytes, paths: list[Path]) -> list[str]:
    return [str(p) for p in paths if needle in p.read_bytes()]


def test_shred_leaves_no_key_bytes_and_the_canary_unreadable(tmp_path, home, store) -> None:
    lines = [
        {"type": "interaction", "request_id": "c1", "user_id": EMAIL, "model_version": "m", "timestamp": "2026-11-01T00:00:00Z",
         "messages": [{"role": "user", "content": f"my name is {CANARY}"}], "response": "ok", "latency_ms": 1,
         "prompt_tokens": 1, "completion_tokens": 1},
        {"type": "feedback", "feedback_id": "cf1", "request_id": "c1", "user_id": EMAIL, "timestamp": "2026-11-01T00:00:01Z",
         "thumbs": -1, "correction": f"{CANARY} wanted something else"},
        {"type": "interaction", "request_id": "n1", "user_id": "neighbour@example.org", "model_version": "m",
         "timestamp": "2026-11-01T00:00:02Z", "messages": [{"role": "user", "content": "neighbour text"}],
         "response": "ok", "latency_ms": 1, "prompt_tokens": 1, "completion_tokens": 1},
    ]
    raw_lines = [json.dumps(x).encode() for x in lines]
    raw_lines.append(json.dumps({**lines[0], "request_id": "c2", "latency_ms": "slow"}).encode())  # quarantined, names the user
    src = tmp_path / "logs.jsonl"
    src.write_bytes(b"\n".join(raw_lines) + b"\n")
    report = Ingester(store).ingest_file(src)
    assert (report.ingested, report.quarantined) == (3, 1)
    projections.catch_up(store)

    subject = store.keys.pseudonymize(EMAIL)
    with sqlite3.connect(home / "keys.db") as con:
        (material,) = con.execute("SELECT material FROM subject_keys WHERE subject_id=?", (subject,)).fetchone()
    assert len(material) == 32
    state = [p for p in files_under(home) if p.suffix in (".duckdb", ".db", ".wal") or p.name.endswith(".duckdb.wal")]
    # before: the key is in the keystore; the canary and the e-mail never reach the warehouse in clear
    assert occurrences(material, state) == [str(home / "keys.db")]
    assert occurrences(CANARY.encode(), state) == []
    assert occurrences(EMAIL.encode(), state) == []
    assert store.read_subject(subject)[0].data.messages[0]["content"].endswith(CANARY)

    store.shred_subject(subject, "dsr-canary")
    store.checkpoint()

    after = files_under(home)
    assert occurrences(material, after) == []  # keystore file, its journal, the DuckDB file and WAL
    assert not (home / "keys.db-journal").exists()
    events = store.read_subject(subject)
    personal = [e for e in events if e.type in ("InteractionLogged", "FeedbackGiven")]
    assert personal and all(e.redacted for e in personal)
    assert all(e.data.user_id is None for e in personal)
    assert CANARY not in repr(events)
    (q,) = [r for r in read_quarantine(store) if r["key_id"] == subject]
    assert q["raw"] is None  # the quarantined line that named the subject is unreadable too
    neighbour = store.read_subject(store.keys.pseudonymize("neighbour@example.org"))
    assert neighbour[0].data.messages == [{"role": "user", "content": "neighbour text"}]
    # projections rebuild from the log with the subject shredded
    before = projections.canonical_hash(store)
    projections.rebuild(store)
    assert projections.canonical_hash(store) == before
    # the shredded subject's key is never re-created by a late replay
    assert Ingester(store).ingest_file(src).duplicates == 3
    assert store.keys.keys_for([subject]) == {}
