"""`make demo`: the main job, run on the project's own sample data.

Today's turn of the flywheel: generate a day of production traffic (interactions, feedback, a few
broken lines), ingest it through the warehouse path (quarantine and all), fold the projections through
a real Dagster materialization, and print what the system now knows. Rerunning is safe: the same
records produce the same event ids, so a second run ingests nothing twice.
"""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.table import Table

from flywheel.config import Paths, ensure_dagster_home
from flywheel.samples import write_demo_logs


def run_demo(*, records: int = 2000, console: Console | None = None) -> dict[str, object]:
    console = console or Console()
    paths = Paths.from_env().ensure()
    os.environ.setdefault("DAGSTER_HOME", str(ensure_dagster_home(paths)))
    t0 = time.perf_counter()

    console.rule("[bold]1. production traffic")
    files = write_demo_logs(paths.landing / "demo", n=records)
    for f in files:
        console.print(f"  {f}  ({f.stat().st_size:,} bytes)")

    console.rule("[bold]2. ingest → event log (with quarantine)")
    from flywheel.cli import ingest_paths

    report = ingest_paths(files)

    console.rule("[bold]3. projections (Dagster materialization)")
    from dagster import DagsterInstance, materialize

    import assets.warehouse
    from assets.resources import WarehouseResource

    result = materialize(
        [assets.warehouse.event_log_projections],
        resources={"warehouse": WarehouseResource(home=str(paths.home))},
        instance=DagsterInstance.get(),
    )
    if not result.success:
        raise SystemExit("projection materialization failed; see the Dagster run logs")
    from warehouse import projections
    from warehouse.store import EventStore

    summary = projections.summary(EventStore(paths.warehouse))
    table = Table(title="what the warehouse knows")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key in ("head", "interactions", "feedback", "subjects", "shredded_subjects", "open_dsr_requests"):
        table.add_row(key.replace("_", " "), f"{summary[key]:,}")
    table.add_row("quarantined lines (this run)", f"{report.quarantined:,}")
    console.print(table)
    per_model = Table(title="feedback per model version")
    for col in ("model version", "interactions", "👍", "👎", "mean latency ms"):
        per_model.add_column(col)
    for r in summary["feedback_by_model"]:  # type: ignore[union-attr]
        per_model.add_row(r["model_version"], str(r["interactions"]), str(r["thumbs_up"]), str(r["thumbs_down"]), str(r["mean_latency_ms"]))
    console.print(per_model)
    console.print(
        f"done in {time.perf_counter() - t0:.1f}s. State: {paths.home}. "
        "Look around: `flywheel events`, `flywheel quarantine`, `make dev` (Dagster UI on 127.0.0.1:3000)."
    )
    return summary
