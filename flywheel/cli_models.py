"""`flywheel promote | rollback | promotions | canary`: the champion, decided in the event log.

    flywheel promotions                      the ledger: every promotion, rejection and rollback
    flywheel promote 7 --force --actor alice --reason "hotfix"    audited override of the gates
    flywheel rollback --actor bob --reason "regression in prod"  back to the previous champion
    flywheel canary                          online feedback rates per model version that answered

Every change goes through `models.promotion` (expected version on the promotion stream), so a
command racing the `promotion` asset either wins or fails with a clear conflict; the MLflow
`champion` alias follows the ledger.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flywheel.config import Config, Paths

console = Console()

ModelOpt = Annotated[str | None, typer.Option(help="registered model name (default: [serving] model)")]
ActorOpt = Annotated[str, typer.Option(help="who asks (recorded in the ledger)")]
ReasonOpt = Annotated[str, typer.Option(help="why (recorded in the ledger)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def _context(model: str | None):
    from models.registry import Tracking
    from warehouse.store import EventStore

    paths = Paths.from_env().ensure()
    name = model or Config.load().section("serving").get("model", "tiny-llm")
    return EventStore(paths.warehouse), Tracking.local(paths.home), name


def promote(
    version: Annotated[str, typer.Argument(help="the model version to make champion")],
    force: Annotated[bool, typer.Option("--force", help="skip the gates (required: this command never evaluates)")] = False,
    actor: ActorOpt = "",
    reason: ReasonOpt = "",
    model: ModelOpt = None,
) -> None:
    """Make VERSION the champion without the gates: audited (actor and reason are required)."""
    from models.promotion import PromotionConflict
    from models.promotion import promote as do_promote

    if not force:
        raise typer.BadParameter("gated promotion runs as the `promotion` asset; this command is the audited "
                                 "override and needs --force", param_hint="--force")
    if not actor.strip() or not reason.strip():
        raise typer.BadParameter("a forced promotion needs --actor and --reason (they go into the ledger)")
    store, tracking, name = _context(model)
    try:
        tracking.version(name, version)
    except Exception as e:
        raise typer.BadParameter(f"{name} has no version {version!r} in the registry") from e
    try:
        event = do_promote(store, tracking, name, version, None, forced=True, actor=actor, reason=reason)
    except PromotionConflict as e:
        console.print(f"[red]{e}")
        raise typer.Exit(1) from e
    console.print(f"{name}@{version} is champion (was {event.previous_version or 'none'}); forced by {actor}: {reason}")


def rollback(actor: ActorOpt = "", reason: ReasonOpt = "", model: ModelOpt = None) -> None:
    """Make the previous champion the champion again (audited)."""
    from models.promotion import PromotionConflict
    from models.promotion import rollback as do_rollback

    if not actor.strip() or not reason.strip():
        raise typer.BadParameter("a rollback needs --actor and --reason (they go into the ledger)")
    store, tracking, name = _context(model)
    try:
        event = do_rollback(store, tracking, name, actor=actor, reason=reason)
    except (ValueError, PromotionConflict) as e:
        console.print(f"[red]{e}")
        raise typer.Exit(1) from e
    console.print(f"{name}: champion {event.from_version} → {event.to_version} (rolled back by {actor}: {reason})")


def promotions(model: ModelOpt = None, as_json: JsonOpt = False) -> None:
    """The promotion ledger of a model, oldest first, and the current champion."""
    from models.promotion import ledger, stream_id

    store, _, name = _context(model)
    rows = []
    for e in store.read_stream(stream_id(name)):
        d = e.data
        kind = type(d).__name__
        version = getattr(d, "model_version", None) or f"{d.from_version}→{d.to_version}"
        failed = [g["name"] for g in getattr(d, "gates", []) if not g.get("passed")]
        rows.append({"position": e.position, "at": e.occurred_at.isoformat(), "event": kind, "version": version,
                     "forced": getattr(d, "forced", False), "actor": getattr(d, "actor", None),
                     "reason": getattr(d, "reason", None), "failed_gates": failed})
    champion = ledger(store, name).champion
    if as_json:
        print(json.dumps({"model": name, "champion": champion, "ledger": rows}, indent=2))
        return
    table = Table(title=f"{name}: champion {champion or 'none'}")
    for col in ("position", "at", "event", "version", "forced", "actor", "reason / failed gates"):
        table.add_column(col)
    for r in rows:
        detail = r["reason"] or (", ".join(r["failed_gates"]) if r["failed_gates"] else "")
        table.add_row(str(r["position"]), r["at"][:19], r["event"], r["version"], "yes" if r["forced"] else "",
                      r["actor"] or "", detail)
    console.print(table)


def canary(as_json: JsonOpt = False) -> None:
    """Online feedback per model version that answered (the canary comparison)."""
    from warehouse.projections import feedback_by_model
    from warehouse.store import EventStore

    rows = feedback_by_model(EventStore(Paths.from_env().ensure().warehouse))
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title="feedback by model version")
    cols = ("model_version", "interactions", "rated", "thumbs_up", "thumbs_down", "thumbs_up_rate",
            "latency_p50_ms", "latency_p95_ms")
    for col in cols:
        table.add_column(col)
    for r in rows:
        table.add_row(*[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols])
    console.print(table)


def register(app: typer.Typer) -> None:
    for fn in (promote, rollback, promotions, canary):
        app.command()(fn)
