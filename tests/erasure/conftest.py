"""Fixtures for the erasure tests: a private copy of the session's trained flywheel state.

`trained_state` (tests/assets/conftest.py: demo data with the canary user → curation → mixture →
tokenizer → base → SFT → DPO) is built once per session and shared read-mostly; erasure mutates
every store, so each test gets its own copy of the home with its own Dagster instance.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster import DagsterInstance

from tests.assets.conftest import trained_state  # noqa: F401 - the session fixture, shared by these tests


@dataclass
class ErasureState:
    home: Path
    instance: DagsterInstance

    def resources(self) -> dict:
        from assets.resources import DvcResource, ProjectConfigResource, WarehouseResource

        return {"warehouse": WarehouseResource(home=str(self.home)), "dvc": DvcResource(home=str(self.home)),
                "project": ProjectConfigResource()}


def relocate_home(home: Path, old: Path) -> None:
    """Make a copied home self-contained: the DVC remote URL, MLflow's artifact locations and the
    manifest paths recorded in the copied event log name the copy, not the original."""
    import sqlite3

    from warehouse.store import EventStore

    old_s, new_s = str(old), str(home)
    config = home / "dvc" / ".dvc" / "config"
    config.write_text(config.read_text().replace(old_s, new_s))
    con = sqlite3.connect(home / "mlflow.db")
    with con:
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            for col in [r[1] for r in con.execute(f'PRAGMA table_info("{table}")').fetchall()]:
                con.execute(f'UPDATE "{table}" SET "{col}" = replace("{col}", ?, ?) WHERE typeof("{col}") = \'text\' '
                            f'AND instr("{col}", ?) > 0', (old_s, new_s, old_s))
    con.close()
    with EventStore(home / "warehouse.duckdb").connect() as db:
        db.execute("UPDATE events SET payload = replace(payload::VARCHAR, $old, $new)::JSON "
                   "WHERE contains(payload::VARCHAR, $old)", {"old": old_s, "new": new_s})


@pytest.fixture
def state_copy(trained_state, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    """A copy of the trained home under tmp_path; FLYWHEEL_HOME and DAGSTER_HOME point at it."""
    home = tmp_path / "home"
    shutil.copytree(trained_state.home, home, ignore=shutil.ignore_patterns("*.lock"))
    relocate_home(home, trained_state.home)
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    instance = DagsterInstance.from_config(str(home / "dagster"))
    yield ErasureState(home, instance)
    instance.dispose()
