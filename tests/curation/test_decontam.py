"""The contamination firewall against the real sealed eval sets in ../shared/data/evals."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from flywheel.curation.decontam import (
    EvalNgramIndex,
    EvalSet,
    assert_no_eval_ngrams,
    decontaminate_table,
    default_eval_sets,
    eval_tokens,
    load_gsm8k,
    load_mmlu,
)
from flywheel.curation.documents import doc_id_for, documents_table
from tests.conftest import shared

DECLARATION = "We hold these truths to be self-evident, that all men are created equal"


@pytest.fixture(scope="module")
def eval_index(tmp_path_factory: pytest.TempPathFactory) -> EvalNgramIndex:
    directory = tmp_path_factory.mktemp("eval-index") / "index"
    return EvalNgramIndex.build(default_eval_sets(shared("evals")), directory)


def gsm8k_test() -> list[dict]:
    with open(shared("evals/gsm8k/test.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def c4_docs(n: int = 300) -> list[dict]:
    with open(shared("corpora/c4_demo.jsonl"), encoding="utf-8") as f:
        return [{"doc_id": f"c4-{i}", "text": json.loads(line)["text"]} for i, line in enumerate(f) if i < n]


def test_index_is_hash_committed_and_names_every_set(eval_index: EvalNgramIndex) -> None:
    m = eval_index.manifest
    assert [s["name"] for s in m["sets"]] == ["gsm8k", "mmlu", "truthfulqa", "humaneval"]
    assert [s["items"] for s in m["sets"]] == [1319, 14042, 817, 164]
    from flywheel.curation.decontam import _sha256_path

    for s in m["sets"]:
        assert s["sha256"] == _sha256_path(Path(s["path"]))
        assert s["ngrams"] > 0
    assert eval_index.ngrams.dtype == np.uint64 and len(eval_index.ngrams) == len(eval_index.ngram_items)
    assert (eval_index.ngrams[1:] >= eval_index.ngrams[:-1]).all()  # sorted for searchsorted
    reopened = EvalNgramIndex(eval_index.path)
    assert reopened.items == eval_index.items and (reopened.ngrams == eval_index.ngrams).all()


def test_planted_gsm8k_question_in_a_web_page_is_flagged_naming_the_item(eval_index: EvalNgramIndex) -> None:
    item = gsm8k_test()[17]
    docs = c4_docs(50)
    page = docs[3]["text"]
    cut = len(page) // 2
    planted = {"doc_id": "planted", "text": f"{page[:cut]}\n\nHomework help: {item['question']}\n\n{page[cut:]}"}
    table = documents_table([*docs, planted])
    clean, bad = decontaminate_table(table, eval_index)
    assert bad["doc_id"].to_pylist() == ["planted"]
    row = bad.to_pylist()[0]
    assert (row["reason"], row["eval_set"], row["eval_item_id"]) == ("eval_ngram_overlap", "gsm8k", "test-17")
    question_tokens = len(eval_tokens([item["question"]])[0])
    assert row["ngram_hits"] == question_tokens - 13 + 1  # every 13-gram of the question, none else
    assert clean.num_rows == 50 and "planted" not in clean["doc_id"].to_pylist()
    # the blocking check names the same item, and only that one
    assert assert_no_eval_ngrams(table, eval_index) == [("planted", "gsm8k/test-17")]


def test_clean_web_text_is_not_flagged(eval_index: EvalNgramIndex) -> None:
    table = documents_table(c4_docs(300))
    clean, bad = decontaminate_table(table, eval_index)
    assert bad.num_rows == 0 and clean.num_rows == 300
    assert assert_no_eval_ngrams(table, eval_index) == []


def test_dolma_crawl_sample_flags_nothing(eval_index: EvalNgramIndex) -> None:
    path = next(shared("corpora/dolma_cc").glob("CC-MAIN-*.jsonl.gz"))
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    table = documents_table({"doc_id": doc_id_for("dolma_cc", r["id"]), "text": r["text"]} for r in rows)
    clean, bad = decontaminate_table(table, eval_index)
    assert bad.num_rows == 0, bad.select(["doc_id", "eval_set", "eval_item_id", "ngram_hits"]).to_pylist()
    assert clean.num_rows == 697


def test_check_is_exhaustive_at_document_edges(eval_index: EvalNgramIndex) -> None:
    # the first and the last 13 tokens of long documents, and a document that is exactly one 13-gram
    q = gsm8k_test()[400]["question"]
    first13 = " ".join(eval_tokens([q])[0].as_py()[:13])
    last13 = " ".join(eval_tokens([q])[0].as_py()[-13:])
    filler = " ".join(f"filler{i}" for i in range(5000))
    table = documents_table([
        {"doc_id": "head", "text": f"{first13} {filler}"},
        {"doc_id": "tail", "text": f"{filler} {last13}"},
        {"doc_id": "only", "text": last13.upper()},
        {"doc_id": "twelve", "text": " ".join(last13.split()[1:])},  # 12 tokens: no 13-gram
    ])
    hits = assert_no_eval_ngrams(table, eval_index)
    assert sorted(hits) == [("head", "gsm8k/test-400"), ("only", "gsm8k/test-400"), ("tail", "gsm8k/test-400")]


def test_reformatted_eval_item_is_caught_by_the_minhash_probe(eval_index: EvalNgramIndex) -> None:
    # replace every 13th token: no 13-gram survives, but the whole item stays similar (Jaccard ≈ 0.44)
    _, segments = list(load_gsm8k(shared("evals/gsm8k/test.jsonl")))[250]
    words = eval_tokens([" ".join(segments)])[0].as_py()
    text = " ".join("xyzzy" if i % 13 == 6 else w for i, w in enumerate(words))
    table = documents_table([{"doc_id": "reworded", "text": text}])
    assert assert_no_eval_ngrams(table, eval_index) == []
    _, bad = decontaminate_table(table, eval_index, minhash_threshold=0.35)
    row = bad.to_pylist()[0]
    assert (row["reason"], row["eval_set"], row["eval_item_id"]) == ("eval_near_duplicate", "gsm8k", "test-250")
    assert row["ngram_hits"] == 0 and 0.35 <= row["similarity"] < 1.0
    # GSM8K's own Socratic rewrite of the test set is contamination: every line is caught
    with open(shared("evals/gsm8k/test_socratic.jsonl"), encoding="utf-8") as f:
        socratic = [json.loads(line) for line in f]
    table = documents_table({"doc_id": f"soc-{i}", "text": f"{r['question']}\n{r['answer']}"}
                            for i, r in enumerate(socratic))
    _, bad = decontaminate_table(table, eval_index)
    assert bad.num_rows == 1319
    named = bad.select(["doc_id", "eval_item_id"]).to_pylist()
    assert sum(r["eval_item_id"] == f"test-{r['doc_id'][4:]}" for r in named) >= 1300


def test_speeches_hit_mmlu_passages_and_the_allow_list_removes_a_famous_quote(
    eval_index: EvalNgramIndex, tmp_path: Path
) -> None:
    with open(shared("corpora/speeches/state_union.jsonl"), encoding="utf-8") as f:
        speeches = {json.loads(line)["id"]: json.loads(line)["text"] for line in f}
    devils = shared("corpora/gutenberg/pg972_devils_dictionary.txt").read_text(encoding="utf-8", errors="replace")
    table = documents_table([
        {"doc_id": "carter-1980", "text": speeches["1980-Carter.txt"]},
        {"doc_id": "devils-dictionary", "text": devils},
    ])
    hits = assert_no_eval_ngrams(table, eval_index)
    # genuine: MMLU US-history items quote Carter's 1980 State of the Union verbatim
    assert ("carter-1980", "mmlu/high_school_us_history-16") in hits
    # common quotation: the Declaration of Independence sentence inside an MMLU question
    assert ("devils-dictionary", "mmlu/high_school_government_and_politics-183") in hits

    gov = shared("evals/mmlu/test/high_school_government_and_politics_test.csv")
    (tmp_path / "mmlu").mkdir()
    local = tmp_path / "mmlu" / gov.name
    shutil.copy(gov, local)
    sets = [EvalSet("mmlu", local, load_mmlu)]
    strict = EvalNgramIndex.build(sets, tmp_path / "strict")
    allowed = EvalNgramIndex.build(sets, tmp_path / "allowed", allow_texts=[DECLARATION])
    assert allowed.manifest["allow_list"]["ngrams_removed"] == 2
    devils_only = table.slice(1, 1)
    assert assert_no_eval_ngrams(devils_only, strict) == [("devils-dictionary", "mmlu/high_school_government_and_politics-183")]
    assert assert_no_eval_ngrams(devils_only, allowed) == []
    # the index is committed to its source: a changed eval file makes it refuse to load
    local.write_text(local.read_text() + '"A new question?",a,b,c,d,0\n')
    with pytest.raises(ValueError, match="changed since"):
        EvalNgramIndex(tmp_path / "strict")
    # and to its arrays: a tampered n-gram file is refused too
    arr = np.load(tmp_path / "allowed" / "ngrams.npy")
    np.save(tmp_path / "allowed" / "ngrams.npy", arr[1:])
    with pytest.raises(ValueError, match="SHA-256 committed"):
        EvalNgramIndex(tmp_path / "allowed", verify_sources=False)


def test_gsm8k_loader_indexes_answers_with_and_without_calculator_marks() -> None:
    item_id, segments = next(load_gsm8k(shared("evals/gsm8k/test.jsonl")))
    assert item_id == "test-0"
    assert "<<16-3-4=9>>" in segments[1] and "<<" not in segments[2]
