"""Exact + MinHash-LSH dedup and the persistent index, on real corpora from ../shared/data."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from flywheel.curation.dedup import (
    MinHashIndex,
    MinHashParams,
    candidate_probability,
    choose_bands,
    comparison_text,
    dedup_table,
    signature,
)
from flywheel.curation.documents import created, doc_id_for, documents_table
from tests.conftest import ROOT, shared


def dolma_table() -> pa.Table:
    path = next(shared("corpora/dolma_cc").glob("CC-MAIN-*.jsonl.gz"))
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return documents_table(
        {"doc_id": doc_id_for("dolma_cc", r["id"]), "source": "dolma_cc", "text": r["text"],
         "created_at": created(r["created"]), "url": r["metadata"].get("url")}
        for r in rows
    )


def gsm8k_pairs_table() -> pa.Table:
    rows = []
    for split in ("test", "test_socratic"):
        with open(shared(f"evals/gsm8k/{split}.jsonl"), encoding="utf-8") as f:
            for i, line in enumerate(f):
                r = json.loads(line)
                rows.append({"doc_id": f"{split}:{i}", "source": split, "text": f"{r['question']}\n{r['answer']}"})
    return documents_table(rows)


def edit_words(text: str, every: int, tag: str) -> str:
    """Deterministic near-duplicate: replace every `every`-th word with a marker word."""
    words = text.split()
    return " ".join(f"{tag}{i}" if i % every == every // 2 else w for i, w in enumerate(words))


# --------------------------------------------------------------------------- band choice


def test_band_choice_puts_the_s_curve_just_below_the_threshold() -> None:
    assert choose_bands(0.8) == (16, 8)
    b, r = choose_bands(0.8)
    assert (1 / b) ** (1 / r) == pytest.approx(0.707, abs=0.001)  # inflection below the threshold
    assert candidate_probability(0.8, b, r) == pytest.approx(0.947, abs=0.001)
    assert candidate_probability(0.85, b, r) > 0.99
    assert candidate_probability(0.5, b, r) < 0.07  # few spurious candidates to verify
    # the alternative factorization 8 × 16 would lose 80% of the pairs right at 0.8
    assert candidate_probability(0.8, 8, 16) < 0.21
    assert choose_bands(0.5) == (64, 2)
    assert MinHashParams.for_threshold(0.8) == MinHashParams(bands=16, rows=8)


def test_normalization_collapses_case_width_and_whitespace() -> None:
    assert comparison_text("Ｈello\r\n\tWORLD\xa0 ") == "hello world"
    assert comparison_text("Straße") == "strasse"  # casefold, not lower
    sig = signature(["A  b c d e f", "a b\r\nC d e F", "", None], MinHashParams())
    assert sig.exact[0] == sig.exact[1] and sig.exact[2] == sig.exact[3]
    assert (sig.minhash[0] == sig.minhash[1]).all()
    assert sig.shingles.tolist() == [2, 2, 0, 0]
    # the batch path (Arrow whitespace split) hashes exactly the one-text reference on real pages
    import xxhash

    texts = dolma_table()["text"].to_pylist() + ["x\x1cy\u2028z\u3000w\x85v ﬁ…²"]
    ref = np.frombuffer(b"".join(xxhash.xxh3_128_digest(comparison_text(t).encode()) for t in texts), dtype="V16")
    assert (signature(texts, MinHashParams()).exact == ref).all()


# --------------------------------------------------------------------------- real corpora


def test_dolma_cc_exact_stage_drops_the_35_duplicates() -> None:
    table = dolma_table()
    assert table.num_rows == 697
    res = dedup_table(table)
    exact = res.excluded.filter(pc.equal(res.excluded["reason"], "exact_duplicate"))
    # 4 groups of identical texts: 27 empty pages, 7 × "Processing Feedback ...", 3 ACB publication
    # pages, 2 × "Log in with OpenID" → 26 + 6 + 2 + 1 = 35 dropped, one kept per group
    assert exact.num_rows == res.stats["exact_duplicates"] == 35
    assert res.stats["docs_without_shingles"] == 27
    texts = {d: t for d, t in zip(table["doc_id"].to_pylist(), table["text"].to_pylist(), strict=True)}
    for row in exact.to_pylist():
        assert comparison_text(texts[row["kept_doc_id"]]) == comparison_text(row["text"])
        assert row["similarity"] == 1.0 and row["kept_batch_id"] is None
    # the near stage finds one more: two "Broadside Ballads Online" search pages
    near = res.excluded.filter(pc.equal(res.excluded["reason"], "near_duplicate"))
    assert near.num_rows == 1 and near["text"][0].as_py().startswith("Broadside Ballads Online")
    assert near["similarity"][0].as_py() >= 0.8
    # nothing vanishes: kept + excluded == input, disjoint
    kept_ids, excl_ids = set(res.kept["doc_id"].to_pylist()), set(res.excluded["doc_id"].to_pylist())
    assert kept_ids.isdisjoint(excl_ids) and kept_ids | excl_ids == set(texts)
    assert res.kept.schema == table.schema
    # one kept row per cluster, and every excluded row is a 'dropped' member of its kept doc's cluster
    clusters = res.clusters.to_pylist()
    assert sum(c["role"] == "kept" for c in clusters) == res.stats["clusters"] == 5
    assert {c["doc_id"] for c in clusters if c["role"] == "dropped"} == excl_ids


def test_keep_rule_is_earliest_then_longest_and_independent_of_row_order() -> None:
    base = dolma_table().slice(0, 200)
    res = dedup_table(base)
    shuffled = base.take(pa.array(np.random.default_rng(7).permutation(base.num_rows)))
    res2 = dedup_table(shuffled)
    assert sorted(res.kept["doc_id"].to_pylist()) == sorted(res2.kept["doc_id"].to_pylist())
    # an earlier copy wins over a later, longer one; with equal times the longer one wins
    from datetime import UTC, datetime

    text = base["text"][5].as_py()
    rows = [
        {"doc_id": "late-long", "text": text + " extra words here", "created_at": datetime(2020, 1, 2, tzinfo=UTC)},
        {"doc_id": "early", "text": text, "created_at": datetime(2020, 1, 1, tzinfo=UTC)},
        {"doc_id": "no-date", "text": text},
    ]
    res3 = dedup_table(documents_table(rows))
    assert res3.kept["doc_id"].to_pylist() == ["early"]
    rows[1]["created_at"] = rows[0]["created_at"]
    assert dedup_table(documents_table(rows)).kept["doc_id"].to_pylist() == ["late-long"]


def test_gutenberg_old_editions_are_near_duplicates_of_the_new_ones() -> None:
    # whole books, one document each (CRLF line endings vanish in whitespace normalization)
    paths = sorted(shared("corpora/gutenberg").glob("pg*.txt"))
    assert len(paths) == 5
    rows = [{"doc_id": p.stem, "text": p.read_text(encoding="utf-8", errors="replace")} for p in paths]
    res = dedup_table(documents_table(rows))
    dropped = {r["doc_id"]: r for r in res.excluded.to_pylist()}
    assert set(dropped) == {"pg3261_news_from_nowhere_OLD_nwsnw10", "pg972_devils_dictionary_OLD_dvldc10"}
    # the new editions are longer, so they are kept; exact 5-gram Jaccard is 0.911 and 0.856
    assert dropped["pg3261_news_from_nowhere_OLD_nwsnw10"]["kept_doc_id"] == "pg3261_news_from_nowhere"
    assert dropped["pg972_devils_dictionary_OLD_dvldc10"]["kept_doc_id"] == "pg972_devils_dictionary"
    assert dropped["pg3261_news_from_nowhere_OLD_nwsnw10"]["similarity"] == pytest.approx(0.911, abs=0.08)
    assert dropped["pg972_devils_dictionary_OLD_dvldc10"]["similarity"] == pytest.approx(0.856, abs=0.08)
    assert all(r["reason"] == "near_duplicate" for r in dropped.values())
    assert "pg1342_pride_and_prejudice" in res.kept["doc_id"].to_pylist()


def test_gsm8k_socratic_rewrites_are_found_at_threshold_0_5() -> None:
    # test line i ↔ test_socratic line i: same question, answer interleaved with sub-questions;
    # exact 5-gram Jaccard has median 0.59 and 81.7% of pairs are ≥ 0.5 (none reach 0.8 but 0.5%)
    table = gsm8k_pairs_table()
    res = dedup_table(table, threshold=0.5)
    pairs = res.pairs.filter(pc.equal(res.pairs["kind"], "near")).to_pylist()
    linked = {tuple(sorted((p["doc_id"], p["other_doc_id"]))) for p in pairs}
    aligned = {(f"test:{i}", f"test_socratic:{i}") for i in range(1319)}
    recall = len(linked & aligned) / len(aligned)
    wrong = [p for p in linked if p[0].split(":")[1] != p[1].split(":")[1]]
    print(f"gsm8k test↔socratic recall at 0.5: {recall:.3f}; pairs across different items: {len(wrong)}")
    assert recall >= 0.75
    assert len(wrong) <= 2  # distinct GSM8K problems do not look alike at 0.5
    # at the default 0.8 the rewrite is (correctly) not a near-duplicate
    assert dedup_table(table).stats["near_duplicates"] <= 20


# --------------------------------------------------------------------------- the persistent index


BATCH1_SCRIPT = """
import sys
from pathlib import Path
import pyarrow.parquet as pq
from flywheel.curation.dedup import MinHashIndex, dedup_table
table = pq.read_table(sys.argv[2])
res = dedup_table(table, MinHashIndex(Path(sys.argv[1])), batch_id="shard-1")
print(res.stats["kept"])
"""


def test_incremental_batch_matches_an_earlier_shard_after_a_process_restart(tmp_path: Path) -> None:
    table = dolma_table()
    batch1 = table.slice(0, 400)
    pq.write_table(batch1, tmp_path / "batch1.parquet")
    index_dir = tmp_path / "index"
    # batch 1 is deduplicated and indexed by another process, which then exits
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(BATCH1_SCRIPT), str(index_dir),
                          str(tmp_path / "batch1.parquet")], cwd=ROOT, capture_output=True, text=True, check=True)
    kept1 = int(out.stdout.strip())
    batch1_files = {p.name: p.read_bytes() for p in index_dir.glob("b000001-*")}
    index = MinHashIndex(index_dir)  # reopened from disk
    assert len(index) == kept1

    # batch 2: the rest of the crawl + an exact copy and an edited copy of batch-1 documents
    src = [r for r in batch1.to_pylist() if r["doc_id"] in index and len((r["text"] or "").split()) > 300][:2]
    copies = [
        {"doc_id": "copy-exact", "text": src[0]["text"].replace(" ", "\t ")},  # same after normalization
        {"doc_id": "copy-edited", "text": edit_words(src[1]["text"], 100, "zzedit")},  # Jaccard ≈ 0.9
    ]
    batch2 = pa.concat_tables([table.slice(400), documents_table(copies)])
    res = dedup_table(batch2, index, batch_id="shard-2")
    excluded = {r["doc_id"]: r for r in res.excluded.to_pylist()}
    assert excluded["copy-exact"]["reason"] == "exact_duplicate"
    assert excluded["copy-exact"]["kept_doc_id"] == src[0]["doc_id"]
    assert excluded["copy-exact"]["kept_batch_id"] == "shard-1"
    assert excluded["copy-edited"]["reason"] == "near_duplicate"
    assert excluded["copy-edited"]["kept_doc_id"] == src[1]["doc_id"]
    assert excluded["copy-edited"]["kept_batch_id"] == "shard-1"
    assert 0.8 <= excluded["copy-edited"]["similarity"] < 1.0
    # the rest of the crawl's duplicates (empty pages etc.) also point into shard-1
    assert res.stats["index_matches"] == res.excluded.num_rows
    # the in-memory state after add_batch (merged, not reloaded) equals a fresh load from disk
    fresh = MinHashIndex(index_dir)
    for attr in ("_ids", "_exact_sorted", "_exact_order", "_band_sorted", "_band_row", "_batch_of"):
        assert np.array_equal(getattr(index, attr), getattr(fresh, attr)), attr
    # the earlier shard was read, not recomputed or rewritten
    assert {p.name: p.read_bytes() for p in index_dir.glob("b000001-*")} == batch1_files
    assert [b["batch_id"] for b in MinHashIndex(index_dir).batches] == ["shard-1", "shard-2"]
    MinHashIndex(index_dir).verify()


def test_rerunning_a_batch_is_refused_until_it_is_removed(tmp_path: Path) -> None:
    batch = dolma_table().slice(0, 120)
    index = MinHashIndex(tmp_path / "index")
    first = dedup_table(batch, index, batch_id="shard-a")
    with pytest.raises(ValueError, match="already indexed"):
        dedup_table(batch, index, batch_id="shard-a2")
    assert index.remove_batch("shard-a") == first.stats["kept"]
    again = dedup_table(batch, index, batch_id="shard-a")
    assert again.kept["doc_id"].to_pylist() == first.kept["doc_id"].to_pylist()
    with pytest.raises(ValueError, match="index was built with"):
        MinHashIndex(tmp_path / "index", MinHashParams.for_threshold(0.5))


def test_removal_leaves_no_trace_and_stops_suppressing(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    index = MinHashIndex(index_dir)
    table = dolma_table().slice(0, 300)
    dedup_table(table, index, batch_id="shard-1")
    victim = next(r for r in table.to_pylist() if r["doc_id"] in index and len((r["text"] or "").split()) > 300)
    row = index.doc_id(np.arange(len(index))).index(victim["doc_id"])
    sig_bytes = index.signatures(np.array([row]))[0].tobytes()
    bands_bytes = np.load(index_dir / index.batches[0]["files"]["bands"])[row].tobytes()
    exact_bytes = signature([victim["text"]], index.params).exact[0].tobytes()

    def traces() -> list[str]:
        found = []
        for p in index_dir.iterdir():
            raw = p.read_bytes()
            found += [f"{p.name}:{kind}" for kind, needle in
                      (("sig", sig_bytes), ("bands", bands_bytes), ("exact", exact_bytes),
                       ("doc_id", victim["doc_id"].encode())) if needle in raw]
            if p.name.endswith(".docs.parquet"):
                ids = pq.read_table(p)["doc_id"].to_pylist()
                found += [f"{p.name}:doc_id-decoded"] if victim["doc_id"] in ids else []
        return found

    before = traces()
    assert any(t.endswith(":sig") for t in before) and any(t.endswith(":bands") for t in before)
    assert any(t.endswith(":doc_id-decoded") for t in before)

    # a near-duplicate of the victim is suppressed while the victim is indexed ...
    probe = documents_table([{"doc_id": "probe", "text": edit_words(victim["text"], 100, "zzprobe")}])
    res = dedup_table(probe, index, batch_id="probe-1")
    assert res.excluded["kept_doc_id"].to_pylist() == [victim["doc_id"]]

    assert index.remove([victim["doc_id"], "not-indexed"]) == 1
    assert traces() == []
    assert victim["doc_id"] not in index and victim["doc_id"] not in MinHashIndex(index_dir)
    MinHashIndex(index_dir).verify()
    # ... and anchors nothing once removed; the other shard-1 documents still do
    probe2 = documents_table([{"doc_id": "probe-2", "text": edit_words(victim["text"], 100, "zzprobe")}])
    assert dedup_table(probe2, MinHashIndex(index_dir), batch_id="probe-2").kept.num_rows == 1
    other = next(r for r in table.to_pylist()
                 if r["doc_id"] != victim["doc_id"] and r["doc_id"] in index and len((r["text"] or "").split()) > 300)
    probe3 = documents_table([{"doc_id": "probe-3", "text": edit_words(other["text"], 100, "zzp3")}])
    assert dedup_table(probe3, index, batch_id="probe-3").excluded["kept_doc_id"].to_pylist() == [other["doc_id"]]


CONCURRENT_SCRIPT = """
import sys, time
from pathlib import Path
from flywheel.curation.dedup import MinHashIndex, dedup_table
from flywheel.curation.documents import documents_table
text = Path(sys.argv[2]).read_text()
name = sys.argv[3]
go = Path(sys.argv[2]).with_name("go")
deadline = time.monotonic() + 120
while not go.exists() and time.monotonic() < deadline:  # start together: all imports done
    time.sleep(0.005)
res = dedup_table(documents_table([{"doc_id": name, "text": text}]), MinHashIndex(Path(sys.argv[1])), batch_id=name)
print(res.stats["kept"])
"""


def test_two_writers_never_both_keep_the_same_document(tmp_path: Path) -> None:
    text = next(r["text"] for r in dolma_table().to_pylist() if len((r["text"] or "").split()) > 300)
    (tmp_path / "doc.txt").write_text(text)
    MinHashIndex(tmp_path / "index")
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(CONCURRENT_SCRIPT), str(tmp_path / "index"),
                               str(tmp_path / "doc.txt"), f"writer-{i}"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for i in range(3)]
    time.sleep(3)  # let every writer finish importing, then release them at once
    (tmp_path / "go").touch()
    kept = [int(p.communicate(timeout=300)[0].strip()) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(kept) == [0, 0, 1]  # the filelock serializes query+add: exactly one writer keeps it
    assert len(MinHashIndex(tmp_path / "index")) == 1
