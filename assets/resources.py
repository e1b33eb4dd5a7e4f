"""Dagster resources: the warehouse (event store) and the project configuration.

Each resource has an embedded default (files under `$FLYWHEEL_HOME`); production swaps by config.
"""


from pathlib import Path

from dagster import ConfigurableResource

from flywheel.config import Config, Paths
from warehouse.store import EventStore


class WarehouseResource(ConfigurableResource):
    """The DuckDB event log and keystore under a flywheel home directory.

    `home` defaults to `$FLYWHEEL_HOME` (or `./var`) when left empty.
    """

    home: str = ""

    @property
    def paths(self) -> Paths:
        return Paths(Path(self.home).resolve()) if self.home else Paths.from_env()

    def store(self) -> EventStore:
        return EventStore(self.paths.ensure().warehouse)


class ProjectConfigResource(ConfigurableResource):
    """The project's `flywheel.toml` (or the file named by `path`)."""

    path: str = ""

    def load(self) -> Config:
        return Config.load(Path(self.path) if self.path else None)


class DvcResource(ConfigurableResource):
    """The DVC repository that versions shards and checkpoints: `$FLYWHEEL_HOME/dvc` with a local remote
    (`$FLYWHEEL_HOME/dvc-remote`) by default; `remote` may name another URL/path."""

    home: str = ""
    remote: str = ""

    def repo(self):
        from flywheel.versioning import DvcRepo

        paths = Paths(Path(self.home).resolve()) if self.home else Paths.from_env()
        return DvcRepo.open(paths.dvc_repo, remote=Path(self.remote) if self.remote else paths.home / "dvc-remote")
