"""Benchmark: document cleaning + quality filters (+ PII scrubbing) against datatrove, docs/s.

Both pipelines get the same documents from the shared corpora (read once, outside the timing; empty
documents are left out because datatrove's repetition filter divides by the text length), in the same
process, alternating run by run:

- **curation** (this project): `normalize_table` (ftfy + NFKC + markup/controls/whitespace) →
  `remove_boilerplate` (per-source line frequency; datatrove has no equivalent, so ours does more) →
  `run_filters` (Gopher quality, C4, Gopher repetition) → `PiiScrubber.scrub_table` on the kept rows
  when `flywheel/curation/pii.py` provides it.
- **datatrove 0.9.0**: `FTFYFormatter` → `GopherRepetitionFilter` → `GopherQualityFilter` →
  `C4QualityFilter` → `PIIFormatter` (e-mails and IPs) when ours scrubs PII. Its default word
  tokenizer needs NLTK data (not available offline), so a regex word/sentence tokenizer is injected.

Throughput is input documents / wall time; the figure is the median of the repeats. On a machine
shared with other jobs wall time is noisy, so the JSON also has the CPU-time figures (process time:
both pipelines are single-threaded) and the median of the per-pair ratios (each run of ours with the
datatrove run right after it). "No-PII" figures subtract each pipeline's own PII step time (ours: the
stage; datatrove: the PIIFormatter's timer).

    .venv/bin/python benchmarks/bench_curation.py            # all shared corpora (~7k docs)
    .venv/bin/python benchmarks/bench_curation.py --quick    # dolma CC + C4 (~1k docs)
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flywheel.curation.boilerplate import remove_boilerplate
from flywheel.curation.documents import documents_table
from flywheel.curation.filters import run_filters
from flywheel.curation.normalize import normalize_table
from flywheel.curation.readers import read_source
from flywheel.curation.sources import load_sources

DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "bench_curation.json"
QUICK_SOURCES = ["dolma_cc", "c4_demo"]


def load_rows(quick: bool) -> list[dict[str, Any]]:
    names = QUICK_SOURCES if quick else None
    rows: list[dict[str, Any]] = []
    for src in load_sources(data_root=DATA, names=names):
        rows += [r for r in read_source(src) if r["text"].strip()]
    return rows


def pii_scrubber() -> Any | None:
    try:
        from flywheel.curation.pii import PiiScrubber
    except ImportError:
        return None
    return PiiScrubber()


def run_curation(table: pa.Table, scrubber: Any | None) -> dict[str, Any]:
    c0, t0 = time.process_time(), time.perf_counter()
    cleaned = normalize_table(table)
    t1 = time.perf_counter()
    cleaned, boiler = remove_boilerplate(cleaned)
    t2 = time.perf_counter()
    kept, _, counts, _ = run_filters(cleaned)
    t3 = time.perf_counter()
    pii_counts: Counter[str] = Counter()
    if scrubber is not None:
        kept, pii_counts = scrubber.scrub_table(kept)
    t4 = time.perf_counter()
    return {
        "total_s": t4 - t0,
        "cpu_s": time.process_time() - c0,
        "pii_s": t4 - t3,
        "stages": {"normalize_s": t1 - t0, "boilerplate_s": t2 - t1, "filters_s": t3 - t2, "pii_s": t4 - t3},
        "kept_ids": set(kept.column("doc_id").to_pylist()),
        "reasons": counts,
        "boilerplate_lines_removed": boiler.lines_removed,
        "pii_counts": dict(pii_counts),
    }


def datatrove_steps(with_pii: bool) -> list[Any]:
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class RegexTokenizer(WordTokenizer):
        """Words and sentences by regex: datatrove's default (NLTK punkt) needs data we do not have."""

        _word = re.compile(r"\w+|[^\w\s]+")
        _sent = re.compile(r"[^.!?\n]+(?:[.!?]+[\"'”’)]*|$)")

        def word_tokenize(self, text: str) -> list[str]:
            return self._word.findall(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [s.strip() for s in self._sent.findall(text) if s.strip()]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in self._sent.finditer(text) if m.group().strip()]

    tok = RegexTokenizer()
    steps = [
        FTFYFormatter(),
        GopherRepetitionFilter(language=tok),
        GopherQualityFilter(language=tok),
        C4QualityFilter(language=tok),
    ]
    if with_pii:
        steps.append(PIIFormatter())
    return steps


def run_datatrove(rows: list[dict[str, Any]], with_pii: bool) -> dict[str, Any]:
    from datatrove.data import Document

    steps = datatrove_steps(with_pii)
    docs = [Document(text=r["text"], id=r["doc_id"]) for r in rows]
    c0, t0 = time.process_time(), time.perf_counter()
    data: Any = iter(docs)
    for step in steps:
        data = step.run(data)
    kept_ids = {d.id for d in data}
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    reasons: Counter[str] = Counter()
    for step in steps:
        for name, stat in step.stats.stats.items():
            if name.startswith("dropped_"):
                reasons[name.removeprefix("dropped_")] += int(stat.total)
    pii_s = float(steps[-1].stats.time_stats.total) if with_pii else 0.0
    return {"total_s": total, "cpu_s": cpu, "pii_s": pii_s, "kept_ids": kept_ids, "reasons": dict(reasons)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="dolma CC + C4 only (~1k documents)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per pipeline (median reported)")
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"shared data not found at {DATA}; nothing to benchmark", file=sys.stderr)
        return 1

    rows = load_rows(args.quick)
    table = documents_table(rows)
    n_docs = len(rows)
    n_chars = sum(len(r["text"]) for r in rows)
    scrubber = pii_scrubber()
    with_pii = scrubber is not None
    print(
        f"{n_docs} documents, {n_chars / 1e6:.1f} M characters; PII scrubbing "
        f"{'included (flywheel.curation.pii.PiiScrubber vs datatrove PIIFormatter)' if with_pii else 'NOT included (no flywheel/curation/pii.py)'}"
    )

    # warm-up (imports, regex compilation, ftfy tables) on a slice, untimed
    run_curation(table.slice(0, 50), scrubber)
    run_datatrove(rows[:50], with_pii)

    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for i in range(args.repeats):
        ours.append(run_curation(table, scrubber))
        theirs.append(run_datatrove(rows, with_pii))
        print(
            f"  run {i + 1}: curation {ours[-1]['total_s']:.2f} s (cpu {ours[-1]['cpu_s']:.2f}), "
            f"datatrove {theirs[-1]['total_s']:.2f} s (cpu {theirs[-1]['cpu_s']:.2f})"
        )

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def med_no_pii(runs: list[dict[str, Any]]) -> float:
        return statistics.median(r["total_s"] - r["pii_s"] for r in runs)

    ours_s, theirs_s = med(ours, "total_s"), med(theirs, "total_s")
    ours_cpu, theirs_cpu = med(ours, "cpu_s"), med(theirs, "cpu_s")
    # each run of ours is paired with the datatrove run right after it: the ratio within a pair is
    # the least disturbed by other jobs on the machine
    paired = statistics.median(t["total_s"] / o["total_s"] for o, t in zip(ours, theirs, strict=True))
    ours_np, theirs_np = med_no_pii(ours), med_no_pii(theirs)
    stages = {k: statistics.median(r["stages"][k] for r in ours) for k in ours[0]["stages"]}
    mine, dt = ours[-1], theirs[-1]
    all_ids = {r["doc_id"] for r in rows}
    agree = sum((d in mine["kept_ids"]) == (d in dt["kept_ids"]) for d in all_ids) / n_docs

    print()
    print(f"{'pipeline':34} {'median s':>9} {'docs/s':>9} {'min s':>8} {'max s':>8} {'kept':>6}")
    for name, runs, med_s in (
        ("curation (this project)", ours, ours_s),
        ("datatrove 0.9.0", theirs, theirs_s),
    ):
        ts = [r["total_s"] for r in runs]
        print(
            f"{name:34} {med_s:9.2f} {n_docs / med_s:9.1f} {min(ts):8.2f} {max(ts):8.2f} {len(runs[-1]['kept_ids']):6}"
        )
    print(
        f"speed-up {theirs_s / ours_s:.2f}x (without the PII step: {theirs_np / ours_np:.2f}x); "
        f"same keep/drop decision on {agree:.1%} of documents"
    )
    print(
        f"CPU time (median): curation {ours_cpu:.2f} s, datatrove {theirs_cpu:.2f} s → {theirs_cpu / ours_cpu:.2f}x; "
        f"median of paired wall-time ratios {paired:.2f}x"
    )
    print("curation stages (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    print("curation reasons:  " + ", ".join(f"{k} {v}" for k, v in mine["reasons"].items()))
    print(
        "datatrove reasons: "
        + ", ".join(f"{k} {v}" for k, v in sorted(dt["reasons"].items(), key=lambda kv: -kv[1]))
    )

    result: dict[str, Any] = {
        "curation_docs_per_s": round(n_docs / ours_s, 1),
        "datatrove_docs_per_s": round(n_docs / theirs_s, 1),
        "curation_speedup_vs_datatrove": round(theirs_s / ours_s, 2),
        "curation_no_pii_docs_per_s": round(n_docs / ours_np, 1),
        "datatrove_no_pii_docs_per_s": round(n_docs / theirs_np, 1),
        "curation_no_pii_speedup_vs_datatrove": round(theirs_np / ours_np, 2),
        "curation_cpu_docs_per_s": round(n_docs / ours_cpu, 1),
        "datatrove_cpu_docs_per_s": round(n_docs / theirs_cpu, 1),
        "curation_cpu_speedup_vs_datatrove": round(theirs_cpu / ours_cpu, 2),
        "curation_paired_speedup_vs_datatrove": round(paired, 2),
        "curation_median_s": round(ours_s, 3),
        "datatrove_median_s": round(theirs_s, 3),
        **{f"curation_{k}": round(v, 3) for k, v in stages.items()},
        "pii_included": int(with_pii),
        "docs": n_docs,
        "chars": n_chars,
        "repeats": args.repeats,
        "quick": int(args.quick),
        "curation_kept": len(mine["kept_ids"]),
        "curation_excluded": n_docs - len(mine["kept_ids"]),
        "datatrove_kept": len(dt["kept_ids"]),
        "decision_agreement": round(agree, 4),
        "boilerplate_lines_removed": mine["boilerplate_lines_removed"],
        **{f"curation_reason_{k}": v for k, v in mine["reasons"].items()},
        **{f"datatrove_reason_{k}": v for k, v in dt["reasons"].items()},
        **{f"curation_pii_{k}": v for k, v in mine["pii_counts"].items()},
        "machine": machine(),
        "command": "python benchmarks/bench_curation.py" + (" --quick" if args.quick else ""),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
