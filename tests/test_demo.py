"""`make demo` end to end on a fresh home, then once more on the same home (rerun safety).

Slow (a few minutes on 2 cores: it trains the whole chain and retrains after the loop), so it runs with
`make test-slow`. What it checks is behaviour, not time: every step happened, the loop turned failing
traffic into validated synthetic data and a retrain, the gate decided, and a rerun ingests nothing twice.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

pytestmark = pytest.mark.slow


def test_demo_turns_the_flywheel_and_reruns_safely(home: Path) -> None:
    from models.promotion import stream_id
    from sensors.demo import run_demo
    from warehouse.store import EventStore

    out = io.StringIO()
    first = run_demo(records=200, replay_requests=120, console=Console(file=out, width=120))
    text = out.getvalue()
    for heading in ("1. demo data", "2. production_log_sensor", "3. curation", "4. turn 1", "5. serve", "6. sensors"):
        assert heading in text
    assert first["traffic"]["requests"] > 0 and first["traffic"]["errors"] == 0
    assert first["traffic"]["thumbs_down"] > 0  # the simulated users found failures
    assert first["loop_ran"], text
    assert first["synthetic_sft"] > 0
    assert first["turn1_decision"] in ("promoted", "rejected")
    store = EventStore(home / "warehouse.duckdb")
    decisions = store.read_stream(stream_id("tiny-llm"))
    assert len(decisions) >= 1  # the gate decided on turn 1 (and on the retrained candidate if the loop got there)
    if first["loop_success"]:
        assert len(decisions) == 2 and first["loop_decision"] in ("promoted", "rejected", "noop")
    assert "one turn of the flywheel" in text and "make dev" in text

    second = run_demo(records=200, replay_requests=40, console=Console(file=io.StringIO(), width=120))
    assert second["traffic"]["requests"] > 0
    with store.connect() as con:
        n, distinct = con.execute("SELECT count(*), count(DISTINCT payload->>'request_id') FROM events "
                                  "WHERE type = 'InteractionLogged'").fetchone()
    assert n == distinct  # nothing ingested twice across the two runs
    assert second["head"] > first["head"]
