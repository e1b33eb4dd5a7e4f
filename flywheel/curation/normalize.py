"""Text cleaning: encoding repair (ftfy), NFKC, control characters, markup remnants, whitespace.

`normalize_text(text)` applies, in order:

1. **ftfy** (mojibake, C1 controls, surrogates, lossy UTF-8): datatrove's FTFY choices (curly quotes
   kept, no HTML unescaping inside ftfy: step 3 does that where it is markup). ftfy works line by line
   and is the slowest step, so it runs only on documents where one of its fixers can act: ASCII text
   never needs it, and other text only when ftfy's own mojibake detector (`ftfy.badness.is_bad`,
   also per line start) or a C1-control / surrogate character says so. The result is identical to
   running ftfy on everything (tests/curation check this on the real corpora).
2. **NFKC** (compatibility forms: ligatures, full-width letters, NBSP → space, "…" → "...").
3. **markup remnants**: HTML comments and tags of real HTML elements (`<br>`/`<p>` become line breaks;
   "a < b" is left alone), HTML entities (`&amp;`, `&#8217;`), wiki links `[[a|b]]` → "b",
   templates `{{…}}`, bold/italic quotes, `== Heading ==` lines.
4. **control characters**: terminal escape sequences, C0 controls but tab and newline, zero-width
   and BOM / bidi-override characters (joiners, which scripts need, are kept); form feeds → newline.
5. **whitespace**: CRLF/CR and U+2028/9 → newline, runs of horizontal whitespace → one space, lines
   stripped (`keep_indentation=True` keeps leading indentation, for code), at most one blank line
   between paragraphs, no leading/trailing blank lines.

`normalize_table(table)` does the same to a table's `text` column (a pure step over Arrow tables).
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass, field

import pyarrow as pa


@dataclass(frozen=True)
class NormalizeConfig:
    """Which cleaning steps run (all on by default)."""

    fix_encoding: bool = field(default=True, metadata={"help": "repair mojibake etc. with ftfy"})
    nfkc: bool = field(default=True, metadata={"help": "Unicode NFKC normalization"})
    strip_markup: bool = field(default=True, metadata={"help": "remove HTML / wiki markup remnants"})
    remove_controls: bool = field(
        default=True, metadata={"help": "drop control and invisible format characters"}
    )
    normalize_whitespace: bool = field(
        default=True, metadata={"help": "collapse spaces, strip lines, cap blank lines"}
    )
    keep_indentation: bool = field(default=False, metadata={"help": "keep leading spaces of lines (code)"})
    force_ftfy: bool = field(default=False, metadata={"help": "run ftfy on every document (no fast path)"})


DEFAULT = NormalizeConfig()

# Characters some ftfy fixer acts on that its mojibake detector does not look for: C1 controls (a
# strong mojibake clue, mapped through Windows-1252) and lone surrogates.
_FTFY_TRIGGER = re.compile("[\x80-\x9f\ud800-\udfff]")
_LINE_START_BAD = re.compile(r"(?m)^[ÃÂ] ")  # ftfy's one start-anchored badness pattern, per line
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")

_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HTML_ELEMENTS = (
    "a|abbr|address|article|aside|b|big|blockquote|body|br|button|caption|center|cite|code|col|colgroup|dd|del"
    "|details|dfn|div|dl|dt|em|figcaption|figure|font|footer|form|h[1-6]|head|header|hr|html|i|iframe|img"
    "|input|ins|kbd|label|li|link|main|mark|meta|nav|noscript|ol|option|p|pre|q|s|samp|script|section"
    "|select|small|span|strike|strong|style|sub|summary|sup|svg|table|tbody|td|textarea|tfoot|th|thead"
    "|time|title|tr|tt|u|ul|var|wbr"
)
_HTML_BREAK = re.compile(r"<(?:br|/p|/div|/li|/tr|/h[1-6]|hr)\b[^<>]{0,500}>", re.IGNORECASE)
_HTML_TAG = re.compile(rf"</?(?:{_HTML_ELEMENTS})\b(?:\s[^<>]{{0,500}})?/?>", re.IGNORECASE)
_ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});")
_WIKI_LINK = re.compile(r"\[\[(?:[^\[\]|\n]*\|)?([^\[\]\n]*)\]\]")
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}\n]{0,500}\}\}")
_WIKI_BOLD = re.compile(r"('{2,5})(?=[^\s'])([^'\n]{1,300}?)(?<=[^\s'])\1(?!')")  # ''x'' / '''x''' pairs only
_WIKI_HEADING = re.compile(r"(?m)^(={2,6})[ \t]*([^=\n]+?)[ \t]*\1[ \t]*$")

_TERMINAL_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CONTROLS = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffc\u00ad]"
)
_PAGE_BREAKS = re.compile("[\x0b\x0c]")
_LINE_BREAKS = re.compile("\r\n?|[\u2028\u2029\x85]")

_ftfy_config = None


def _ftfy(text: str) -> str:
    global _ftfy_config
    import ftfy

    if _ftfy_config is None:
        # datatrove's FTFYFormatter choices: repair encodings, leave formatting decisions alone. NFKC,
        # control characters and line breaks are steps of their own below.
        _ftfy_config = ftfy.TextFixerConfig(
            unescape_html=False,
            uncurl_quotes=False,
            fix_latin_ligatures=False,
            fix_character_width=False,
            normalization=None,
            explain=False,
        )
    return ftfy.fix_text(text, config=_ftfy_config)


def needs_ftfy(text: str) -> bool:
    """Whether any ftfy fixer we use could change `text`.

    ASCII text: never. Otherwise ftfy's mojibake detector (`ftfy.badness.BADNESS_RE`, which every
    fixer but the ones for C1 controls and surrogates is gated on) decides, run only on windows of 8
    characters around the non-ASCII runs: each of its patterns needs a non-ASCII character and spans
    fewer than 8 characters on either side, so a match in the text is a match in a window (the converse
    can fail, which only costs an unneeded ftfy call).
    """
    if text.isascii():
        return False
    if _FTFY_TRIGGER.search(text) or _LINE_START_BAD.search(text):
        return True
    from ftfy.badness import BADNESS_RE

    spans = [m.span() for m in _NON_ASCII_RUN.finditer(text)]
    if len(spans) * 17 > len(text) // 2:  # dense non-ASCII text: the windows would be the whole text
        return bool(BADNESS_RE.search(text))
    probe = "\n".join(text[max(0, a - 8) : b + 8] for a, b in spans)
    return bool(BADNESS_RE.search(probe))


def strip_markup(text: str) -> str:
    """Remove HTML / wiki markup remnants from text that is meant to be plain."""
    if "<" in text:
        text = _HTML_COMMENT.sub("", text)
        text = _HTML_BREAK.sub("\n", text)
        text = _HTML_TAG.sub("", text)
    if "&" in text:
        text = _ENTITY.sub(lambda m: html.unescape(m.group()), text)
    if "[[" in text:
        text = _WIKI_LINK.sub(r"\1", text)
    if "{{" in text:
        text = _WIKI_TEMPLATE.sub("", text)
    if "''" in text:
        text = _WIKI_BOLD.sub(r"\2", text)
    if "==" in text:
        text = _WIKI_HEADING.sub(r"\2", text)
    return text


def remove_controls(text: str) -> str:
    """Drop control and invisible format characters (tab and newline stay; form feeds → newline)."""
    if "\x1b" in text:
        text = _TERMINAL_ESCAPE.sub("", text)
    text = _PAGE_BREAKS.sub("\n", text)
    return _CONTROLS.sub("", text)


def normalize_whitespace(text: str, keep_indentation: bool = False) -> str:
    """Unix line breaks, single spaces, stripped lines, at most one blank line in a row."""
    text = _LINE_BREAKS.sub("\n", text)
    out: list[str] = []
    blank = True  # no blank lines at the start
    for line in text.split("\n"):
        if keep_indentation:
            stripped = line.rstrip()
            indent = len(stripped) - len(stripped.lstrip())
            line = stripped[:indent] + " ".join(stripped.split()) if stripped else ""
        else:
            line = " ".join(line.split())  # str.split() knows every Unicode space
        if line:
            out.append(line)
            blank = False
        elif not blank:
            out.append("")
            blank = True
    if out and not out[-1]:
        out.pop()
    return "\n".join(out)


def normalize_text(text: str, config: NormalizeConfig = DEFAULT) -> str:
    """One document's text, cleaned (see the module docstring for the steps)."""
    if not text:
        return ""
    if config.fix_encoding and (config.force_ftfy or needs_ftfy(text)):
        text = _ftfy(text)
    if config.nfkc and not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    if config.strip_markup:
        text = strip_markup(text)
    if config.remove_controls:
        text = remove_controls(text)
    if config.normalize_whitespace:
        text = normalize_whitespace(text, config.keep_indentation)
    return text


def normalize_texts(texts: list[str | None], config: NormalizeConfig = DEFAULT) -> list[str]:
    """A column of texts, cleaned (nulls become empty strings)."""
    return [normalize_text(t or "", config) for t in texts]


def normalize_table(table: pa.Table, config: NormalizeConfig = DEFAULT) -> pa.Table:
    """`table` with its `text` column cleaned; every other column untouched."""
    i = table.schema.get_field_index("text")
    if i < 0:
        raise KeyError("normalize_table: the table has no `text` column")
    cleaned = pa.array(normalize_texts(table.column("text").to_pylist(), config), pa.string())
    return table.set_column(i, table.schema.field(i), cleaned)
