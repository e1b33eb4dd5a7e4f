"""The production-log sensor and the job it launches: new lines in `landing/` → the event log."""

from pathlib import Path

import orjson
from dagster import (
    Config,
    DefaultSensorStatus,
    OpExecutionContext,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    job,
    op,
    sensor,
)

from assets.resources import WarehouseResource
from flywheel import landing


class LogRangeConfig(Config):
    path: str
    start: int
    end: int


@op
def ingest_log_range(context: OpExecutionContext, config: LogRangeConfig, warehouse: WarehouseResource) -> None:
    """Ingest one byte range of one landing file (complete lines only), then fold projections."""
    from warehouse import projections
    from warehouse.ingest import Ingester

    store = warehouse.store()
    report = Ingester(store).ingest_file(
        Path(config.path), start_offset=config.start, end_offset=config.end if not config.path.endswith(".gz") else None,
        complete_lines_only=not config.path.endswith(".gz"),
    )
    projections.catch_up(store)
    summary = {k: getattr(report, k) for k in ("read", "ingested", "duplicates", "quarantined", "blank_lines")}
    context.log.info(f"{config.path} [{config.start}, {config.end}): {summary}")


@job(tags={"flywheel/stage": "ingest"})
def ingest_landing_job() -> None:
    """Ingest a byte range of a production-log file from the landing folder."""
    ingest_log_range()


@sensor(job=ingest_landing_job, minimum_interval_seconds=15, default_status=DefaultSensorStatus.RUNNING)
def production_log_sensor(context: SensorEvaluationContext, warehouse: WarehouseResource):
    """Watches `$FLYWHEEL_HOME/landing/` for new files and growing files.

    Cursor: {file: offset launched up to}. One run per new byte range; the run key names the file's
    identity and the range, so a re-evaluated tick never ingests twice.
    """
    offsets = orjson.loads(context.cursor) if context.cursor else {}
    ranges = landing.scan(warehouse.paths.landing, offsets)
    if not ranges:
        return SkipReason("no new complete lines in landing/")
    return SensorResult(
        run_requests=[
            RunRequest(
                run_key=r.key,
                run_config={"ops": {"ingest_log_range": {"config": {"path": r.path, "start": r.start, "end": r.end}}}},
                tags={"flywheel/file": Path(r.path).name},
            )
            for r in ranges
        ],
        cursor=orjson.dumps(landing.advance(offsets, ranges)).decode(),
    )
