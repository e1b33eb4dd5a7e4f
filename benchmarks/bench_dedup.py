"""Near-duplicate detection: flywheel's vectorized MinHash-LSH vs datasketch, rensa and datatrove.

Every method sees the same documents and the same shingles (word 5-grams of `comparison_text`),
128 permutations and the same Jaccard threshold, in one process, one after the other:

- flywheel: `dedup_table` (exact stage + signature → buckets → verified clusters → filter, output
  tables included), and the same corpus in 4 batches through a `MinHashIndex` on disk.
- datasketch 2.0 `MinHash` + `MinHashLSH` as documented: query, then insert, per document (its own
  (b, r) from `_optimal_param`; query results are not verified).
- rensa 0.5 `RMinHash` + `RMinHashLSH` (same bands as ours), candidates verified with `jaccard`.
- datatrove 0.9 `MinhashDedupSignature` → `MinhashDedupBuckets` → `MinhashDedupCluster` on local
  files, with `get_shingles` swapped for the same shingle strings hashed by datatrove's own xxhash
  (so no NLTK/spaCy tokenizer is involved); r = 8 at 0.8 and r = 4 at 0.5, no verification.

Labelled pairs, all from real data (labels by construction, never by any method's output):
positives — Dolma CC exact duplicates (non-empty), synthetic near-duplicates of C4 / WikiText /
speech documents made by replacing evenly spaced words with marker words so that the 5-gram
Jaccard hits a target (k = S(1−J)/(5(1+J)) substitutions for S shingles), GSM8K test ↔ Socratic
(at 0.5 only); negatives — synthetic edits at low target Jaccard (hard negatives), random GSM8K
test pairs, random corpus pairs. At threshold t a synthetic pair is positive if its target is
≥ t + 0.05 and negative if ≤ t − 0.1 (targets in between are left out). A method predicts a pair
as duplicate when it puts both documents in one cluster.

Run: `.venv/bin/python benchmarks/bench_dedup.py [--quick] [--repeats N]`; writes
benchmarks/results/bench_dedup.json.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata  # noqa: F401  (datatrove 0.9 calls importlib.metadata without importing it)
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = (ROOT / ".." / "shared" / "data").resolve()

from flywheel.curation.dedup import (
    MinHashIndex,
    MinHashParams,
    choose_bands,
    comparison_text,
    dedup_table,
    estimated_jaccard,
    signature,
)
from flywheel.curation.documents import documents_table

TARGETS = [0.3, 0.4, 0.5, 0.65, 0.75, 0.85, 0.9, 0.95]
NUM_PERM = 128
SEED = 42


# --------------------------------------------------------------------------- data


def shingle_strings(text: str | None, n: int = 5) -> list[str]:
    """The shingles every method gets: word n-grams of the normalized text (short docs: one shingle)."""
    w = comparison_text(text).split()
    if not w:
        return []
    if len(w) < n:
        return [" ".join(w)]
    return [" ".join(w[i : i + n]) for i in range(len(w) - n + 1)]


def edit_to_jaccard(text: str, target: float, tag: str) -> str:
    """Replace k evenly spaced words (≥ 5 apart) with unique markers: 5-gram Jaccard ≈ target."""
    words = comparison_text(text).split()
    s = len(words) - 4
    k = max(1, round(s * (1 - target) / (5 * (1 + target))))
    k = min(k, len(words) // 5)
    pos = {int((i + 0.5) * len(words) / k) for i in range(k)}
    return " ".join(f"zq{tag}x{i}" if i in pos else w for i, w in enumerate(words))


def build_corpus(quick: bool) -> tuple[list[dict], list[tuple[str, str, str, float]]]:
    """Documents and labelled pairs (a, b, kind, target_or_-1)."""
    rng = np.random.default_rng(0)
    docs: list[dict] = []
    pairs: list[tuple[str, str, str, float]] = []
    n_gsm = 300 if quick else 1319
    gsm = {}
    for split in ("test", "test_socratic"):
        with open(DATA / "evals" / "gsm8k" / f"{split}.jsonl", encoding="utf-8") as f:
            gsm[split] = [json.loads(line) for line in f][:n_gsm]
    for i in range(n_gsm):
        for split in ("test", "test_socratic"):
            r = gsm[split][i]
            docs.append({"doc_id": f"{split}:{i}", "text": f"{r['question']}\n{r['answer']}"})
        pairs.append((f"test:{i}", f"test_socratic:{i}", "gsm8k_aligned", -1.0))
    for _ in range(300 if quick else 1000):
        i, j = rng.choice(n_gsm, 2, replace=False)
        pairs.append((f"test:{i}", f"test:{j}", "gsm8k_random", -1.0))

    path = next((DATA / "corpora" / "dolma_cc").glob("CC-MAIN-*.jsonl.gz"))
    with gzip.open(path, "rt", encoding="utf-8") as f:
        dolma = [json.loads(line) for line in f]
    by_text: dict[str, list[str]] = {}
    for r in dolma:
        docs.append({"doc_id": f"dolma:{r['id']}", "text": r["text"]})
        if comparison_text(r["text"]):
            by_text.setdefault(comparison_text(r["text"]), []).append(f"dolma:{r['id']}")
    for ids in by_text.values():
        pairs += [(ids[a], ids[b], "dolma_exact", 1.0) for a in range(len(ids)) for b in range(a + 1, len(ids))]

    bases: list[tuple[str, str]] = []
    with open(DATA / "corpora" / "c4_demo.jsonl", encoding="utf-8") as f:
        bases += [(f"c4:{i}", json.loads(line)["text"]) for i, line in enumerate(f)]
    raw = (DATA / "corpora" / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    bases += [(f"wiki:{i}", a) for i, a in enumerate(re.split(r"\n = (?!=)", raw))]
    for name in ("state_union", "inaugural"):
        with open(DATA / "corpora" / "speeches" / f"{name}.jsonl", encoding="utf-8") as f:
            bases += [(f"{name}:{json.loads(line)['id']}", json.loads(line)["text"]) for line in f]
    bases = [b for b in bases if len(comparison_text(b[1]).split()) >= 100]
    if quick:
        bases = bases[:120]
    for bi, (bid, text) in enumerate(bases):
        target = TARGETS[bi % len(TARGETS)]
        docs.append({"doc_id": bid, "text": text})
        docs.append({"doc_id": f"{bid}~{target}", "text": edit_to_jaccard(text, target, str(bi))})
        pairs.append((bid, f"{bid}~{target}", "synthetic", target))
    ids = [d["doc_id"] for d in docs]
    for _ in range(300 if quick else 1000):
        i, j = rng.choice(len(ids), 2, replace=False)
        a, b = ids[i], ids[j]
        if a.split("~")[0] != b.split("~")[0] and a.split(":")[-1] != b.split(":")[-1]:
            pairs.append((a, b, "random", -1.0))
    return docs, pairs


def labels_at(pairs: list[tuple[str, str, str, float]], t: float) -> list[tuple[str, str, bool, str]]:
    out = []
    for a, b, kind, target in pairs:
        if kind == "synthetic":
            if target >= t + 0.05:
                out.append((a, b, True, f"synthetic≥{t + 0.05:.2f}"))
            elif target <= t - 0.1:
                out.append((a, b, False, f"synthetic≤{t - 0.1:.2f}"))
        elif kind == "gsm8k_aligned":
            if t <= 0.5:
                out.append((a, b, True, kind))
        else:
            out.append((a, b, kind == "dolma_exact", kind))
    return out


# --------------------------------------------------------------------------- methods


_TABLES: dict[int, object] = {}


def docs_table(docs: list[dict]):
    """Our input is an Arrow table of documents; it is built once, outside the timed region."""
    if id(docs) not in _TABLES:
        _TABLES[id(docs)] = documents_table(docs)
    return _TABLES[id(docs)]


def components(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def run_flywheel(docs: list[dict], t: float) -> np.ndarray:
    res = dedup_table(docs_table(docs), threshold=t)
    pos = {d["doc_id"]: i for i, d in enumerate(docs)}
    comp = np.arange(len(docs))
    for cid, did in zip(res.clusters["cluster_id"].to_pylist(), res.clusters["doc_id"].to_pylist(), strict=True):
        comp[pos[did]] = pos[cid]
    return comp


def run_flywheel_incremental(docs: list[dict], t: float) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        index = MinHashIndex(Path(d) / "index", MinHashParams.for_threshold(t))
        comp = np.arange(len(docs))
        pos = {x["doc_id"]: i for i, x in enumerate(docs)}
        step = -(-len(docs) // 4)
        for k in range(0, len(docs), step):
            res = dedup_table(docs_table(docs).slice(k, step), index, threshold=t, batch_id=f"b{k}")
            for cid, did in zip(res.clusters["cluster_id"].to_pylist(), res.clusters["doc_id"].to_pylist(),
                                strict=True):
                comp[pos[did]] = comp[pos[cid]]
        return comp


def run_datasketch(docs: list[dict], t: float) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=t, num_perm=NUM_PERM)
    edges = []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=NUM_PERM, seed=SEED)
        m.update_batch([s.encode() for s in shingle_strings(d["text"])])
        edges += [(i, j) for j in lsh.query(m)]
        lsh.insert(i, m)
    return components(len(docs), edges)


def run_rensa(docs: list[dict], t: float) -> np.ndarray:
    from rensa import RMinHash, RMinHashLSH

    b, _ = choose_bands(t, NUM_PERM)
    lsh = RMinHashLSH(t, NUM_PERM, b)
    stored: list = []
    edges = []
    for i, d in enumerate(docs):
        m = RMinHash(NUM_PERM, SEED)
        m.update(shingle_strings(d["text"]))
        edges += [(i, j) for j in lsh.query(m) if m.jaccard(stored[j]) >= t]
        lsh.insert(i, m)
        stored.append(m)
    return components(len(docs), edges)


def run_datatrove(docs: list[dict], t: float) -> np.ndarray:
    import struct

    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )
    from datatrove.utils.logging import logger

    logger.remove()
    rows = 8 if t >= 0.7 else 4
    cfg = MinhashConfig(n_grams=5, num_buckets=NUM_PERM // rows, hashes_per_bucket=rows, seed=SEED)
    with tempfile.TemporaryDirectory() as d:
        sig = MinhashDedupSignature(output_folder=f"{d}/sigs", config=cfg)
        sig.get_shingles = lambda text: np.fromiter(  # same shingles, datatrove's own xxhash
            (sig._hash_func(s) for s in shingle_strings(text)), dtype=np.uint64).reshape((-1, 1))
        sig.run((Document(text=x["text"], id=str(i)) for i, x in enumerate(docs)), rank=0, world_size=1)
        buckets = MinhashDedupBuckets(input_folder=f"{d}/sigs", output_folder=f"{d}/buckets", config=cfg)
        for r in range(cfg.num_buckets):
            buckets.run(rank=r, world_size=cfg.num_buckets)
        MinhashDedupCluster(input_folder=f"{d}/buckets", output_folder=f"{d}/remove", config=cfg).run()
        edges = []
        for p in Path(f"{d}/buckets").glob("*.dups"):
            raw = p.read_bytes()
            edges += [(a, c) for _, a, _, c in struct.iter_unpack("<4I", raw)]
    return components(len(docs), edges)


METHODS: dict[str, Callable[[list[dict], float], np.ndarray]] = {
    "dedup": run_flywheel,
    "dedup_incremental": run_flywheel_incremental,
    "datasketch": run_datasketch,
    "rensa": run_rensa,
    "datatrove": run_datatrove,
}


def score(comp: np.ndarray, labelled: list[tuple[str, str, bool, str]], pos: dict[str, int]) -> dict[str, float]:
    tp = fp = fn = 0
    for a, b, label, _ in labelled:
        pred = comp[pos[a]] == comp[pos[b]]
        tp += pred and label
        fp += pred and not label
        fn += (not pred) and label
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def estimator_rmse(docs: list[dict], labelled: list[tuple[str, str, bool, str]], pos: dict[str, int]) -> dict:
    """RMSE of each method's Jaccard estimate vs the exact 5-gram Jaccard on the labelled pairs."""
    from datasketch import MinHash
    from rensa import RMinHash

    sh = {i: set(shingle_strings(d["text"])) for i, d in enumerate(docs)}
    used = [(pos[a], pos[b]) for a, b, _, _ in labelled if sh[pos[a]] and sh[pos[b]]]
    exact = np.array([len(sh[a] & sh[b]) / len(sh[a] | sh[b]) for a, b in used])
    ours = signature([d["text"] for d in docs], MinHashParams())
    est_ours = np.array([estimated_jaccard(ours.minhash[[a]], ours.minhash[[b]])[0] for a, b in used])
    ds, rs = {}, {}
    for i in {x for p in used for x in p}:
        ds[i] = MinHash(num_perm=NUM_PERM, seed=SEED)
        ds[i].update_batch([s.encode() for s in sh[i]])
        rs[i] = RMinHash(NUM_PERM, SEED)
        rs[i].update(list(sh[i]))
    est_ds = np.array([ds[a].jaccard(ds[b]) for a, b in used])
    est_rs = np.array([rs[a].jaccard(rs[b]) for a, b in used])
    rmse = {k: float(np.sqrt(np.mean((v - exact) ** 2))) for k, v in
            (("dedup", est_ours), ("datasketch", est_ds), ("rensa", est_rs))}
    mid = (exact > 0.05) & (exact < 0.95)
    rmse["binomial_theory"] = float(np.sqrt(np.mean(exact[mid] * (1 - exact[mid]) / NUM_PERM)))
    rmse["dedup_mid"] = float(np.sqrt(np.mean((est_ours[mid] - exact[mid]) ** 2)))
    rmse["datasketch_mid"] = float(np.sqrt(np.mean((est_ds[mid] - exact[mid]) ** 2)))
    return {"rmse": rmse, "synthetic_exact_by_target": synthetic_exact(docs, sh, pos)}


def synthetic_exact(docs: list[dict], sh: dict[int, set], pos: dict[str, int]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for d in docs:
        if "~" in d["doc_id"]:
            base, target = d["doc_id"].rsplit("~", 1)
            a, b = sh[pos[base]], sh[pos[d["doc_id"]]]
            out.setdefault(target, []).append(len(a & b) / len(a | b))
    return {k: round(statistics.mean(v), 3) for k, v in sorted(out.items())}


# --------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict:
    docs, pairs = build_corpus(args.quick)
    pos = {d["doc_id"]: i for i, d in enumerate(docs)}
    words = sum(len((d["text"] or "").split()) for d in docs)
    print(f"corpus: {len(docs)} docs, {words / len(docs):.0f} words/doc, {len(pairs)} labelled pairs; "
          f"repeats={args.repeats}", flush=True)
    result: dict = {"docs": len(docs), "words_per_doc": words / len(docs), "repeats": args.repeats,
                    "quick": args.quick}
    for t in (0.8, 0.5):
        labelled = labels_at(pairs, t)
        n_pos = sum(x[2] for x in labelled)
        prefix = "" if t == 0.8 else "t050_"
        print(f"\nthreshold {t}: {n_pos} positive / {len(labelled) - n_pos} negative labelled pairs")
        print(f"{'method':<20}{'docs/s (median)':>16}{'precision':>11}{'recall':>9}{'f1':>8}")
        # warm up every method (imports, constants, first calls), then time them round-robin so a
        # change in machine load between methods hits all of them alike
        active: dict[str, Callable[[list[dict], float], np.ndarray]] = {}
        for name, fn in METHODS.items():
            if name in args.skip:
                continue
            try:
                docs_table(docs)
                fn(docs[:200], t)
                active[name] = fn
            except Exception as e:  # noqa: BLE001  (a peer that cannot run offline is reported, not fatal)
                print(f"{name:<20} failed: {type(e).__name__}: {e}")
                result[f"{prefix}{name}_error"] = f"{type(e).__name__}: {e}"
        times: dict[str, list[float]] = {name: [] for name in active}
        comps: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for name, fn in active.items():
                t0 = time.perf_counter()
                comps[name] = fn(docs, t)
                times[name].append(time.perf_counter() - t0)
        gsm = [x for x in labelled if x[3] == "gsm8k_aligned"]
        for name in active:
            dps = len(docs) / statistics.median(times[name])
            s = score(comps[name], labelled, pos)
            result[f"{prefix}{name}_docs_per_s"] = dps
            result[f"{prefix}{name}_seconds_all"] = times[name]
            for k, v in s.items():
                result[f"{prefix}{name}_{k}"] = v
            if gsm:
                result[f"{prefix}{name}_gsm8k_recall"] = score(comps[name], gsm, pos)["recall"]
            print(f"{name:<20}{dps:>16.0f}{s['precision']:>11.3f}{s['recall']:>9.3f}{s['f1']:>8.3f}", flush=True)
        if "datasketch" in active:
            for name in active:
                if name != "datasketch":
                    result[f"{prefix}{name}_speedup_vs_datasketch"] = (
                        result[f"{prefix}{name}_docs_per_s"] / result[f"{prefix}datasketch_docs_per_s"])
                    paired = [d / o for o, d in zip(times[name], times["datasketch"], strict=True)]
                    result[f"{prefix}{name}_speedup_vs_datasketch_paired_median"] = statistics.median(paired)
    quality = estimator_rmse(docs, labels_at(pairs, 0.5), pos)
    for k, v in quality["rmse"].items():
        result[f"jaccard_rmse_{k}"] = v
    result["synthetic_exact_jaccard_by_target"] = quality["synthetic_exact_by_target"]
    print(f"\nspeedup vs datasketch at 0.8: {result.get('dedup_speedup_vs_datasketch', float('nan')):.1f}×; "
          f"Jaccard-estimate RMSE: {json.dumps({k: round(v, 4) for k, v in quality['rmse'].items()})}")
    print(f"synthetic pairs, exact Jaccard by target: {quality['synthetic_exact_by_target']}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1.1k documents instead of ~4.6k")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(METHODS), help="methods to leave out")
    args = parser.parse_args()
    res = main(args)
    out = ROOT / "benchmarks" / "results" / "bench_dedup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {out}")
