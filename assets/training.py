"""Training assets: training_mixture → tokenizer → base_checkpoint → sft_checkpoint → dpo_checkpoint,
with sft_dataset and preference_pairs beside them.

Every training asset is an MLflow run (params, per-step metrics, loss plot, dataset inputs with the
manifest digest and DVC md5, artifacts), registers its checkpoint as a version of the model in the
registry (tags: Dagster run id, asset key, data versions, stage), tracks it with DVC, and records
`CheckpointTrained` with a manifest of every sample it saw — so lineage can answer "which models saw
sample X". The DPO checkpoint is the candidate: it gets the `challenger` alias.
"""

import json
import os
import shutil
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from assets.curation import dedup_shards, open_eval_index
from assets.resources import DvcResource, ProjectConfigResource, WarehouseResource
from assets.warehouse import event_log_projections
from flywheel.config import Paths
from flywheel.plots import bar_png, line_plot_png, markdown_image, markdown_table
from flywheel.shards import write_parquet_atomic

TRAINER_TAGS = {"flywheel/resource": "trainer"}  # one training run at a time (dagster.yaml)
# assets/loop.py's output, named by key (that module imports this one); a turn without it reads no file
SYNTHETIC_SAMPLES = AssetKey("synthetic_samples")
INPUT_COLUMNS = ["sample_id", "doc_id", "source", "license", "subject_id", "origin_event_id", "parent_ids",
                 "shard_stage", "shard_source", "shard_md5"]


def _settings(project: ProjectConfigResource, section: str) -> dict[str, Any]:
    return project.load().section(section)


def model_name(project: ProjectConfigResource) -> str:
    return _settings(project, "serving").get("model", "tiny-llm")


def _dir(paths: Paths, *parts: str) -> Path:
    return paths.dvc_repo.joinpath(*parts)


def _uuid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def _threads(project: ProjectConfigResource) -> None:
    import torch

    torch.set_num_threads(int(_settings(project, "training").get("threads", os.cpu_count() or 1)))


def _record_checkpoint(store, *, stage: str, model: str, version: str | None, checkpoint: Path, md5: str | None,
                       inputs: pa.Table, paths: Paths, parent: str | None, run_id: str | None, dagster_run: str,
                       metrics: dict[str, float]) -> Path:
    """Write the inputs manifest for this checkpoint version and record CheckpointTrained."""
    from flywheel.shards import content_digest
    from warehouse.events import CheckpointTrained
    from warehouse.store import NewEvent

    manifest = paths.home / "lineage" / "training" / stage / f"{(md5 or 'unversioned').removesuffix('.dir')}.parquet"
    inputs = _inputs_frame(inputs)
    write_parquet_atomic(inputs, manifest)
    digest = content_digest(inputs.append_column("text", pa.array([""] * inputs.num_rows, pa.string())))
    event = CheckpointTrained(stage=stage, model_name=model, model_version=version, checkpoint_path=str(checkpoint),
                              checkpoint_md5=md5, inputs_manifest=str(manifest), inputs_digest=digest,
                              samples=inputs.num_rows, parent_model_version=parent, mlflow_run_id=run_id,
                              dagster_run_id=dagster_run, metrics={k: float(v) for k, v in metrics.items()})
    store.append([NewEvent(event, f"model-{model}", datetime.now(UTC), event_id=_uuid(f"ckpt:{stage}:{md5}:{digest}:{version}:{dagster_run}"))])
    return manifest


def _inputs_frame(table: pa.Table) -> pa.Table:
    cols = {}
    for name in INPUT_COLUMNS:
        if name in table.column_names:
            cols[name] = table.column(name).cast(pa.list_(pa.string()) if name == "parent_ids" else pa.string())
        else:
            cols[name] = pa.array([[]] * table.num_rows, pa.list_(pa.string())) if name == "parent_ids" else \
                pa.nulls(table.num_rows, pa.string())
    return pa.table(cols)


def _loss_plot(history: list[dict[str, float]], title: str) -> str:
    steps = [h["step"] for h in history if "loss" in h]
    return markdown_image(line_plot_png(steps, [h["loss"] for h in history if "loss" in h], xlabel="step", ylabel="loss",
                                        title=title))


def _latest_shards(store) -> dict[str, Any]:
    """The current dedup shard version per source (the last ShardMaterialized of stage dedup)."""
    latest: dict[str, Any] = {}
    for e in store.read(types=["ShardMaterialized"]):
        if e.data.stage == "dedup":
            latest[e.data.source] = e.data
    return latest


# --- mixture --------------------------------------------------------------------------------------


@asset(group_name="training", deps=[dedup_shards], kinds={"parquet", "dvc"})
def training_mixture(context: AssetExecutionContext, warehouse: WarehouseResource, dvc: DvcResource,
                     project: ProjectConfigResource) -> MaterializeResult:
    """Temperature-weighted sample of every source's current dedup shard (weights from the sources config,
    per-source caps, license allow-list), with a held-out slice per source; a manifest names each sample
    and the exact shard version (DVC md5) it came from."""
    from assets.curation import load_source, shard_dir
    from flywheel.mixing import MixtureConfig, build_mixture

    paths = warehouse.paths
    store = warehouse.store()
    shards = _latest_shards(store)
    if not shards:
        raise RuntimeError("no dedup shard has been materialized yet: materialize dedup_shards first")
    tables, weights = {}, {}
    for source, info in sorted(shards.items()):
        t = pq.read_table(shard_dir(paths, "dedup", source) / "part-00000.parquet")
        n = t.num_rows
        tables[source] = t.append_column("shard_stage", pa.array(["dedup"] * n)).append_column(
            "shard_source", pa.array([source] * n)).append_column("shard_md5", pa.array([info.dvc_md5] * n))
        try:
            weights[source] = load_source(paths, source).weight
        except Exception:  # noqa: BLE001 - a source no longer configured keeps weight 1
            weights[source] = 1.0
    settings = project.load()
    cfg = MixtureConfig.from_dict(settings.section("mixture"), weights=weights,
                                  allowed_licenses=settings.section("curation").get("allowed_licenses", []))
    mix = build_mixture(tables, cfg)
    out = _dir(paths, "mixtures", "current")
    write_parquet_atomic(mix.samples, out / "mixture.parquet")
    write_parquet_atomic(mix.heldout, out / "heldout.parquet")
    write_parquet_atomic(_inputs_frame(mix.samples), out / "manifest.parquet")
    (out / "quotas.json").write_text(json.dumps(mix.quotas, indent=2, sort_keys=True))
    version = dvc.repo().track(out)
    rows = [{"source": s, **{k: round(v, 4) for k, v in q.items()}} for s, q in sorted(mix.quotas.items())]
    return MaterializeResult(
        metadata={
            "samples": mix.samples.num_rows, "heldout": mix.heldout.num_rows, "refused_by_license": mix.refused.num_rows,
            "quotas": MetadataValue.md(markdown_table(rows)),
            "mix": MetadataValue.md(markdown_image(bar_png([r["source"] for r in rows], [r["quota"] for r in rows],
                                                           ylabel="samples", title="mixture by source"))),
            "shard_versions": MetadataValue.json({s: i.dvc_md5 for s, i in shards.items()}),
            "dvc_md5": version.md5, "config": MetadataValue.json(asdict(cfg)),
        },
        data_version=DataVersion(version.md5),
    )


def _mixture(paths: Paths) -> tuple[pa.Table, pa.Table, str]:
    out = _dir(paths, "mixtures", "current")
    if not (out / "mixture.parquet").exists():
        raise FileNotFoundError(f"{out}/mixture.parquet missing: materialize training_mixture first")
    from flywheel.versioning import DvcRepo

    md5 = DvcRepo(paths.dvc_repo, paths.home / "dvc-remote").version_of(out).md5
    return pq.read_table(out / "mixture.parquet"), pq.read_table(out / "heldout.parquet"), md5


# --- tokenizer ------------------------------------------------------------------------------------


@asset(group_name="training", deps=[training_mixture], kinds={"huggingface", "dvc"})
def tokenizer(context: AssetExecutionContext, warehouse: WarehouseResource, dvc: DvcResource,
              project: ProjectConfigResource) -> MaterializeResult:
    """Byte-level BPE trained on the mixture, with a chat template, and its tokenization audit per source
    (tokens per char/word, bytes per token, byte-fallback rate) against the previous version."""
    from models.config import TokenizerConfig
    from models.registry import Tracking
    from models.tokenizer import audit_table, audit_tokenizer, load_tokenizer, save_tokenizer, train_tokenizer

    paths = warehouse.paths
    mixture, heldout, mix_md5 = _mixture(paths)
    cfg = TokenizerConfig(**_settings(project, "tokenizer"))
    current = _dir(paths, "tokenizers", "current")
    previous = load_tokenizer(current) if (current / "tokenizer.json").exists() else None
    texts = list(dict.fromkeys(t for t in mixture.column("text").to_pylist() if t))
    tok = train_tokenizer(texts, cfg)
    samples: dict[str, list[str]] = {}
    audit_src = heldout if heldout.num_rows else mixture
    for r in audit_src.select(["source", "text"]).to_pylist():
        samples.setdefault(r["source"], []).append(r["text"])
    rows = audit_tokenizer(tok, samples, previous=previous)
    staging = current.with_name("staging")
    shutil.rmtree(staging, ignore_errors=True)
    save_tokenizer(tok, staging)
    (staging / "audit.json").write_text(json.dumps({"max_inflation": cfg.max_inflation, "rows": rows}, indent=2))
    if current.exists():
        shutil.rmtree(current.with_name("previous"), ignore_errors=True)
        current.rename(current.with_name("previous"))
    staging.rename(current)
    version = dvc.repo().track(current)
    tracking = Tracking.local(paths.home)
    with tracking.run("tokenizer", tags={"dagster_run_id": context.run.run_id, "asset": "tokenizer"}) as run:
        run.log_params(asdict(cfg))
        run.log_dataset("training_mixture", _dir(paths, "mixtures", "current"), mix_md5, tags={"dvc_md5": mix_md5})
        run.log_dir(current, "tokenizer")
        run.log_metrics({f"tokens_per_char/{r['domain']}": r["tokens_per_char"] for r in rows})
    _record_checkpoint(warehouse.store(), stage="tokenizer", model=model_name(project), version=None, checkpoint=current,
                       md5=version.md5, inputs=mixture, paths=paths, parent=None, run_id=run.run_id,
                       dagster_run=context.run.run_id, metrics={"vocab_size": float(len(tok))})
    table = audit_table(rows)
    shown = ["domain", "tokens_per_char", "tokens_per_word", "bytes_per_token", "fallback_rate", "inflation"]
    return MaterializeResult(
        metadata={"vocab_size": len(tok), "dvc_md5": version.md5, "mlflow_run_id": run.run_id,
                  "audit": MetadataValue.md(markdown_table(table.select(shown).to_pylist())),
                  "previous_version": previous is not None},
        data_version=DataVersion(version.md5),
    )


@asset_check(asset=tokenizer, blocking=True, description="tokenization audit: no domain inflates tokens per "
             "character beyond [tokenizer] max_inflation vs the previous version, and every text round-trips")
def tokenizer_inflation(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    from models.tokenizer import check_inflation

    audit = json.loads((_dir(warehouse.paths, "tokenizers", "current") / "audit.json").read_text())
    verdict = check_inflation(audit["rows"], audit["max_inflation"])
    passed = verdict is True
    return AssetCheckResult(
        passed=passed, severity=AssetCheckSeverity.ERROR,
        metadata={"reason": "" if passed else verdict[1], "max_inflation": audit["max_inflation"],
                  "inflation": MetadataValue.json({r["domain"]: r.get("inflation") for r in audit["rows"]})},
    )


# --- checkpoints ----------------------------------------------------------------------------------


def _publish_checkpoint(context, *, warehouse: WarehouseResource, dvc: DvcResource, project: ProjectConfigResource,
                        stage: str, result, target: Path, inputs: pa.Table, params: dict[str, Any],
                        datasets: list[tuple[str, Path, str]], parent: str | None) -> tuple[Any, Any, Any]:
    """Copy the trained model into the DVC repo, track it, log the MLflow run, register the version."""
    from models.registry import Tracking

    paths = warehouse.paths
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(result.output_dir, target)
    version = dvc.repo().track(target)
    tracking = Tracking.local(paths.home)
    model = model_name(project)
    tags = {"dagster_run_id": context.run.run_id, "asset": context.asset_key.to_user_string(), "stage": stage}
    with tracking.run(context.asset_key.to_user_string(), tags=tags) as run:
        run.log_params(params)
        for i, h in enumerate(result.history):
            run.log_step(int(h.get("step", i)), {k: v for k, v in h.items() if k != "step" and isinstance(v, int | float)})
        for name, path, md5 in datasets:
            run.log_dataset(name, path, md5, tags={"dvc_md5": md5})
        if result.history:
            run.log_loss_plot(result.history, title=f"{stage} loss")
        run.log_metrics(result.final_metrics)
        run.log_dir(target, "checkpoint")
        mv = run.register(model, "checkpoint", tags={**tags, "checkpoint_md5": version.md5,
                                                     "data_versions": json.dumps([d[2] for d in datasets])})
    _record_checkpoint(warehouse.store(), stage=stage, model=model, version=mv.version, checkpoint=target, md5=version.md5,
                       inputs=inputs, paths=paths, parent=parent, run_id=run.run_id, dagster_run=context.run.run_id,
                       metrics=result.final_metrics)
    return version, mv, run


def _checkpoint_metadata(result, version, mv, run, stage: str) -> dict[str, Any]:
    return {
        "model_version": mv.version, "dvc_md5": version.md5, "mlflow_run_id": run.run_id,
        "final_loss": float(result.final_metrics.get("loss", result.history[-1]["loss"] if result.history else 0.0)),
        "tokens_seen": result.tokens_seen, "wall_time_s": round(result.wall_time_s, 1),
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        "loss_curve": MetadataValue.md(_loss_plot(result.history, f"{stage} loss")),
    }


def _registered_version(store, stage: str) -> str | None:
    """The registry version of the latest checkpoint of a stage (from CheckpointTrained)."""
    found = [e.data for e in store.read(types=["CheckpointTrained"]) if e.data.stage == stage]
    return found[-1].model_version if found else None


@asset(group_name="training", deps=[training_mixture, tokenizer], kinds={"pytorch", "mlflow", "dvc"}, op_tags=TRAINER_TAGS)
def base_checkpoint(context: AssetExecutionContext, warehouse: WarehouseResource, dvc: DvcResource,
                    project: ProjectConfigResource) -> MaterializeResult:
    """Tiny Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA) pretrained next-token on the mixture: AdamW,
    cosine schedule with warmup, gradient clipping, bf16 where faster; safetensors only."""
    from models.config import PretrainConfig
    from models.pretrain import pretrain
    from models.tokenizer import load_tokenizer

    _threads(project)
    paths = warehouse.paths
    mixture, _, mix_md5 = _mixture(paths)
    tok_dir = _dir(paths, "tokenizers", "current")
    cfg = PretrainConfig(output_dir=str(paths.home / "work" / "pretrain"), **_settings(project, "pretrain"))
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a new mixture or tokenizer starts a new run
    result = pretrain(cfg, load_tokenizer(tok_dir), mixture.column("text").to_pylist(),
                      on_log=lambda step, m: context.log.debug(f"step {step}: {m}") if step % 50 == 0 else None)
    version, mv, run = _publish_checkpoint(
        context, warehouse=warehouse, dvc=dvc, project=project, stage="pretrain", result=result,
        target=_dir(paths, "checkpoints", "base"), inputs=mixture, params=asdict(cfg),
        datasets=[("training_mixture", _dir(paths, "mixtures", "current"), mix_md5)], parent=None)
    return MaterializeResult(metadata=_checkpoint_metadata(result, version, mv, run, "pretrain"),
                             data_version=DataVersion(version.md5))


@asset(group_name="training", deps=[event_log_projections, SYNTHETIC_SAMPLES], kinds={"parquet", "dvc"})
def sft_dataset(context: AssetExecutionContext, warehouse: WarehouseResource, dvc: DvcResource,
                project: ProjectConfigResource) -> MaterializeResult:
    """Instruction conversations (files or generated, incl. JSON-schema tasks), thumbs-up production
    interactions from the event log (PII-scrubbed), and synthetic samples from failure cases — each with
    its lineage (subjects, origin event, parents). Items that overlap a sealed eval set are excluded."""
    from flywheel.curation.decontam import decontaminate_table
    from models import datasets as ds

    paths = warehouse.paths
    settings = _settings(project, "sft")
    rows = ds.generated_instructions(int(settings.get("generated_instructions", 200)),
                                     int(settings.get("generated_tasks", 200)), int(settings.get("seed", 1)))
    root = os.environ.get("FLYWHEEL_DATA_ROOT") or settings.get("data_root")
    if settings.get("instruction_files") and root:
        rows += ds.file_instructions([Path(root) / f for f in settings["instruction_files"]],
                                     license=settings.get("instruction_license", "Apache-2.0"))
    production = ds.production_sft(warehouse.store())
    synthetic_path = paths.dvc_repo / "synthetic" / "current" / "sft.parquet"
    synthetic = ds.synthetic_sft(pq.read_table(synthetic_path) if synthetic_path.exists() else None)
    table = ds.sft_table(rows + production + synthetic)
    probe = pa.table({"doc_id": table.column("sample_id"), "text": pa.array(ds.texts_of_sft(table))})
    clean, contaminated = decontaminate_table(probe, open_eval_index(paths))
    if contaminated.num_rows:
        table = table.filter(pc.is_in(table.column("sample_id"), clean.column("doc_id")))
    out = _dir(paths, "datasets", "sft")
    write_parquet_atomic(table, out / "sft.parquet")
    version = dvc.repo().track(out)
    by_source = {c["values"]: c["counts"] for c in pc.value_counts(table.column("source")).to_pylist()}
    return MaterializeResult(
        metadata={"conversations": table.num_rows, "by_source": MetadataValue.json(by_source),
                  "production": len(production), "synthetic": len(synthetic), "excluded_contaminated": contaminated.num_rows,
                  "dvc_md5": version.md5},
        data_version=DataVersion(version.md5),
    )


@asset(group_name="training", deps=[base_checkpoint, sft_dataset], kinds={"pytorch", "mlflow", "dvc"}, op_tags=TRAINER_TAGS)
def sft_checkpoint(context: AssetExecutionContext, warehouse: WarehouseResource, dvc: DvcResource,
                   project: ProjectConfigResource) -> MaterializeResult:
    """The base checkpoint fine-tuned with TRL's SFTTrainer + LoRA (assistant-only loss), adapter merged."""
    from models.config import SFTTrainingConfig
    from models.sft import train_sft

    _threads(project)
    paths = warehouse.paths
    data_dir = _dir(paths, "datasets", "sft")
    table = pq.read_table(data_dir / "sft.parquet")
    cfg = SFTTrainingConfig(output_dir=str(paths.home / "work" / "sft"), **_settings(project, "sft_training"))
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    records = [{"messages": m} for m in table.column("messages").to_pylist()]
    result = train_sft(cfg, _dir(paths, "checkpoints", "base"), records)
    from flywheel.versioning import DvcRepo

    md5 = DvcRepo(paths.dvc_repo, paths.home / "dvc-remote").version_of(data_dir).md5
    version, mv, run = _publish_checkpoint(
        context, warehouse=warehouse, dvc=dvc, project=project, stage="sft", result=result,
        target=_dir(paths, "checkpoints", "sft"), inputs=table, params=asdict(cfg),
        datasets=[("sft_dataset", data_dir, md5)], parent=_registered_version(warehouse.store(), "pretrain"))
    return MaterializeResult(metadata=_checkpoint_metadata(result, version, mv, run, "sft"),
                             data_version=DataVersion(version.md5))


@asset(group_name="training", deps=[event_log_projections, SYNTHETIC_SAMPLES], kinds={"parquet", "dvc"})
def preference_pairs(context: AssetExecutionContext, warehouse: WarehouseResource, dvc: DvcResource,
                     project: ProjectConfigResource) -> MaterializeResult:
    """Chosen/rejected pairs: user corrections vs the corrected answer, thumbs-up vs thumbs-down answers
    to the same prompt, safety pairs (refuse harmful, help benign) and synthetic contrastive pairs; every
    pair keeps its parents' ids and subjects."""
    from models import datasets as ds

    paths = warehouse.paths
    settings = _settings(project, "preferences")
    rows = ds.feedback_pairs(warehouse.store())
    rows += ds.generated_safety_pairs(int(settings.get("generated_safety", 80)), int(settings.get("seed", 2)))
    root = os.environ.get("FLYWHEEL_DATA_ROOT") or settings.get("data_root")
    if settings.get("hh_rlhf_file") and root:
        rows += ds.hh_rlhf_pairs(Path(root) / settings["hh_rlhf_file"], int(settings.get("hh_rlhf_limit", 200)))
    synthetic_path = paths.dvc_repo / "synthetic" / "current" / "preferences.parquet"
    rows += ds.synthetic_pairs(pq.read_table(synthetic_path) if synthetic_path.exists() else None)
    table = ds.pair_table(rows)
    out = _dir(paths, "datasets", "preferences")
    write_parquet_atomic(table, out / "pairs.parquet")
    version = dvc.repo().track(out)
    kinds = pc.value_counts(table.column("kind")).to_pylist()
    return MaterializeResult(
        metadata={"pairs": table.num_rows, "by_kind": MetadataValue.json({k["values"]: k["counts"] for k in kinds}),
                  "dvc_md5": version.md5,
                  "preview": MetadataValue.md(markdown_table([{k: (r[k] or "")[:60] for k in ("prompt", "chosen", "rejected")}
                                                              for r in table.slice(0, 5).to_pylist()]))},
        data_version=DataVersion(version.md5),
    )


@asset_check(asset=preference_pairs, blocking=True, description="great-expectations suite: non-empty, unique ids, "
             "chosen != rejected, length bounds, no eval 13-gram in prompt/chosen/rejected")
def preference_pairs_quality(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    from flywheel.quality import preference_expectations, validate

    table = pq.read_table(_dir(warehouse.paths, "datasets", "preferences") / "pairs.parquet")
    texts = [f"{r['prompt']}\n{r['chosen']}\n{r['rejected']}" for r in table.to_pylist()]
    index = open_eval_index(warehouse.paths)
    doc_rows, _, _ = index.ngram_hits(texts) if texts else ([], [], [])
    import numpy as np

    hits = np.bincount(np.asarray(doc_rows, dtype=np.int64), minlength=len(texts))
    derived = pa.table({
        "pair_id": table.column("pair_id"), "prompt_text": table.column("prompt"), "chosen_text": table.column("chosen"),
        "rejected_text": table.column("rejected"),
        "chosen_equals_rejected": pc.equal(pc.utf8_trim_whitespace(table.column("chosen")),
                                           pc.utf8_trim_whitespace(table.column("rejected"))),
        "eval_ngram_hits": pa.array(hits, pa.int64()),
    })
    outcomes = validate(derived, preference_expectations(min_chars=1, max_chars=20_000), name="preference_pairs")
    failed = [o.name for o in outcomes if not o.passed]
    return AssetCheckResult(passed=not failed, severity=AssetCheckSeverity.ERROR,
                            metadata={"failed": MetadataValue.json(failed),
                                      "results": MetadataValue.json({o.name: o.observed for o in outcomes})})


@asset(group_name="training", deps=[sft_checkpoint, preference_pairs], kinds={"pytorch", "mlflow", "dvc"},
       op_tags=TRAINER_TAGS)
def dpo_checkpoint(context: AssetExecutionContext, warehouse: WarehouseResource, dvc: DvcResource,
                   project: ProjectConfigResource) -> MaterializeResult:
    """The SFT model aligned with TRL's DPOTrainer + LoRA (reference: the adapter-disabled model), merged:
    the candidate. Registered and given the `challenger` alias."""
    from flywheel.versioning import DvcRepo
    from models import datasets as ds
    from models.config import DPOTrainingConfig
    from models.dpo import train_dpo
    from models.registry import Tracking

    _threads(project)
    paths = warehouse.paths
    data_dir = _dir(paths, "datasets", "preferences")
    table = pq.read_table(data_dir / "pairs.parquet")
    cfg = DPOTrainingConfig(output_dir=str(paths.home / "work" / "dpo"), **_settings(project, "dpo_training"))
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    result = train_dpo(cfg, _dir(paths, "checkpoints", "sft"), ds.as_trl_pairs(table))
    md5 = DvcRepo(paths.dvc_repo, paths.home / "dvc-remote").version_of(data_dir).md5
    inputs = table.rename_columns(["sample_id" if c == "pair_id" else c for c in table.column_names])
    version, mv, run = _publish_checkpoint(
        context, warehouse=warehouse, dvc=dvc, project=project, stage="dpo", result=result,
        target=_dir(paths, "checkpoints", "dpo"), inputs=inputs, params=asdict(cfg),
        datasets=[("preference_pairs", data_dir, md5)], parent=_registered_version(warehouse.store(), "sft"))
    Tracking.local(paths.home).set_alias(model_name(project), "challenger", mv.version)
    return MaterializeResult(metadata={**_checkpoint_metadata(result, version, mv, run, "dpo"), "alias": "challenger"},
                             data_version=DataVersion(version.md5))
