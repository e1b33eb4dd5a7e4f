"""Production-log ingestion on real files: every fixture of bad input, idempotency, drift, OASST."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.conftest import shared
from warehouse import projections
from warehouse.events import derive_event_id
from warehouse.ingest import Ingester, read_quarantine
from warehouse.oasst import convert_tree_export


def record(i: int, **overrides) -> dict:
    rec = {
        "type": "interaction", "request_id": f"r{i}", "user_id": f"user{i % 3}@example.com", "session_id": "s1",
        "model_version": "tiny@1", "timestamp": "2026-11-01T12:00:00Z",
        "messages": [{"role": "user", "content": f"question {i}"}], "response": f"answer {i}",
        "latency_ms": 12.5, "prompt_tokens": 3, "completion_tokens": 2,
    }
    rec.update(overrides)
    return rec


def line(rec: dict) -> bytes:
    return json.dumps(rec).encode()


def write(path: Path, lines: list[bytes], *, gz: bool = False) -> Path:
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def quarantine_reasons(store) -> dict[int, str]:
    return {q["line"]: q["reason"] for q in read_quarantine(store, limit=1000)}


def test_every_bad_input_fixture_is_quarantined_with_its_reason(tmp_path, store) -> None:
    missing = record(6)
    del missing["user_id"]
    lines = [
        line(record(1)),                                                   # 1 ok
        b'{"type": "interaction", "request_id": "r2", "user_id": "u',      # 2 truncated JSON
        line(record(3)).replace(b"question", b"\xff\xfeq"),                # 3 invalid UTF-8
        b"\xef\xbb\xbf" + line(record(4)),                                 # 4 BOM: tolerated
        line(record(5)).replace(b"question", b"qu\x00estion"),             # 5 NUL byte
        line(missing),                                                     # 6 missing required field
        line(record(7, latency_ms="fast")),                                # 7 wrong type
        line(record(8, type="telemetry")),                                 # 8 unknown record type
        line(record(9))[:-1] + b', "request_id": "again"}',               # 9 duplicate key
        line(record(10, region="eu-west")),                                # 10 new field: schema drift
        b"",                                                               # 11 blank: skipped
        line(record(12)) + b"\r",                                          # 12 CRLF: tolerated
        b"[1, 2, 3]",                                                      # 13 not an object
        line(record(14, messages=[{"role": "wizard", "content": "x"}])),  # 14 bad role
    ]
    store_path = write(tmp_path / "fixtures.jsonl", lines)
    report = Ingester(store).ingest_file(store_path)
    assert (report.read, report.ingested, report.duplicates, report.quarantined) == (13, 4, 0, 9)
    assert (report.blank_lines, report.bom_lines) == (1, 1)
    reasons = quarantine_reasons(store)
    assert set(reasons) == {2, 3, 5, 6, 7, 8, 9, 13, 14}
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3] == f"invalid UTF-8 at byte {lines[2].index(bytes([0xFF]))}"
    assert reasons[5].startswith("NUL byte")
    assert reasons[6] == "missing required field 'user_id' for type 'interaction'"
    assert reasons[7] == "field 'latency_ms': expected number, got str \"fast\""
    assert reasons[8].startswith("unknown record type 'telemetry'")
    assert reasons[9] == "duplicate key 'request_id'"
    assert reasons[13] == "expected a JSON object, got list"
    assert "role" in reasons[14]
    assert report.drift_fields == {"region": 1}
    drifted = store.read(stream_id="interaction-r10")[0]
    assert drifted.data.extra == {"region": "eu-west"}  # kept (encrypted with the personal part)
    with store.connect() as con:
        assert con.execute("SELECT field, first_line, records FROM schema_drift").fetchall() == [("region", 10, 1)]
    # the raw bytes are kept, encrypted, with file, line and byte offset
    q = {r["line"]: r for r in read_quarantine(store)}
    assert q[7]["raw"] == lines[6] and q[7]["byte_offset"] == sum(len(x) + 1 for x in lines[:6])
    with store.connect() as con:
        blobs = [r[0] for r in con.execute("SELECT raw FROM quarantine").fetchall()]
    assert all(b"fast" not in b for b in blobs)


def test_reingesting_adds_nothing_twice(tmp_path, store) -> None:
    path = write(tmp_path / "a.jsonl", [line(record(i)) for i in range(20)] + [b"{broken"])
    first = Ingester(store).ingest_file(path)
    second = Ingester(store).ingest_file(path)
    assert (first.ingested, first.quarantined) == (20, 1)
    assert (second.ingested, second.duplicates, second.quarantined) == (0, 20, 1)
    assert store.head() == 20
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM quarantine").fetchall() == [(1,)]


def test_partial_file_then_whole_file(tmp_path, store) -> None:
    lines = [line(record(i)) for i in range(30)]
    path = write(tmp_path / "growing.jsonl", lines[:10])
    path.write_bytes(path.read_bytes() + lines[10][:25])  # a line still being written
    ing = Ingester(store, chunk_lines=4)
    part = ing.ingest_file(path, complete_lines_only=True)
    assert (part.read, part.ingested) == (10, 10) and part.next_offset == sum(len(x) + 1 for x in lines[:10])
    write(path, lines)
    rest = ing.ingest_file(path, start_offset=part.next_offset)
    assert (rest.read, rest.ingested, rest.duplicates) == (20, 20, 0)
    assert Ingester(store).ingest_file(path).duplicates == 30
    assert {e.data.request_id for e in store.read(types=["InteractionLogged"])} == {f"r{i}" for i in range(30)}
    assert rest.next_offset == path.stat().st_size


def test_truncated_gzip_keeps_what_arrived(tmp_path, store) -> None:
    data = gzip.compress(b"\n".join(line(record(i)) for i in range(400)) + b"\n")
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    report = Ingester(store).ingest_file(path)
    assert report.truncated_gzip
    assert report.read == report.ingested + report.quarantined and report.ingested > 50
    assert any("truncated gzip" in r for r in report.reasons)


def test_twenty_megabyte_line(tmp_path, store) -> None:
    big = record(1, response="x" * (20 << 20))
    path = write(tmp_path / "big.jsonl", [line(record(0)), line(big), line(record(2))])
    report = Ingester(store).ingest_file(path)
    assert (report.ingested, report.quarantined) == (3, 0)
    assert len(store.read(stream_id="interaction-r1")[0].data.response) == 20 << 20
    limited = Ingester(store, max_line_bytes=1 << 20).ingest_file(write(tmp_path / "big2.jsonl", [line(record(3, response="y" * (20 << 20)))]))
    assert limited.quarantined == 1
    (q,) = [r for r in read_quarantine(store) if r["file"].endswith("big2.jsonl")]
    assert q["raw_truncated"] and len(q["raw"]) == 1 << 20 and "longer than" in q["reason"]


def test_conflicting_record_with_a_reused_id_is_quarantined(tmp_path, store) -> None:
    Ingester(store).ingest_file(write(tmp_path / "a.jsonl", [line(record(1))]))
    report = Ingester(store).ingest_file(write(tmp_path / "b.jsonl", [line(record(1, response="different")), line(record(2))]))
    assert (report.ingested, report.quarantined) == (1, 1)
    (q,) = read_quarantine(store, file=str(tmp_path / "b.jsonl"))
    assert "already recorded with different content" in q["reason"]


def test_vectorized_and_per_line_paths_build_identical_events(tmp_path, home) -> None:
    from warehouse.store import EventStore

    clean = [line(record(i)) for i in range(40)]
    a = EventStore(home / "a.duckdb")
    b = EventStore(home / "b.duckdb", keystore=a.keys)
    Ingester(a).ingest_file(write(tmp_path / "clean.jsonl", clean))
    # every other line broken: the chunk is bisected down to single lines
    noisy = [x for pair in zip(clean, [b"{bad"] * 40, strict=True) for x in pair]
    Ingester(b, chunk_lines=7).ingest_file(write(tmp_path / "noisy.jsonl", noisy))
    cols = "event_id, stream_id, stream_version, type, subject_id, payload::VARCHAR"
    rows = lambda s: sorted(s.read_arrow(columns=cols).to_pylist(), key=lambda r: str(r["event_id"]))  # noqa: E731
    assert rows(a) == rows(b)
    assert [e.data for e in a.read()] == sorted((e.data for e in b.read()), key=lambda d: int(d.request_id[1:]))


def test_event_ids_match_the_python_derivation(tmp_path, store) -> None:
    Ingester(store).ingest_file(write(tmp_path / "a.jsonl", [line(record(7))]))
    (event,) = store.read()
    assert event.event_id == derive_event_id("interaction", "r7")


def test_feedback_and_erasure_requests_become_events_and_projections(tmp_path, store) -> None:
    lines = [
        line(record(1)),
        line({"type": "feedback", "feedback_id": "f1", "request_id": "r1", "user_id": "user1@example.com",
              "timestamp": "2026-11-01T12:01:00+01:00", "thumbs": -1, "correction": "a better answer"}),
        line({"type": "feedback", "feedback_id": "f2", "request_id": "r1", "user_id": "user1@example.com",
              "timestamp": "2026-11-01T12:02:00Z", "rating": 9}),
        line({"type": "erasure_request", "request_id": "dsr-1", "user_id": "user1@example.com",
              "timestamp": "2026-11-02T00:00:00Z"}),
    ]
    report = Ingester(store).ingest_file(write(tmp_path / "fb.jsonl", lines))
    assert (report.ingested, report.quarantined) == (3, 1)
    assert quarantine_reasons(store)[3] == "field 'rating' must be between 1 and 5"
    projections.catch_up(store)
    fb = store.read(types=["FeedbackGiven"])[0]
    assert fb.data.correction == "a better answer" and fb.data.has_correction and fb.stream_version == 2
    with store.connect() as con:
        assert con.execute("SELECT thumbs_down, corrections FROM interaction_feedback").fetchall() == [(1, 1)]
        assert con.execute("SELECT kind, completed_position FROM proj_dsr_requests").fetchall() == [("erasure", None)]
        subj = store.keys.pseudonymize("user1@example.com")
        assert con.execute("SELECT erasure_requested_position FROM proj_subjects WHERE subject_id=?", [subj]).fetchall() == [(3,)]


def test_oasst_tree_export_becomes_traffic_with_feedback(tmp_path, store) -> None:
    src = shared("logs/oasst_en_100_tree.jsonl")
    trees = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    replies = votes_up = votes_down = 0

    def walk(node, depth):
        nonlocal replies, votes_up, votes_down
        if node["role"] == "assistant" and depth:
            replies += 1
            votes_up += (node.get("emojis") or {}).get("+1", 0)
            votes_down += (node.get("emojis") or {}).get("-1", 0)
        for r in node.get("replies") or []:
            walk(r, depth + 1)

    for t in trees:
        walk(t["prompt"], 0)
    out = tmp_path / "oasst.records.jsonl"
    n = convert_tree_export(src, out)
    report = Ingester(store).ingest_file(out)
    assert n == replies + votes_up + votes_down == report.ingested
    projections.catch_up(store)
    with store.connect() as con:
        assert con.execute("SELECT count(*), sum(thumbs_up), sum(thumbs_down) FROM interaction_feedback").fetchall() == [
            (replies, votes_up, votes_down)]
    # re-import: the same ids, nothing twice
    convert_tree_export(src, out)
    assert Ingester(store).ingest_file(out).duplicates == n


@pytest.mark.parametrize("gz", [False, True])
def test_gzip_and_plain_give_the_same_events(tmp_path, home, gz) -> None:
    from warehouse.store import EventStore

    store = EventStore(home / f"w{gz}.duckdb")
    lines = [line(record(i)) for i in range(50)]
    report = Ingester(store, chunk_lines=16).ingest_file(write(tmp_path / ("x.jsonl.gz" if gz else "x.jsonl"), lines, gz=gz))
    assert (report.read, report.ingested) == (50, 50)
    assert store.head() == 50


def test_byte_ranges_cover_a_file_exactly_once(tmp_path, store) -> None:
    lines = [line(record(i)) for i in range(12)]
    path = write(tmp_path / "ranges.jsonl", lines)
    cuts = [0, sum(len(x) + 1 for x in lines[:5]), sum(len(x) + 1 for x in lines[:9]), path.stat().st_size]
    reports = [Ingester(store).ingest_file(path, start_offset=a, end_offset=b, complete_lines_only=True)
               for a, b in zip(cuts, cuts[1:], strict=False)]
    assert [r.ingested for r in reports] == [5, 4, 3]
    assert [r.next_offset for r in reports] == cuts[1:]
    assert store.head() == 12
    bad = read_quarantine(store)
    assert bad == []


def test_a_subject_shredded_between_files_is_redacted_by_the_same_ingester(tmp_path, store) -> None:
    """The ingester caches each user's subject id and key; a shred in between must reach the cache."""
    ingester = Ingester(store, workers=0)
    first = ingester.ingest_file(write(tmp_path / "a.jsonl", [line(record(i)) for i in range(6)]))
    assert first.ingested == 6 and first.redacted == 0
    shredded = store.keys.pseudonymize("user0@example.com")
    assert store.shred_subject(shredded)
    second = ingester.ingest_file(write(tmp_path / "b.jsonl", [line(record(i)) for i in range(6, 15)]))
    assert second.ingested == 9
    assert second.redacted == 3  # r6, r9, r12: user0's records come without their personal part
    for i in range(6, 15):
        (event,) = store.read(stream_id=f"interaction-r{i}")
        if i % 3 == 0:
            assert event.subject_id == shredded and event.data.messages is None and event.data.user_id is None
        else:
            assert not event.redacted and event.data.messages == [{"role": "user", "content": f"question {i}"}]
    again = ingester.ingest_file(write(tmp_path / "c.jsonl", [line(record(15, user_id="new@example.com"))]))
    assert again.ingested == 1 and again.redacted == 0  # a user met after the shred still gets a key
