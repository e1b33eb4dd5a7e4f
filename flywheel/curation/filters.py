"""Gopher / C4-style document quality filters, per document or vectorized over a table.

Each filter works like datatrove's: `filter(text)` returns `True` (keep) or `(False, "reason")`.
Over a table, `run_filters(table)` computes the quality signals of every document once, compares them
with the thresholds column-wise (numpy), and returns the kept rows (with `qs_*` signal columns), the
excluded rows with their `filter_reason` (never silently dropped), and the count per reason.

Words are whitespace tokens, lower-cased, with surrounding punctuation stripped; a token that is only
punctuation is a *symbol*, not a word. Lines and paragraphs are the non-blank lines and the blocks
between blank lines. Thresholds default to Gopher's (Rae et al. 2021, "Scaling Language Models",
Appendix A, Table A1); every one can be changed or switched off (`None`).

`GopherQualityFilter` (reason: rule, default)
    empty                     no words at all
    too_few_words             fewer than 50 words             too_many_words   more than 100,000
    mean_word_length_low      mean word length < 3            mean_word_length_high   > 10
    hash_symbol_ratio         "#" per token > 0.1             ellipsis_symbol_ratio   "..."/"…" per token > 0.1
    bullet_lines              > 90 % of lines start with a bullet (•, -, *, ·, ‣, ◦, ▪, ●)
    ellipsis_lines            > 30 % of lines end with an ellipsis
    non_alpha_words           < 80 % of tokens contain a letter
    few_stop_words            < 2 of {the, be, to, of, and, that, have, with} present

`C4QualityFilter` (document-level versions of C4's rules; C4's line removal is boilerplate.py's job)
    lorem_ipsum               "lorem ipsum" anywhere (C4)
    curly_brackets            "{" + "}" per token > 0.025. C4 drops any page with a "{"; that drops
                              every StackExchange answer with a code sample, so only code-heavy
                              documents (JS/CSS/JSON dumps) go
    no_terminal_punct         < 12 % of lines end in terminal punctuation (. ! ? " ' and their
                              Unicode forms, not "..."); C4's line rule as FineWeb's document rule

`GopherRepetitionFilter` (duplicates = occurrences after the first)
    dup_para_frac / dup_line_frac              > 30 % of paragraphs / lines are duplicates
    dup_para_char_frac / dup_line_char_frac    > 20 % of characters are in duplicate paragraphs / lines
    top_{2,3,4}_gram          the most frequent word n-gram (if it repeats; ties: the longest) covers
                              > 20 / 18 / 16 % of word characters
    dup_{5..10}_gram          word characters covered by repeated n-grams > 15 / 14 / 13 / 12 / 11 / 10 %

The n-gram signals are computed with numpy: words → hashes, rolling 64-bit polynomial hashes per n,
`np.unique` for first occurrences and counts, prefix sums for the characters covered.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "-", "*", "·", "‣", "◦", "▪", "●", "–")
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "»")
ELLIPSES = ("...", "…")
# Punctuation stripped from token edges (ASCII and the common Unicode forms).
PUNCT = (
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»‹›“”„‘’‚–—―…•·‣◦▪●¡¿§¶†‡°′″、。，．：；！？（）【】「」『』《》〈〉"
)

_NON_ALPHA_TOKEN = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")  # a whitespace token without a letter
_PARAGRAPH_SPLIT = re.compile(r"\n[^\S\n]*\n\s*")
_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the rolling n-gram hash

Result = bool | tuple[bool, str]


# --- signals ----------------------------------------------------------------------------------------

CHEAP_SIGNALS = (
    "qs_words",
    "qs_mean_word_length",
    "qs_hash_ratio",
    "qs_ellipsis_ratio",
    "qs_bullet_lines_frac",
    "qs_ellipsis_lines_frac",
    "qs_alpha_words_frac",
    "qs_stop_words",
    "qs_lorem_ipsum",
    "qs_curly_bracket_ratio",
    "qs_terminal_punct_lines_frac",
)
REPETITION_SIGNALS = (
    "qs_dup_para_frac",
    "qs_dup_para_char_frac",
    "qs_dup_line_frac",
    "qs_dup_line_char_frac",
    *(f"qs_top_{n}gram_char_frac" for n in (2, 3, 4)),
    *(f"qs_dup_{n}gram_char_frac" for n in range(5, 11)),
)
SIGNALS = CHEAP_SIGNALS + REPETITION_SIGNALS


def _words(text: str) -> tuple[list[str], list[str]]:
    """(all whitespace tokens lower-cased, the words among them with edge punctuation stripped)."""
    tokens = text.lower().split()
    return tokens, list(filter(None, map(str.strip, tokens, repeat(PUNCT))))


def cheap_signals(text: str, out: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The Gopher-quality and C4 signals of one document (and its words, for the n-gram signals)."""
    s: dict[str, Any] = {} if out is None else out
    tokens, words = _words(text)
    n_tokens = len(tokens) or 1
    n_words = len(words)
    s["qs_words"] = n_words
    s["qs_mean_word_length"] = (sum(map(len, words)) / n_words) if n_words else 0.0
    s["qs_hash_ratio"] = text.count("#") / n_tokens
    s["qs_ellipsis_ratio"] = (text.count("...") + text.count("…")) / n_tokens
    lines = [ln for ln in (raw.strip() for raw in text.split("\n")) if ln]
    n_lines = len(lines) or 1
    s["qs_bullet_lines_frac"] = sum(1 for ln in lines if ln.startswith(BULLETS)) / n_lines
    ends_ellipsis = sum(1 for ln in lines if ln.endswith(ELLIPSES))
    s["qs_ellipsis_lines_frac"] = ends_ellipsis / n_lines
    s["qs_terminal_punct_lines_frac"] = (
        sum(1 for ln in lines if ln.endswith(TERMINAL_PUNCT) and not ln.endswith("...")) / n_lines
    )
    s["qs_alpha_words_frac"] = (
        (len(tokens) - len(_NON_ALPHA_TOKEN.findall(text))) / n_tokens if tokens else 0.0
    )
    s["qs_stop_words"] = len(STOP_WORDS.intersection(words))
    lower = text.lower() if "orem" in text or "OREM" in text else ""
    s["qs_lorem_ipsum"] = int("lorem ipsum" in lower)
    s["qs_curly_bracket_ratio"] = (text.count("{") + text.count("}")) / n_tokens
    return s, words


def _dup_fraction(parts: list[str], total_chars: int) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier part, fraction of characters in those repeats)."""
    if not parts:
        return 0.0, 0.0
    seen: set[str] = set()
    dups = dup_chars = 0
    for p in parts:
        if p in seen:
            dups += 1
            dup_chars += len(p)
        else:
            seen.add(p)
    return dups / len(parts), (dup_chars / total_chars if total_chars else 0.0)


def repetition_signals(text: str, words: list[str], out: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Gopher repetition signals of one document (`words` as returned by `cheap_signals`)."""
    s: dict[str, Any] = {} if out is None else out
    total = len(text)
    paragraphs = [p.strip() for p in _PARAGRAPH_SPLIT.split(text.strip()) if p.strip()]
    s["qs_dup_para_frac"], s["qs_dup_para_char_frac"] = _dup_fraction(paragraphs, total)
    lines = [ln for ln in (raw.strip() for raw in text.split("\n")) if ln]
    s["qs_dup_line_frac"], s["qs_dup_line_char_frac"] = _dup_fraction(lines, total)

    m = len(words)
    for n in (2, 3, 4):
        s[f"qs_top_{n}gram_char_frac"] = 0.0
    for n in range(5, 11):
        s[f"qs_dup_{n}gram_char_frac"] = 0.0
    if m < 2:
        return s
    # Word ids are Python's string hashes (64-bit, stable within a process): no vocabulary to build.
    ids = np.fromiter(map(hash, words), dtype=np.int64, count=m).view(np.uint64)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=m)
    cum = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    word_chars = int(cum[-1])
    h = ids
    j = np.arange(m)
    with np.errstate(over="ignore"):
        for n in range(2, 11):
            if m < n:
                break
            h = h[:-1] * _HASH_MULT + ids[n - 1 :]  # hash of the n-gram starting at each position (wraps)
            if n <= 4:
                _, first, counts = np.unique(h, return_index=True, return_counts=True)
                best = int(counts.max())
                if best < 2:
                    break  # no repeated n-gram: no longer one repeats either
                at = first[counts == best]  # the most frequent n-grams; ties → the longest
                s[f"qs_top_{n}gram_char_frac"] = float(int((cum[at + n] - cum[at]).max()) * best / word_chars)
            else:
                _, first = np.unique(h, return_index=True)
                if len(first) == len(h):
                    break  # no repeated n-gram, hence none for larger n either
                repeat_at = np.ones(len(h), dtype=np.int64)
                repeat_at[first] = 0  # occurrences after the first
                starts = np.zeros(len(h) + 1, dtype=np.int64)
                np.cumsum(repeat_at, out=starts[1:])
                # word i is covered if a repeated n-gram starts in [i-n+1, i] (within the valid starts)
                lo = np.maximum(j - n + 1, 0)
                hi = np.minimum(j, len(h) - 1)
                covered = (starts[hi + 1] - starts[lo]) > 0
                s[f"qs_dup_{n}gram_char_frac"] = float(lengths[covered].sum() / word_chars)
    return s


def quality_signals(text: str) -> dict[str, Any]:
    """Every quality signal of one document."""
    s, words = cheap_signals(text)
    return repetition_signals(text, words, s)


# --- filters ----------------------------------------------------------------------------------------


def _over(x: np.ndarray, limit: float | None) -> np.ndarray:
    return np.zeros(len(x), dtype=bool) if limit is None else x > limit


def _under(x: np.ndarray, limit: float | None) -> np.ndarray:
    return np.zeros(len(x), dtype=bool) if limit is None else x < limit


def _as_columns(signals: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray([v], dtype=float) for k, v in signals.items()}


class _Filter:
    """Shared plumbing: `checks(cols)` lists (reason, mask) in order; the first true mask wins."""

    needs_repetition = False

    def checks(self, cols: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        raise NotImplementedError

    def reasons(self, cols: dict[str, np.ndarray]) -> np.ndarray:
        """Per document, the first failed rule's reason, or None (kept). Vectorized over columns."""
        n = len(next(iter(cols.values())))
        out = np.full(n, None, dtype=object)
        for reason, mask in reversed(self.checks(cols)):  # reversed: the first rule in order wins
            out[mask] = reason
        return out

    def filter(self, text: str) -> Result:
        """True to keep `text`, else (False, reason)."""
        signals = quality_signals(text) if self.needs_repetition else cheap_signals(text)[0]
        reason = self.reasons(_as_columns(signals))[0]
        return True if reason is None else (False, reason)


@dataclass(frozen=True)
class GopherQualityFilter(_Filter):
    """Gopher's quality rules: length, word length, symbols, bullets, ellipses, letters, stop words."""

    min_words: int | None = field(default=50, metadata={"help": "fewer words → too_few_words"})
    max_words: int | None = field(default=100_000, metadata={"help": "more words → too_many_words"})
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = field(default=0.1, metadata={"help": "'#' and '...' per token"})
    max_bullet_lines_frac: float | None = 0.9
    max_ellipsis_lines_frac: float | None = 0.3
    min_alpha_words_frac: float | None = 0.8
    min_stop_words: int | None = 2

    def checks(self, c: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        has_words = c["qs_words"] > 0
        return [
            ("empty", ~has_words),
            ("too_few_words", _under(c["qs_words"], self.min_words)),
            ("too_many_words", _over(c["qs_words"], self.max_words)),
            ("mean_word_length_low", _under(c["qs_mean_word_length"], self.min_mean_word_length)),
            ("mean_word_length_high", _over(c["qs_mean_word_length"], self.max_mean_word_length)),
            ("hash_symbol_ratio", _over(c["qs_hash_ratio"], self.max_symbol_word_ratio)),
            ("ellipsis_symbol_ratio", _over(c["qs_ellipsis_ratio"], self.max_symbol_word_ratio)),
            ("bullet_lines", _over(c["qs_bullet_lines_frac"], self.max_bullet_lines_frac)),
            ("ellipsis_lines", _over(c["qs_ellipsis_lines_frac"], self.max_ellipsis_lines_frac)),
            ("non_alpha_words", _under(c["qs_alpha_words_frac"], self.min_alpha_words_frac)),
            ("few_stop_words", _under(c["qs_stop_words"], self.min_stop_words)),
        ]


@dataclass(frozen=True)
class C4QualityFilter(_Filter):
    """C4's rules as document-level decisions: lorem ipsum, code-heavy braces, terminal punctuation."""

    filter_lorem_ipsum: bool = True
    max_curly_bracket_ratio: float | None = field(default=0.025, metadata={"help": "'{' + '}' per token"})
    min_terminal_punct_lines_frac: float | None = field(
        default=0.12, metadata={"help": "lines ending . ! ? etc."}
    )

    def checks(self, c: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        lorem = (
            c["qs_lorem_ipsum"] > 0 if self.filter_lorem_ipsum else np.zeros(len(c["qs_lorem_ipsum"]), bool)
        )
        return [
            ("lorem_ipsum", lorem),
            ("curly_brackets", _over(c["qs_curly_bracket_ratio"], self.max_curly_bracket_ratio)),
            (
                "no_terminal_punct",
                _under(c["qs_terminal_punct_lines_frac"], self.min_terminal_punct_lines_frac),
            ),
        ]


@dataclass(frozen=True)
class GopherRepetitionFilter(_Filter):
    """Gopher's repetition rules: duplicate lines / paragraphs, top n-grams, repeated n-grams."""

    max_dup_para_frac: float | None = 0.30
    max_dup_para_char_frac: float | None = 0.20
    max_dup_line_frac: float | None = 0.30
    max_dup_line_char_frac: float | None = 0.20
    max_top_ngram_char_frac: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    max_dup_ngram_char_frac: tuple[tuple[int, float], ...] = (
        (5, 0.15),
        (6, 0.14),
        (7, 0.13),
        (8, 0.12),
        (9, 0.11),
        (10, 0.10),
    )
    needs_repetition = True

    def __post_init__(self) -> None:
        bad = [n for n, _ in self.max_top_ngram_char_frac if n not in (2, 3, 4)]
        bad += [n for n, _ in self.max_dup_ngram_char_frac if not 5 <= n <= 10]
        if bad:
            raise ValueError(f"GopherRepetitionFilter: n-gram sizes {bad} not computed (top: 2-4, dup: 5-10)")

    def checks(self, c: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        out = [
            ("dup_para_frac", _over(c["qs_dup_para_frac"], self.max_dup_para_frac)),
            ("dup_para_char_frac", _over(c["qs_dup_para_char_frac"], self.max_dup_para_char_frac)),
            ("dup_line_frac", _over(c["qs_dup_line_frac"], self.max_dup_line_frac)),
            ("dup_line_char_frac", _over(c["qs_dup_line_char_frac"], self.max_dup_line_char_frac)),
        ]
        out += [
            (f"top_{n}_gram", _over(c[f"qs_top_{n}gram_char_frac"], t))
            for n, t in self.max_top_ngram_char_frac
        ]
        out += [
            (f"dup_{n}_gram", _over(c[f"qs_dup_{n}gram_char_frac"], t))
            for n, t in self.max_dup_ngram_char_frac
        ]
        return out


@dataclass(frozen=True)
class QualityFilters:
    """The filters `run_filters` applies, in this order (a document's reason is the first failure)."""

    gopher: GopherQualityFilter | None = field(default_factory=GopherQualityFilter)
    c4: C4QualityFilter | None = field(default_factory=C4QualityFilter)
    repetition: GopherRepetitionFilter | None = field(default_factory=GopherRepetitionFilter)

    def filter(self, text: str) -> Result:
        for f in (self.gopher, self.c4, self.repetition):
            if f is not None and (r := f.filter(text)) is not True:
                return r
        return True

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> QualityFilters:
        """From a config table with optional sub-tables `gopher`, `c4`, `repetition` of thresholds
        (`false` switches a whole filter off); unknown keys are refused, naming them."""
        kinds = {"gopher": GopherQualityFilter, "c4": C4QualityFilter, "repetition": GopherRepetitionFilter}
        unknown = set(section) - set(kinds)
        if unknown:
            raise ValueError(
                f"quality filter config: unknown section(s) {sorted(unknown)}; one of {sorted(kinds)}"
            )
        made: dict[str, Any] = {}
        for name, kind in kinds.items():
            spec = section.get(name, {})
            if spec is False:
                made[name] = None
                continue
            allowed = {f.name for f in fields(kind)}
            bad = set(spec) - allowed
            if bad:
                raise ValueError(
                    f"quality filter config [{name}]: unknown threshold(s) {sorted(bad)}; allowed {sorted(allowed)}"
                )
            spec = {
                k: (tuple(tuple(p) for p in v) if k.startswith("max_") and "ngram" in k else v)
                for k, v in spec.items()
            }
            made[name] = kind(**spec)
        return cls(**made)


class FilterResult(NamedTuple):
    """What `run_filters` returns."""

    kept: pa.Table  # input rows that passed, with the qs_* signal columns
    excluded: pa.Table  # input rows that failed, with `filter_reason` and the signal columns
    reason_counts: dict[str, int]  # reason → documents excluded for it
    signal_columns: tuple[str, ...]  # names of the qs_* columns added


def _is_none(values: np.ndarray) -> np.ndarray:
    return np.fromiter((v is None for v in values), dtype=bool, count=len(values))


def signal_columns(
    texts: Sequence[str | None], filters: QualityFilters | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Signals of every text (float64 columns) and the per-document exclusion reason (None = kept).

    Repetition signals (the costly part) are computed only for documents that passed the quality and
    C4 rules; the others have NaN there, like a filter pipeline that stops at the first failure.
    """
    filters = filters or QualityFilters()
    n = len(texts)
    cols = {name: np.full(n, np.nan) for name in SIGNALS}
    words_of: list[list[str] | None] = [None] * n
    row: dict[str, Any] = {}
    for i, t in enumerate(texts):
        _, words_of[i] = cheap_signals(t or "", row)
        for k in CHEAP_SIGNALS:
            cols[k][i] = row[k]
    reasons = np.full(n, None, dtype=object)
    for f in (filters.gopher, filters.c4):
        if f is not None:
            r = f.reasons(cols)
            fill = _is_none(reasons) & ~_is_none(r)
            reasons[fill] = r[fill]
    if filters.repetition is not None:
        todo = np.flatnonzero(_is_none(reasons))
        for i in todo:
            repetition_signals(texts[i] or "", words_of[i] or [], row)
            for k in REPETITION_SIGNALS:
                cols[k][i] = row[k]
        sub = {k: v[todo] for k, v in cols.items()}
        if len(todo):
            reasons[todo] = filters.repetition.reasons(sub)
    return cols, reasons


def run_filters(table: pa.Table, filters: QualityFilters | None = None) -> FilterResult:
    """Split a documents table into kept and excluded (with reasons), adding the quality signals."""
    texts = table.column("text").to_pylist()
    cols, reasons = signal_columns(texts, filters)
    # a table filtered before (signals or a reason from an earlier run) gets fresh ones
    with_signals = table.drop_columns([c for c in (*SIGNALS, "filter_reason") if c in table.column_names])
    for name in SIGNALS:
        with_signals = with_signals.append_column(name, pa.array(cols[name], pa.float64(), from_pandas=True))
    keep = _is_none(reasons)
    kept = with_signals.filter(pa.array(keep))
    excluded = with_signals.filter(pa.array(~keep))
    excluded = excluded.append_column("filter_reason", pa.array(list(reasons[~keep]), pa.string()))
    counts = Counter(r for r in reasons if r is not None)
    return FilterResult(kept, excluded, dict(counts.most_common()), SIGNALS)
