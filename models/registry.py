"""MLflow tracking and model registry: embedded SQLite + local artifacts by default.

    tracking = Tracking.local(paths)                      # sqlite:///$FLYWHEEL_HOME/mlflow.db
    with tracking.run("sft_checkpoint", tags={...}) as run:
        run.log_params(config)
        run.log_step(step, {"loss": ...})                 # per-step metrics (training callbacks)
        run.log_dataset("dedup_shards", path, digest, tags={"dvc_md5": ...})
        run.log_loss_plot(history)                        # PNG artifact
        run.log_dir(checkpoint_dir, "checkpoint")
        version = run.register("tiny-llm", "checkpoint", tags={...})
    tracking.set_alias("tiny-llm", "challenger", version)

A server URI (`MLFLOW_TRACKING_URI`, or `[mlflow] tracking_uri` in flywheel.toml) replaces the
embedded store without code changes. MLflow aliases have no compare-and-set: the promotion asset
serializes alias moves through the event store's expected version on a promotion stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

EXPERIMENT = "llm-flywheel"


@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: str
    source: str  # artifact URI of the checkpoint directory
    run_id: str | None
    tags: Mapping[str, str]


class Tracking:
    """One MLflow tracking + registry location."""

    def __init__(self, tracking_uri: str, artifact_root: str | None, experiment: str = EXPERIMENT) -> None:
        import mlflow

        self.uri = tracking_uri
        self._activate()
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = self.client.create_experiment(experiment, artifact_location=artifact_root)
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id

    def _activate(self) -> None:
        """Point mlflow's process-global fluent API (start_run, log_*) at this store.

        mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; the environment is restored so a later
        Tracking.local(other_home) in this process (or a child process) is not sent to this store.
        """
        import mlflow

        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    @classmethod
    def local(cls, home: Path) -> Tracking:
        """The embedded default: SQLite database and artifacts under the flywheel home."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"
        artifacts = (Path(home).resolve() / "mlartifacts").as_uri()
        return cls(uri, artifacts)

    @contextmanager
    def run(self, name: str, *, tags: Mapping[str, str] | None = None) -> Iterator[RunLogger]:
        import mlflow

        self._activate()
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=name, tags=dict(tags or {})) as active:
            yield RunLogger(self, active.info.run_id, active.info.artifact_uri)

    # --- registry ------------------------------------------------------------------------------

    def set_alias(self, model: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(model, alias, version)

    def delete_alias(self, model: str, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model_alias(model, alias)
        except MlflowException:
            pass

    def alias(self, model: str, alias: str) -> ModelVersionRef | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(model, alias)
        except MlflowException:
            return None
        return ModelVersionRef(model, str(mv.version), mv.source, mv.run_id, dict(mv.tags))

    def version(self, model: str, version: str) -> ModelVersionRef:
        mv = self.client.get_model_version(model, version)
        return ModelVersionRef(model, str(mv.version), mv.source, mv.run_id, dict(mv.tags))

    def versions(self, model: str) -> list[ModelVersionRef]:
        return [
            ModelVersionRef(model, str(mv.version), mv.source, mv.run_id, dict(mv.tags))
            for mv in self.client.search_model_versions(f"name='{model}'")
        ]

    def set_version_tag(self, model: str, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(model, version, key, value)

    def local_path(self, ref: ModelVersionRef) -> Path:
        """A local directory holding the version's files (the artifact store is local by default)."""
        import mlflow

        if ref.source.startswith("file://"):
            return Path(ref.source.removeprefix("file://"))
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.source))


@dataclass
class RunLogger:
    tracking: Tracking
    run_id: str
    artifact_uri: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        flat = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in params.items()}
        mlflow.log_params({k: ("" if v is None else v) for k, v in flat.items()})

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})

    def log_dataset(self, name: str, path: str | Path, digest: str, *, context: str = "training",
                    tags: Mapping[str, str] | None = None) -> None:
        """A dataset input: where it is and its content digest (MLflow shows it on the run)."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        ds = MetaDataset(source=resolve_dataset_source(str(path)), name=name, digest=digest[:36])
        mlflow.log_input(ds, context=context, tags=dict(tags or {}))

    def log_dir(self, directory: Path, artifact_path: str) -> str:
        import mlflow

        mlflow.log_artifacts(str(directory), artifact_path=artifact_path)
        return f"{self.artifact_uri}/{artifact_path}"

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_loss_plot(self, history: list[Mapping[str, float]], *, key: str = "loss", title: str = "") -> bytes:
        """Plot `key` over steps; logged as `plots/<key>.png`; returns the PNG bytes."""
        import mlflow

        from flywheel.plots import line_plot_png

        png = line_plot_png([h["step"] for h in history if key in h], [h[key] for h in history if key in h],
                            xlabel="step", ylabel=key, title=title or key)
        mlflow.log_image(_png_to_array(png), artifact_file=f"plots/{key}.png")
        return png

    def register(self, model: str, artifact_path: str, *, tags: Mapping[str, str] | None = None) -> ModelVersionRef:
        from mlflow.exceptions import MlflowException

        client = self.tracking.client
        try:
            client.create_registered_model(model)
        except MlflowException:
            pass  # already registered
        mv = client.create_model_version(model, source=f"{self.artifact_uri}/{artifact_path}", run_id=self.run_id,
                                         tags={k: str(v) for k, v in (tags or {}).items()})
        return ModelVersionRef(model, str(mv.version), mv.source, mv.run_id, dict(mv.tags))


def _png_to_array(png: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def alias_version_source(home: Path, model: str, alias: str = "champion"):
    """A serving version source: (version, local checkpoint dir) of the model's alias, re-read per call.

    The server polls it and reloads when the alias moves (promotion or rollback).
    """

    def source() -> tuple[str, str] | None:
        try:
            tracking = Tracking.local(home)
            ref = tracking.alias(model, alias)
            return None if ref is None else (f"{model}@{ref.version}", str(tracking.local_path(ref)))
        except Exception:  # noqa: BLE001 - a registry hiccup means "no change", never a crash
            return None

    return source
