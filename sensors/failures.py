"""The failure sensor, the flywheel loop job it launches, and the periodic retrain schedule.

    failure_sensor: event log since its cursor → failure signal counts (flywheel.failures) → when the
                    failing interactions pass `[loop] failure_threshold`, one run of `flywheel_loop_job`
                    with run_key = the position range; below the threshold the cursor stays, so counts
                    accumulate over ticks.
    flywheel_loop_job: failure_cases → synthetic_samples → sft_dataset → sft_checkpoint → preference_pairs
                    → dpo_checkpoint → eval_scores → promotion (with their blocking checks), in process.
    retrain_schedule: the same job on `[loop] retrain_cron` (UTC).
"""

from dataclasses import dataclass

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    in_process_executor,
    sensor,
)

from assets.resources import ProjectConfigResource, WarehouseResource
from flywheel.config import Config

LOOP_ASSETS = ["failure_cases", "synthetic_samples", "sft_dataset", "sft_checkpoint", "preference_pairs",
               "dpo_checkpoint", "eval_scores", "promotion"]
DEFAULT_THRESHOLD = 20
DEFAULT_CRON = "0 3 * * *"

_loop = AssetSelection.assets(*LOOP_ASSETS)
flywheel_loop_job = define_asset_job(
    "flywheel_loop_job",
    selection=_loop | AssetSelection.checks_for_assets(*LOOP_ASSETS),
    executor_def=in_process_executor,  # one process: the trainers are the memory budget, not parallelism
    tags={"flywheel/stage": "loop"},
    description="Failure cases → synthetic data → SFT + DPO retrain → eval → gated promotion.",
)


@dataclass(frozen=True)
class FailureWindow:
    """Failure signals in the event positions (after, upto] and whether they warrant a loop run."""

    after: int
    upto: int
    failing: int
    threshold: int
    counts: dict[str, int]

    @property
    def due(self) -> bool:
        return self.upto > self.after and self.failing >= self.threshold

    @property
    def run_key(self) -> str:
        return f"failures:{self.after}-{self.upto}"


def traffic_head(store) -> int:
    """The position of the last interaction or feedback event (projections caught up first).

    Windows end here rather than at the log's head: events the loop itself appends (alerts, checkpoints,
    evaluations) then never change a window, so a re-evaluated tick asks for the same run key.
    """
    from warehouse import projections

    projections.catch_up(store)
    with store.connect() as con:
        (head,) = con.execute("SELECT greatest((SELECT coalesce(max(position), 0) FROM proj_interactions), "
                              "(SELECT coalesce(max(position), 0) FROM proj_feedback))").fetchone()
    return int(head)


def failure_window(warehouse: WarehouseResource, project: ProjectConfigResource, after: int) -> FailureWindow:
    """Count failure signals in (after, traffic head] (SQL over the projections, no decryption)."""
    from assets.loop import failure_policy
    from flywheel.failures import failure_signal_counts

    settings = project.load().section("loop")
    store = warehouse.store()
    upto = traffic_head(store)
    counts = (failure_signal_counts(store, after, upto, failure_policy(settings), catch_up=False)
              if upto > after else {})
    return FailureWindow(after, upto, counts.get("failing", 0),
                         int(settings.get("failure_threshold", DEFAULT_THRESHOLD)), counts)


@sensor(job=flywheel_loop_job, minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING)
def failure_sensor(context: SensorEvaluationContext, warehouse: WarehouseResource, project: ProjectConfigResource):
    """Requests the loop job (synthetic data + retrain + gated promotion) when failure signals since the
    cursor (an event position) pass `[loop] failure_threshold`. Run key = the position range."""
    w = failure_window(warehouse, project, int(context.cursor or 0))
    if not w.due:
        return SkipReason(f"{w.failing} failing interactions in ({w.after}, {w.upto}] < threshold {w.threshold}")
    return SensorResult(
        run_requests=[RunRequest(run_key=w.run_key, tags={"flywheel/trigger": "failure_sensor",
                                                          "flywheel/window": f"{w.after}-{w.upto}",
                                                          "flywheel/failing": str(w.failing)})],
        cursor=str(w.upto),
    )


retrain_schedule = ScheduleDefinition(
    name="retrain_schedule",
    job=flywheel_loop_job,
    cron_schedule=str(Config.load().section("loop").get("retrain_cron", DEFAULT_CRON)),
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    tags={"flywheel/trigger": "retrain_schedule"},
    description="The periodic turn of the flywheel ([loop] retrain_cron in flywheel.toml).",
)
