"""Shared fixtures: a fresh FLYWHEEL_HOME per test, paths to the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _shared_data() -> Path:
    """The shared real data sets: $FLYWHEEL_SHARED_DATA, else ../shared/data, else /work/shared/data."""
    for candidate in (os.environ.get("FLYWHEEL_SHARED_DATA"), ROOT / ".." / "shared" / "data", "/work/shared/data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return (ROOT / ".." / "shared" / "data").resolve()


SHARED_DATA = _shared_data()

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "true")


def shared(relative: str) -> Path:
    """A file from ../shared/data; the test is skipped (with the reason) where it is absent."""
    p = SHARED_DATA / relative
    if not p.exists():
        pytest.skip(f"shared data set not present: {p}")
    return p


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("FLYWHEEL_HOME", str(h))
    monkeypatch.setenv("DAGSTER_HOME", str(h / "dagster"))
    (h / "dagster").mkdir()
    (h / "dagster" / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    return h


@pytest.fixture
def store(home: Path):
    from warehouse.store import EventStore

    return EventStore(home / "warehouse.duckdb")
