"""PII scrubbing: flywheel's `PiiScrubber` against presidio-analyzer (pattern recognizers only).

Same documents for both, side by side in one process, interleaved repeats, median docs/s:

- `presidio`: the 1,500 texts of presidio-research's synthetic PII set (labelled spans, so recall
  and precision per type are measured too), and
- `cc`: Common Crawl WET documents from dolma's test data (long, messy web text; speed only,
  plus the e-mail spans dolma labelled in its `expected__email-spans` file).

presidio is configured offline and without spaCy: `AnalyzerEngine` with presidio's own
`NoOpNlpEngine` (no model, no NER) and a registry of exactly the six recognizers for our structured
types (EmailRecognizer, PhoneRecognizer, CreditCardRecognizer, IbanRecognizer, UsSsnRecognizer,
IpRecognizer), default score threshold 0, entities restricted to those six. tldextract (used by
presidio's e-mail validation) is pointed at its bundled public-suffix snapshot, and every socket
connect raises, so the run cannot touch the network.

    .venv/bin/python benchmarks/bench_pii.py           # full: all docs, 5 repeats
    .venv/bin/python benchmarks/bench_pii.py --quick   # 500 + 100 docs, 3 repeats

Writes benchmarks/results/bench_pii.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = (ROOT / ".." / "shared" / "data").resolve()
PRESIDIO_SET = DATA / "pii" / "presidio_synth_dataset_v2.json"
CC_DOCS = DATA / "corpora" / "dolma_cc" / "CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz"
DOLMA_DOCS = DATA / "corpora" / "dolma_cc" / "provided__documents__000.jsonl.gz"
DOLMA_EMAILS = DATA / "corpora" / "dolma_cc" / "expected__email-spans.jsonl.gz"
OUT = ROOT / "benchmarks" / "results" / "bench_pii.json"

# presidio dataset entity → our type; the benchmark key suffix for it.
GOLD_TYPES = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "CREDIT_CARD": "CREDIT_CARD",
    "IBAN_CODE": "IBAN",
    "US_SSN": "US_SSN",
    "IP_ADDRESS": "IP_ADDRESS",
    "PERSON": "PERSON",
}
KEY = {"EMAIL": "EMAIL", "PHONE": "PHONE", "CREDIT_CARD": "CREDIT_CARD", "IBAN": "IBAN", "US_SSN": "US_SSN",
       "IP_ADDRESS": "IP", "PERSON": "PERSON"}  # fmt: skip
PRESIDIO_ENTITIES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS"]


def no_network() -> None:
    """Make any socket connection attempt fail loudly: the benchmark must run offline."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"bench_pii: network access attempted {args!r}")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
    socket.getaddrinfo = refuse  # type: ignore[assignment]


def presidio_analyzer() -> Callable[[str], list[tuple[str, int, int]]]:
    """presidio-analyzer with pattern recognizers only, offline (see module docstring)."""
    os.environ["TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS"] = ""  # read at tldextract import: no URLs
    import tldextract
    import tldextract.tldextract as tlde

    # The module-level extractor presidio's EmailRecognizer calls: bundled snapshot, no cache dir.
    tlde.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NoOpNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )

    registry = RecognizerRegistry(
        recognizers=[
            EmailRecognizer(),
            PhoneRecognizer(),
            CreditCardRecognizer(),
            IbanRecognizer(),
            UsSsnRecognizer(),
            IpRecognizer(),
        ],
        supported_languages=["en"],
    )
    engine = AnalyzerEngine(
        registry=registry,
        nlp_engine=NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "no_op"}]),
        supported_languages=["en"],
    )

    def analyze(text: str) -> list[tuple[str, int, int]]:
        res = engine.analyze(text=text, language="en", entities=PRESIDIO_ENTITIES)
        return [(GOLD_TYPES[r.entity_type], r.start, r.end) for r in res]

    return analyze


def load_presidio_set(limit: int | None) -> tuple[list[str], list[list[tuple[str, int, int]]]]:
    rows = json.loads(PRESIDIO_SET.read_text())
    if limit:
        rows = rows[:limit]
    texts = [r["full_text"] for r in rows]
    gold = [
        [
            (GOLD_TYPES[s["entity_type"]], s["start_position"], s["end_position"])
            for s in r["spans"]
            if s["entity_type"] in GOLD_TYPES
        ]
        for r in rows
    ]
    return texts, gold


def load_cc(limit: int | None) -> list[str]:
    with gzip.open(CC_DOCS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[:limit] if limit else texts


def load_dolma_emails() -> tuple[list[str], list[list[tuple[str, int, int]]]]:
    """dolma's documents with the e-mail spans it labels (score ≥ 0.5; its 0.1 guess is a Twitter handle)."""
    with gzip.open(DOLMA_DOCS, "rt", encoding="utf-8") as f:
        docs = {d["id"]: d["text"] for d in map(json.loads, f)}
    texts, gold = [], []
    with gzip.open(DOLMA_EMAILS, "rt", encoding="utf-8") as f:
        for d in map(json.loads, f):
            spans = (d.get("attributes") or {}).get("pii", {}).get("email", [])
            texts.append(docs[d["id"]])
            gold.append([("EMAIL", s, e) for s, e, score in spans if score >= 0.5])
    return texts, gold


def score(
    gold: Sequence[Sequence[tuple[str, int, int]]], pred: Sequence[Sequence[tuple[str, int, int]]]
) -> dict[str, tuple[int, int, int, int]]:
    from flywheel.curation.pii import score_spans

    tot: dict[str, list[int]] = {}
    for g, p in zip(gold, pred):
        for t, v in score_spans(g, p).items():
            acc = tot.setdefault(t, [0, 0, 0, 0])
            for i in range(4):
                acc[i] += v[i]
    return {t: (v[0], v[1], v[2], v[3]) for t, v in tot.items()}


def timed(fn: Callable[[str], Any], texts: Sequence[str]) -> tuple[float, list[Any]]:
    t0 = time.perf_counter()
    out = [fn(t) for t in texts]
    return time.perf_counter() - t0, out


def main(args: argparse.Namespace) -> dict[str, Any]:
    no_network()
    from flywheel.curation.pii import PII_TYPES, PiiScrubber

    quick = args.quick
    repeats = 3 if quick else 5
    texts, gold = load_presidio_set(500 if quick else None)
    cc = load_cc(100 if quick else None)
    dolma_texts, dolma_gold = load_dolma_emails()

    ours = PiiScrubber()
    ours_structured = PiiScrubber(types=[t for t in PII_TYPES if t != "PERSON"])
    presidio = presidio_analyzer()

    def ours_find(t: str) -> list[tuple[str, int, int]]:
        return [tuple(s) for s in ours.find(t)]

    # Warm-up: phonenumbers loads region metadata and presidio compiles patterns on first use.
    for t in texts[:50] + cc[:5]:
        ours.scrub(t)
        ours_structured.scrub(t)
        presidio(t)

    timings: dict[str, list[float]] = {}
    for _ in range(repeats):
        for corpus, docs in (("presidio", texts), ("cc", cc)):
            for name, fn in (
                ("pii", ours.scrub),
                ("pii_structured", ours_structured.scrub),
                ("presidio", presidio),
            ):
                dt, _ = timed(fn, docs)
                timings.setdefault(f"{name}_{corpus}", []).append(len(docs) / dt)
    med = {k: statistics.median(v) for k, v in timings.items()}

    ours_pred = [ours_find(t) for t in texts]
    pres_pred = [presidio(t) for t in texts]
    s_ours, s_pres = score(gold, ours_pred), score(gold, pres_pred)
    d_ours = score(dolma_gold, [ours_find(t) for t in dolma_texts])
    d_pres = score(dolma_gold, [presidio(t) for t in dolma_texts])

    res: dict[str, Any] = {
        "pii_docs_per_s": round(med["pii_presidio"], 1),
        "presidio_docs_per_s": round(med["presidio_presidio"], 1),
        "pii_speedup_vs_presidio": round(med["pii_presidio"] / med["presidio_presidio"], 2),
        "pii_structured_docs_per_s": round(med["pii_structured_presidio"], 1),
        "pii_structured_speedup_vs_presidio": round(med["pii_structured_presidio"] / med["presidio_presidio"], 2),
        "pii_cc_docs_per_s": round(med["pii_cc"], 1),
        "presidio_cc_docs_per_s": round(med["presidio_cc"], 1),
        "pii_cc_speedup_vs_presidio": round(med["pii_cc"] / med["presidio_cc"], 2),
        "pii_structured_cc_docs_per_s": round(med["pii_structured_cc"], 1),
    }
    for ty, key in KEY.items():
        f, g, c, p = s_ours.get(ty, (0, 0, 0, 0))
        pf, pg, pc, pp = s_pres.get(ty, (0, 0, 0, 0))
        res[f"gold_spans_{key}"] = g
        res[f"pii_recall_{key}"] = round(f / g, 4) if g else None
        res[f"pii_precision_{key}"] = round(c / p, 4) if p else None
        res[f"presidio_recall_{key}"] = round(pf / pg, 4) if pg else None
        res[f"presidio_precision_{key}"] = round(pc / pp, 4) if pp else None
    f, g, c, p = d_ours.get("EMAIL", (0, 0, 0, 0))
    pf, _, pc, pp = d_pres.get("EMAIL", (0, 0, 0, 0))
    res.update(
        {
            "dolma_gold_EMAIL": g,
            "pii_recall_EMAIL_dolma": round(f / g, 4) if g else None,
            "presidio_recall_EMAIL_dolma": round(pf / g, 4) if g else None,
            "pii_predicted_EMAIL_dolma": p,
            "presidio_predicted_EMAIL_dolma": pp,
        }
    )
    res.update(
        {
            "docs_presidio_set": len(texts),
            "docs_cc": len(cc),
            "mean_chars_presidio_set": round(sum(map(len, texts)) / len(texts), 1),
            "mean_chars_cc": round(sum(map(len, cc)) / len(cc), 1),
            "repeats": repeats,
            "quick": quick,
            "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
        }
    )

    print(f"\nPII scrubbing — median of {repeats} interleaved repeats (docs/s)")
    print(f"{'corpus':<26}{'ours (all)':>12}{'ours (no PERSON)':>18}{'presidio':>12}{'ratio':>8}")
    for corpus, label in (("presidio", f"presidio set ({len(texts)})"), ("cc", f"dolma CC ({len(cc)})")):
        print(
            f"{label:<26}{med['pii_' + corpus]:>12.0f}{med['pii_structured_' + corpus]:>18.0f}"
            f"{med['presidio_' + corpus]:>12.0f}{med['pii_' + corpus] / med['presidio_' + corpus]:>7.1f}×"
        )
    print(f"\n{'type':<13}{'gold':>6}{'recall':>9}{'prec.':>8}{'presidio recall':>17}{'presidio prec.':>16}")
    for ty, key in KEY.items():
        r = res

        def fmt(v: float | None) -> str:
            return "   —" if v is None else f"{v:.3f}"

        print(
            f"{key:<13}{r['gold_spans_' + key]:>6}{fmt(r['pii_recall_' + key]):>9}{fmt(r['pii_precision_' + key]):>8}"
            f"{fmt(r['presidio_recall_' + key]):>17}{fmt(r['presidio_precision_' + key]):>16}"
        )
    print(
        f"dolma e-mails: {res['dolma_gold_EMAIL']} labelled; recall ours {res['pii_recall_EMAIL_dolma']}, "
        f"presidio {res['presidio_recall_EMAIL_dolma']}"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {OUT.relative_to(ROOT)}")
    return res


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 + 100 documents, 3 repeats")
    main(parser.parse_args())
