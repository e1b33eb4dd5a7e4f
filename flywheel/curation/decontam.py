"""Contamination firewall: training documents must not contain text of the sealed evaluation sets.

Two probes, both against an `EvalNgramIndex` built once from the eval files and committed to disk
with the SHA-256 of every source file:

1. **13-gram overlap** (GPT-3 style) on normalized tokens: NFKC, lowercase, every run of
   characters that are not letters, digits or marks replaced by a space, split on whitespace.
   Every 13-gram of every eval segment is hashed (64-bit, the same vectorized token hashing as
   `dedup.py`) into one sorted uint64 array with a parallel array of eval-item numbers; a document
   is checked by hashing *all* its 13-grams and `np.searchsorted` membership, so the check is
   exhaustive. A segment shorter than 13 tokens but at least `min_short_tokens` long (e.g. a short
   TruthfulQA question + answer) is indexed whole and matched as a k-gram of the same length.
2. **MinHash near-duplicates** of whole eval items (5-grams of the same normalized tokens, 128
   permutations, default Jaccard ≥ 0.5) through a `MinHashIndex` in the same directory, one index
   batch per eval set: it scores how much of a document *is* an eval item, and catches edited
   copies whose 13-grams were all broken (a word changed every 13 tokens keeps Jaccard ≈ 0.44).

False positives: a 13-gram can be common outside the eval set (licence boilerplate, "all of the
above" style templates, code idioms in HumanEval solutions). `allow_texts` removes the 13-grams of
operator-approved texts from the index at build time (stored, counted and hashed in the manifest),
and `min_ngram_hits` (default 1, i.e. strict) lets `decontaminate_table` require more than one
distinct shared 13-gram. `assert_no_eval_ngrams`, the blocking check, always uses every indexed
13-gram (allow-list applied) with a threshold of one.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flywheel.curation.dedup import (
    MinHashIndex,
    MinHashParams,
    expand_runs,
    nfkc,
    ngram_hashes,
    signature,
    token_hashes,
)

NGRAM = 13
MIN_SHORT_TOKENS = 8
MINHASH_THRESHOLD = 0.5
_TOKEN_SEED = 13
_FORMAT = "flywheel-eval-ngrams/1"
_PUNCT = r"[^\p{L}\p{N}\p{M}\s]+"  # RE2 (Arrow) syntax: anything but letters, digits, marks, space

# (item_id, text segments): an item's segments are indexed separately, so a 13-gram never spans
# two fields that a web page would format differently (question | answer)
ItemLoader = Callable[[Path], Iterator[tuple[str, list[str]]]]


# --------------------------------------------------------------------------- eval-set loaders


def load_gsm8k(path: Path) -> Iterator[tuple[str, list[str]]]:
    """GSM8K JSONL: item `<file stem>-<line index>`; question, answer, answer without <<calc>> marks."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{i + 1}: not JSON ({e})") from e
            answer = r["answer"]
            yield f"{path.stem}-{i}", [r["question"], answer, re.sub(r"<<[^>]*>>", "", answer)]


def load_mmlu(path: Path) -> Iterator[tuple[str, list[str]]]:
    """MMLU directory of `<subject>_test.csv` (header question,choice0..3,answer): item `<subject>-<row>`."""
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    for file in files:
        subject = file.stem.removesuffix("_test")
        with open(file, encoding="utf-8", newline="") as f:
            for i, r in enumerate(csv.DictReader(f)):
                choices = [r[f"choice{k}"] for k in range(4) if r.get(f"choice{k}")]
                yield f"{subject}-{i}", [" ".join([r["question"], *choices])]


def load_truthfulqa(path: Path) -> Iterator[tuple[str, list[str]]]:
    """TruthfulQA CSV: item `<row>`; question + best answer (questions alone are often < 13 tokens)."""
    with open(path, encoding="utf-8", newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            yield str(i), [f"{r['Question']} {r['Best Answer']}"]


def load_humaneval(path: Path) -> Iterator[tuple[str, list[str]]]:
    """HumanEval JSONL(.gz): item = task_id without its prefix; prompt, canonical solution."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                yield r["task_id"].split("/")[-1], [r["prompt"], r["canonical_solution"]]


@dataclass(frozen=True)
class EvalSet:
    """One sealed evaluation set: a name, the file (or directory) it lives in and how to read it."""

    name: str
    path: Path
    loader: ItemLoader


def default_eval_sets(root: str | Path) -> list[EvalSet]:
    """GSM8K test, MMLU test, TruthfulQA, HumanEval under `root` (the layout of shared/data/evals)."""
    root = Path(root)
    return [
        EvalSet("gsm8k", root / "gsm8k" / "test.jsonl", load_gsm8k),
        EvalSet("mmlu", root / "mmlu" / "test", load_mmlu),
        EvalSet("truthfulqa", root / "truthfulqa" / "TruthfulQA.csv", load_truthfulqa),
        EvalSet("humaneval", root / "humaneval" / "HumanEval.jsonl.gz", load_humaneval),
    ]


# --------------------------------------------------------------------------- tokens and hashes


def eval_tokens(texts: Sequence[str | None]) -> pa.ListArray:
    """Normalized tokens per text: NFKC, lowercase, non-alphanumerics → space, whitespace split."""
    arr = pc.utf8_lower(pa.array([nfkc(t) if t else t for t in texts], pa.large_string()))
    arr = pc.replace_substring_regex(arr, pattern=_PUNCT, replacement=" ")
    # Arrow's split keeps an empty token for leading/trailing whitespace ("salary?" → "salary "), so trim
    arr = pc.utf8_trim_whitespace(arr)
    arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.large_string()), arr)  # no token, not [""]
    out = pc.utf8_split_whitespace(arr)
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


def token_texts(texts: Sequence[str | None]) -> list[str]:
    """Each text as its normalized tokens joined by single spaces: what the MinHash probe compares,
    so punctuation and formatting differences cannot hide a copy from it either."""
    joined = pc.binary_join(eval_tokens(texts), pa.scalar(" ", pa.large_string()))
    return [t or "" for t in joined.to_pylist()]


def _grams(texts: Sequence[str | None], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token-hash array, token offsets, per-text token counts) — the input to n-gram hashing."""
    tok_h, offsets = token_hashes(eval_tokens(texts), _TOKEN_SEED)
    return tok_h, offsets, np.diff(offsets)


def _exact_ngrams(tok_h: np.ndarray, offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every full n-gram per text (texts shorter than n yield none): (hashes, text index)."""
    h, doc_off = ngram_hashes(tok_h, offsets, n)
    doc = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(doc_off))
    full = np.diff(offsets)[doc] >= n  # drop ngram_hashes' whole-text hash of short texts
    return h[full], doc[full]


def _sha256_path(path: Path) -> str:
    """SHA-256 of a file, or of the sorted (name, SHA-256) list of a directory's files."""
    if path.is_dir():
        lines = [f"{p.relative_to(path)}\t{_sha256_path(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save(path: Path, arr: np.ndarray) -> str:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    return _sha256_path(path)


# --------------------------------------------------------------------------- the index


class EvalNgramIndex:
    """Hashes of every eval 13-gram (and short segment), each naming its eval item; on disk.

    Directory: `manifest.json` (format, n, per set: path, SHA-256, items, n-grams; allow-list
    size; SHA-256 of every array), `items.json` (the `set/item_id` of item number i),
    `ngrams.npy` / `ngram_items.npy` (sorted uint64 hashes and their int32 item numbers; a hash
    shared by several items appears once per item), `short_*.npy` (whole short segments with their
    token length), and `minhash/` (a `MinHashIndex`, one batch per eval set).
    """

    def __init__(self, directory: str | Path, *, verify_sources: bool = True) -> None:
        self.path = Path(directory)
        mpath = self.path / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"{mpath}: no eval index here; build it with EvalNgramIndex.build()")
        self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        if self.manifest.get("format") != _FORMAT:
            raise ValueError(f"{mpath}: format {self.manifest.get('format')!r}, expected {_FORMAT!r}")
        for name, digest in self.manifest["arrays"].items():
            if _sha256_path(self.path / name) != digest:
                raise ValueError(f"{self.path / name}: content differs from the SHA-256 committed in {mpath}")
        if verify_sources:
            self.check_sources()
        self.n: int = self.manifest["n"]
        self.items: list[str] = json.loads((self.path / "items.json").read_text())
        self.ngrams = np.load(self.path / "ngrams.npy", allow_pickle=False)
        self.ngram_items = np.load(self.path / "ngram_items.npy", allow_pickle=False)
        self.short = np.load(self.path / "short_ngrams.npy", allow_pickle=False)
        self.short_items = np.load(self.path / "short_items.npy", allow_pickle=False)
        self.short_lens = np.load(self.path / "short_lens.npy", allow_pickle=False)
        self.minhash = MinHashIndex(self.path / "minhash")
        self.minhash_threshold: float = self.manifest["minhash_threshold"]

    def check_sources(self) -> None:
        """Raise if an eval file present on this machine differs from the one the index committed to."""
        for s in self.manifest["sets"]:
            p = Path(s["path"])
            if p.exists() and _sha256_path(p) != s["sha256"]:
                raise ValueError(
                    f"{p}: eval set {s['name']!r} changed since {self.path} was built "
                    f"(SHA-256 {s['sha256'][:12]}…); rebuild the eval index"
                )

    @classmethod
    def build(
        cls,
        eval_sets: Iterable[EvalSet],
        directory: str | Path,
        *,
        allow_texts: Sequence[str] = (),
        n: int = NGRAM,
        min_short_tokens: int = MIN_SHORT_TOKENS,
        minhash_threshold: float = MINHASH_THRESHOLD,
    ) -> EvalNgramIndex:
        """Read every eval set, hash its n-grams and write the index to `directory` (must be new/empty)."""
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()):
            raise FileExistsError(f"{directory}: not empty; build the eval index into a new directory")
        directory.mkdir(parents=True, exist_ok=True)
        items: list[str] = []
        seg_text: list[str] = []
        seg_item: list[int] = []
        sets_meta: list[dict[str, Any]] = []
        per_set_items: list[tuple[str, int, int]] = []  # name, first item number, end
        for es in eval_sets:
            first = len(items)
            for item_id, segments in es.loader(es.path):
                items.append(f"{es.name}/{item_id}")
                for seg in segments:
                    seg_text.append(seg)
                    seg_item.append(len(items) - 1)
            per_set_items.append((es.name, first, len(items)))
            sets_meta.append({"name": es.name, "path": str(es.path.resolve()), "sha256": _sha256_path(es.path),
                              "items": len(items) - first})
        if len(set(items)) != len(items):
            raise ValueError("eval item ids are not unique across the configured sets (two sets with one name?)")
        seg_item_a = np.array(seg_item, dtype=np.int32)

        tok_h, offsets, lens = _grams(seg_text, n)
        h, seg = _exact_ngrams(tok_h, offsets, n)
        item = seg_item_a[seg]
        removed = 0
        if allow_texts:
            a_h, a_off, _ = _grams(list(allow_texts), n)
            allow_h = np.unique(_exact_ngrams(a_h, a_off, n)[0])
            keep = ~np.isin(h, allow_h)
            removed = len(np.unique(h[~keep]))
            h, item = h[keep], item[keep]
        # segments come in item order, so a stable sort by hash keeps items ascending within a hash
        order = np.argsort(h, kind="stable")
        h, item = h[order], item[order]
        first = np.r_[True, (h[1:] != h[:-1]) | (item[1:] != item[:-1])] if len(h) else np.empty(0, dtype=bool)
        ngrams, ngram_items = h[first], item[first].astype(np.int32)

        short_seg = np.flatnonzero((lens >= min_short_tokens) & (lens < n))
        s_h, s_len, s_item = [], [], []
        for k in np.unique(lens[short_seg]):
            segs = short_seg[lens[short_seg] == k]
            hk, dk = _exact_ngrams(tok_h, offsets, int(k))
            sel = np.isin(dk, segs)
            s_h.append(hk[sel])
            s_len.append(np.full(int(sel.sum()), k, dtype=np.int32))
            s_item.append(seg_item_a[dk[sel]])
        short = np.concatenate(s_h) if s_h else np.empty(0, dtype=np.uint64)
        short_lens = np.concatenate(s_len) if s_len else np.empty(0, dtype=np.int32)
        short_items = np.concatenate(s_item) if s_item else np.empty(0, dtype=np.int32)
        order = np.lexsort((short_items, short, short_lens))
        short, short_lens, short_items = short[order], short_lens[order], short_items[order]

        for meta, (_, lo, hi) in zip(sets_meta, per_set_items, strict=True):
            in_set = (seg_item_a >= lo) & (seg_item_a < hi)
            meta["segments"] = int(in_set.sum())
            meta["ngrams"] = int(((ngram_items >= lo) & (ngram_items < hi)).sum())
            meta["short_segments_indexed"] = int(((short_items >= lo) & (short_items < hi)).sum())
            meta["segments_too_short"] = int((in_set & (lens < min_short_tokens)).sum())

        # whole-item MinHash signatures, one index batch per eval set
        params = MinHashParams.for_threshold(minhash_threshold)
        mh = MinHashIndex(directory / "minhash", params)
        item_text = [""] * len(items)
        for i, t in zip(seg_item, seg_text, strict=True):
            item_text[i] = f"{item_text[i]}\n{t}" if item_text[i] else t
        for name, lo, hi in per_set_items:
            sig = signature(token_texts(item_text[lo:hi]), params)
            mh.add_batch(name, items[lo:hi], sig)

        arrays = {
            "ngrams.npy": _save(directory / "ngrams.npy", ngrams),
            "ngram_items.npy": _save(directory / "ngram_items.npy", ngram_items),
            "short_ngrams.npy": _save(directory / "short_ngrams.npy", short),
            "short_items.npy": _save(directory / "short_items.npy", short_items),
            "short_lens.npy": _save(directory / "short_lens.npy", short_lens),
        }
        (directory / "items.json").write_text(json.dumps(items))
        arrays["items.json"] = _sha256_path(directory / "items.json")
        manifest = {
            "format": _FORMAT, "n": n, "min_short_tokens": min_short_tokens, "token_seed": _TOKEN_SEED,
            "normalization": "NFKC, lowercase, non-[letter|digit|mark] runs -> space, whitespace split",
            "minhash_threshold": minhash_threshold, "sets": sets_meta,
            "allow_list": {"texts": len(allow_texts), "ngrams_removed": removed,
                           "sha256": hashlib.sha256("\x1e".join(allow_texts).encode()).hexdigest()},
            "unique_ngrams": int((np.diff(ngrams) != 0).sum()) + int(len(ngrams) > 0), "arrays": arrays,
        }
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
        return cls(directory, verify_sources=False)

    # ----------------------------------------------------------------- matching

    def ngram_hits(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (text row, eval item number, distinct shared n-grams) with at least one shared n-gram.

        Exhaustive: all n-grams of every text (and all k-grams for the short-segment lengths k).
        """
        tok_h, offsets, _ = _grams(texts, self.n)
        doc_parts: list[np.ndarray] = []
        item_parts: list[np.ndarray] = []
        key_parts: list[np.ndarray] = []
        h, doc = _exact_ngrams(tok_h, offsets, self.n)
        self._lookup(h, doc, self.ngrams, self.ngram_items, doc_parts, item_parts, key_parts)
        for k in np.unique(self.short_lens):
            lo, hi = np.searchsorted(self.short_lens, [k, k + 1])
            hk, dk = _exact_ngrams(tok_h, offsets, int(k))
            self._lookup(hk, dk, self.short[lo:hi], self.short_items[lo:hi], doc_parts, item_parts, key_parts)
        if not doc_parts:
            e = np.empty(0, dtype=np.int64)
            return e, e, e
        doc = np.concatenate(doc_parts)
        item = np.concatenate(item_parts)
        key = np.concatenate(key_parts)
        # count distinct n-grams per (doc, item): repeated n-grams in a document count once
        trip = np.unique(np.stack([doc, item, key.view(np.int64)], axis=1), axis=0)
        pair, counts = np.unique(trip[:, :2], axis=0, return_counts=True)
        return pair[:, 0], pair[:, 1], counts

    @staticmethod
    def _lookup(h: np.ndarray, doc: np.ndarray, table: np.ndarray, table_items: np.ndarray,
                doc_parts: list[np.ndarray], item_parts: list[np.ndarray], key_parts: list[np.ndarray]) -> None:
        if len(h) == 0 or len(table) == 0:
            return
        # Search the table with sorted queries (5× faster than random order: cache locality), then map
        # the few hit values back onto the documents through a small sorted array.
        qs = np.sort(h)
        pos = np.minimum(np.searchsorted(table, qs), len(table) - 1)
        found = qs[table[pos] == qs]
        if len(found) == 0:
            return
        found = found[np.r_[True, found[1:] != found[:-1]]]
        j = np.minimum(np.searchsorted(found, h), len(found) - 1)
        hit = found[j] == h
        left = np.searchsorted(table, h[hit], "left")
        right = np.searchsorted(table, h[hit], "right")
        h, doc = h[hit], doc[hit]
        owner, pos = expand_runs(left, right - left)
        doc_parts.append(doc[owner])
        item_parts.append(table_items[pos].astype(np.int64))
        key_parts.append(h[owner])

    def near_duplicates(self, texts: Sequence[str | None], threshold: float | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(text row, eval item number, estimated Jaccard) of whole-item MinHash matches ≥ threshold."""
        sig = signature(token_texts(texts), self.minhash.params)
        m = self.minhash.query(sig, self.minhash_threshold if threshold is None else threshold)
        rows = np.r_[m.exact_query, m.near_query].astype(np.int64)
        idx_rows = np.r_[m.exact_row, m.near_row].astype(np.int64)
        sims = np.r_[np.ones(len(m.exact_query)), m.near_similarity]
        item_no = {name: i for i, name in enumerate(self.items)}
        items = np.array([item_no[d] for d in self.minhash.doc_id(idx_rows)], dtype=np.int64)
        return rows, items, sims


# --------------------------------------------------------------------------- table-level API

CONTAMINATION_COLUMNS = ("reason", "eval_set", "eval_item_id", "ngram_hits", "items_hit", "similarity")


def decontaminate_table(
    table: pa.Table,
    index: EvalNgramIndex,
    *,
    min_ngram_hits: int = 1,
    minhash_threshold: float | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Split `table` (needs `doc_id`, `text`) into (clean, contaminated-with-reason).

    A document is contaminated if it shares ≥ `min_ngram_hits` distinct 13-grams with one eval
    item (reason `eval_ngram_overlap`) or its MinHash similarity to a whole eval item is ≥ the
    threshold (reason `eval_near_duplicate`). The reason columns name the eval set and item with
    the most shared 13-grams (or the most similar item), the count of shared 13-grams with it,
    how many eval items were hit at all, and the estimated similarity (near-duplicates only).
    """
    texts = table["text"].to_pylist()
    n = table.num_rows
    best_item = np.full(n, -1, dtype=np.int64)
    best_hits = np.zeros(n, dtype=np.int64)
    items_hit = np.zeros(n, dtype=np.int64)
    doc, item, counts = index.ngram_hits(texts)
    ok = counts >= min_ngram_hits
    doc, item, counts = doc[ok], item[ok], counts[ok]
    if len(doc):
        order = np.lexsort((item, -counts, doc))  # per doc: most hits first, then lowest item number
        doc, item, counts = doc[order], item[order], counts[order]
        first = np.r_[True, doc[1:] != doc[:-1]]
        best_item[doc[first]] = item[first]
        best_hits[doc[first]] = counts[first]
        items_hit[:] = np.bincount(doc, minlength=n)
    reason = np.where(best_item >= 0, "eval_ngram_overlap", "").astype(object)  # object: no truncation
    similarity = np.full(n, np.nan)
    r, it, sim = index.near_duplicates(texts, minhash_threshold)
    if len(r):
        order = np.lexsort((it, -sim, r))
        r, it, sim = r[order], it[order], sim[order]
        first = np.r_[True, r[1:] != r[:-1]]
        for row, i, s in zip(r[first], it[first], sim[first], strict=True):
            similarity[row] = s
            if best_item[row] < 0:
                best_item[row] = i
                reason[row] = "eval_near_duplicate"
                items_hit[row] = int((r == row).sum())
    bad = best_item >= 0
    clean = table.filter(pa.array(~bad))
    rows = np.flatnonzero(bad)
    contaminated = table.take(pa.array(rows, pa.int64()))
    names = [index.items[i] for i in best_item[rows]]
    extra = {
        "reason": pa.array(reason[rows].tolist(), pa.string()),
        "eval_set": pa.array([s.split("/", 1)[0] for s in names], pa.string()),
        "eval_item_id": pa.array([s.split("/", 1)[1] for s in names], pa.string()),
        "ngram_hits": pa.array(best_hits[rows], pa.int64()),
        "items_hit": pa.array(items_hit[rows], pa.int64()),
        "similarity": pa.array(similarity[rows], pa.float64(), from_pandas=True),
    }
    for name, col in extra.items():
        if name in contaminated.column_names:
            contaminated = contaminated.drop_columns([name])
        contaminated = contaminated.append_column(name, col)
    return clean, contaminated


def assert_no_eval_ngrams(table: pa.Table, index: EvalNgramIndex) -> list[tuple[str, str]]:
    """The blocking check: every (doc_id, "set/item") sharing at least one indexed 13-gram.

    Exhaustive — every 13-gram (and short-segment k-gram) of every document is looked up; an empty
    list means the table is clean. The caller decides to fail (an asset check with blocking=True).
    """
    doc, item, _ = index.ngram_hits(table["text"].to_pylist())
    ids = table["doc_id"].to_pylist()
    return [(ids[d], index.items[i]) for d, i in zip(doc.tolist(), item.tolist(), strict=True)]


def load_task_items(path: Path) -> Iterator[tuple[str, list[str]]]:
    """JSONL items `{"id", "prompt", "answer"}` (the generated structured-task eval sets)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                yield str(r["id"]), [r["prompt"], str(r.get("answer", ""))]


def eval_sets_by_name(names: Iterable[str], root: str | Path) -> list[EvalSet]:
    """Configured eval sets by name: the four public ones (shared/data/evals layout) and `demo_tasks`."""
    root = Path(root)
    known = {es.name: es for es in default_eval_sets(root)}
    known["demo_tasks"] = EvalSet("demo_tasks", root / "demo_tasks.jsonl", load_task_items)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown eval set(s) {unknown}; known: {sorted(known)}")
    return [known[n] for n in names]
