"""The Dagster entry point: every asset, check, sensor, schedule and resource of the flywheel.

`dagster dev` finds this module through `[tool.dagster]` in pyproject.toml; `make dev` / `flywheel dev`
also point DAGSTER_HOME at `$FLYWHEEL_HOME/dagster` so runs are stored with the rest of the state.
"""

from __future__ import annotations

from dagster import Definitions, load_assets_from_modules

import assets.curation
import assets.evaluation
import assets.loop
import assets.training
import assets.warehouse
from assets.resources import DvcResource, ProjectConfigResource, WarehouseResource
from sensors.failures import failure_sensor, flywheel_loop_job, retrain_schedule
from sensors.health import collect_failures_job, health_alert_sensor
from sensors.lineage import lineage_query_job
from sensors.production_logs import ingest_landing_job, production_log_sensor

defs = Definitions(
    assets=load_assets_from_modules([assets.warehouse, assets.curation, assets.training, assets.evaluation,
                                    assets.loop]),
    asset_checks=[assets.curation.dedup_shard_quality, assets.training.tokenizer_inflation,
                  assets.training.preference_pairs_quality, assets.evaluation.candidate_inputs_uncontaminated,
                  assets.evaluation.sealed_sets_unchanged, assets.loop.synthetic_samples_valid],
    jobs=[ingest_landing_job, flywheel_loop_job, collect_failures_job, lineage_query_job],
    sensors=[production_log_sensor, failure_sensor, health_alert_sensor],
    schedules=[retrain_schedule],
    resources={
        "warehouse": WarehouseResource(),
        "project": ProjectConfigResource(),
        "dvc": DvcResource(),
    },
)

# Erasure and retention (sensors/erasure.py): merged so their jobs see every asset and resource above.
from sensors.erasure import erasure_definitions

defs = Definitions.merge(defs, erasure_definitions())
