"""Cleaning, boilerplate removal and quality filters, on real documents from ../shared/data."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from flywheel.curation.boilerplate import LineFrequency, remove_boilerplate
from flywheel.curation.documents import DOC_SCHEMA, documents_table
from flywheel.curation.filters import (
    SIGNALS,
    C4QualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    QualityFilters,
    cheap_signals,
    quality_signals,
    run_filters,
)
from flywheel.curation.normalize import NormalizeConfig, needs_ftfy, normalize_table, normalize_text
from flywheel.curation.readers import read_source
from flywheel.curation.sources import load_sources
from tests.conftest import SHARED_DATA, shared

SOURCES = [
    "dolma_cc",
    "c4_demo",
    "gutenberg",
    "wikipedia",
    "stackexchange_history_meta",
    "stackexchange_coffee",
    "inaugural",
    "wikitext2",
]


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[dict]]:
    """Rows of the shared corpora used here, by source."""
    shared("corpora")
    return {s.name: list(read_source(s)) for s in load_sources(data_root=SHARED_DATA, names=SOURCES)}


def find(corpus: dict[str, list[dict]], source: str, locator: str) -> dict:
    for r in corpus[source]:
        if r["url"] == locator or r["meta"].endswith(f'"id":"{locator}"}}') or r["doc_id"] == locator:
            return r
    raise LookupError(f"{source}: no document {locator}")


# --- normalize ----------------------------------------------------------------------------------------


def test_normalize_repairs_and_cleans() -> None:
    assert normalize_text("cafÃ© â€œquotedâ€\x9d") == "café “quoted”"  # mojibake, curly quotes kept
    assert normalize_text("\ufb01ne \uff21\uff22 wait\u2026 1\u00a0000") == "fine AB wait... 1 000"  # NFKC
    assert (
        normalize_text("a&amp;b <p>para</p><br/>next &nosuch; a < b > c")
        == "a&b para\n\nnext &nosuch; a < b > c"
    )
    assert normalize_text("[[Foo|bar]] and [[baz]] {{cite web|x}} '''bold''' ''it''\n== Head ==") == (
        "bar and baz bold it\nHead"
    )
    assert normalize_text("x\u200b\u00ady\x00 \x1b[31mred\x1b[0m\x0cpage") == "xy red\npage"
    assert normalize_text("  a \t b  \r\n\r\n\r\n\r\n c\u2028d  \n\n") == "a b\n\nc\nd"
    code = "def f():\n    return {1: 2}  \n\n\n\nx = ''"
    assert (
        normalize_text(code, NormalizeConfig(keep_indentation=True))
        == "def f():\n    return {1: 2}\n\nx = ''"
    )
    assert normalize_text("") == ""


def test_ftfy_fast_path_matches_running_ftfy_on_everything(corpus: dict[str, list[dict]]) -> None:
    texts = [r["text"] for s in ("dolma_cc", "c4_demo", "stackexchange_coffee") for r in corpus[s]]
    non_ascii = [t for t in texts if not t.isascii()]
    assert len(non_ascii) > 500
    forced = NormalizeConfig(force_ftfy=True)
    assert sum(map(needs_ftfy, non_ascii)) < len(non_ascii) // 4  # the fast path skips most documents
    for t in non_ascii:
        assert normalize_text(t) == normalize_text(t, forced)


def test_normalize_table_keeps_schema_and_other_columns(corpus: dict[str, list[dict]]) -> None:
    table = documents_table(corpus["stackexchange_coffee"])
    out = normalize_table(table)
    assert out.schema == DOC_SCHEMA and out.num_rows == table.num_rows
    assert out.column("doc_id").equals(table.column("doc_id"))
    assert all("\n\n\n" not in t and t == t.strip() for t in out.column("text").to_pylist())


# --- boilerplate --------------------------------------------------------------------------------------

NAV = "Jump to navigation Jump to search"


def test_boilerplate_lines_repeated_across_dolma_docs_are_removed_unique_content_kept(
    corpus: dict[str, list[dict]],
) -> None:
    table = normalize_table(documents_table(corpus["dolma_cc"]))
    before = table.column("text").to_pylist()
    with_nav = [i for i, t in enumerate(before) if NAV in t.split("\n")]
    assert len(with_nav) >= 30
    out, report = remove_boilerplate(table, min_docs=3)
    after = out.column("text").to_pylist()
    assert all(NAV not in t.split("\n") for t in after)
    assert report.lines_removed >= len(with_nav) and report.documents_changed >= len(with_nav)
    assert any(line == NAV and n >= 30 for _, line, n in report.top_lines)
    assert report.thresholds == {"dolma_cc": 3}
    # lines found in a single document are all still there
    df = Counter(line for t in {*before} for line in {ln.strip() for ln in t.split("\n") if ln.strip()})
    for b, a in zip(before, after, strict=True):
        unique = [ln.strip() for ln in b.split("\n") if ln.strip() and df[ln.strip()] == 1]
        kept = {ln.strip() for ln in a.split("\n")}
        assert all(u in kept for u in unique)
    assert out.column("doc_id").equals(table.column("doc_id"))


def test_exact_duplicate_documents_do_not_make_their_lines_boilerplate() -> None:
    doc = "An ordinary first line of text.\nA second line, also ordinary."
    rows = [
        {"doc_id": str(i), "source": "s", "text": doc if i < 5 else f"other {i}\nshared footer"}
        for i in range(9)
    ]
    out, report = remove_boilerplate(documents_table(rows), min_docs=3)
    texts = out.column("text").to_pylist()
    assert texts[:5] == [doc] * 5  # five copies of one document: still one document per line
    assert texts[5:] == [f"other {i}" for i in range(5, 9)]  # the footer of four distinct documents goes
    assert report.lines_removed == 4 and report.top_lines == [("s", "shared footer", 4)]


def test_boilerplate_threshold_is_per_source_and_scales_with_min_doc_frac() -> None:
    rows = [{"doc_id": f"a{i}", "source": "a", "text": f"doc {i}\nfooter"} for i in range(10)]
    rows += [{"doc_id": f"b{i}", "source": "b", "text": f"doc {i}\nfooter"} for i in range(2)]
    freq = LineFrequency(min_docs=2, min_doc_frac=0.5).update(documents_table(rows))
    assert freq.threshold("a") == 5 and freq.threshold("b") == 2
    out, _ = freq.strip(documents_table(rows))
    assert set(out.column("text").to_pylist()) == {f"doc {i}" for i in range(10)}


# --- filters: each reason on a real document ----------------------------------------------------------

GQ, C4, REP = GopherQualityFilter(), C4QualityFilter(), GopherRepetitionFilter()
DOLMA_URLS = {
    "too_few_words": "http://autores.uy/autor/445",
    "mean_word_length_high": "https://meta.stackoverflow.com/questions/335893/"
    "i-cannot-post-a-relevant-url-because-it-is-too-long-but-i-cannot-post-a-shorten",
    "mean_word_length_low": "https://blog.samsungfire.com/tag/%EB%B3%80%EB%8F%99%EC%A7%80%EC%B6%9C",
    "ellipsis_lines": "http://traidlation.com/tag/ingles/",
    "non_alpha_words": "http://classic.maplight.org/us-congress/bill/114-hr-22/7863400/amendment/32769/nojs",
    "few_stop_words": "http://adapei69.fr/sinformer/actualites",
    "curly_brackets": "https://pastebin.com/0YLNunWg",
    "dup_line_frac": "http://carsoncityinformationcenter.com/sustainability",
    "dup_line_char_frac": "http://link.libraries.ou.edu/portal/At-home-abroad--Mark-Twain-in-Australasia/dO0_Bkv5CiE/",
    "dup_para_frac": "http://www.mynewsdesk.com/se/goodyear/tag/golden-sahara-ii",
    "top_2_gram": "http://en.brickimedia.org/wiki/Ultimate_Sticker_Collection:_LEGO_Friends",
    "top_3_gram": "https://distanzechilometriche.net/mappa/lesa/",
    "top_4_gram": "https://cy.wikipedia.org/wiki/320",
    "dup_5_gram": "http://hikipedia.ws/wiki/Barack_Obama",
    "dup_10_gram": "http://www.marbef.org/data/aphia.php?p=taxdetails&id=944",
}
CASES = [
    ("wikipedia", "https://en.wikipedia.org/wiki/AccessibleComputing", GQ, "empty"),  # a redirect
    ("gutenberg", "https://www.gutenberg.org/ebooks/1342", GQ, "too_many_words"),  # Pride and Prejudice, 125k
    (
        "stackexchange_history_meta",
        "https://history.meta.stackexchange.com/q/614#comment2253_614",
        GQ,
        "bullet_lines",
    ),
    ("stackexchange_history_meta", "https://history.meta.stackexchange.com/q/2157", C4, "lorem_ipsum"),
    ("wikipedia", "https://en.wikipedia.org/wiki/Alien", C4, "no_terminal_punct"),  # a disambiguation list
    ("stackexchange_coffee", "https://coffee.stackexchange.com/q/408", REP, "dup_para_char_frac"),
] + [
    (
        "dolma_cc",
        url,
        REP if reason.startswith(("dup_", "top_")) else C4 if reason == "curly_brackets" else GQ,
        reason,
    )
    for reason, url in DOLMA_URLS.items()
]


@pytest.mark.parametrize(("source", "locator", "flt", "reason"), CASES, ids=[c[3] for c in CASES])
def test_each_reason_on_a_real_document(
    corpus: dict[str, list[dict]],
    source: str,
    locator: str,
    flt: GopherQualityFilter | C4QualityFilter | GopherRepetitionFilter,
    reason: str,
) -> None:
    text = normalize_text(find(corpus, source, locator)["text"])
    assert flt.filter(text) == (False, reason)


def test_ellipsis_symbol_ratio_on_a_real_c4_document(corpus: dict[str, list[dict]]) -> None:
    from flywheel.curation.documents import doc_id_for

    row = find(corpus, "c4_demo", doc_id_for("c4_demo", "c4_demo.jsonl:83"))  # a man page full of "..."
    assert GQ.filter(normalize_text(row["text"])) == (False, "ellipsis_symbol_ratio")


def test_hash_symbol_ratio() -> None:
    # No shared document is hashtag-heavy enough; a real sentence followed by a tag cloud is.
    text = "The committee published its annual report on the state of the harbour and the river. " * 6
    assert GQ.filter(text) is True
    tagged = text + " ".join(f"#tag{i}" for i in range(20))
    assert GQ.filter(tagged) == (False, "hash_symbol_ratio")
    assert GopherQualityFilter(max_symbol_word_ratio=None).filter(tagged) is True


def test_good_documents_pass(corpus: dict[str, list[dict]]) -> None:
    filters = QualityFilters()
    speeches = [normalize_text(r["text"]) for r in corpus["inaugural"]]
    assert all(filters.filter(t) is True for t in speeches)  # all 59 inaugural addresses
    articles = [normalize_text(r["text"]) for r in corpus["wikitext2"]]
    assert sum(filters.filter(t) is True for t in articles) >= 58
    anarchism = normalize_text(find(corpus, "wikipedia", "https://en.wikipedia.org/wiki/Anarchism")["text"])
    assert filters.filter(anarchism) is True


# --- filters: the table API ---------------------------------------------------------------------------


def test_run_filters_splits_kept_and_excluded_with_reasons(corpus: dict[str, list[dict]]) -> None:
    rows = corpus["dolma_cc"] + corpus["stackexchange_coffee"] + corpus["inaugural"]
    table = normalize_table(documents_table(rows))
    kept, excluded, counts, names = run_filters(table)
    assert kept.num_rows + excluded.num_rows == table.num_rows  # nothing silently dropped
    assert sum(counts.values()) == excluded.num_rows and 0 < kept.num_rows < table.num_rows
    assert names == SIGNALS and kept.schema.names == DOC_SCHEMA.names + list(SIGNALS)
    assert excluded.schema.names == DOC_SCHEMA.names + list(SIGNALS) + ["filter_reason"]
    assert excluded.column("filter_reason").null_count == 0
    assert dict(Counter(excluded.column("filter_reason").to_pylist())) == counts
    for name in SIGNALS:  # kept documents carry every signal
        assert kept.column(name).null_count == 0, name
    assert counts["too_few_words"] > 100 and counts["few_stop_words"] > 100 and "empty" in counts
    assert set(kept.column("doc_id").to_pylist()).isdisjoint(excluded.column("doc_id").to_pylist())
    by_source = Counter(kept.column("source").to_pylist())
    assert by_source["inaugural"] == 59
    # the vectorized decision is the per-document one
    filters = QualityFilters()
    reasons = dict(
        zip(excluded.column("doc_id").to_pylist(), excluded.column("filter_reason").to_pylist(), strict=True)
    )
    for doc_id, text in zip(
        table.column("doc_id").to_pylist(), table.column("text").to_pylist(), strict=True
    ):
        expected = filters.filter(text)
        assert (True if doc_id not in reasons else (False, reasons[doc_id])) == expected


def test_thresholds_are_configurable(corpus: dict[str, list[dict]]) -> None:
    table = normalize_table(documents_table(corpus["stackexchange_coffee"]))
    default = run_filters(table)
    lenient = run_filters(table, QualityFilters.from_config({"gopher": {"min_words": 5}, "c4": False}))
    assert lenient.kept.num_rows > default.kept.num_rows
    assert "no_terminal_punct" not in lenient.reason_counts
    assert pc.sum(pc.less(lenient.kept.column("qs_words"), 50)).as_py() > 0
    with pytest.raises(ValueError, match="unknown threshold.*min_wrods"):
        QualityFilters.from_config({"gopher": {"min_wrods": 5}})
    with pytest.raises(ValueError, match="n-gram sizes"):
        GopherRepetitionFilter(max_dup_ngram_char_frac=((11, 0.1),))


def _reference_signals(words: list[str]) -> dict[str, float]:
    """Gopher's n-gram signals the slow, obvious way."""
    total = sum(map(len, words))
    out = {}
    for n in (2, 3, 4):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        best = max(grams.values(), default=0)
        out[f"qs_top_{n}gram_char_frac"] = (
            0.0 if best < 2 else max(best * sum(map(len, g)) for g, k in grams.items() if k == best) / total
        )
    for n in range(5, 11):
        seen: set[tuple[str, ...]] = set()
        covered = [False] * len(words)
        for i in range(len(words) - n + 1):
            g = tuple(words[i : i + n])
            if g in seen:
                covered[i : i + n] = [True] * n
            seen.add(g)
        out[f"qs_dup_{n}gram_char_frac"] = (
            sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total
        )
    return out


def test_vectorized_ngram_signals_match_a_plain_reference(corpus: dict[str, list[dict]]) -> None:
    texts = [normalize_text(r["text"]) for r in corpus["dolma_cc"][:250] + corpus["c4_demo"][:50]]
    checked = 0
    for t in texts:
        _, words = cheap_signals(t)
        if len(words) < 2:
            continue
        got = quality_signals(t)
        for k, v in _reference_signals(words).items():
            assert got[k] == pytest.approx(v, abs=1e-12), k
        checked += 1
    assert checked > 250


def test_filters_on_a_table_without_optional_columns() -> None:
    table = pa.table({"doc_id": ["a", "b"], "text": ["", "word " * 60]})
    res = run_filters(table)
    assert res.reason_counts == {"empty": 1, "few_stop_words": 1}
    assert res.kept.num_rows == 0 and res.excluded.column("doc_id").to_pylist() == ["a", "b"]
