"""The Dagster entry point: every asset, check, sensor, schedule and resource of the flywheel.

`dagster dev` finds this module through `[tool.dagster]` in pyproject.toml; `make dev` / `flywheel dev`
also point DAGSTER_HOME at `$FLYWHEEL_HOME/dagster` so runs are stored with the rest of the state.
"""

from __future__ import annotations

from dagster import Definitions, load_assets_from_modules

import assets.curation
import assets.evaluation
import assets.training
import assets.warehouse
from assets.resources import DvcResource, ProjectConfigResource, WarehouseResource
from sensors.production_logs import ingest_landing_job, production_log_sensor

defs = Definitions(
    assets=load_assets_from_modules([assets.warehouse, assets.curation, assets.training, assets.evaluation]),
    asset_checks=[assets.curation.dedup_shard_quality, assets.training.tokenizer_inflation,
                  assets.training.preference_pairs_quality, assets.evaluation.candidate_inputs_uncontaminated,
                  assets.evaluation.sealed_sets_unchanged],
    jobs=[ingest_landing_job],
    sensors=[production_log_sensor],
    resources={
        "warehouse": WarehouseResource(),
        "project": ProjectConfigResource(),
        "dvc": DvcResource(),
    },
)
