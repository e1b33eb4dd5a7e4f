"""Closing the loop: failure_cases → synthetic_samples (→ sft_dataset, preference_pairs), and production_health.

- `failure_cases` reads the projections (and decrypts what the detectors need) through
  `flywheel.failures`, clusters the failing interactions by type and prompt similarity, and writes
  `$FLYWHEEL_HOME/loop/failures/{failures,clusters,window}` — ids, types, signals and cluster
  membership only: no user text at rest outside the event log, so crypto-shredding a subject is
  enough (synthetic_samples decrypts the window again and finds an erased member redacted).
- `synthetic_samples` turns every cluster into corrected answers, paraphrased prompts and contrastive
  pairs through `text_generation.Client` against the teacher (`[loop] teacher_url`, default: the
  champion served by `models/server.py` on a free loopback port for the asset's duration), validated by
  `flywheel.synthesis` (injection screening, PII scrub, dedup against the training data, the
  contamination firewall) and the blocking GX check below. It writes
  `$FLYWHEEL_HOME/dvc/synthetic/current/{sft,preferences}.parquet`, which `sft_dataset` and
  `preference_pairs` read; every row keeps the failing interactions' event ids in `parent_ids`.
- `production_health`: latency P50/P95, tokens/s, error/refusal rates and feedback rates per model
  version, prompt drift of recent traffic against the chat model's training prompts, and the alerts
  those would raise (`sensors/health.py` records them), with plots.
"""

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AutomationCondition,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from assets.curation import open_eval_index, sealed_eval_index
from assets.resources import DvcResource, ProjectConfigResource, WarehouseResource
from assets.training import model_name
from assets.warehouse import event_log_projections
from flywheel.config import Paths
from flywheel.plots import bar_png, line_plot_png, markdown_image, markdown_table
from flywheel.shards import write_parquet_atomic

LOOP_GROUP = "loop"
TEXT_COLUMNS = ["prompt", "messages", "response", "correction"]  # decrypted text: never written by failure_cases
PREVIEW_CHARS = 80


def loop_settings(project: ProjectConfigResource) -> dict[str, Any]:
    return project.load().section("loop")


def failures_dir(paths: Paths) -> Path:
    return paths.home / "loop" / "failures"


def synthetic_dir(paths: Paths) -> Path:
    return paths.dvc_repo / "synthetic" / "current"


def health_dir(paths: Paths) -> Path:
    return paths.home / "loop" / "health"


def failure_policy(settings: dict[str, Any]):
    from flywheel.failures import FailurePolicy

    return FailurePolicy(**settings.get("policy", {}))


def _window(store, settings: dict[str, Any]) -> tuple[int, int]:
    """(after, upto]: the whole log, or its last `lookback_positions` positions."""
    upto = store.head()
    lookback = int(settings.get("lookback_positions", 0))
    return (max(0, upto - lookback) if lookback else 0), upto


def _preview(text: str | None) -> str:
    """What metadata may show of user text: PII-scrubbed and short (Dagster's event log is not erasable)."""
    from flywheel.curation.pii import default_scrubber

    if not text:
        return ""
    t = default_scrubber().scrub(" ".join(text.split())).text
    return t if len(t) <= PREVIEW_CHARS else t[: PREVIEW_CHARS - 1] + "…"


# --- the teacher ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model_dir: str | Path, model_version: str, *, port: int | None = None, startup_timeout: float = 120.0,
           **server_options: Any) -> Iterator[str]:
    """`models.server.Server` on 127.0.0.1 (a free port unless given) in this process, for a `with` block.

    Yields the base URL once /health answers. uvicorn runs in a thread (it installs no signal handlers
    off the main thread) and is told to exit on leaving the block; the engine threads stop with it.
    """
    import uvicorn

    from models.server import Server

    server = Server(model_dir, model_version=model_version, **server_options)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port or 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    web = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, name="teacher-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not web.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            web.should_exit = True
            sock.close()
            raise RuntimeError(f"the model server for {model_dir} did not start within {startup_timeout:.0f}s")
        time.sleep(0.05)
    try:
        yield url
    finally:
        web.should_exit = True
        thread.join(30)
        sock.close()


@contextlib.contextmanager
def teacher_endpoint(paths: Paths, settings: dict[str, Any], model: str) -> Iterator[tuple[str | None, str]]:
    """(url, description) of the teacher for a `with` block: `[loop] teacher_url` if set, else the
    champion served in-process; (None, why) when there is no champion yet (the synthesis then uses
    user corrections and JSON repairs only)."""
    url = str(settings.get("teacher_url") or "")
    if url:
        yield url, f"configured endpoint {url}"
        return
    from models.registry import Tracking

    tracking = Tracking.local(paths.home)
    champion = tracking.alias(model, "champion")
    if champion is None:
        yield None, f"none: {model} has no champion yet (corrections and JSON repairs only)"
        return
    options = {"torch_threads": int(settings.get("teacher_threads", 2)), "max_batch_size": 16}
    with served(tracking.local_path(champion), f"{model}@{champion.version}", **options) as served_url:
        yield served_url, f"champion {model}@{champion.version} served at {served_url}"


# --- failure_cases --------------------------------------------------------------------------------


@asset(group_name=LOOP_GROUP, deps=[event_log_projections], kinds={"duckdb", "parquet", "scikitlearn"})
def failure_cases(context: AssetExecutionContext, warehouse: WarehouseResource,
                  project: ProjectConfigResource) -> MaterializeResult:
    """Failing production interactions (thumbs-down, low rating, correction, failure labels, errors, JSON
    breakage, over-refusal) from the event log, clustered by failure type and prompt similarity (TF-IDF,
    average linkage), with counts per type and per signal."""
    from flywheel.failures import FAILURE_SCHEMA, cluster_failures, failure_signal_counts, find_failures

    settings = loop_settings(project)
    policy = failure_policy(settings)
    store = warehouse.store()
    after, upto = _window(store, settings)
    failures = find_failures(store, after, upto, policy) if upto > after else FAILURE_SCHEMA.empty_table()
    clusters = cluster_failures(failures, float(settings.get("cluster_threshold", 0.5)))
    out = failures_dir(warehouse.paths)
    write_parquet_atomic(failures.drop_columns(TEXT_COLUMNS), out / "failures.parquet")
    write_parquet_atomic(clusters.set_column(clusters.schema.get_field_index("representative_prompt"),
                                             "representative_prompt", pa.nulls(clusters.num_rows, pa.string())),
                         out / "clusters.parquet")
    (out / "window.json").write_text(json.dumps({"after": after, "upto": upto}))
    counts = failure_signal_counts(store, after, upto, policy, catch_up=False) if upto > after else {}
    by_type: dict[str, int] = {}
    for t in failures.column("primary_type").to_pylist():
        by_type[t] = by_type.get(t, 0) + 1
    top = clusters.slice(0, 20).to_pylist()
    rows = [{"cluster": c["cluster_id"][:10], "type": c["failure_type"], "size": c["size"],
             "similarity": round(c["mean_similarity"], 2), "representative prompt": _preview(c["representative_prompt"])}
            for c in top]
    metadata: dict[str, Any] = {
        "failures": failures.num_rows, "clusters": clusters.num_rows, "window": MetadataValue.json([after, upto]),
        "redacted": int(sum(failures.column("redacted").to_pylist())) if failures.num_rows else 0,
        "by_type": MetadataValue.json(dict(sorted(by_type.items()))),
        "signal_counts": MetadataValue.json(counts),
        "top_clusters": MetadataValue.md(markdown_table(rows) if rows else "_no failing interactions_"),
        "path": MetadataValue.path(str(out)),
    }
    if by_type:
        metadata["failures_by_type"] = MetadataValue.md(markdown_image(bar_png(
            list(by_type), list(by_type.values()), ylabel="interactions", title="failures by primary type")))
    return MaterializeResult(metadata=metadata)


# --- synthetic_samples ----------------------------------------------------------------------------


def _existing_texts(paths: Paths) -> list[str]:
    """The non-synthetic SFT samples and preference prompts already in the training data (dedup target)."""
    from flywheel.synthesis import sample_text

    texts: list[str] = []
    sft = paths.dvc_repo / "datasets" / "sft" / "sft.parquet"
    if sft.exists():
        for r in pq.read_table(sft, columns=["messages", "source"]).to_pylist():
            if r["source"] != "synthetic":
                texts.append(sample_text(r["messages"]))
    pairs = paths.dvc_repo / "datasets" / "preferences" / "pairs.parquet"
    if pairs.exists():
        texts += [r["prompt"] for r in pq.read_table(pairs, columns=["prompt", "source"]).to_pylist()
                  if r["source"] != "synthetic" and r["prompt"]]
    return texts


def synthesis_config(settings: dict[str, Any]):
    from flywheel.synthesis import SynthesisConfig

    return SynthesisConfig(**settings.get("synthesis", {}))


@asset(group_name=LOOP_GROUP, deps=[failure_cases, sealed_eval_index], kinds={"parquet", "dvc"})
def synthetic_samples(context: AssetExecutionContext, warehouse: WarehouseResource, dvc: DvcResource,
                      project: ProjectConfigResource) -> MaterializeResult:
    """Per failure cluster: corrected answers (user correction, repaired JSON, or the teacher through
    `text_generation.Client`), paraphrased prompts and chosen/rejected pairs, validated (prompt-injection
    screen, PII scrub, dedup against the training data, contamination firewall); every sample keeps the
    failing interactions' event ids as `parent_ids`. Feeds sft_dataset and preference_pairs."""
    from flywheel.failures import FAILURE_SCHEMA, find_failures
    from flywheel.synthesis import drop_counts_table, synthesize

    paths = warehouse.paths
    settings = loop_settings(project)
    src = failures_dir(paths)
    if not (src / "window.json").exists():
        raise FileNotFoundError(f"{src}/window.json missing: materialize failure_cases first")
    window = json.loads((src / "window.json").read_text())
    clusters = pq.read_table(src / "clusters.parquet")
    # the text, decrypted now from the same window: a subject erased since failure_cases comes back redacted
    after, upto = window["after"], window["upto"]
    store = warehouse.store()
    failures = (find_failures(store, after, upto, failure_policy(settings)) if upto > after
                else FAILURE_SCHEMA.empty_table())
    cfg = synthesis_config(settings)
    existing = _existing_texts(paths)
    started = time.perf_counter()
    with teacher_endpoint(paths, settings, model_name(project)) as (url, teacher):
        context.log.info(f"teacher: {teacher}; {clusters.num_rows} clusters, {failures.num_rows} failures")
        result = synthesize(failures, clusters, url, cfg, existing_texts=existing, eval_index=open_eval_index(paths))
    out = synthetic_dir(paths)
    write_parquet_atomic(result.sft, out / "sft.parquet")
    write_parquet_atomic(result.preferences, out / "preferences.parquet")
    write_parquet_atomic(result.drops, out / "drops.parquet")  # previews are PII-scrubbed
    version = dvc.repo().track(out)
    kinds: dict[str, int] = {}
    for k in result.sft.column("kind").to_pylist() + result.preferences.column("kind").to_pylist():
        kinds[k] = kinds.get(k, 0) + 1
    preview = [{"kind": r["kind"], "type": r["failure_type"], "prompt": _preview(r["prompt"]),
                "chosen": _preview(r["chosen"]), "parents": len(r["parent_ids"])}
               for r in result.preferences.slice(0, 5).to_pylist()]
    return MaterializeResult(
        metadata={
            "sft_samples": result.sft.num_rows, "preference_pairs": result.preferences.num_rows,
            "dropped": result.drops.num_rows, "teacher": teacher, "teacher_calls": result.stats.get("teacher_calls", 0),
            "teacher_errors": result.stats.get("teacher_errors", 0),
            "contamination_checked": bool(result.stats.get("contamination_checked")),
            "existing_texts_compared": len(existing), "by_kind": MetadataValue.json(dict(sorted(kinds.items()))),
            "drop_reasons": MetadataValue.md(markdown_table(drop_counts_table(result.drops).to_pylist())
                                             if result.drops.num_rows else "_nothing dropped_"),
            "pairs_preview": MetadataValue.md(markdown_table(preview) if preview else "_no pairs_"),
            "wall_time_s": round(time.perf_counter() - started, 1), "dvc_md5": version.md5,
            "path": MetadataValue.path(str(out)),
        },
        data_version=DataVersion(version.md5),
    )


@asset_check(asset=synthetic_samples, blocking=True, description="great-expectations suite over every synthetic "
             "sample and pair: unique ids, parent_ids present, synthetic license, no residual PII, no eval 13-gram, "
             "chosen != rejected")
def synthetic_samples_valid(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    import great_expectations as gx

    from flywheel.quality import validate
    from flywheel.synthesis import SYNTHETIC_LICENSE, sample_text

    out = synthetic_dir(warehouse.paths)
    sft, prefs = pq.read_table(out / "sft.parquet"), pq.read_table(out / "preferences.parquet")
    ids = sft.column("sample_id").to_pylist() + prefs.column("pair_id").to_pylist()
    texts = [sample_text(m) for m in sft.column("messages").to_pylist()]
    texts += [f"{r['prompt']}\n{r['chosen']}\n{r['rejected']}" for r in prefs.to_pylist()]
    frame = pa.table({
        "id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
        "license": pa.array(sft.column("license").to_pylist() + prefs.column("license").to_pylist(), pa.string()),
        "parents": pa.array([len(p or []) for p in sft.column("parent_ids").to_pylist() + prefs.column("parent_ids").to_pylist()],
                            pa.int64()),
        "chosen_equals_rejected": pa.array([False] * sft.num_rows + [
            " ".join((r["chosen"] or "").split()) == " ".join((r["rejected"] or "").split()) for r in prefs.to_pylist()],
            pa.bool_()),
    })
    from flywheel.quality import with_derived_columns

    frame = with_derived_columns(frame, open_eval_index(warehouse.paths))
    E = gx.expectations
    outcomes = validate(frame, [
        ("id_unique", E.ExpectColumnValuesToBeUnique(column="id")),
        ("parent_ids_present", E.ExpectColumnValuesToBeBetween(column="parents", min_value=1)),
        ("synthetic_license", E.ExpectColumnValuesToBeInSet(column="license", value_set=[SYNTHETIC_LICENSE])),
        ("chosen_differs_from_rejected", E.ExpectColumnValuesToBeInSet(column="chosen_equals_rejected", value_set=[False])),
        ("no_residual_pii", E.ExpectColumnValuesToBeBetween(column="residual_pii_hits", min_value=0, max_value=0)),
        ("no_eval_13gram", E.ExpectColumnValuesToBeBetween(column="eval_ngram_hits", min_value=0, max_value=0)),
    ], name="synthetic_samples")
    failed = [o.name for o in outcomes if not o.passed]
    return AssetCheckResult(passed=not failed, severity=AssetCheckSeverity.ERROR,
                            metadata={"rows": frame.num_rows, "failed": MetadataValue.json(failed),
                                      "results": MetadataValue.json({o.name: o.observed for o in outcomes})})


# --- production_health ----------------------------------------------------------------------------


def training_prompts(paths: Paths, limit: int) -> list[str]:
    """The user prompts the chat model was fine-tuned on (the SFT dataset): drift's reference sample."""
    from flywheel.failures import last_user_message

    sft = paths.dvc_repo / "datasets" / "sft" / "sft.parquet"
    if not sft.exists():
        return []
    out = [p for p in map(last_user_message, pq.read_table(sft, columns=["messages"]).column("messages").to_pylist()) if p]
    step = max(1, len(out) // limit) if limit else 1
    return out[::step][:limit] if limit else out


def health_report(store, paths: Paths, settings: dict[str, Any], after: int = 0, upto: int | None = None) -> dict[str, Any]:
    """Metrics per model version, drift against the training prompts and the alerts both raise.

    Shared by `production_health` and the health sensor, so the asset shows what the sensor acts on.
    """
    from flywheel.health import (
        DEFAULT_THRESHOLDS,
        alerts,
        drift_by_domain,
        keyword_domains,
        production_metrics,
        prompts,
    )

    upto = store.head() if upto is None else upto
    thresholds = {**DEFAULT_THRESHOLDS, **settings.get("thresholds", {})}
    min_requests = int(settings.get("min_requests", 20))
    metrics = production_metrics(store, after, upto, window=None)
    fired = alerts(metrics, thresholds, min_requests=min_requests)
    sample = int(settings.get("drift_sample", 400))
    recent = prompts(store, after, upto)[-sample:] if upto > after else []
    reference = training_prompts(paths, sample)
    drift: dict[str, Any] | None = None
    if len(recent) >= 5 and len(reference) >= 5:
        domains = keyword_domains(settings.get("domains", {}))
        drift = drift_by_domain(recent, reference, domains, permutations=int(settings.get("drift_permutations", 30)))
        fired += alerts({"prompt_drift": drift["all"].excess, "requests": len(recent), "domain": "all"}, thresholds,
                        min_requests=min_requests)
        for name, d in drift["domains"].items():
            fired += alerts({"prompt_drift": d.excess, "requests": d.n_recent, "domain": name},
                            {"prompt_drift": thresholds["prompt_drift"]}, min_requests=min_requests)
    return {"after": after, "upto": upto, "metrics": metrics, "drift": drift, "alerts": fired,
            "recent_prompts": len(recent), "reference_prompts": len(reference)}


@asset(group_name=LOOP_GROUP, deps=[event_log_projections], kinds={"duckdb", "scipy"},
       automation_condition=AutomationCondition.eager())
def production_health(context: AssetExecutionContext, warehouse: WarehouseResource,
                      project: ProjectConfigResource) -> MaterializeResult:
    """Served models from the event log: latency P50/P95, tokens/s, error and refusal rates, feedback rates
    per model version (the canary comparison), prompt drift of recent traffic against the training
    prompts (Jensen–Shannon over unigram+bigram distributions, overall and per domain, above a
    permutation baseline), and the alerts those cross."""
    from flywheel.health import production_metrics

    paths = warehouse.paths
    settings = loop_settings(project)
    store = warehouse.store()
    after, upto = _window(store, settings)
    report = health_report(store, paths, settings, after, upto)
    metrics: pa.Table = report["metrics"]
    out = health_dir(paths)
    write_parquet_atomic(metrics, out / "metrics.parquet")
    shown = ["model_version", "requests", "latency_p50_ms", "latency_p95_ms", "tokens_per_s", "error_rate",
             "refusal_rate", "feedback_rate", "thumbs_up_share", "thumbs_down_share", "mean_rating"]
    rows = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k in shown}
            for r in metrics.to_pylist()]
    with store.connect() as con:
        per_version = con.execute("SELECT * FROM feedback_by_model_version ORDER BY model_version").to_arrow_table()
    metadata: dict[str, Any] = {
        "window": MetadataValue.json([after, upto]), "model_versions": metrics.num_rows,
        "metrics": MetadataValue.md(markdown_table(rows, shown) if rows else "_no traffic yet_"),
        "feedback_by_version": MetadataValue.md(markdown_table(per_version.to_pylist()) if per_version.num_rows
                                                else "_no traffic yet_"),
        "alerts": MetadataValue.json(report["alerts"]), "alert_count": len(report["alerts"]),
        "drift_reference": f"{report['reference_prompts']} SFT training prompts vs {report['recent_prompts']} recent",
    }
    if rows:
        labels = [str(r["model_version"]) for r in rows]
        metadata["latency_p95_by_version"] = MetadataValue.md(markdown_image(bar_png(
            labels, [r["latency_p95_ms"] or 0.0 for r in rows], ylabel="ms", title="latency P95 per model version")))
        metadata["thumbs_down_share_by_version"] = MetadataValue.md(markdown_image(bar_png(
            labels, [r["thumbs_down_share"] or 0.0 for r in rows], ylabel="share", title="thumbs-down share")))
        timeline = production_metrics(store, after, upto, window=str(settings.get("health_window", "1 hour")),
                                      refusals=False, catch_up=False).sort_by("window_start").to_pylist()
        series: dict[str, list[float]] = {}
        xs: list[float] = []
        starts = sorted({r["window_start"] for r in timeline})
        xs = [(s - starts[0]).total_seconds() / 3600 for s in starts]
        for version in labels:
            by_start = {r["window_start"]: r["latency_p95_ms"] for r in timeline if str(r["model_version"]) == version}
            series[version] = [float(by_start.get(s) or 0.0) for s in starts]
        if len(xs) > 1:
            metadata["latency_p95_over_time"] = MetadataValue.md(markdown_image(line_plot_png(
                xs, series, xlabel="hours since window start", ylabel="P95 ms", title="latency P95 over time")))
    drift = report["drift"]
    if drift is not None:
        domains = {"all": drift["all"], **drift["domains"]}
        metadata["prompt_drift_excess"] = float(drift["all"].excess)
        metadata["prompt_drift"] = MetadataValue.md(markdown_table([
            {"domain": d, "js_bits": round(r.js, 4), "baseline": round(r.baseline, 4), "excess": round(r.excess, 4),
             "p_value": round(r.p_value, 3), "recent": r.n_recent, "reference": r.n_reference} for d, r in domains.items()]))
        metadata["prompt_drift_plot"] = MetadataValue.md(markdown_image(bar_png(
            list(domains), [r.excess for r in domains.values()], ylabel="JS excess (bits)", title="prompt drift by domain")))
        metadata["drift_top_terms"] = MetadataValue.json([[t, round(w, 5)] for t, w in drift["all"].top_terms])
    return MaterializeResult(metadata=metadata)
