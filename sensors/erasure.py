"""Erasure and retention in Dagster: the erasure sensor and job, the retrain-after-erasure sensor, and
the retention schedule. The logic is `flywheel.erasure`; this module only wires it to Dagster.

- `erasure_sensor` — cursor: the log position of the last `ErasureRequested` seen; one run of
  `erasure_job` per request (run key: the request's event id, so a re-evaluated tick never erases
  twice).
- `erasure_job` — `flywheel.erasure.run_erasure` with hooks that re-materialize the affected curation
  partitions and derived datasets in-process (new versions, same instance) and delete the Dagster
  runs whose storage held the subject.
- `retrain_after_erasure_sensor` — cursor: the position of the last `CheckpointTainted`; one run of
  `retrain_after_erasure_job` (mixture → tokenizer → base → SFT → DPO) per erasure request.
- `tainted_versions_sensor` — after a `ModelPromoted` of an untainted champion, one run of
  `remove_tainted_versions_job`: tainted versions leave the registry, their runs and DVC checkpoint
  versions are deleted.
- `retention_schedule` — `retention_job` on `[retention] cron`: expired production-log subjects
  become erasure requests, expired documents are dropped and their partitions rebuilt and purged.
"""

from dagster import (
    AssetSelection,
    Config,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    MetadataValue,
    OpExecutionContext,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    job,
    materialize,
    op,
    sensor,
)

from assets.resources import DvcResource, ProjectConfigResource, WarehouseResource
from flywheel.config import Config as ProjectConfig
from flywheel.plots import markdown_table

CURATION_ASSETS = ("raw_documents", "cleaned_documents", "dedup_shards")
RETRAIN_ASSETS = ("training_mixture", "tokenizer", "base_checkpoint", "sft_dataset", "sft_checkpoint",
                  "preference_pairs", "dpo_checkpoint")


class ErasureConfig(Config):
    subject_ids: list[str]  # one person's identifiers in different sources
    request_id: str


def _definitions() -> list:
    """Every asset and check the hooks may re-materialize (imported lazily: the asset modules are big)."""
    from dagster import AssetChecksDefinition, AssetsDefinition

    import assets.curation
    import assets.training
    import assets.warehouse

    out = []
    for module in (assets.warehouse, assets.curation, assets.training):
        out += [v for v in vars(module).values() if isinstance(v, AssetsDefinition | AssetChecksDefinition)]
    return list({id(d): d for d in out}.values())


def erasure_hooks(context: OpExecutionContext, warehouse: WarehouseResource, dvc: DvcResource,
                  project: ProjectConfigResource):
    """Hooks that run the re-materializations in-process on the job's own instance."""
    from flywheel.erasure import ErasureHooks

    resources = {"warehouse": warehouse, "dvc": dvc, "project": project}
    definitions = _definitions()

    def run(selection: AssetSelection, partition_key: str | None = None) -> None:
        result = materialize(definitions, selection=selection, resources=resources, instance=context.instance,
                             partition_key=partition_key, tags={"flywheel/erasure": "rematerialize"})
        if not result.success:
            raise RuntimeError(f"re-materialization failed (partition {partition_key}): see run {result.run_id}")

    def partitions(sources: list[str]) -> None:
        for source in sources:
            selection = AssetSelection.assets(*CURATION_ASSETS)
            run(selection | AssetSelection.checks_for_assets(*CURATION_ASSETS), partition_key=source)

    def assets(names: list[str]) -> None:
        run(AssetSelection.assets(*names) | AssetSelection.checks_for_assets(*names))

    def delete_runs(run_ids: list[str]) -> int:
        n = 0
        for run_id in run_ids:
            if context.instance.get_run_by_id(run_id) is not None:
                context.instance.delete_run(run_id)
                n += 1
        return n

    return ErasureHooks(rematerialize_partitions=partitions, rematerialize_assets=assets, delete_runs=delete_runs,
                        current_run_id=context.run_id)


@op
def erase_subject(context: OpExecutionContext, config: ErasureConfig, warehouse: WarehouseResource, dvc: DvcResource,
                  project: ProjectConfigResource) -> dict:
    """Erase a data subject (their subject ids) everywhere lineage reaches; `ErasureCompleted` + receipt."""
    from flywheel.erasure import run_erasure

    receipt = run_erasure(warehouse.store(), warehouse.paths, config.subject_ids, config.request_id,
                          hooks=erasure_hooks(context, warehouse, dvc, project), log=context.log.info)
    rows = [{"store": name, "found": v.get("found", ""), "removed": v.get("removed", ""),
             "scan hits": receipt["verification"]["stores"].get(name, {}).get("hits", "")}
            for name, v in sorted(receipt["stores"].items())]
    context.add_output_metadata({"verified": receipt["verification"]["clean"], "wall_s": receipt["wall_s"],
                                 "tainted": len(receipt["tainted"]), "receipt": MetadataValue.json(receipt),
                                 "stores": MetadataValue.md(markdown_table(rows))})
    return {"request_id": receipt["request_id"], "verified": receipt["verification"]["clean"]}


@job(tags={"flywheel/stage": "erasure", "flywheel/resource": "trainer"})
def erasure_job() -> None:
    """Erase a data subject (GDPR Art. 17): shred, re-materialize, purge, taint, verify, receipt."""
    erase_subject()


@sensor(job=erasure_job, minimum_interval_seconds=15, default_status=DefaultSensorStatus.RUNNING)
def erasure_sensor(context: SensorEvaluationContext, warehouse: WarehouseResource):
    """`ErasureRequested` in the event log → one erasure run per request id (all the subject ids it
    names; run key: its first event id; cursor: log position)."""
    from flywheel.erasure import pending_erasure_requests

    after = int(context.cursor or 0)
    requests = pending_erasure_requests(warehouse.store(), after)
    if not requests:
        return SkipReason(f"no ErasureRequested after position {after}")
    return SensorResult(
        run_requests=[RunRequest(run_key=r["event_id"],
                                 run_config={"ops": {"erase_subject": {"config": {
                                     "subject_ids": r["subject_ids"], "request_id": r["request_id"]}}}},
                                 tags={"flywheel/request_id": r["request_id"]})
                      for r in requests],
        cursor=str(requests[-1]["position"]),
    )


retrain_after_erasure_job = define_asset_job(
    "retrain_after_erasure_job", selection=AssetSelection.assets(*RETRAIN_ASSETS),
    description="Retrain the chain without erased data (requested by CheckpointTainted).",
    tags={"flywheel/stage": "retrain", "flywheel/resource": "trainer"},
)


@sensor(job=retrain_after_erasure_job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING)
def retrain_after_erasure_sensor(context: SensorEvaluationContext, warehouse: WarehouseResource):
    """`CheckpointTainted` → one retrain run per erasure request (cursor: log position)."""
    from flywheel.erasure import pending_retrains

    after = int(context.cursor or 0)
    pending = pending_retrains(warehouse.store(), after)
    if not pending:
        return SkipReason(f"no CheckpointTainted after position {after}")
    return SensorResult(
        run_requests=[RunRequest(run_key=f"retrain-{p['request_id']}", tags={"flywheel/request_id": p["request_id"]})
                      for p in pending],
        cursor=str(max(p["position"] for p in pending)),
    )


class RegistryCleanupConfig(Config):
    model: str


@op
def remove_tainted(context: OpExecutionContext, config: RegistryCleanupConfig, warehouse: WarehouseResource) -> dict:
    """Delete tainted model versions (registry, runs, DVC checkpoint versions) once a clean champion serves."""
    from flywheel.erasure import remove_tainted_versions

    report = remove_tainted_versions(warehouse.store(), warehouse.paths, config.model)
    context.log.info(f"{config.model}: removed tainted versions {report['removed_versions']}")
    return report


@job(tags={"flywheel/stage": "erasure"})
def remove_tainted_versions_job() -> None:
    """Remove the tainted versions of a model from the registry after a clean successor's promotion."""
    remove_tainted()


@sensor(job=remove_tainted_versions_job, minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING)
def tainted_versions_sensor(context: SensorEvaluationContext, warehouse: WarehouseResource):
    """`ModelPromoted` of an untainted version while tainted versions remain → remove them (cursor: log
    position; run key: the promotion's event id)."""
    from flywheel.erasure import promotions_after, removable_tainted_versions

    after = int(context.cursor or 0)
    promotions = promotions_after(warehouse.store(), after)
    if not promotions:
        return SkipReason(f"no ModelPromoted after position {after}")
    latest = {p["model"]: p for p in promotions}
    requests = [RunRequest(run_key=f"remove-tainted-{p['event_id']}",
                           run_config={"ops": {"remove_tainted": {"config": {"model": model}}}})
                for model, p in sorted(latest.items())
                if removable_tainted_versions(warehouse.store(), warehouse.paths, model)]
    return SensorResult(run_requests=requests, cursor=str(promotions[-1]["position"]))


@op
def expire_retention(context: OpExecutionContext, warehouse: WarehouseResource, dvc: DvcResource,
                     project: ProjectConfigResource) -> dict:
    """Expire production-log subjects and corpus documents past their `[retention]` windows."""
    from flywheel.erasure import apply_retention

    report = apply_retention(warehouse.store(), warehouse.paths, hooks=erasure_hooks(context, warehouse, dvc, project))
    context.log.info(f"retention: {report['subjects']} subjects, {report['documents']} documents expired")
    return report


@job(tags={"flywheel/stage": "retention", "flywheel/resource": "trainer"})
def retention_job() -> None:
    """Expire data past its retention window through the erasure machinery."""
    expire_retention()


retention_schedule = ScheduleDefinition(
    name="retention_schedule", job=retention_job, cron_schedule=str(ProjectConfig.load().section("retention").get("cron", "30 2 * * *")),
    execution_timezone="UTC", default_status=DefaultScheduleStatus.RUNNING,
)


def erasure_definitions() -> Definitions:
    """The erasure jobs, sensors and schedule (merged into `flywheel.definitions.defs`)."""
    return Definitions(jobs=[erasure_job, retrain_after_erasure_job, retention_job, remove_tainted_versions_job],
                       sensors=[erasure_sensor, retrain_after_erasure_sensor, tainted_versions_sensor],
                       schedules=[retention_schedule])
