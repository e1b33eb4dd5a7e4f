"""The promotion ledger: who is champion, decided in the event log, mirrored to the MLflow alias.

MLflow aliases have no compare-and-set, so the alias is never the source of truth. Every decision is
an event on the stream `promotion-<model>` appended with the stream version the decider read
(`expected_version`): of two promoters racing from the same state, exactly one append succeeds, and
only the winner moves the alias. The alias can always be re-derived from the ledger (`sync_alias`).

    promote(store, tracking, "tiny-llm", "7", decision)             # gated (decision from flywheel.gates)
    promote(..., forced=True, actor="alice", reason="hotfix")        # audited override
    rollback(store, tracking, "tiny-llm", actor="bob", reason="...") # back to the previous champion
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from warehouse.events import ModelPromoted, ModelRolledBack, PromotionRejected
from warehouse.store import ConcurrencyError, EventStore, NewEvent


class PromotionConflict(RuntimeError):
    """Another promoter changed the ledger between our read and our append."""


@dataclass(frozen=True)
class LedgerState:
    version: int  # the promotion stream's version
    champion: str | None
    history: list[str]  # champions in order, rollbacks applied (the last is the current one)


def stream_id(model: str) -> str:
    return f"promotion-{model}"


def ledger(store: EventStore, model: str) -> LedgerState:
    """Fold the promotion stream: the current champion and the champions before it."""
    events = store.read_stream(stream_id(model))
    history: list[str] = []
    for e in events:
        if isinstance(e.data, ModelPromoted):
            history.append(e.data.model_version)
        elif isinstance(e.data, ModelRolledBack):
            while history and history[-1] == e.data.from_version:
                history.pop()
            if not history or history[-1] != e.data.to_version:
                history.append(e.data.to_version)
    version = events[-1].stream_version if events else 0
    return LedgerState(version, history[-1] if history else None, history)


def _append(store: EventStore, model: str, event: Any, expected: int) -> None:
    try:
        store.append([NewEvent(event, stream_id(model), datetime.now(UTC), event_id=str(uuid.uuid4()))],
                      expected_version=expected)
    except ConcurrencyError as e:
        raise PromotionConflict(f"{model}: the promotion ledger moved (expected version {e.expected}, found "
                                f"{e.actual}); another promotion or rollback won — re-evaluate against the new champion") from e


def promote(store: EventStore, tracking, model: str, version: str, decision, *, forced: bool = False,
            actor: str | None = None, reason: str | None = None, expected_version: int | None = None) -> Any:
    """Record the decision; on promotion move the `champion` alias. Returns the recorded event.

    `decision` is a `flywheel.gates.GateDecision` (or None with `forced=True`). `expected_version` is
    the ledger version the decision was made against (default: read now).
    """
    state = ledger(store, model)
    expected = state.version if expected_version is None else expected_version
    gates = [g.to_dict() for g in decision.gates] if decision is not None else []
    if forced or (decision is not None and decision.promote):
        if not forced and not (reason or actor):
            reason = "all gates passed"
        event = ModelPromoted(model_name=model, model_version=version, previous_version=state.champion, gates=gates,
                              forced=forced, actor=actor, reason=reason if reason else (decision.reason if decision else None))
        _append(store, model, event, expected)
        tracking.set_alias(model, "champion", version)
        return event
    event = PromotionRejected(model_name=model, model_version=version, champion_version=state.champion, gates=gates)
    _append(store, model, event, expected)
    return event


def rollback(store: EventStore, tracking, model: str, *, actor: str | None = None, reason: str | None = None) -> ModelRolledBack:
    """Make the previous champion the champion again (audited)."""
    state = ledger(store, model)
    if len(state.history) < 2:
        raise ValueError(f"{model}: no previous champion to roll back to (history: {state.history or 'empty'})")
    current, previous = state.history[-1], state.history[-2]
    event = ModelRolledBack(model_name=model, from_version=current, to_version=previous, actor=actor, reason=reason)
    _append(store, model, event, state.version)
    tracking.set_alias(model, "champion", previous)
    return event


def sync_alias(store: EventStore, tracking, model: str) -> str | None:
    """Re-derive the `champion` alias from the ledger (after a crash between append and alias move)."""
    champion = ledger(store, model).champion
    if champion is None:
        tracking.delete_alias(model, "champion")
    else:
        tracking.set_alias(model, "champion", champion)
    return champion
