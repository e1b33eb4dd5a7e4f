"""Readers and the sources config, on the real shared corpora (../shared/data)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from xml.etree import ElementTree as ET

import orjson
import pytest

from flywheel.curation.documents import DOC_SCHEMA, doc_id_for
from flywheel.curation.readers import (
    BadRecord,
    batches,
    read_gutenberg,
    read_jsonl,
    read_mediawiki,
    read_source,
    read_stackexchange,
    read_warc,
    read_wikitext,
    stackexchange_subject_ids,
    wiki_to_text,
)
from flywheel.curation.sources import DEFAULT_CONFIG, FORMATS, SourceConfigError, load_sources
from tests.conftest import SHARED_DATA, shared
from warehouse.keystore import KeyStore

LIC = "CC-BY-SA-3.0"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return KeyStore(tmp_path_factory.mktemp("keys") / "keys.db")


def meta(row: dict) -> dict:
    return orjson.loads(row["meta"])


# --- sources.toml -----------------------------------------------------------------------------------


def test_project_sources_config_declares_every_shared_corpus_with_a_license() -> None:
    shared("corpora")
    sources = load_sources(DEFAULT_CONFIG, SHARED_DATA)
    by_name = {s.name: s for s in sources}
    assert {s.format for s in sources} == set(FORMATS)  # every reader has a real source
    for s in sources:
        assert s.license and s.paths and not s.missing, s
        assert all(p.is_file() and SHARED_DATA in p.parents for p in s.paths)
    assert by_name["stackexchange_history_meta"].license == "CC-BY-SA-3.0"
    assert by_name["dolma_cc"].license == "ODC-By-1.0"
    assert by_name["gutenberg"].weight == 0.5
    assert len(by_name["gutenberg"].paths) == 5  # the LICENSE files are not books


def _write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "a.jsonl").write_text('{"id": "1", "text": "hello"}\n')
    cfg = tmp_path / "sources.toml"
    cfg.write_text(body)
    return cfg


def test_source_without_license_is_refused_naming_source_and_file(tmp_path: Path) -> None:
    cfg = _write(tmp_path, '[sources.web]\nformat = "jsonl"\npaths = ["a.jsonl"]\n')
    with pytest.raises(SourceConfigError) as e:
        load_sources(cfg, tmp_path / "data")
    assert "'web'" in str(e.value) and str(cfg) in str(e.value) and "no license" in str(e.value)
    cfg = _write(tmp_path, '[sources.web]\nformat = "jsonl"\npaths = ["a.jsonl"]\nlicense = "  "\n')
    with pytest.raises(SourceConfigError, match="no license"):
        load_sources(cfg, tmp_path / "data")
    cfg = _write(tmp_path, '[sources.web]\nformat = "jsonl"\npaths = ["a.jsonl"]\nlicense = "CC BY SA"\n')
    with pytest.raises(SourceConfigError, match="not an SPDX id"):
        load_sources(cfg, tmp_path / "data")


def test_unknown_format_option_key_and_missing_files_are_refused(tmp_path: Path) -> None:
    cfg = _write(tmp_path, '[sources.web]\nformat = "parquet"\npaths = ["a.jsonl"]\nlicense = "MIT"\n')
    with pytest.raises(SourceConfigError, match="unknown format 'parquet'"):
        load_sources(cfg, tmp_path / "data")
    cfg = _write(
        tmp_path, '[sources.web]\nformat = "jsonl"\npaths = ["a.jsonl"]\nlicense = "MIT"\nlicence = "x"\n'
    )
    with pytest.raises(SourceConfigError, match="unknown key.*licence"):
        load_sources(cfg, tmp_path / "data")
    cfg = _write(
        tmp_path,
        '[sources.web]\nformat = "jsonl"\npaths = ["a.jsonl"]\nlicense = "MIT"\n[sources.web.options]\nsite = "x"\n',
    )
    with pytest.raises(SourceConfigError, match="not understood by the 'jsonl' reader"):
        load_sources(cfg, tmp_path / "data")
    cfg = _write(
        tmp_path,
        '[sources.web]\nformat = "jsonl"\npaths = ["a.jsonl", "b/*.jsonl"]\nlicense = "MIT OR Apache-2.0"\n',
    )
    with pytest.raises(SourceConfigError) as e:
        load_sources(cfg, tmp_path / "data")
    assert str(tmp_path / "data" / "b/*.jsonl") in str(e.value)
    (src,) = load_sources(cfg, tmp_path / "data", allow_missing=True)
    assert src.missing == ("b/*.jsonl",) and [p.name for p in src.paths] == ["a.jsonl"]
    assert [r["text"] for r in read_source(src)] == ["hello"]


# --- JSONL --------------------------------------------------------------------------------------------


def test_dolma_jsonl_gz() -> None:
    path = shared("corpora/dolma_cc/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz")
    rows = list(read_jsonl(path, source="dolma_cc", license="ODC-By-1.0"))
    assert len(rows) == 697
    assert len({r["doc_id"] for r in rows}) == 697
    first = rows[0]
    assert first["doc_id"] == doc_id_for("dolma_cc", "blj5uzvcoa4iybpd5o6kom5nir6ngmoj")
    assert first["url"] == "http://16thfleet.wikidot.com/chatter:anewhome"
    assert first["created_at"].year == 2019 and first["text"].startswith("A New Home?")
    assert meta(first)["metadata"]["warc_date"] == "2019-07-17T12:15:59.000Z" and "text" not in meta(first)
    table = next(batches(rows, 1000))
    assert table.schema == DOC_SCHEMA and table.num_rows == 697


def test_c4_and_speeches_jsonl() -> None:
    c4 = list(read_jsonl(shared("corpora/c4_demo.jsonl"), source="c4_demo", license="ODC-By-1.0"))
    assert len(c4) == 300 and all(r["text"] for r in c4)
    assert c4[4]["doc_id"] == doc_id_for("c4_demo", "c4_demo.jsonl:5")  # no id field: file:line
    inaugural = list(read_jsonl(shared("corpora/speeches/inaugural.jsonl"), source="inaugural", license="x"))
    union = list(read_jsonl(shared("corpora/speeches/state_union.jsonl"), source="state_union", license="x"))
    assert (len(union), len(inaugural)) == (65, 59)
    assert meta(inaugural[0]) == {"id": "1789-Washington.txt"}
    assert inaugural[0]["text"].startswith("Fellow-Citizens of the Senate")


def test_bad_jsonl_lines_raise_with_file_and_line_or_go_to_the_callback(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(
            '{"id": "a", "text": "fine"}\n{"id": "b", "text": \n\n[1, 2]\n{"id": "c"}\n{"id": "d", "text": "ok"}\n'
        )
    with pytest.raises(ValueError, match=rf"{re.escape(str(p))}: line 2: invalid JSON"):
        list(read_jsonl(p, source="s", license="MIT"))
    bad: list[BadRecord] = []
    rows = list(read_jsonl(p, source="s", license="MIT", on_bad_record=bad.append))
    assert [r["text"] for r in rows] == ["fine", "ok"]
    assert [(b.offset, b.reason.split(":")[0]) for b in bad] == [
        (2, "invalid JSON"),
        (4, "not a JSON object"),
        (5, "field 'text' missing or not a string"),
    ]
    assert bad[0].raw == b'{"id": "b", "text": \n' and bad[0].path == str(p)


# --- Gutenberg ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "title", "starts", "ends"),
    [
        (
            "pg3261_news_from_nowhere.txt",
            "News from Nowhere or An Epoch of Rest, being some chapters from A Utopian Romance",
            "NEWS FROM NOWHERE\nOR\nAN EPOCH OF REST",
            "{3}  Cirencester and Burford he must have meant.",
        ),
        (
            "pg3261_news_from_nowhere_OLD_nwsnw10.txt",
            "News from Nowhere",
            "NEWS FROM NOWHERE\nor AN EPOCH OF REST",
            "{3}  Cirencester and Burford he must have meant.",
        ),
        (
            "pg972_devils_dictionary.txt",
            "The Devil's Dictionary",
            "THE DEVIL'S DICTIONARY\n\nby Ambrose Bierce",
            "the domestic cow sheds its horn every two years.",
        ),
        (
            "pg972_devils_dictionary_OLD_dvldc10.txt",
            "The Devil's Dictionary",
            "The Internet Wiretap 1st Online Edition of\n\nTHE DEVIL'S DICTIONARY",
            "the domestic cow sheds its horn every two years.",
        ),
    ],
)
def test_gutenberg_header_and_footer_are_stripped(name: str, title: str, starts: str, ends: str) -> None:
    path = shared(f"corpora/gutenberg/{name}")
    raw = path.read_bytes()
    assert b"\r\n" in raw and (b"*** START OF" in raw or b"***START OF" in raw or b"SMALL PRINT" in raw)
    (row,) = read_gutenberg(path, source="gutenberg", license="LicenseRef-PublicDomain-US")
    text = row["text"]
    assert "\r" not in text
    for marker in (
        "*** START",
        "***START",
        "*** END",
        "***END",
        "SMALL PRINT",
        "This file should be named",
        "Project Gutenberg",
        "Produced by",
        "Transcribed from",
        "email",
    ):
        assert marker not in text, marker
    assert text.startswith(starts) and text.endswith(ends)
    assert row["title"] == title and meta(row)["header_removed"] and meta(row)["footer_removed"]
    assert row["url"] == f"https://www.gutenberg.org/ebooks/{meta(row)['ebook_number']}"
    assert len(text) > 0.8 * len(raw.decode("latin-1")) - 40_000  # the book itself is all there


def test_gutenberg_without_header_keeps_the_book_and_names_it_from_the_file() -> None:
    (row,) = read_gutenberg(
        shared("corpora/gutenberg/pg1342_pride_and_prejudice.txt"), source="g", license="x"
    )
    assert row["title"] == "Pride And Prejudice" and meta(row)["ebook_number"] == 1342
    assert "[Illustration" not in row["text"] and row["text"].lstrip().startswith("PRIDE.")
    assert "It is a truth universally acknowledged" in row["text"]


# --- WikiText -----------------------------------------------------------------------------------------


def test_wikitext_is_split_into_articles_and_detokenized() -> None:
    rows = list(read_wikitext(shared("corpora/wikitext2/wiki.test.raw"), source="wikitext2", license=LIC))
    assert len(rows) == 62
    assert rows[0]["title"] == "Robert Boulter"
    assert rows[0]["text"].startswith("Robert Boulter is an English film, television and theatre actor.")
    assert "guest-starring" in rows[0]["text"] and "\n\nCareer\n\n" in rows[0]["text"]
    titles = [r["title"] for r in rows]
    assert "Temple Beth Israel (Eugene, Oregon)" in titles and len(set(titles)) == 62
    for r in rows:
        assert " @-@ " not in r["text"] and not re.search(
            r"(?m)^ ?(?:= )+.*(?: =)+ ?$", r["text"]
        )  # no headings
        assert r["url"] == "https://en.wikipedia.org/wiki/" + r["title"].replace(" ", "_")
    raw = list(
        read_wikitext(shared("corpora/wikitext2/wiki.test.raw"), source="w", license=LIC, detokenize=False)
    )
    assert " @-@ " in raw[0]["text"]


# --- MediaWiki ----------------------------------------------------------------------------------------

WIKI_DUMP = "corpora/wikipedia_xml/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def test_mediawiki_pages_markup_removed_contributors_as_subjects(keys: KeyStore) -> None:
    rows = list(
        read_mediawiki(shared(WIKI_DUMP), source="wikipedia", license=LIC, pseudonymize=keys.pseudonymize)
    )
    assert len(rows) == 206
    redirects = [r for r in rows if meta(r)["redirect"] is not None]
    articles = [r for r in rows if meta(r)["redirect"] is None]
    assert len(redirects) == 100 and all(r["text"] == "" for r in redirects)
    for r in articles:
        for leftover in ("{{", "}}", "[[", "]]", "<ref", "</", "'''", "{|", "|}", "&lt;", "&quot;", "[http"):
            assert leftover not in r["text"], (r["title"], leftover)
        assert not re.search(r"(?m)^==", r["text"]), r["title"]
    by_title = {r["title"]: r for r in rows}
    anarchism = by_title["Anarchism"]
    assert anarchism["text"].startswith(
        "Anarchism is a political philosophy that advocates self-governed societies"
    )
    assert "\n\nEtymology and terminology\n\n" in anarchism["text"]
    assert "Anarchism" in meta(anarchism)["categories"] and meta(anarchism)["contributor_kind"] == "ip"
    assert anarchism["subject_id"] == keys.pseudonymize("mediawiki:85.193.216.88")
    assert anarchism["url"] == "https://en.wikipedia.org/wiki/Anarchism"
    assert by_title["AccessibleComputing"]["subject_id"] == keys.pseudonymize("mediawiki:Paine Ellsworth")
    assert all(r["subject_id"] for r in rows) and len({r["subject_id"] for r in rows}) > 50
    for r in rows:  # the raw identifiers are nowhere in the document
        assert "85.193.216.88" not in r["meta"] and "Paine Ellsworth" not in r["meta"]
    assert anarchism["created_at"].isoformat() == "2016-04-22T10:19:33+00:00"


def test_wiki_to_text_handles_nesting_tables_files_and_kept_templates() -> None:
    text, cats = wiki_to_text(
        "'''Foo''' ({{lang|fr|[[wikt:foo|fóo]]}}; {{IPA|x}}) is a [[bar (thing)|bar]] of {{convert|5|km|mi}}"
        "<ref name=a>{{cite web|url=http://x}}</ref>.\n{| class=wikitable\n|-\n| a || b\n|}\n"
        "[[File:X.jpg|thumb|A [[nested]] caption]]\n== History ==\n* item [http://e.com site]\n"
        "[[Category:Things]][[de:Foo]]<!-- hidden -->"
    )
    assert text == "Foo (fóo) is a bar of 5 km.\n\nHistory\n\nitem site"
    assert cats == ["Things"]


# --- StackExchange ------------------------------------------------------------------------------------


def test_stackexchange_posts_comments_links_and_subjects(keys: KeyStore) -> None:
    site = "history.meta.stackexchange.com"
    common = {"source": "se_hm", "license": LIC, "site": site, "pseudonymize": keys.pseudonymize}
    posts = list(read_stackexchange(shared("corpora/stackexchange/tpxml_Posts.xml"), **common))
    comments = list(read_stackexchange(shared("corpora/stackexchange/tpxml_Comments.xml"), **common))
    assert (len(posts), len(comments)) == (1657, 3454)
    post_ids = {p["doc_id"] for p in posts}
    assert all(len(c["parent_ids"]) == 1 and c["parent_ids"][0] in post_ids for c in comments)
    answers = [p for p in posts if meta(p)["post_type"] == "answer"]
    assert answers and all(a["parent_ids"][0] in post_ids and a["title"] is None for a in answers)  # the asker's text
    q1 = posts[0]
    assert q1["title"] == "Should we include sources in answers?"
    assert q1["text"].startswith("Should we include sources in answers?\n\nAs a historian I know")
    assert meta(q1)["tags"] == ["discussion", "answers"] and q1["created_at"].isoformat().startswith(
        "2011-10-11T19:42:20"
    )
    assert q1["subject_id"] == keys.pseudonymize(f"stackexchange:{site}:12")
    first_comment = comments[0]
    assert first_comment["parent_ids"] == [doc_id_for("se_hm", f"{site}/post/3")]
    assert first_comment["subject_id"] == keys.pseudonymize(f"stackexchange:{site}:12")
    for r in posts + comments:
        assert "<p>" not in r["text"] and "&lt;" not in r["text"]
        assert r["subject_id"] and "UserId" not in r["meta"] and "DisplayName" not in r["meta"]
    # users → subject ids: every subject is a user of Users.xml, or a deleted account known by name only
    users = stackexchange_subject_ids(
        shared("corpora/stackexchange/tpxml_Users.xml"), site, keys.pseudonymize
    )
    assert len(users) == 2295
    known = set(users.values())
    unknown = [r for r in posts + comments if r["subject_id"] not in known]
    assert len(unknown) < 0.05 * len(posts + comments)
    names = set()
    for f, id_attr, name_attr in (
        ("tpxml_Posts.xml", "OwnerUserId", "OwnerDisplayName"),
        ("tpxml_Comments.xml", "UserId", "UserDisplayName"),
    ):
        for _, el in ET.iterparse(shared(f"corpora/stackexchange/{f}")):
            if el.tag == "row" and not el.get(id_attr) and el.get(name_attr):
                names.add(el.get(name_attr))
    deleted = {keys.pseudonymize(f"stackexchange:{site}:name:{n}") for n in names}
    assert unknown and all(r["subject_id"] in deleted for r in unknown)


def test_stackexchange_coffee_posts() -> None:
    rows = list(read_stackexchange(shared("corpora/stackexchange/coffee_Posts.xml"), source="c", license=LIC))
    assert len(rows) == 592 and all(r["subject_id"] is None for r in rows)  # no pseudonymizer: no subject
    assert meta(rows[0])["site"] == "coffee" and rows[0]["title"] == "How should I store whole bean coffee?"
    with pytest.raises(ValueError, match="not a StackExchange Posts.xml or Comments.xml"):
        list(read_stackexchange(shared("corpora/stackexchange/tpxml_Users.xml"), source="c", license=LIC))


# --- WARC ---------------------------------------------------------------------------------------------


def test_warc_responses_to_main_text() -> None:
    rows = []
    for name in ("warc__sample-0000.warc.gz", "warc__sample-0001.warc.gz"):
        rows += list(read_warc(shared(f"corpora/dolma_cc/{name}"), source="dolma_warc", license="ODC-By-1.0"))
    assert len(rows) == 37
    assert len({r["doc_id"] for r in rows}) == 37
    for r in rows:
        assert len(r["text"].split()) > 20, r["url"]
        assert "<div" not in r["text"] and "</" not in r["text"] and "function(" not in r["text"]
        assert r["url"].startswith("http") and r["created_at"].year == 2024
        assert meta(r)["http_status"] == 200 and meta(r)["extractor"] == "trafilatura"
    first = rows[0]
    assert first["url"] == "https://www.semanticscholar.org/research/research-team"
    assert first["title"] == "Semantic Scholar | Research | Research Team"
    assert "Semantic Scholar Research Team" in first["text"]
    assert first["doc_id"] == doc_id_for("dolma_warc", "urn:uuid:283E41D7-F686-4C3E-B7DA-E8D248A100C1")


def test_truncated_warc_is_reported_with_its_offset(tmp_path: Path) -> None:
    with gzip.open(shared("corpora/dolma_cc/warc__sample-0000.warc.gz"), "rb") as f:
        data = f.read(20_000)  # cuts the first response record short
    p = tmp_path / "cut.warc"
    p.write_bytes(data)
    with pytest.raises(ValueError, match=r"cut.warc: byte 1167: truncated record"):
        list(read_warc(p, source="w", license="MIT"))
    bad: list[BadRecord] = []
    assert list(read_warc(p, source="w", license="MIT", on_bad_record=bad.append)) == []
    assert [b.offset for b in bad] == [1167]
