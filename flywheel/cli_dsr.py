"""`flywheel lineage …` and `flywheel dsr access|erase|plan`: lineage queries and data-subject requests.

    flywheel lineage sample ID [--json]             raw event/document → shards → checkpoints → evals
    flywheel lineage model VERSION [--model NAME]   sources, licenses, subjects, shard versions a model saw
    flywheel lineage subject ID [--json]            everything a subject's data reached
    flywheel dsr access SUBJECT --out FILE          GDPR Art. 15 export (JSON, mode 0600)
    flywheel dsr plan SUBJECT [--json]              what an erasure would reach (step 2 of erasure)
    flywheel dsr erase SUBJECT... [--reason R] [--now]  ErasureRequested; --now runs the erasure job here

Registered in flywheel/cli.py; logic in warehouse/lineage.py, warehouse/access.py, flywheel/erasure.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

lineage_app = typer.Typer(help="Lineage queries: samples, models, subjects.", no_args_is_help=True)
console = Console()

JsonOption = Annotated[bool, typer.Option("--json", help="print the result as JSON instead of a table")]


def _show(result: dict[str, Any], as_json: bool) -> None:
    from warehouse.lineage import render_table

    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True, ensure_ascii=False))
    else:
        console.print(render_table(result))


@lineage_app.command("sample")
def lineage_sample(item_id: Annotated[str, typer.Argument(help="sample id, document id or event id")],
                   as_json: JsonOption = False) -> None:
    """Where one sample came from and where it went."""
    from warehouse.lineage import lineage_sample_cmd

    _show(lineage_sample_cmd(item_id), as_json)


@lineage_app.command("model")
def lineage_model(version: Annotated[str, typer.Argument(help="registry version: 3, NAME/3 or NAME@3")],
                  model: Annotated[str | None, typer.Option("--model", help="registered model name")] = None,
                  as_json: JsonOption = False) -> None:
    """Which sources, licenses, subjects and shard versions a model version saw; flags licenses outside
    the allow-list and erased subjects."""
    from warehouse.lineage import lineage_model_cmd

    try:
        result = lineage_model_cmd(version, model)
    except LookupError as e:
        raise typer.BadParameter(str(e)) from e
    _show(result, as_json)


@lineage_app.command("subject")
def lineage_subject(subject: Annotated[str, typer.Argument(help="subject id (see `flywheel dsr subject-of`)")],
                    as_json: JsonOption = False) -> None:
    """Everything a data subject's data reached."""
    from warehouse.lineage import lineage_subject_cmd

    _show(lineage_subject_cmd(subject), as_json)


def dsr_access(subject: Annotated[str, typer.Argument(help="subject id (see `flywheel dsr subject-of`)")],
               out: Annotated[Path, typer.Option("--out", help="where to write the JSON export")]) -> None:
    """Write the subject's access export (GDPR Art. 15): every record about them, nothing about anyone else."""
    from warehouse.access import dsr_access_cmd

    summary = dsr_access_cmd(subject, out)
    console.print(f"access export for {subject} → {out}")
    console.print({k: v for k, v in summary.items() if k not in ("out", "subject_id")})


def dsr_plan(subject: Annotated[str, typer.Argument(help="subject id")], as_json: JsonOption = False) -> None:
    """What erasing the subject would reach: events, documents, shard versions, near-duplicates,
    synthetic children, checkpoints, partitions to re-materialize."""
    from warehouse.lineage import erasure_plan_cmd

    _show(erasure_plan_cmd(subject), as_json)


def dsr_erase(subjects: Annotated[list[str], typer.Argument(help="subject id(s) of one person (their identifiers "
                                                             "in different sources: `flywheel dsr subject-of`)")],
              reason: Annotated[str | None, typer.Option(help="why (recorded in ErasureRequested)")] = None,
              request_id: Annotated[str | None, typer.Option(help="the DSR request id (default: a new one)")] = None,
              now: Annotated[bool, typer.Option("--now", help="run the erasure job in this process instead of "
                                                "leaving it to the erasure sensor")] = False,
              as_json: JsonOption = False) -> None:
    """Request erasure (GDPR Art. 17): append ErasureRequested; the erasure sensor runs the job."""
    import getpass

    from flywheel.cli import _store
    from flywheel.erasure import request_erasure

    store = _store()
    req = request_erasure(store, subjects, reason=reason, requested_by=f"cli:{getpass.getuser()}", request_id=request_id)
    console.print(f"ErasureRequested {req['request_id']} for {', '.join(subjects)} at position {req['position']}")
    if not now:
        console.print("the erasure sensor starts the erasure job (`flywheel dev`), or run again with --now")
        return
    receipt = run_erasure_job(subjects, req["request_id"])
    if as_json:
        print(json.dumps(receipt, indent=2, sort_keys=True))
        return
    _print_receipt(receipt)
    if not receipt["verification"]["clean"]:
        raise typer.Exit(1)


def run_erasure_job(subjects: list[str], request_id: str) -> dict[str, Any]:
    """Run `erasure_job` in-process on the instance under $FLYWHEEL_HOME; return the receipt."""
    import os

    from dagster import DagsterInstance

    from flywheel.config import Paths, ensure_dagster_home
    from flywheel.definitions import defs
    from warehouse.store import EventStore

    paths = Paths.from_env().ensure()
    os.environ.setdefault("DAGSTER_HOME", str(ensure_dagster_home(paths)))
    instance = DagsterInstance.get()
    job = defs.resolve_job_def("erasure_job")
    result = job.execute_in_process(
        run_config={"ops": {"erase_subject": {"config": {"subject_ids": subjects, "request_id": request_id}}}},
        instance=instance, tags={"flywheel/request_id": request_id},
    )
    if not result.success:
        raise typer.Exit(2)
    done = [e for e in EventStore(paths.warehouse).read(types=["ErasureCompleted"])
            if e.data.request_id == request_id]
    return dict(done[-1].data.receipt)


def _print_receipt(receipt: dict[str, Any]) -> None:
    from rich.table import Table

    v = receipt["verification"]
    table = Table(title=f"erasure {receipt['request_id']}: {'verified' if v['clean'] else 'NOT verified'} "
                        f"in {receipt['wall_s']} s")
    table.add_column("store")
    table.add_column("found", justify="right")
    table.add_column("removed", justify="right")
    table.add_column("scan hits", justify="right")
    table.add_column("details")
    scanned = v["stores"]
    for name, s in sorted(receipt["stores"].items()):
        details = {k: x for k, x in s.items() if k not in ("found", "removed")}
        table.add_row(name, str(s.get("found", "")), str(s.get("removed", "")),
                      str(scanned.get(name, {}).get("hits", "")), json.dumps(details, default=str)[:90])
    console.print(table)
    console.print(f"verification: {v['needles']} fingerprints, {sum(s['files'] for s in scanned.values())} files, "
                  f"{v['hits']} hits")
