"""MLflow tracking and registry on a real SQLite backend in tmp_path."""

from __future__ import annotations

from pathlib import Path

from models.registry import Tracking


def test_run_with_steps_dataset_plot_artifacts_and_registry_aliases(tmp_path: Path) -> None:
    tracking = Tracking.local(tmp_path)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    history = [{"step": s, "loss": 4.0 - s * 0.5} for s in range(5)]
    with tracking.run("pretrain", tags={"dagster_run_id": "r-1"}) as run:
        run.log_params({"lr": 1e-3, "layers": 2, "note": None})
        for h in history:
            run.log_step(h["step"], {"loss": h["loss"]})
        run.log_dataset("dedup_shards", tmp_path, "d" * 64, tags={"dvc_md5": "abc.dir"})
        png = run.log_loss_plot(history)
        run.log_dir(ckpt, "checkpoint")
        v1 = run.register("tiny-llm", "checkpoint", tags={"asset": "base_checkpoint"})
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    client = tracking.client
    logged = client.get_run(run.run_id)
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [h["loss"] for h in history]
    assert logged.data.params["lr"] == "0.001"
    assert logged.inputs.dataset_inputs[0].dataset.digest == "d" * 36
    arts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"checkpoint", "plots"} <= arts
    assert (tracking.local_path(v1) / "model.safetensors").exists()
    with tracking.run("sft") as run2:
        run2.log_dir(ckpt, "checkpoint")
        v2 = run2.register("tiny-llm", "checkpoint")
    assert (v1.version, v2.version) == ("1", "2")
    tracking.set_alias("tiny-llm", "champion", v1.version)
    tracking.set_alias("tiny-llm", "challenger", v2.version)
    assert tracking.alias("tiny-llm", "champion").version == "1"
    tracking.set_alias("tiny-llm", "champion", v2.version)
    assert tracking.alias("tiny-llm", "champion").version == "2"
    tracking.delete_alias("tiny-llm", "challenger")
    assert tracking.alias("tiny-llm", "challenger") is None
    assert tracking.alias("unknown-model", "champion") is None
    # artifacts live under the flywheel home, not the working directory
    assert str(tmp_path.resolve()) in v1.source


def test_two_homes_in_one_process_keep_their_own_registry(tmp_path: Path) -> None:
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a second home must not inherit the first's store."""
    import os

    first, second = Tracking.local(tmp_path / "a"), Tracking.local(tmp_path / "b")
    assert "MLFLOW_TRACKING_URI" not in os.environ or os.environ["MLFLOW_TRACKING_URI"] not in (first.uri, second.uri)
    assert first.uri != second.uri
    for tracking in (first, second, first):
        with tracking.run("r") as run:
            (tmp_path / "f.txt").write_text("x")
            run.log_file(tmp_path / "f.txt")
            run.register("m", "f.txt")
    assert [v.version for v in first.versions("m")] in (["1", "2"], ["2", "1"])
    assert [v.version for v in second.versions("m")] == ["1"]
