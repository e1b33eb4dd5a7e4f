"""PII scrubber: detection on real labelled spans, validators, offsets, residual check, table API."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from functools import lru_cache

import pyarrow as pa
import pytest

from flywheel.curation.pii import (
    CREDIT_CARD,
    EMAIL,
    IBAN,
    IP_ADDRESS,
    PERSON,
    PHONE,
    SPANS_TYPE,
    URL_CREDENTIALS,
    US_SSN,
    PiiScrubber,
    card_ok,
    find_residual_pii,
    iban_ok,
    ip_ok,
    luhn_ok,
    score_spans,
    scrub,
    scrub_table,
    ssn_ok,
)
from tests.conftest import shared

# presidio-research entity names → ours
GOLD_TYPES = {
    "EMAIL_ADDRESS": EMAIL,
    "PHONE_NUMBER": PHONE,
    "CREDIT_CARD": CREDIT_CARD,
    "IBAN_CODE": IBAN,
    "US_SSN": US_SSN,
    "IP_ADDRESS": IP_ADDRESS,
    "PERSON": PERSON,
}
STRUCTURED = [EMAIL, PHONE, CREDIT_CARD, IBAN, US_SSN, IP_ADDRESS]


@lru_cache(maxsize=1)
def presidio_rows() -> tuple[dict, ...]:
    return tuple(json.loads(shared("pii/presidio_synth_dataset_v2.json").read_text()))


def gold_spans(row: dict) -> list[tuple[str, int, int]]:
    return [
        (GOLD_TYPES[s["entity_type"]], s["start_position"], s["end_position"])
        for s in row["spans"]
        if s["entity_type"] in GOLD_TYPES
    ]


@lru_cache(maxsize=1)
def presidio_scores() -> dict[str, tuple[int, int, int, int]]:
    """Recall/precision counts over the whole presidio set (1,500 texts, about 0.2 s)."""
    scrubber = PiiScrubber()
    tot: dict[str, list[int]] = {}
    for row in presidio_rows():
        for t, v in score_spans(gold_spans(row), scrubber.find(row["full_text"])).items():
            acc = tot.setdefault(t, [0, 0, 0, 0])
            for i in range(4):
                acc[i] += v[i]
    return {t: (a, b, c, d) for t, (a, b, c, d) in tot.items()}


@pytest.mark.parametrize("pii_type", STRUCTURED)
def test_structured_recall_on_the_presidio_set(pii_type: str) -> None:
    found, gold, _, _ = presidio_scores()[pii_type]
    assert gold >= 14, f"the data set should label {pii_type}"
    assert found / gold >= 0.95, f"{pii_type}: recall {found}/{gold}"


@pytest.mark.parametrize("pii_type", [EMAIL, CREDIT_CARD, IBAN, US_SSN, IP_ADDRESS, PHONE])
def test_structured_precision_on_the_presidio_set(pii_type: str) -> None:
    # Not a target of the issue, but a scrubber that tags every number is useless: hold the line.
    _, _, correct, predicted = presidio_scores()[pii_type]
    assert correct / predicted >= 0.9, f"{pii_type}: precision {correct}/{predicted}"


def test_person_layer_finds_most_names_on_the_presidio_set() -> None:
    # Reported honestly in docs/pii.md (about 0.73 recall, 0.91 precision); this guards regressions.
    found, gold, correct, predicted = presidio_scores()[PERSON]
    assert gold > 800
    assert found / gold >= 0.65
    assert correct / predicted >= 0.85


def test_dolma_email_spans_are_found() -> None:
    docs = {}
    with gzip.open(shared("corpora/dolma_cc/provided__documents__000.jsonl.gz"), "rt", encoding="utf-8") as f:
        for d in map(json.loads, f):
            docs[d["id"]] = d["text"]
    labelled = 0
    with gzip.open(shared("corpora/dolma_cc/expected__email-spans.jsonl.gz"), "rt", encoding="utf-8") as f:
        for d in map(json.loads, f):
            text = docs[d["id"]]
            spans = {(s.start, s.end) for s in scrub(text).spans if s.type == EMAIL}
            for start, end, confidence in (d.get("attributes") or {}).get("pii", {}).get("email", []):
                if confidence < 0.5:
                    continue  # dolma's 0.1 guess is "@LearnonScreen", a Twitter handle
                labelled += 1
                assert (start, end) in spans, f"{d['id']}: e-mail {text[start:end]!r} not found exactly"
    assert labelled == 3


def test_offsets_point_into_the_original_text() -> None:
    text = "Hi, I'm Maria Garcia. Mail maria.garcia@example.com or call +44 20 7946 0958 today."
    r = scrub(text)
    got = {(s.type, text[s.start : s.end]) for s in r.spans}
    assert (EMAIL, "maria.garcia@example.com") in got
    assert (PHONE, "+44 20 7946 0958") in got
    assert (PERSON, "Maria Garcia") in got
    assert r.text == "Hi, I'm <PERSON>. Mail <EMAIL> or call <PHONE> today."
    # Spans are sorted, disjoint and in range; the values themselves are never stored.
    ends = [0] + [e for _, _, e in r.spans]
    assert all(s >= prev for (_, s, _), prev in zip(r.spans, ends))
    assert all(isinstance(x, int) for span in r.spans for x in span[1:])


def test_offsets_on_the_presidio_set_cover_the_labelled_values() -> None:
    scrubber = PiiScrubber(types=STRUCTURED)
    for row in presidio_rows()[:300]:
        text = row["full_text"]
        for t, s, e in scrubber.find(text):
            assert 0 <= s < e <= len(text)
            if t == CREDIT_CARD:
                assert card_ok("".join(c for c in text[s:e] if c.isdigit()))


def test_every_structured_type_is_replaced_with_its_placeholder() -> None:
    text = (
        "card 4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 7654 32, SSN 123-45-6789, "
        "ip 192.168.10.1 and 2001:db8::8a2e:370:7334, https://admin:hunter2@db.example.com/x, "
        "bob@example.org, (612) 439-4474"
    )
    r = scrub(text)
    assert r.counts == Counter(
        {CREDIT_CARD: 1, IBAN: 1, US_SSN: 1, IP_ADDRESS: 2, URL_CREDENTIALS: 1, EMAIL: 1, PHONE: 1}
    )
    assert r.text == (
        "card <CREDIT_CARD>, IBAN <IBAN>, SSN <US_SSN>, ip <IP_ADDRESS> and <IP_ADDRESS>, "
        "https://<URL_CREDENTIALS>@db.example.com/x, <EMAIL>, <PHONE>"
    )


def test_validators() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert card_ok("378282246310005")  # Amex test number
    assert not card_ok("4111111111111112")  # checksum fails
    assert not card_ok("9780306406157")  # an ISBN-13, not an issuer range
    assert not card_ok("0000000000000000")
    assert iban_ok("GB82WEST12345698765432") and iban_ok("DE89370400440532013000")
    assert not iban_ok("GB82WEST12345698765433")  # mod-97 fails
    assert not iban_ok("GB82WEST1234569876543")  # wrong length for GB
    assert not iban_ok("XX82WEST12345698765432")  # no such country
    assert ssn_ok("123", "45", "6789")
    for area, group, serial in [("000", "12", "3456"), ("666", "12", "3456"), ("912", "12", "3456"),
                                ("123", "00", "4567"), ("123", "45", "0000")]:  # fmt: skip
        assert not ssn_ok(area, group, serial)
    assert ip_ok("8.8.8.8") and ip_ok("fe80::1%eth0") and ip_ok("2001:db8::1")
    assert not ip_ok("256.1.1.1") and not ip_ok("01.2.3.4") and not ip_ok("1:2:3")


def test_checksum_failing_and_invalid_values_are_not_tagged() -> None:
    s = PiiScrubber()

    def types(text: str) -> set[str]:
        return {x.type for x in s.find(text)}

    assert CREDIT_CARD in types("card 4111 1111 1111 1111 please")
    assert CREDIT_CARD not in types("card 4111 1111 1111 1112 please")
    assert IBAN in types("my iban is gb82west12345698765432")
    assert IBAN not in types("my iban is GB82WEST12345698765433")
    assert US_SSN in types("SSN: 078-05-1121")
    for bad in ["000-12-3456", "666-12-3456", "912-12-3456", "123-00-4567", "123-45-0000"]:
        assert US_SSN not in types(f"SSN: {bad}"), bad
    assert IP_ADDRESS in types("from 10.0.0.254 today")
    assert IP_ADDRESS not in types("from 10.0.0.256 today")
    assert IP_ADDRESS not in types("version 1.2.3.04 now")
    assert IP_ADDRESS not in types("integer,intent(in)::a,b")
    assert EMAIL not in types("follow @LearnonScreen or a@b")
    assert [x.type for x in s.find("@team: mail bob@example.org")] == [EMAIL]
    assert URL_CREDENTIALS not in types("see https://user@example.com/ (no password)")


def test_numbers_that_are_not_phones() -> None:
    s = PiiScrubber()
    for text in [
        "Published 2011. 513-542 pages",  # page range
        "ISBN 80-7231-006-2.",  # an ISBN
        "born 1975-03-27 in Oslo",  # a date
        "open 14.00-15.00 daily",  # hours
        "at 43.19289 -70.876331",  # coordinates
        "1 2 3 4 5 6 7 8 9 10 11 12",  # a page list
        "Pages 1252 1253 1254 1255 1256",  # a listing
        "order 1291388960",  # a bare id, no phone cue
    ]:
        assert PHONE not in {x.type for x in s.find(text)}, text
    for text, want in [
        ("Call me at 555-867-5309.", "555-867-5309"),
        ("Tel: +49 561 9804848", "+49 561 9804848"),
        ("mobile: 0490 75 40 81", "0490 75 40 81"),
        ("Fax: 9498777106", "9498777106"),
    ]:
        got = [text[x.start : x.end] for x in s.find(text) if x.type == PHONE]
        assert got == [want], (text, got)


def test_person_cues_and_non_names() -> None:
    s = PiiScrubber(types=[PERSON])

    def names(text: str) -> list[str]:
        return [text[x.start : x.end] for x in s.find(text)]

    assert names("my name is lena andersson.") == ["lena andersson"]
    assert names("Please correct it to Dr. Cettina Fanucci?") == ["Cettina Fanucci"]
    assert names("Dear Freddy, thanks for the call") == ["Freddy"]
    assert names("They had 3: Efimiya, Mary and Jodi.") == ["Efimiya", "Mary", "Jodi"]
    assert names("I'm Amanda's daughter") == ["Amanda"]
    assert names("The office is at 1317 Kimberly Way near Thomas Street.") == []
    assert names("The Jones Orchestra played at Heidelberg University.") == []


def test_residual_check_is_clean_after_scrubbing_real_documents() -> None:
    scrubber = PiiScrubber()
    texts = [r["full_text"] for r in presidio_rows()[:400]]
    with gzip.open(
        shared("corpora/dolma_cc/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz"), "rt", encoding="utf-8"
    ) as f:
        texts += [json.loads(line)["text"] for _, line in zip(range(120), f)]
    flagged_before = 0
    for text in texts:
        flagged_before += bool(find_residual_pii(text))
        out = scrubber.scrub(text).text
        assert find_residual_pii(out) == [], (text[:80], find_residual_pii(out))
    assert flagged_before > 50  # the check does fire on unscrubbed text


def test_residual_check_reports_types() -> None:
    assert find_residual_pii("nothing to see") == []
    assert find_residual_pii("write to a.b@example.com or 4111-1111-1111-1111") == [CREDIT_CARD, EMAIL]


def test_table_api_with_null_texts() -> None:
    table = pa.table(
        {
            "doc_id": ["a", "b", "c"],
            "text": ["mail bob@example.org now", None, "no pii here"],
            "n": [1, 2, 3],
        }
    )
    out, counts = scrub_table(table)
    assert out.column_names == ["doc_id", "text", "n", "pii_spans"]
    assert out.schema.field("pii_spans").type == SPANS_TYPE
    assert out.column("text").to_pylist() == ["mail <EMAIL> now", None, "no pii here"]
    assert out.column("pii_spans").to_pylist() == [[{"type": EMAIL, "start": 5, "end": 20}], [], []]
    assert out.column("doc_id").to_pylist() == ["a", "b", "c"] and out.column("n").to_pylist() == [1, 2, 3]
    assert counts == Counter({EMAIL: 1})
    # Scrubbing again replaces the span column instead of adding a second one.
    again, counts2 = scrub_table(out)
    assert again.column_names == out.column_names and counts2 == Counter()
    with pytest.raises(KeyError, match="no column 'body'"):
        scrub_table(table, column="body")


def test_table_api_on_documents_schema() -> None:
    from flywheel.curation.documents import documents_table

    rows = [
        {"doc_id": str(i), "source": "presidio", "text": r["full_text"]} for i, r in enumerate(presidio_rows()[:200])
    ]
    rows.append({"doc_id": "null", "source": "presidio", "text": None})
    out, counts = scrub_table(documents_table(rows))
    assert out.num_rows == 201 and out.column("text")[200].as_py() is None
    spans = out.column("pii_spans").to_pylist()
    assert sum(len(s) for s in spans) == sum(counts.values()) > 100
    for row, s in zip(rows, spans):
        for span in s:
            assert 0 <= span["start"] < span["end"] <= len(row["text"])


def test_unknown_type_and_region_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown PII types"):
        PiiScrubber(types=["EMAIL", "PASSPORT"])
    with pytest.raises(ValueError, match="unknown phone region 'XQ'"):
        PiiScrubber(phone_regions=["US", "XQ"])
