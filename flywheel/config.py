"""Where the system keeps its state, and the project configuration (`flywheel.toml`).

Everything lives under one home directory, `$FLYWHEEL_HOME` (default `./var`):

    warehouse.duckdb   the event log and its projections (the source of truth)
    keys.db            the per-subject keystore (crypto-shredding)
    dagster/           DAGSTER_HOME: Dagster's SQLite storage and compute logs
    mlflow.db, mlartifacts/, dvc/, shards/, checkpoints/, landing/, quarantine/

The project configuration is `flywheel.toml` at the project root (or `$FLYWHEEL_CONFIG`); each section
is read by the part of the system it names.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Paths:
    """Every on-disk location, derived from one home directory."""

    home: Path

    @classmethod
    def from_env(cls) -> Paths:
        return cls(Path(os.environ.get("FLYWHEEL_HOME", "var")).expanduser().resolve())

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse.duckdb"

    @property
    def keystore(self) -> Path:
        return self.home / "keys.db"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def landing(self) -> Path:
        return self.home / "landing"

    @property
    def quarantine(self) -> Path:
        return self.home / "quarantine"

    @property
    def shards(self) -> Path:
        return self.home / "shards"

    @property
    def checkpoints(self) -> Path:
        return self.home / "checkpoints"

    @property
    def mlflow_db(self) -> Path:
        return self.home / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def dvc_repo(self) -> Path:
        return self.home / "dvc"

    def ensure(self) -> Paths:
        """Create the home directory (and the folders others drop files into)."""
        for d in (self.home, self.landing, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        return self


def ensure_dagster_home(paths: Paths) -> Path:
    """Make `$FLYWHEEL_HOME/dagster` a DAGSTER_HOME whose dagster.yaml is the project's own.

    The project's `dagster.yaml` names no absolute paths, so Dagster keeps its SQLite storage,
    compute logs and artifacts under the DAGSTER_HOME it is copied into.
    """
    home = paths.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    src = PROJECT_ROOT / "dagster.yaml"
    dst = home / "dagster.yaml"
    if not dst.exists() or dst.read_bytes() != src.read_bytes():
        shutil.copyfile(src, dst)
    return home


@dataclass(frozen=True)
class Config:
    """The parsed `flywheel.toml`: sections are plain dicts, read by the modules that own them."""

    raw: dict[str, Any]
    source: Path

    @classmethod
    def load(cls, path: Path | None = None) -> Config:
        path = path or Path(os.environ.get("FLYWHEEL_CONFIG", PROJECT_ROOT / "flywheel.toml"))
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"configuration file {path} not found; set FLYWHEEL_CONFIG or run from the project root"
            ) from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from None
        return cls(raw, path)

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.raw.get(name, {}))

    @cached_property
    def ingest(self) -> dict[str, Any]:
        return self.section("ingest")
