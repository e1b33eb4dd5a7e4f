"""Curation assets: raw_documents → cleaned_documents → dedup_shards, one partition per source.

Every materialization writes a shard version (Parquet + manifest, atomically), tracks it with DVC
(`dvc add` + `dvc push` to the local remote), keeps a copy of its manifest per version for lineage,
and records `ShardMaterialized` in the event log. A source (partition) can be re-materialized alone:
erasure does exactly that. Logic lives in `flywheel.curation.pipeline`; these bodies are glue.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    StaticPartitionsDefinition,
    asset,
    asset_check,
)

from assets.resources import DvcResource, ProjectConfigResource, WarehouseResource
from flywheel.config import PROJECT_ROOT, Config, Paths
from flywheel.plots import histogram_png, markdown_image, markdown_table
from flywheel.shards import ShardInfo, write_shard

STAGES = ("raw", "clean", "dedup")


def sources_file() -> Path:
    """The sources config this deployment reads: $FLYWHEEL_SOURCES, else [curation] sources."""
    name = os.environ.get("FLYWHEEL_SOURCES") or Config.load().section("curation").get("sources", "sources.demo.toml")
    path = Path(name)
    return path if path.is_absolute() else PROJECT_ROOT / path


def data_root(paths: Paths) -> Path:
    """Where relative source paths point: $FLYWHEEL_DATA_ROOT, [curation] data_root, or the demo data."""
    configured = os.environ.get("FLYWHEEL_DATA_ROOT") or Config.load().section("curation").get("data_root")
    return Path(configured).expanduser().resolve() if configured else paths.home / "demo-data"


def _source_names() -> list[str]:
    from flywheel.curation.sources import load_sources

    return [s.name for s in load_sources(sources_file(), Path("/nonexistent"), allow_missing=True)]


source_partitions = StaticPartitionsDefinition(_source_names())


def load_source(paths: Paths, name: str):
    from flywheel.curation.sources import load_sources

    (source,) = load_sources(sources_file(), data_root(paths), names=[name])
    return source


def shard_dir(paths: Paths, stage: str, source: str) -> Path:
    return paths.dvc_repo / "shards" / stage / source


def exclusions_dir(paths: Paths, stage: str, source: str) -> Path:
    return paths.dvc_repo / "exclusions" / stage / source


def lineage_manifest(paths: Paths, stage: str, source: str, md5: str) -> Path:
    return paths.home / "lineage" / "manifests" / stage / source / f"{md5.removesuffix('.dir')}.parquet"


def read_shard(paths: Paths, stage: str, source: str) -> pa.Table:
    data = shard_dir(paths, stage, source) / "part-00000.parquet"
    if not data.exists():
        raise FileNotFoundError(f"{data} does not exist: materialize the {stage} stage of source {source!r} first")
    return pq.read_table(data)


def publish_shard(
    context: AssetExecutionContext,
    *,
    paths: Paths,
    dvc: DvcResource,
    warehouse: WarehouseResource,
    stage: str,
    source: str,
    kept: pa.Table,
    excluded: pa.Table | None,
) -> tuple[ShardInfo, Any]:
    """Write the shard (+ exclusions), DVC-track both, keep the manifest per version, record the event."""
    from datetime import UTC, datetime

    from warehouse.events import ShardMaterialized
    from warehouse.store import NewEvent

    repo = dvc.repo()
    info = write_shard(kept, shard_dir(paths, stage, source), stage=stage, source=source)
    version = repo.track(shard_dir(paths, stage, source))
    if excluded is not None:
        exdir = exclusions_dir(paths, stage, source)
        exdir.mkdir(parents=True, exist_ok=True)
        from flywheel.shards import write_parquet_atomic

        write_parquet_atomic(excluded, exdir / "excluded.parquet")
        repo.track(exdir)
    manifest_copy = lineage_manifest(paths, stage, source, version.md5)
    manifest_copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(info.manifest_file, manifest_copy)
    event = ShardMaterialized(
        stage=stage, source=source, path=version.path, dvc_md5=version.md5, content_digest=info.content_digest,
        sample_ids_digest=info.sample_ids_digest, rows=info.rows, manifest=str(manifest_copy),
        data_version=version.md5, dagster_run_id=context.run.run_id,
    )
    warehouse.store().append(
        [NewEvent(event, f"shard-{stage}-{source}", datetime.now(UTC),
                  # one event per (shard version, run): a retried run is a no-op, a later run that
                  # re-materializes identical data records that it did (its own run id)
                  event_id=_uuid(f"shard:{stage}:{source}:{version.md5}:{info.content_digest}:{context.run.run_id}"))]
    )
    return info, version


def _uuid(name: str) -> str:
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def _preview(table: pa.Table, n: int = 5) -> str:
    rows = []
    for r in table.slice(0, n).to_pylist():
        text = (r.get("text") or "").replace("\n", " ")
        rows.append({"doc_id": r["doc_id"][:12], "subject": (r.get("subject_id") or "")[:10],
                     "text": text[:140] + ("…" if len(text) > 140 else "")})
    return markdown_table(rows)


def _common_metadata(info: ShardInfo, version) -> dict[str, Any]:
    return {
        "rows": info.rows,
        "dvc_md5": version.md5,
        "content_digest": info.content_digest,
        "shard_path": MetadataValue.path(info.data_file),
        "manifest": MetadataValue.path(info.manifest_file),
    }


@asset(group_name="curation", partitions_def=source_partitions, kinds={"parquet", "dvc"})
def raw_documents(
    context: AssetExecutionContext, warehouse: WarehouseResource, dvc: DvcResource
) -> MaterializeResult:
    """Every document of one configured source, read by its format's reader, with subjects pseudonymized.

    Bad records and the documents of erased subjects go to the exclusions (erased: id and reason only).
    """
    from flywheel.curation.pipeline import read_stage
    from flywheel.erasure import drop_erased_documents, erased_documents

    paths = warehouse.paths
    name = context.partition_key
    store = warehouse.store()
    result = read_stage(load_source(paths, name), pseudonymize=store.keys.pseudonymize,
                        erased_subjects=store.keys.shredded_subjects())
    # erased near-duplicate copies and retention-expired documents (flywheel/erasure.py)
    kept, excluded, erased_docs = drop_erased_documents(result.kept, result.excluded, erased_documents(paths))
    info, version = publish_shard(context, paths=paths, dvc=dvc, warehouse=warehouse, stage="raw", source=name,
                                  kept=_as_samples(kept), excluded=excluded)
    return MaterializeResult(
        metadata={**_common_metadata(info, version), **result.metrics, "excluded": excluded.num_rows,
                  "erased_documents": erased_docs, "preview": MetadataValue.md(_preview(kept))},
        data_version=DataVersion(version.md5),
    )


def _as_samples(docs: pa.Table) -> pa.Table:
    from flywheel.shards import with_sample_ids

    return with_sample_ids(docs)


@asset(group_name="curation", partitions_def=source_partitions, deps=[raw_documents], kinds={"parquet", "dvc"})
def cleaned_documents(
    context: AssetExecutionContext, warehouse: WarehouseResource, dvc: DvcResource
) -> MaterializeResult:
    """Normalized (ftfy + NFKC), boilerplate stripped by frequency, quality-filtered (Gopher/C4) and
    PII-scrubbed documents; dropped ones go to the exclusions with their reason."""
    from flywheel.curation.pipeline import clean_stage

    paths = warehouse.paths
    name = context.partition_key
    raw = read_shard(paths, "raw", name)
    source = load_source(paths, name)
    result = clean_stage(raw.drop_columns(["sample_id"]), quality=dict(source.quality), boilerplate=source.boilerplate)
    info, version = publish_shard(context, paths=paths, dvc=dvc, warehouse=warehouse, stage="clean", source=name,
                                  kept=result.kept, excluded=result.excluded)
    m = result.metrics
    lengths = [len(t or "") for t in result.kept.column("text").to_pylist()]
    reasons = [{"reason": k, "documents": v} for k, v in sorted(m["dropped_by_reason"].items(), key=lambda x: -x[1])]
    return MaterializeResult(
        metadata={
            **_common_metadata(info, version),
            "documents_in": m["documents_in"],
            "documents_out": m["documents_out"],
            "dropped_by_reason": MetadataValue.md(markdown_table(reasons)),
            "pii_spans_by_type": MetadataValue.json(m["pii_spans_by_type"]),
            "boilerplate_lines_removed": m["boilerplate"]["lines_removed"],
            "boilerplate_top_lines": MetadataValue.json(m["boilerplate"]["top_lines"][:10]),
            "token_estimate": m["token_estimate"],
            "length_histogram": MetadataValue.md(markdown_image(
                histogram_png(lengths or [0], xlabel="characters per document", title=f"{name}: cleaned lengths"))),
            "scrubbed_preview": MetadataValue.md(_preview(result.kept)),
        },
        data_version=DataVersion(version.md5),
    )


@asset(group_name="evaluation", kinds={"numpy"})
def sealed_eval_index(context: AssetExecutionContext, warehouse: WarehouseResource,
                      project: ProjectConfigResource) -> MaterializeResult:
    """13-gram and MinHash index of the sealed eval sets, hash-committed to their files (the
    contamination firewall's reference)."""
    from flywheel.curation.decontam import EvalNgramIndex, eval_sets_by_name

    paths = warehouse.paths
    settings = project.load().section("evals")
    root = eval_root(paths, settings)
    directory = paths.home / "indexes" / "eval-ngrams"
    staging = directory.with_name("eval-ngrams.staging")
    shutil.rmtree(staging, ignore_errors=True)
    names = os.environ.get("FLYWHEEL_EVAL_SETS", "").split(",") if os.environ.get("FLYWHEEL_EVAL_SETS") else \
        settings.get("sets", ["demo_tasks"])
    index = EvalNgramIndex.build(eval_sets_by_name(names, root), staging)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    return MaterializeResult(
        metadata={"eval_sets": MetadataValue.json({s["name"]: {"sha256": s["sha256"], "items": s["items"]}
                                                   for s in manifest["sets"]}),
                  "items": len(index.items), "index_dir": MetadataValue.path(str(directory))},
        data_version=DataVersion(json.dumps(manifest.get("arrays", {}), sort_keys=True)[:64]),
    )


def eval_root(paths: Paths, settings: dict[str, Any]) -> Path:
    configured = os.environ.get("FLYWHEEL_EVAL_ROOT") or settings.get("root")
    return Path(configured).expanduser().resolve() if configured else paths.home / "demo-data" / "evals"


def open_eval_index(paths: Paths):
    from flywheel.curation.decontam import EvalNgramIndex

    return EvalNgramIndex(paths.home / "indexes" / "eval-ngrams")


@asset(group_name="curation", partitions_def=source_partitions, deps=[cleaned_documents, sealed_eval_index],
       kinds={"parquet", "dvc"})
def dedup_shards(
    context: AssetExecutionContext, warehouse: WarehouseResource, dvc: DvcResource, project: ProjectConfigResource
) -> MaterializeResult:
    """Training-ready shards: contamination firewall (13-gram + MinHash vs sealed eval sets), then exact
    + MinHash-LSH near dedup against every earlier shard in the persistent index. Exclusions keep each
    dropped document with the doc it duplicates or the eval item it matched."""
    from flywheel.curation.dedup import MinHashIndex
    from flywheel.curation.pipeline import dedup_stage

    paths = warehouse.paths
    name = context.partition_key
    threshold = float(project.load().section("curation").get("dedup_threshold", 0.8))
    clean = read_shard(paths, "clean", name)
    result = dedup_stage(clean, index=MinHashIndex(paths.home / "indexes" / "minhash"),
                         eval_index=open_eval_index(paths), batch_id=name, threshold=threshold)
    info, version = publish_shard(context, paths=paths, dvc=dvc, warehouse=warehouse, stage="dedup", source=name,
                                  kept=result.kept, excluded=result.excluded)
    m = result.metrics
    hist = [{"cluster size": k, "clusters": v} for k, v in sorted(m["cluster_size_histogram"].items())]
    return MaterializeResult(
        metadata={
            **_common_metadata(info, version),
            **{k: m[k] for k in ("documents_in", "documents_out", "contaminated", "exact_duplicates",
                                 "near_duplicates", "clusters", "largest_cluster")},
            "dedup_rate": float(m["dedup_rate"]),
            "cluster_sizes": MetadataValue.md(markdown_table(hist)),
            "token_estimate": int(sum(len(t or "") for t in result.kept.column("text").to_pylist()) / 4),
            "preview": MetadataValue.md(_preview(result.kept)),
        },
        data_version=DataVersion(version.md5),
    )


def _shard_outcomes(paths: Paths, source: str, project: ProjectConfigResource):
    from flywheel.quality import shard_expectations, validate, with_derived_columns
    from flywheel.shards import SAMPLE_COLUMNS

    settings = project.load().section("curation")
    table = with_derived_columns(read_shard(paths, "dedup", source), open_eval_index(paths))
    allowed = settings.get("allowed_licenses") or sorted({load_source(paths, source).license})
    return validate(
        table,
        shard_expectations(allowed_licenses=allowed, min_chars=int(settings.get("min_chars", 1)),
                           max_chars=int(settings.get("max_chars", 2_000_000)), columns=SAMPLE_COLUMNS.names),
        name=f"dedup_shards-{source}",
    )


@asset_check(asset=dedup_shards, blocking=True, description="great-expectations suite on the shard: schema, "
             "non-null ids, unique sample_id, text length bounds, license allowed, no residual PII, no eval 13-gram")
def dedup_shard_quality(context: AssetCheckExecutionContext, warehouse: WarehouseResource,
                        project: ProjectConfigResource) -> AssetCheckResult:
    outcomes = []
    partitions = _materialized_partitions(warehouse.paths)
    for source in partitions:
        outcomes += [(source, o) for o in _shard_outcomes(warehouse.paths, source, project)]
    failed = [f"{s}:{o.name}" for s, o in outcomes if not o.passed]
    return AssetCheckResult(
        passed=not failed,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "failed": MetadataValue.json(failed),
            "results": MetadataValue.md(markdown_table(
                [{"source": s, "check": o.name, "passed": o.passed, "observed": json.dumps(o.observed)[:160]}
                 for s, o in outcomes])),
        },
    )


def _materialized_partitions(paths: Paths) -> list[str]:
    base = paths.dvc_repo / "shards" / "dedup"
    return sorted(p.name for p in base.iterdir() if (p / "part-00000.parquet").exists()) if base.exists() else []
