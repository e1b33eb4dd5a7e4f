"""The health alert sensor and the data-collection job it requests.

    health_alert_sensor: event log since its cursor → production metrics and prompt drift
                         (assets.loop.health_report) → every threshold crossed is recorded as an
                         `AlertRaised` event (idempotent ids) and one run of `collect_failures_job`
                         is requested (run_key = the position range). Too little traffic for a rate
                         (`[loop] min_requests`): the cursor stays and traffic accumulates.
    collect_failures_job: failure_cases + production_health, so the failures behind the alert are
                         clustered and the health view is fresh.
"""

import uuid
from datetime import UTC, datetime
from typing import Any

from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    in_process_executor,
    sensor,
)

from assets.resources import ProjectConfigResource, WarehouseResource

collect_failures_job = define_asset_job(
    "collect_failures_job",
    selection=AssetSelection.assets("failure_cases", "production_health"),
    executor_def=in_process_executor,
    tags={"flywheel/stage": "loop"},
    description="Cluster the failure cases and refresh production health (requested by alerts).",
)


def alert_event_id(alert: dict[str, Any], after: int, upto: int) -> str:
    detail = sorted((alert.get("detail") or {}).items())
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"alert:{alert['metric']}:{detail}:{after}:{upto}"))


def evaluate_health(warehouse: WarehouseResource, project: ProjectConfigResource, after: int) -> dict[str, Any] | None:
    """The health report for (after, traffic head], or None while it has fewer than `min_requests` interactions."""
    from assets.loop import health_report
    from sensors.failures import traffic_head

    settings = project.load().section("loop")
    store = warehouse.store()
    upto = traffic_head(store)  # not the log's head: the alerts this sensor appends must not move its window
    if upto <= after:
        return None
    with store.connect() as con:
        (n,) = con.execute("SELECT count(*) FROM proj_interactions WHERE position > ? AND position <= ?",
                           [after, upto]).fetchone()
    if n < int(settings.get("min_requests", 20)):
        return None
    return health_report(store, warehouse.paths, settings, after, upto)


def record_alerts(warehouse: WarehouseResource, report: dict[str, Any]) -> int:
    """Append one AlertRaised per crossed threshold; replaying the same window appends nothing."""
    from warehouse.events import AlertRaised
    from warehouse.store import NewEvent

    events = [NewEvent(AlertRaised(kind=a["kind"], metric=a["metric"], value=a["value"], threshold=a["threshold"],
                                   detail={**a["detail"], "window": [report["after"], report["upto"]]}),
                       "alerts", datetime.now(UTC), event_id=alert_event_id(a, report["after"], report["upto"]))
              for a in report["alerts"]]
    if events:
        warehouse.store().append(events)
    return len(events)


@sensor(job=collect_failures_job, minimum_interval_seconds=300, default_status=DefaultSensorStatus.RUNNING)
def health_alert_sensor(context: SensorEvaluationContext, warehouse: WarehouseResource, project: ProjectConfigResource):
    """Records AlertRaised when a failure/error/refusal rate, latency or prompt drift passes its threshold
    (`[loop.thresholds]`) and requests the data-collection job. Run key = the position range."""
    after = int(context.cursor or 0)
    report = evaluate_health(warehouse, project, after)
    if report is None:
        return SkipReason(f"too little new traffic after position {after} for health rates")
    cursor = str(report["upto"])
    if not report["alerts"]:
        return SensorResult(skip_reason=f"healthy in ({after}, {report['upto']}]", cursor=cursor)
    record_alerts(warehouse, report)
    metrics = sorted({a["metric"] for a in report["alerts"]})
    return SensorResult(
        run_requests=[RunRequest(run_key=f"health:{after}-{report['upto']}",
                                 tags={"flywheel/trigger": "health_alert_sensor", "flywheel/alerts": ",".join(metrics)})],
        cursor=cursor,
    )
