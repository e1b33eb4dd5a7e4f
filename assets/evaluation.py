"""Evaluation and gated promotion: eval_scores (candidate vs champion on sealed suites) → promotion.

`eval_scores` scores the challenger (the DPO candidate) and the current champion on the same loaded,
hash-committed, access-logged suites, stores per-item results (Parquet + `EvalScored`), logs metrics
to the candidate's MLflow run, and verifies that no sealed 13-gram is in the candidate's training
inputs. Its blocking checks (the firewall, unchanged sealed sets) must pass before `promotion` runs:
the policy in `[promotion]` decides with a paired bootstrap, the ledger records `ModelPromoted` or
`PromotionRejected` with every gate's numbers, and only then does the `champion` alias move.
"""

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from assets.curation import open_eval_index, sealed_eval_index
from assets.resources import ProjectConfigResource, WarehouseResource
from assets.training import dpo_checkpoint, model_name
from flywheel.config import Paths
from flywheel.plots import bar_png, markdown_image, markdown_table
from flywheel.shards import write_parquet_atomic


def _eval_dir(paths: Paths) -> Path:
    return paths.home / "evals"


def eval_set_config(paths: Paths, settings: dict[str, Any]):
    """Where the sealed suites come from: the shared layout under a data root, else the demo's own."""
    from models.evalsets import EvalSetConfig

    root = os.environ.get("FLYWHEEL_DATA_ROOT") or settings.get("data_root")
    sizes = {k: int(v) for k, v in settings.get("sizes", {}).items()}
    if root and (Path(root) / "evals").exists():
        return EvalSetConfig.from_root(root, **sizes)
    demo = paths.home / "demo-data" / "evals"
    return EvalSetConfig(harmful_path=demo / "harmful.jsonl", **sizes)


def _heldout_domains(paths: Paths, limit: int) -> dict[str, list[str]]:
    heldout = paths.dvc_repo / "mixtures" / "current" / "heldout.parquet"
    domains: dict[str, list[str]] = {}
    if heldout.exists():
        for r in pq.read_table(heldout).select(["source", "text"]).to_pylist():
            if len(domains.setdefault(r["source"], [])) < limit:
                domains[r["source"]].append(r["text"])
    return domains


def _training_texts(store, version: str | None, paths: Paths) -> list[str]:
    """Every text the candidate's chain trained on (its own inputs and its parents'), for the firewall."""
    by_version = {e.data.model_version: e.data for e in store.read(types=["CheckpointTrained"]) if e.data.model_version}
    texts: list[str] = []
    seen = set()
    while version and version in by_version and version not in seen:
        seen.add(version)
        ck = by_version[version]
        inputs = pq.read_table(ck.inputs_manifest)
        if ck.stage == "pretrain":
            mixture = pq.read_table(paths.dvc_repo / "mixtures" / "current" / "mixture.parquet", columns=["sample_id", "text"])
            wanted = set(inputs.column("sample_id").to_pylist())
            texts += [t for s, t in zip(mixture.column("sample_id").to_pylist(), mixture.column("text").to_pylist(),
                                        strict=True) if s in wanted]
        elif ck.stage == "sft":
            table = pq.read_table(paths.dvc_repo / "datasets" / "sft" / "sft.parquet")
            texts += [" ".join(m["content"] for m in msgs) for msgs in table.column("messages").to_pylist()]
        elif ck.stage == "dpo":
            table = pq.read_table(paths.dvc_repo / "datasets" / "preferences" / "pairs.parquet")
            texts += [f"{r['prompt']}\n{r['chosen']}\n{r['rejected']}" for r in table.to_pylist()]
        version = ck.parent_model_version
    return texts


def firewall(store, paths: Paths, version: str) -> dict[str, Any]:
    texts = _training_texts(store, version, paths)
    index = open_eval_index(paths)
    doc_rows, items, counts = index.ngram_hits(texts) if texts else ([], [], [])
    hits = sorted({index.items[i] for i in list(items)})
    return {"passed": len(hits) == 0, "texts_checked": len(texts), "eval_items_hit": hits[:20], "hits": len(hits)}


@asset(group_name="evaluation", deps=[dpo_checkpoint, sealed_eval_index], kinds={"pytorch", "mlflow"})
def eval_scores(context: AssetExecutionContext, warehouse: WarehouseResource, project: ProjectConfigResource) -> MaterializeResult:
    """The challenger and the champion scored on the same sealed suites: held-out perplexity per domain,
    exact match (JSON formatting, arithmetic), safety (refusal on harmful, over-refusal on benign), JSON
    validity (and MMLU where the shared sets are configured). Per-item rows are stored for paired gates."""
    from models.evalsets import load_suites
    from models.evaluation import evaluate
    from models.registry import Tracking
    from warehouse.events import EvalScored
    from warehouse.store import NewEvent

    paths = warehouse.paths
    settings = project.load().section("evaluation")
    model = model_name(project)
    tracking = Tracking.local(paths.home)
    candidate = tracking.alias(model, "challenger")
    if candidate is None:
        raise RuntimeError(f"{model} has no challenger: materialize dpo_checkpoint first")
    champion = tracking.alias(model, "champion")
    store = warehouse.store()
    cfg = eval_set_config(paths, settings)
    domains = _heldout_domains(paths, int(settings.get("perplexity_texts_per_domain", 10)))
    if domains:
        cfg.perplexity_domains = domains
    names = [s for s in settings.get("suites", ["perplexity", "exact_match", "json_validity", "safety"])
             if s != "perplexity" or cfg.wikitext_path or domains]
    suites = load_suites(names, cfg, access_log=_eval_dir(paths) / "access.jsonl", purpose="eval_scores",
                         model_id=f"{model}@{candidate.version}")
    committed = _commit_digests(paths, {n: s.digest for n, s in suites.items() if n != "perplexity"})
    wall = firewall(store, paths, candidate.version)
    results = {}
    limits = {k: int(v) for k, v in settings.get("limits", {}).items()}
    for role, ref in (("candidate", candidate), ("champion", champion)):
        if ref is None:
            continue
        res = evaluate(tracking.local_path(ref), None, suites, limits=limits, num_threads=1)
        out = _eval_dir(paths) / f"{model}@{ref.version}" / "items.parquet"
        write_parquet_atomic(res.items, out)
        write_parquet_atomic(res.items, _eval_dir(paths) / "current" / f"{role}.parquet")
        results[role] = (ref, res, out)
        for suite in suites:
            summary = {k: float(v) for k, v in res.metrics.items() if k == suite or k.startswith(f"{suite}/")}
            event = EvalScored(model_name=model, model_version=ref.version, suite=suite, summary=summary, items_path=str(out),
                               items_digest=_digest(out), eval_set_digest=suites[suite].digest,
                               contamination_check_passed=wall["passed"] if role == "candidate" else True)
            store.append([NewEvent(event, f"eval-{model}-{ref.version}", datetime.now(UTC))])
        if role == "candidate" and ref.run_id:
            for k, v in res.metrics.items():
                tracking.client.log_metric(ref.run_id, f"eval/{k}", float(v))
    (_eval_dir(paths) / "current" / "state.json").write_text(json.dumps({
        "model": model, "candidate": candidate.version, "champion": champion.version if champion else None,
        "firewall": wall, "digests": committed}, indent=2))
    cand = results["candidate"][1].metrics
    champ = results["champion"][1].metrics if "champion" in results else {}
    rows = [{"metric": k, "candidate": v, "champion": champ.get(k)} for k, v in sorted(cand.items())]
    headline = [r for r in rows if "/" not in r["metric"]]
    return MaterializeResult(metadata={
        "candidate": f"{model}@{candidate.version}", "champion": f"{model}@{champion.version}" if champion else "none",
        "per_slice": MetadataValue.md(markdown_table(rows)),
        "scores": MetadataValue.md(markdown_image(bar_png([r["metric"] for r in headline], [r["candidate"] for r in headline],
                                                          ylabel="candidate", title="eval scores (candidate)"))),
        "firewall_passed": wall["passed"], "items": results["candidate"][1].items.num_rows,
        "wall_s": round(sum(r[1].wall_s for r in results.values()), 1),
    })


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _commit_digests(paths: Paths, digests: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The first load of a sealed suite commits its digest; later loads are compared against it."""
    path = _eval_dir(paths) / "committed.json"
    committed = json.loads(path.read_text()) if path.exists() else {}
    report = {}
    for name, digest in digests.items():
        first = committed.setdefault(name, digest)
        report[name] = {"digest": digest, "committed": first, "unchanged": first == digest}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(committed, indent=2, sort_keys=True))
    return report


def _state(paths: Paths) -> dict[str, Any]:
    return json.loads((_eval_dir(paths) / "current" / "state.json").read_text())


@asset_check(asset=eval_scores, blocking=True, description="contamination firewall: no sealed eval 13-gram in any "
             "text the candidate (and its parent checkpoints) trained on")
def candidate_inputs_uncontaminated(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    wall = _state(warehouse.paths)["firewall"]
    return AssetCheckResult(passed=wall["passed"], severity=AssetCheckSeverity.ERROR, metadata={
        "texts_checked": wall["texts_checked"], "eval_items_hit": MetadataValue.json(wall["eval_items_hit"])})


@asset_check(asset=eval_scores, blocking=True, description="sealed suites unchanged since their digests were committed")
def sealed_sets_unchanged(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    digests = _state(warehouse.paths)["digests"]
    changed = [n for n, d in digests.items() if not d["unchanged"]]
    return AssetCheckResult(passed=not changed, severity=AssetCheckSeverity.ERROR,
                            metadata={"changed": MetadataValue.json(changed), "digests": MetadataValue.json(digests)})


@asset(group_name="evaluation", deps=[eval_scores], kinds={"mlflow", "duckdb"})
def promotion(context: AssetExecutionContext, warehouse: WarehouseResource, project: ProjectConfigResource) -> MaterializeResult:
    """Gated promotion, fail closed: the paired-bootstrap gain on the primary metric must clear the margin,
    no slice may regress beyond tolerance, safety must not regress, JSON validity must meet its floor
    (absolute floors when there is no champion). The decision goes to the ledger (expected-version on the
    promotion stream: two promoters cannot both win); the champion alias moves only on promotion."""
    from flywheel.gates import GatePolicy, decide
    from models.promotion import ledger, promote
    from models.registry import Tracking

    paths = warehouse.paths
    state = _state(paths)
    store = warehouse.store()
    tracking = Tracking.local(paths.home)
    model, candidate = state["model"], state["candidate"]
    read = ledger(store, model)
    cand_items = pq.read_table(_eval_dir(paths) / "current" / "candidate.parquet")
    champ_path = _eval_dir(paths) / "current" / "champion.parquet"
    champ_items = pq.read_table(champ_path) if state["champion"] and champ_path.exists() else None
    if read.champion != state["champion"]:
        raise RuntimeError(f"the champion changed since eval_scores ({state['champion']} → {read.champion}): re-evaluate")
    if candidate == read.champion:
        return MaterializeResult(metadata={"decision": "noop", "reason": f"{model}@{candidate} is already the champion"})
    decision = decide(cand_items, champ_items, GatePolicy.from_dict(project.load().section("promotion")))
    event = promote(store, tracking, model, candidate, decision, expected_version=read.version)
    gates = [g.to_dict() for g in decision.gates]
    return MaterializeResult(metadata={
        "decision": "promoted" if decision.promote else "rejected",
        "event": type(event).__name__, "candidate": f"{model}@{candidate}",
        "champion_before": f"{model}@{read.champion}" if read.champion else "none",
        "reason": decision.reason,
        "gates": MetadataValue.md(markdown_table([{k: g.get(k) for k in ("name", "passed", "observed", "threshold",
                                                                         "ci_low", "ci_high", "detail")} for g in gates])),
    })
