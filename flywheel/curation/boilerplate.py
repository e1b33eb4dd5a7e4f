"""Boilerplate removal: lines that repeat across many documents of a source, found by frequency.

Navigation bars, cookie notices, share buttons and license footers are the same line on many pages.
No hand-written list finds them all; counting does (CCNet's paragraph-hash idea, per source):

1. **count**: for each source, the number of *distinct* documents each line (stripped; lines shorter
   than `min_line_chars` are ignored) occurs in, by a 64-bit xxhash of the line. A document counts
   once per line however often it repeats it, and exact-duplicate documents count once (duplicates
   are dedup's business: they must not turn every line they hold into "boilerplate").
2. **threshold**: a line is boilerplate in a source when its document frequency is at least
   `max(min_docs, min_doc_frac × distinct documents of the source)`.
3. **strip**: boilerplate lines are removed from every document of that source; a report says how
   many lines and characters went, in how many documents, and which lines were most repeated.

`LineFrequency` does 1 over any number of tables (a whole corpus, streamed) and 3 afterwards;
`remove_boilerplate(table)` does both on one table.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import xxhash


@dataclass
class BoilerplateReport:
    """What `LineFrequency.strip` removed."""

    documents: int = 0
    documents_changed: int = 0
    lines_removed: int = 0
    chars_removed: int = 0
    boilerplate_lines: int = 0  # distinct lines over the threshold, all sources
    thresholds: dict[str, int] = field(default_factory=dict)  # source → document-frequency threshold
    top_lines: list[tuple[str, str, int]] = field(default_factory=list)  # (source, line, documents)

    def as_metadata(self) -> dict[str, object]:
        """Flat numbers + the top lines, for asset metadata and benchmark JSON."""
        return {
            "documents": self.documents,
            "documents_changed": self.documents_changed,
            "lines_removed": self.lines_removed,
            "chars_removed": self.chars_removed,
            "boilerplate_lines": self.boilerplate_lines,
            "thresholds": dict(self.thresholds),
            "top_lines": [{"source": s, "line": ln, "documents": d} for s, ln, d in self.top_lines],
        }


def _line_hash(line: str) -> int:
    return xxhash.xxh3_64_intdigest(line.encode("utf-8", "surrogatepass"))


class LineFrequency:
    """Document frequency of lines per source; then strips the lines over the threshold."""

    def __init__(
        self, *, min_docs: int = 3, min_doc_frac: float = 0.0, min_line_chars: int = 1, top: int = 20
    ) -> None:
        if min_docs < 2:
            raise ValueError("min_docs must be >= 2: a line in one document is not repeated")
        self.min_docs = min_docs
        self.min_doc_frac = min_doc_frac
        self.min_line_chars = min_line_chars
        self.top = top
        self._df: dict[str, Counter[int]] = defaultdict(Counter)
        self._docs: dict[str, int] = Counter()
        self._seen_docs: dict[str, set[int]] = defaultdict(set)
        self._examples: dict[int, str] = {}

    def _lines(self, text: str) -> set[int]:
        out = set()
        for raw in text.split("\n"):
            line = raw.strip()
            if len(line) >= self.min_line_chars:
                out.add(_line_hash(line))
        return out

    def update(self, table: pa.Table) -> LineFrequency:
        """Count the lines of a table's documents (columns `source`, `text`)."""
        for source, text in zip(
            table.column("source").to_pylist(), table.column("text").to_pylist(), strict=True
        ):
            if not text:
                continue
            doc_hash = _line_hash(text)
            seen = self._seen_docs[source]
            if doc_hash in seen:  # an exact duplicate document counts once
                continue
            seen.add(doc_hash)
            self._docs[source] += 1
            self._df[source].update(self._lines(text))
        return self

    def threshold(self, source: str) -> int:
        """The document frequency from which a line of `source` is boilerplate."""
        return max(self.min_docs, math.ceil(self.min_doc_frac * self._docs.get(source, 0)))

    def boilerplate(self, source: str) -> set[int]:
        """Hashes of the boilerplate lines of `source`."""
        t = self.threshold(source)
        return {h for h, n in self._df.get(source, Counter()).items() if n >= t}

    def strip(self, table: pa.Table) -> tuple[pa.Table, BoilerplateReport]:
        """`table` with boilerplate lines removed from `text`, and what was removed."""
        report = BoilerplateReport()
        by_source = {s: self.boilerplate(s) for s in self._df}
        report.thresholds = {s: self.threshold(s) for s in self._df}
        report.boilerplate_lines = sum(len(v) for v in by_source.values())
        out: list[str | None] = []
        removed_lines: Counter[tuple[str, int]] = Counter()
        for source, text in zip(
            table.column("source").to_pylist(), table.column("text").to_pylist(), strict=True
        ):
            report.documents += 1
            bad = by_source.get(source)
            if not text or not bad:
                out.append(text)
                continue
            kept: list[str] = []
            changed = False
            for raw in text.split("\n"):
                line = raw.strip()
                if len(line) >= self.min_line_chars:
                    h = _line_hash(line)
                    if h in bad:
                        changed = True
                        report.lines_removed += 1
                        report.chars_removed += len(raw) + 1
                        if len(self._examples) < 100_000:
                            self._examples.setdefault(h, line)
                        removed_lines[(source, h)] += 1
                        continue
                kept.append(raw)
            if changed:
                report.documents_changed += 1
                out.append(_tidy("\n".join(kept)))
            else:
                out.append(text)
        top = sorted(removed_lines, key=lambda k: (-self._df[k[0]][k[1]], self._examples.get(k[1], "")))
        report.top_lines = [(s, self._examples.get(h, "?"), self._df[s][h]) for s, h in top[: self.top]]
        i = table.schema.get_field_index("text")
        return table.set_column(i, table.schema.field(i), pa.array(out, pa.string())), report


def _tidy(text: str) -> str:
    """Collapse the blank-line runs that removing lines leaves behind."""
    lines = text.split("\n")
    out: list[str] = []
    for line in lines:
        if not line.strip() and (not out or not out[-1].strip()):
            continue
        out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out)


def remove_boilerplate(
    table: pa.Table, *, min_docs: int = 3, min_doc_frac: float = 0.0, min_line_chars: int = 1
) -> tuple[pa.Table, BoilerplateReport]:
    """Count line frequencies over `table` and strip the lines over the threshold (per source)."""
    freq = LineFrequency(min_docs=min_docs, min_doc_frac=min_doc_frac, min_line_chars=min_line_chars)
    return freq.update(table).strip(table)
