"""Warehouse assets: the event-log projections the rest of the graph reads."""


from dagster import AssetExecutionContext, AutomationCondition, MaterializeResult, MetadataValue, asset

from assets.resources import WarehouseResource
from warehouse import projections


# Declarative automation: the projections refold every 10 minutes (the production-log sensor's runs
# also catch them up); production_health follows them (assets/loop.py).
@asset(group_name="warehouse", kinds={"duckdb"}, automation_condition=AutomationCondition.on_cron("*/10 * * * *"))
def event_log_projections(context: AssetExecutionContext, warehouse: WarehouseResource) -> MaterializeResult:
    """Interactions, feedback, subjects and data-subject requests, folded from the event log.

    Caught up incrementally from each projection's tracking position (committed with the rows), so
    a re-materialization only applies new events; `flywheel projections rebuild` refolds from zero.
    """
    store = warehouse.store()
    applied = projections.catch_up(store)
    summary = projections.summary(store)
    context.log.info(f"applied {applied} up to position {summary['head']}")
    return MaterializeResult(
        metadata={
            "head_position": summary["head"],
            "events_applied": MetadataValue.json(applied),
            "interactions": summary["interactions"],
            "feedback": summary["feedback"],
            "subjects": summary["subjects"],
            "shredded_subjects": summary["shredded_subjects"],
            "open_dsr_requests": summary["open_dsr_requests"],
            "feedback_by_model": MetadataValue.md(summary["feedback_by_model_md"]),
            "canonical_hash": summary["canonical_hash"],
        }
    )
