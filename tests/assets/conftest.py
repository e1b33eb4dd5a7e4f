"""One flywheel state per test session: the demo data curated and the whole training chain trained.

Built once (it takes a few minutes on 2 cores) with a small training configuration
(`flywheel.test.toml`: the project config with fewer steps), then shared read-mostly by the asset,
evaluation, promotion, lineage and erasure tests. Tests that change the state copy it first.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster import AssetSelection, DagsterInstance, materialize

from tests.conftest import ROOT

SMALL = {"pretrain": {"max_steps": 40, "save_every": 20, "warmup_steps": 5}, "sft_training": {"max_steps": 12},
         "dpo_training": {"max_steps": 6}, "mixture": {"target_samples": 600}, "sft": {"generated_instructions": 60,
         "generated_tasks": 60}, "training": {"threads": 1}}


def small_config(path: Path) -> Path:
    """The project's flywheel.toml with the SMALL overrides applied (same keys, fewer steps)."""
    text = (ROOT / "flywheel.toml").read_text()
    for section, values in SMALL.items():
        for key, value in values.items():
            pattern = re.compile(rf"(\[{section}\][^\[]*?^){key}\s*=.*?$", re.DOTALL | re.MULTILINE)
            text, n = pattern.subn(rf"\g<1>{key} = {value}", text)
            assert n == 1, f"[{section}] {key} not found in flywheel.toml"
    path.write_text(text)
    return path


@dataclass
class FlywheelState:
    home: Path
    instance: DagsterInstance

    def resources(self) -> dict:
        from assets.resources import DvcResource, ProjectConfigResource, WarehouseResource

        return {"warehouse": WarehouseResource(home=str(self.home)), "dvc": DvcResource(home=str(self.home)),
                "project": ProjectConfigResource()}


def all_definitions() -> list:
    """Every asset and check of the project, unbound (the tests pass their own resources)."""
    from dagster import AssetChecksDefinition, AssetsDefinition

    import assets.curation
    import assets.loop
    import assets.training
    import assets.warehouse

    out = []
    for module in (assets.warehouse, assets.curation, assets.training, assets.loop):
        out += [v for v in vars(module).values() if isinstance(v, AssetsDefinition | AssetChecksDefinition)]
    return list({id(d): d for d in out}.values())


def materialize_selection(state: FlywheelState, selection, partition_key: str | None = None):
    result = materialize(all_definitions(), selection=selection, resources=state.resources(), instance=state.instance,
                         partition_key=partition_key, raise_on_error=False)
    assert result.success, [e.event_specific_data for e in result.all_events if e.is_failure]
    return result


@pytest.fixture(scope="session")
def trained_state(tmp_path_factory: pytest.TempPathFactory):
    """Demo data → curation (3 sources) → mixture → tokenizer → base → SFT → DPO (challenger)."""
    import assets.curation as cur
    import assets.training as tr
    import assets.warehouse as wh
    from flywheel import demo_data

    base = tmp_path_factory.mktemp("flywheel")
    home = base / "home"
    (home / "dagster").mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster" / "dagster.yaml")
    saved = {k: os.environ.get(k) for k in ("FLYWHEEL_HOME", "FLYWHEEL_CONFIG", "DAGSTER_HOME")}
    os.environ["FLYWHEEL_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    os.environ["FLYWHEEL_CONFIG"] = str(small_config(base / "flywheel.test.toml"))
    state = FlywheelState(home, DagsterInstance.get())
    demo_data.write_all(home / "demo-data")
    materialize_selection(state, AssetSelection.assets(cur.sealed_eval_index, wh.event_log_projections))
    for source in cur.source_partitions.get_partition_keys():
        materialize_selection(state, AssetSelection.assets(cur.raw_documents, cur.cleaned_documents, cur.dedup_shards),
                              partition_key=source)
    training = [tr.training_mixture, tr.tokenizer, tr.base_checkpoint, tr.sft_dataset, tr.sft_checkpoint,
                tr.preference_pairs, tr.dpo_checkpoint]
    result = materialize_selection(state, AssetSelection.assets(*training) | AssetSelection.checks_for_assets(*training))
    state.training_result = result  # type: ignore[attr-defined]
    yield state
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
