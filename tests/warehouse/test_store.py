"""The event store's contract on a real DuckDB file: positions, versions, idempotency, concurrency."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from warehouse.events import (
    ErasureRequested,
    InteractionLogged,
    UnknownEvent,
    derive_event_id,
)
from warehouse.store import (
    BATCH_SCHEMA,
    ConcurrencyError,
    EventConflictError,
    EventStore,
    NewEvent,
)

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)


def interaction(request_id: str, user: str = "alice", text: str = "hello", latency: float = 10.0) -> InteractionLogged:
    return InteractionLogged(
        request_id=request_id, model_version="m@1", session_id="s", latency_ms=latency, prompt_tokens=1,
        completion_tokens=2, status="ok", labels=None, user_id=user,
        messages=[{"role": "user", "content": text}], response="hi",
    )


def new(store: EventStore, request_id: str, **kw) -> NewEvent:
    ev = interaction(request_id, **kw)
    return NewEvent(ev, f"interaction-{request_id}", NOW, store.keys.pseudonymize(ev.user_id),
                    derive_event_id("interaction", request_id))


def test_positions_and_stream_versions(store: EventStore) -> None:
    r1 = store.append([new(store, "a"), new(store, "b")])
    assert (r1.appended, r1.first_position, r1.last_position) == (2, 1, 2)
    sid = store.keys.pseudonymize("alice")
    follow = NewEvent(ErasureRequested(request_id="dsr-1"), "interaction-a", NOW, sid)
    r2 = store.append([follow, dataclasses.replace(follow, event_id=str(uuid.uuid4()))])
    assert r2.stream_versions == {"interaction-a": 3}
    events = store.read()
    assert [e.position for e in events] == [1, 2, 3, 4]
    assert [(e.stream_id, e.stream_version) for e in events] == [
        ("interaction-a", 1), ("interaction-b", 1), ("interaction-a", 2), ("interaction-a", 3)]
    assert store.head() == 4 and store.stream_version("interaction-a") == 3


def test_personal_fields_are_encrypted_at_rest_and_decrypted_on_read(store: EventStore) -> None:
    store.append([new(store, "a", text="CANARY-7f3a9 my secret")])
    raw = store.read_arrow()
    assert b"CANARY-7f3a9" not in raw.column("pii")[0].as_py()
    assert "CANARY" not in raw.column("payload")[0].as_py()
    (event,) = store.read()
    assert event.data.messages == [{"role": "user", "content": "CANARY-7f3a9 my secret"}]
    assert event.data.user_id == "alice" and not event.redacted


def test_expected_version_is_optimistic_concurrency(store: EventStore) -> None:
    store.append([new(store, "a")], expected_version=0)
    with pytest.raises(ConcurrencyError) as err:
        store.append([dataclasses.replace(new(store, "a"), event_id=str(uuid.uuid4()))], expected_version=0)
    assert (err.value.expected, err.value.actual) == (0, 1)
    ok = store.append([dataclasses.replace(new(store, "a"), event_id=str(uuid.uuid4()))], expected_version=1)
    assert ok.stream_versions == {"interaction-a": 2}
    assert store.head() == 2


def test_same_batch_three_times_is_stored_once_even_after_reopening(home, store: EventStore) -> None:
    batch = [new(store, f"r{i}") for i in range(5)]
    assert store.append(batch).appended == 5
    assert store.append(batch).duplicates == 5
    reopened = EventStore(home / "warehouse.duckdb")
    result = reopened.append(batch)
    assert (result.appended, result.duplicates) == (0, 5)
    assert reopened.head() == 5
    assert len({e.event_id for e in reopened.read()}) == 5


def test_same_id_different_content_is_a_conflict_and_the_batch_is_all_or_nothing(store: EventStore) -> None:
    store.append([new(store, "a")])
    changed_public = new(store, "a", latency=99.0)
    changed_personal = new(store, "a", text="something else")
    for bad in (changed_public, changed_personal):
        with pytest.raises(EventConflictError) as err:
            store.append([new(store, "fresh"), bad])
        assert err.value.event_ids == [bad.event_id]
        assert store.head() == 1  # the fresh event did not go in either


def test_repeated_id_inside_one_batch(store: EventStore) -> None:
    a = new(store, "a")
    assert store.append([a, a]).appended == 1
    with pytest.raises(EventConflictError):
        store.append([new(store, "b"), new(store, "b", latency=1.0)])


def test_conflicts_can_be_returned_instead_of_raised(store: EventStore) -> None:
    store.append([new(store, "a")])
    batch = store.encode([new(store, "b"), new(store, "a", latency=5.0), new(store, "a")])
    result = store.append_batch(batch, on_conflict="return")
    assert (result.appended, result.duplicates, result.conflicts) == (1, 1, (1,))


def test_reads_by_subject_type_stream_and_position_range(store: EventStore) -> None:
    store.append([new(store, "a", user="alice"), new(store, "b", user="bob"), new(store, "c", user="alice")])
    alice = store.keys.pseudonymize("alice")
    assert [e.data.request_id for e in store.read_subject(alice)] == ["a", "c"]
    assert [e.position for e in store.read(after=1, upto=2)] == [2]
    assert [e.stream_id for e in store.read_stream("interaction-b")] == ["interaction-b"]
    assert len(store.read(types=["InteractionLogged"])) == 3
    assert store.read(types=["FeedbackGiven"]) == []


def test_unknown_types_and_fields_are_kept_not_dropped(store: EventStore) -> None:
    batch = pa.table(
        {
            "event_id": [str(uuid.uuid4()), derive_event_id("interaction", "z")],
            "stream_id": ["future-1", "interaction-z"],
            "type": ["ModelDistilled", "InteractionLogged"],
            "schema_version": pa.array([1, 2], pa.int32()),
            "occurred_at": pa.array([NOW, NOW], pa.timestamp("us", tz="UTC")),
            "subject_id": [None, None],
            "payload": ['{"student": "tiny@2"}',
                        '{"request_id": "z", "model_version": "m", "session_id": null, "latency_ms": 1.0, '
                        '"prompt_tokens": 1, "completion_tokens": 1, "status": "ok", "labels": null, "region": "eu"}'],
            "pii": pa.array([None, None], pa.binary()),
        },
        schema=BATCH_SCHEMA,
    )
    store.append_batch(batch)
    unknown, newer = store.read()
    assert isinstance(unknown.data, UnknownEvent) and unknown.data.payload == {"student": "tiny@2"}
    assert newer.schema_version == 2 and newer.data.extra == {"region": "eu"}
    assert newer.data.request_id == "z" and newer.data.user_id is None


def test_shredding_redacts_personal_fields_and_projections_still_rebuild(store: EventStore) -> None:
    from warehouse import projections

    store.append([new(store, "a", user="alice"), new(store, "b", user="bob")])
    projections.catch_up(store)
    alice = store.keys.pseudonymize("alice")
    assert store.shred_subject(alice, "dsr-9") is True
    a, b = store.read(types=["InteractionLogged"])
    assert a.redacted and a.data.messages is None and a.data.user_id is None and a.data.request_id == "a"
    assert not b.redacted and b.data.user_id == "bob"
    incremental = projections.canonical_hash(store)
    projections.rebuild(store)
    assert projections.canonical_hash(store) == incremental
    with store.connect() as con:
        assert con.execute("SELECT shredded_position IS NOT NULL FROM proj_subjects WHERE subject_id=?", [alice]).fetchall() == [(True,)]
    # a replay of the shredded subject's event is a duplicate, and brings no personal data back
    assert store.append([new(store, "a", user="alice")]).duplicates == 1
    assert store.read(stream_id="interaction-a")[0].redacted
