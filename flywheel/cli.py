"""The `flywheel` command line: ingest logs, inspect the event log, run data-subject requests, demo.

\b
    flywheel ingest logs/*.jsonl.gz        stream production logs into the event log
    flywheel events --subject ID           read events (decrypted where the key exists)
    flywheel projections status|rebuild    the tables folded from the log
    flywheel quarantine                    bad lines with file, line, offset and reason
    flywheel dsr shred SUBJECT             crypto-shred a data subject (the key only)
    flywheel dsr access|plan|erase SUBJECT access export, erasure plan, erasure (flywheel/cli_dsr.py)
    flywheel lineage sample|model|subject  lineage queries (table or --json)
    flywheel promotions | promote | rollback   the champion ledger (audited overrides)
    flywheel canary                        online feedback rates per model version
    flywheel demo                          the main job on the project's own sample data
    flywheel dev                           the Dagster UI on 127.0.0.1

Every command reads `$FLYWHEEL_HOME` (default ./var). `flywheel COMMAND --help` says more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from flywheel.config import Paths, ensure_dagster_home

app = typer.Typer(help=__doc__, no_args_is_help=True, rich_markup_mode=None, add_completion=False)
projections_app = typer.Typer(help="The projection tables folded from the event log.", no_args_is_help=True)
dsr_app = typer.Typer(help="Data-subject requests: find, access, plan, erase, shred.", no_args_is_help=True)
app.add_typer(projections_app, name="projections")
app.add_typer(dsr_app, name="dsr")
console = Console()

from flywheel import cli_models

cli_models.register(app)


def _store():
    from warehouse.store import EventStore

    return EventStore(Paths.from_env().ensure().warehouse)


def _progress(total: int, description: str) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal and os.environ.get("FLYWHEEL_PROGRESS") != "1",
    )


def ingest_paths(paths: list[Path], *, fmt: str = "jsonl", chunk_lines: int | None = None, quiet: bool = False):
    """Ingest files (the CLI and the demo share this); returns the IngestReport."""
    from warehouse.ingest import Ingester
    from warehouse.oasst import convert_tree_export

    home = Paths.from_env().ensure()
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise typer.BadParameter(f"not a file: {', '.join(map(str, missing))}")
    if fmt == "oasst":
        converted = []
        for p in paths:
            dst = home.landing / "oasst" / (p.name.removesuffix(".jsonl") + ".records.jsonl")
            n = convert_tree_export(p, dst)
            if not quiet:
                console.print(f"converted {p} → {dst} ({n} records)")
            converted.append(dst)
        paths = converted
    from flywheel.config import Config

    settings = Config.load().ingest
    store = _store()
    ingester = Ingester(
        store,
        chunk_lines=chunk_lines or int(settings.get("chunk_lines", 131_072)),
        max_line_bytes=int(settings.get("max_line_bytes", 64 << 20)),
    )
    total = sum(p.stat().st_size for p in paths)
    t0 = time.perf_counter()
    with _progress(total, "ingest") as progress:
        task = progress.add_task("ingest", total=total)
        report = ingester.ingest_files(paths, progress=lambda n: progress.advance(task, n))
    elapsed = time.perf_counter() - t0
    if not quiet:
        _print_ingest_report(report, elapsed)
    return report


def _print_ingest_report(report, elapsed: float) -> None:
    table = Table(title="ingest", show_lines=False)
    for col in ("file", "read", "ingested", "duplicates", "quarantined", "blank", "drift fields"):
        table.add_column(col, justify="left" if col in ("file", "drift fields") else "right")
    for f in report.files:
        drift = ", ".join(f"{k} ({v})" for k, v in f.drift_fields.most_common(5))
        table.add_row(Path(f.path).name, *(str(x) for x in (f.read, f.ingested, f.duplicates, f.quarantined, f.blank_lines)), drift)
    console.print(table)
    ok = report.read == report.ingested + report.duplicates + report.quarantined
    console.print(
        f"read {report.read} = ingested {report.ingested} + duplicates {report.duplicates} "
        f"+ quarantined {report.quarantined}  [{'ok' if ok else 'VIOLATED'}]  "
        f"({report.read / elapsed if elapsed else 0:,.0f} records/s)"
    )
    reasons: dict[str, int] = {}
    for f in report.files:
        for r, n in f.reasons.items():
            reasons[r] = reasons.get(r, 0) + n
    if reasons:
        console.print("quarantine reasons: " + "; ".join(f"{r} ×{n}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])))
        console.print("see them with: flywheel quarantine")


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="JSONL or JSONL.gz files (docs/production-logs.md)")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl (our schema) or oasst (OpenAssistant tree export)")] = "jsonl",
    chunk_lines: Annotated[int | None, typer.Option(help="lines per transaction (default 131072)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Stream production-log files into the event log; bad lines go to the quarantine."""
    if fmt not in ("jsonl", "oasst"):
        raise typer.BadParameter("--format must be jsonl or oasst")
    report = ingest_paths(paths, fmt=fmt, chunk_lines=chunk_lines, quiet=json_out)
    from warehouse import projections

    projections.catch_up(_store())
    if json_out:
        print(json.dumps([{**f.__dict__, "drift_fields": dict(f.drift_fields), "reasons": dict(f.reasons)} for f in report.files], indent=2))


@app.command()
def events(
    subject: Annotated[str | None, typer.Option(help="subject id (see `flywheel dsr subject-of`)")] = None,
    stream: Annotated[str | None, typer.Option(help="stream id, e.g. interaction-REQUEST_ID")] = None,
    type_: Annotated[list[str] | None, typer.Option("--type", help="event type (repeatable)")] = None,
    after: Annotated[int, typer.Option(help="only events after this position")] = 0,
    limit: Annotated[int, typer.Option(help="at most this many events")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """Read events in position order, personal fields decrypted where the subject's key exists."""
    store = _store()
    rows = store.read(after=after, subject_id=subject, stream_id=stream, types=type_, limit=limit)
    if json_out:
        for e in rows:
            data = {k: v for k, v in e.data.__dict__.items() if k != "extra"}
            print(json.dumps({**{k: getattr(e, k) for k in ("position", "event_id", "stream_id", "stream_version", "type", "subject_id", "redacted")},
                              "occurred_at": e.occurred_at.isoformat(), "data": data, "extra": dict(getattr(e.data, "extra", {}) or {})}, default=str))
        return
    table = Table()
    for col in ("pos", "type", "stream", "v", "subject", "occurred", "data"):
        table.add_column(col)
    for e in rows:
        data = {k: v for k, v in e.data.__dict__.items() if k != "extra" and v is not None}
        text = json.dumps(data, default=str)
        table.add_row(str(e.position), e.type, e.stream_id, str(e.stream_version), (e.subject_id or "")[:12],
                      e.occurred_at.strftime("%Y-%m-%d %H:%M:%S"), ("[redacted] " if e.redacted else "") + text[:120])
    console.print(table)


@projections_app.command("status")
def projections_status() -> None:
    """Tracking positions, row counts and the canonical hash of the projections."""
    from warehouse import projections

    store = _store()
    s = projections.summary(store)
    console.print({k: v for k, v in s.items() if k not in ("feedback_by_model_md",)})
    console.print(projections.positions(store))


@projections_app.command("catch-up")
def projections_catch_up() -> None:
    """Apply events not yet folded into the projections."""
    from warehouse import projections

    console.print(projections.catch_up(_store()))


@projections_app.command("rebuild")
def projections_rebuild() -> None:
    """Drop every projection and fold the whole log again (same state, same hash)."""
    from warehouse import projections

    store = _store()
    before = projections.canonical_hash(store)
    projections.rebuild(store)
    after = projections.canonical_hash(store)
    console.print(f"rebuilt; canonical hash {after} ({'unchanged' if before == after else 'changed: was ' + before})")


@app.command()
def quarantine(
    file: Annotated[Path | None, typer.Option(help="only lines from this file")] = None,
    limit: Annotated[int, typer.Option(help="at most this many rows")] = 50,
    raw: Annotated[bool, typer.Option(help="show the (decrypted) raw bytes")] = False,
) -> None:
    """Lines that were not ingested: file, line, byte offset, reason (and raw bytes)."""
    from warehouse.ingest import read_quarantine

    rows = read_quarantine(_store(), file=str(file) if file else None, limit=limit)
    table = Table()
    for col in ("file", "line", "offset", "bytes", "reason") + (("raw",) if raw else ()):
        table.add_column(col)
    for r in rows:
        extra = (repr(r["raw"][:80]) if r["raw"] is not None else "[key shredded]",) if raw else ()
        table.add_row(Path(r["file"]).name, str(r["line"]), str(r["byte_offset"]), str(r["length"]), r["reason"], *extra)
    console.print(table)


@dsr_app.command("subject-of")
def dsr_subject_of(user_id: Annotated[str, typer.Argument(help="the raw user identifier, as in the logs")]) -> None:
    """Print the pseudonymous subject id of a raw user identifier."""
    print(_store().keys.pseudonymize(user_id))


@dsr_app.command("shred")
def dsr_shred(
    subject: Annotated[str, typer.Argument(help="subject id (see `flywheel dsr subject-of`)")],
    request_id: Annotated[str | None, typer.Option(help="the DSR request id to record")] = None,
) -> None:
    """Crypto-shred a subject: destroy their key; their personal fields read back redacted."""
    request_id = request_id or f"cli-{uuid.uuid4()}"
    existed = _store().shred_subject(subject, request_id)
    console.print(f"subject {subject}: key {'destroyed' if existed else 'was already absent'}; request {request_id}")


@app.command()
def demo(
    records: Annotated[int, typer.Option(help="production-log records to generate")] = 2000,
) -> None:
    """The main job on the project's own sample data (no shared data sets needed)."""
    from sensors.demo import run_demo

    run_demo(records=records, console=console)


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="port (the server binds 127.0.0.1 unless --host says otherwise)")] = 8080,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    model: Annotated[str | None, typer.Option(help="registered model name (default: [serving] model in flywheel.toml)")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="serve this checkpoint directory instead of the champion")] = None,
    canary_share: Annotated[float | None, typer.Option(help="share of traffic for the challenger alias (0..1)")] = None,
    poll_interval: Annotated[float, typer.Option(help="seconds between checks of the champion alias")] = 10.0,
) -> None:
    """Serve the champion over the TGI protocol; reload when the alias moves; log traffic to landing/."""
    import datetime as dt

    from flywheel.config import Config
    from models.registry import Tracking, alias_version_source
    from models.server import JsonlSink
    from models.server import serve as run_server

    paths = Paths.from_env().ensure()
    settings = Config.load().section("serving")
    model = model or settings.get("model", "tiny-llm")
    tracking = Tracking.local(paths.home)
    options: dict = {}
    if model_dir is None:
        champion = tracking.alias(model, "champion")
        if champion is None:
            raise typer.BadParameter(f"model {model!r} has no champion yet: run the flywheel (make demo) or pass --model-dir")
        model_dir, version = tracking.local_path(champion), f"{model}@{champion.version}"
        options["version_source"] = alias_version_source(paths.home, model, "champion")
        options["poll_interval_s"] = poll_interval
        share = settings.get("canary_share", 0.0) if canary_share is None else canary_share
        challenger = tracking.alias(model, "challenger")
        if challenger is not None and share > 0 and challenger.version != champion.version:
            options.update(challenger_dir=str(tracking.local_path(challenger)),
                           challenger_version=f"{model}@{challenger.version}", canary_share=share)
    else:
        version = model_dir.name
    sink = JsonlSink(paths.landing / "server" / f"{dt.date.today():%Y%m%d}-{os.getpid()}.jsonl")
    console.print(f"serving {version} from {model_dir} on http://{host}:{port} (traffic → {sink.path})")
    run_server(model_dir, host=host, port=port, model_version=version, on_interaction=sink, on_feedback=sink, **options)


@app.command()
def dev(port: Annotated[int, typer.Option(help="port for the UI (127.0.0.1)")] = 3000) -> None:
    """Start the Dagster UI and daemon on 127.0.0.1 with DAGSTER_HOME under $FLYWHEEL_HOME."""
    paths = Paths.from_env().ensure()
    env = {**os.environ, "DAGSTER_HOME": str(ensure_dagster_home(paths)), "FLYWHEEL_HOME": str(paths.home)}
    cmd = [str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port)]
    console.print(f"DAGSTER_HOME={env['DAGSTER_HOME']}  →  http://127.0.0.1:{port}")
    raise SystemExit(subprocess.call(cmd, env=env))


from flywheel.cli_dsr import dsr_access, dsr_erase, dsr_plan, lineage_app

app.add_typer(lineage_app, name="lineage")
dsr_app.command("access")(dsr_access)
dsr_app.command("erase")(dsr_erase)
dsr_app.command("plan")(dsr_plan)


def main() -> None:  # pragma: no cover - console script
    app()


if __name__ == "__main__":  # pragma: no cover
    app()

