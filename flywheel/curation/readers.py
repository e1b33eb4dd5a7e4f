"""Corpus readers: files → rows of `DOC_SCHEMA` (dicts), streamed one document at a time.

One reader per format in the shared corpora (see docs/curation.md for what each extracts):

| format          | reader                | files                                                        |
|-----------------|-----------------------|--------------------------------------------------------------|
| `jsonl`         | `read_jsonl`          | Dolma / C4 / any `{"text": ...}` JSON lines, `.gz` or plain  |
| `gutenberg`     | `read_gutenberg`      | Project Gutenberg plain-text books (header/footer removed)   |
| `wikitext`      | `read_wikitext`       | WikiText raw splits, one document per ` = Title = ` article |
| `mediawiki`     | `read_mediawiki`      | MediaWiki XML dumps (`.xml`, `.xml.bz2`), markup → text      |
| `stackexchange` | `read_stackexchange`  | StackExchange dump `Posts.xml` / `Comments.xml`              |
| `warc`          | `read_warc`           | WARC/1.0 (`.warc`, `.warc.gz`) HTML responses, trafilatura   |

Every row has `doc_id = doc_id_for(source, key)` with a key local to the source (the upstream id where
there is one), the source's `license`, and `meta` as a JSON object. People: a reader that sees a user
identifier (a wiki contributor, a StackExchange user) never stores it; it stores
`subject_id = pseudonymize("mediawiki:<name or IP>")` / `pseudonymize("stackexchange:<site>:<id>")`
(the keystore's keyed HMAC, e.g. `KeyStore(path).pseudonymize`), or no subject when no pseudonymizer
is given. Nothing personal goes into `meta`.

Bad input never vanishes: a record that cannot be parsed raises `ValueError` naming the file and the
line / byte offset, or, with `on_bad_record=callback`, is handed to the callback (e.g. a quarantine)
as a `BadRecord` and reading goes on.

    python -m flywheel.curation.readers SOURCE [DATA_ROOT]     # print a source's first documents
"""

from __future__ import annotations

import bz2
import gzip
import html
import io
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any
from xml.etree import ElementTree as ET

import orjson
import pyarrow as pa

from flywheel.curation.documents import created, doc_id_for, documents_table
from flywheel.curation.sources import Source

Pseudonymize = Callable[[str], str]


@dataclass(frozen=True)
class BadRecord:
    """A record a reader could not turn into a document (for a quarantine)."""

    path: str
    offset: int  # line number for line formats, byte offset (uncompressed) for WARC, record index for XML
    raw: bytes
    reason: str


OnBadRecord = Callable[[BadRecord], None]


def _bad(on_bad: OnBadRecord | None, path: Path, offset: int, raw: bytes, reason: str, unit: str) -> None:
    if on_bad is None:
        raise ValueError(f"{path}: {unit} {offset}: {reason}")
    on_bad(BadRecord(str(path), offset, raw, reason))


def _row(
    source: str,
    license: str,
    key: str,
    text: str,
    *,
    subject_id: str | None = None,
    created_at: datetime | None = None,
    url: str | None = None,
    title: str | None = None,
    parent_ids: list[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "doc_id": doc_id_for(source, key),
        "source": source,
        "license": license,
        "subject_id": subject_id,
        "created_at": created_at,
        "text": text,
        "url": url,
        "title": title,
        "parent_ids": parent_ids or [],
        "meta": orjson.dumps(meta or {}, option=orjson.OPT_SORT_KEYS).decode(),
    }


def open_binary(path: Path) -> IO[bytes]:
    """A file opened for reading bytes, transparently decompressing `.gz` / `.bz2`."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def _created(value: Any) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        return created(value)
    except ValueError:
        return None


def _dotted(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


# --- JSONL (Dolma, C4, speeches) -------------------------------------------------------------------


def read_jsonl(
    path: Path,
    *,
    source: str,
    license: str,
    id_field: str = "id",
    text_field: str = "text",
    created_field: str = "created",
    url_field: str | None = None,
    title_field: str = "title",
    subject_field: str | None = None,
    pseudonymize: Pseudonymize | None = None,
    on_bad_record: OnBadRecord | None = None,
) -> Iterator[dict[str, Any]]:
    """JSON lines with a text field: Dolma (`id`, `text`, `created`, `metadata.url`), C4 (`text` only).

    The key is the record's `id_field` (else `<file name>:<line>`); `url` is `url_field` (a dotted path)
    or the first of `url`, `metadata.warc_url`, `metadata.url`; `title` is `title_field` or
    `metadata.title`. Every other field goes to `meta` as is, except `subject_field` (pseudonymized
    into `subject_id`, never stored).
    """
    path = Path(path)
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                _bad(on_bad_record, path, lineno, raw, f"invalid JSON: {e}", "line")
                continue
            if not isinstance(record, dict):
                _bad(on_bad_record, path, lineno, raw, "not a JSON object", "line")
                continue
            text = record.pop(text_field, None)
            if not isinstance(text, str):
                _bad(
                    on_bad_record, path, lineno, raw, f"field {text_field!r} missing or not a string", "line"
                )
                continue
            upstream_id = record.get(id_field)
            key = str(upstream_id) if upstream_id not in (None, "") else f"{path.name}:{lineno}"
            if url_field:
                url = _dotted(record, url_field)
            else:
                url = (
                    record.get("url")
                    or _dotted(record, "metadata.warc_url")
                    or _dotted(record, "metadata.url")
                )
            title = record.get(title_field) or _dotted(record, "metadata.title")
            subject_id = None
            if subject_field is not None:
                raw_subject = record.pop(subject_field, None)
                if raw_subject not in (None, "") and pseudonymize is not None:
                    subject_id = pseudonymize(f"{source}:{raw_subject}")
            yield _row(
                source,
                license,
                key,
                text,
                subject_id=subject_id,
                created_at=_created(record.get(created_field)),
                url=url if isinstance(url, str) else None,
                title=title if isinstance(title, str) else None,
                meta=record,
            )


# --- Project Gutenberg -------------------------------------------------------------------------------

# Where the licence header ends: the modern "*** START OF THE/THIS PROJECT GUTENBERG EBOOK …" line, or
# the end of the 1990s "SMALL PRINT" block ("*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*…").
_PG_START = re.compile(
    r"^\s*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG"
    r"|^\s*\*\s*END\s*\*?\s*THE SMALL PRINT"
    r"|^\s*\*{3}\s*START OF THE COPYRIGHTED PROJECT GUTENBERG",
    re.IGNORECASE,
)
# Where the footer begins: "*** END OF …", "End of [the] Project Gutenberg['s] [EBook|Etext] of …".
_PG_END = re.compile(
    r"^\s*\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG"
    r"|^\s*End of (?:the |this )?Project Gutenberg"
    r"|^\s*\*{3}\s*END OF THE COPYRIGHTED PROJECT GUTENBERG",
    re.IGNORECASE,
)
# Transcriber credits right after the header ("Produced by …", "Transcribed from … by …, email …").
_PG_CREDIT = re.compile(
    r"^\s*(?:produced by|transcribed (?:from|by)|this e-?text was (?:produced|prepared)|e-?text prepared by"
    r"|this e-?book was (?:produced|prepared)|entered by|prepared by|scanned by|proofread by)",
    re.IGNORECASE,
)
_PG_FIELD = re.compile(r"^(Title|Author|Release Date|Posting Date|Language|Edition):\s*(.*)$")
_PG_TITLE_LINE = re.compile(
    r"Project Gutenberg(?:'s)? (?:e-?book|etext) of (.+?)(?:,? by .*)?$", re.IGNORECASE
)
_PG_NUMBER = re.compile(r"\[(?:e-?book|etext) #(\d+)\]", re.IGNORECASE)
_PG_ILLUSTRATION = re.compile(r"\[Illustration(?::[^\]]*)?\]", re.IGNORECASE)


def _decode_book(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Older Gutenberg files are ISO-8859-1 / Windows-1252; cp1252 decodes every byte but five.
        return data.decode("cp1252", errors="replace")


def strip_gutenberg(text: str) -> tuple[str, dict[str, Any]]:
    """A Gutenberg book's body without the licence header/footer and transcriber credits, and its
    header fields (`title`, `author`, `release_date`, `language`, `ebook_number`, …)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    # Header fields live in the header (before the start marker) or, in files without one, near the top.
    start = -1
    half = len(lines) // 2
    for i in range(half):
        if _PG_START.match(lines[i]):
            start = i  # the last start marker in the first half: SMALL PRINT blocks can repeat "START"
    end = len(lines)
    for i in range(start + 1, len(lines)):
        if i > half and _PG_END.match(lines[i]):
            end = i
            break
    fields: dict[str, Any] = {}
    header = lines[: start + 1] if start >= 0 else lines[:80]
    for i, line in enumerate(header):
        m = _PG_FIELD.match(line.strip())
        if m and m.group(1).lower().replace(" ", "_") not in fields and m.group(2):
            value = m.group(2).strip()
            # A title may continue on indented lines ("Title: News from Nowhere\n       or An Epoch …").
            j = i + 1
            while (
                m.group(1) == "Title"
                and j < len(header)
                and header[j].startswith((" ", "\t"))
                and header[j].strip()
            ):
                value += " " + header[j].strip()
                j += 1
            fields[m.group(1).lower().replace(" ", "_")] = _PG_NUMBER.sub("", value).strip()
    if "title" not in fields:
        for line in header[:5]:
            m = _PG_TITLE_LINE.search(line.strip())
            if m:
                fields["title"] = m.group(1).strip()
                break
    for line in header:
        m = _PG_NUMBER.search(line)
        if m:
            fields["ebook_number"] = int(m.group(1))
            break
    body = lines[start + 1 : end]
    fields["header_removed"] = start >= 0
    fields["footer_removed"] = end < len(lines)
    # Drop credit paragraphs among the first few paragraphs of the body.
    text_body = "\n".join(body).strip("\n")
    paragraphs = re.split(r"\n\s*\n", text_body)
    kept = [p for i, p in enumerate(paragraphs) if not (i < 12 and _PG_CREDIT.match(p.strip()))]
    text_body = "\n\n".join(p.strip("\n") for p in kept if p.strip())
    text_body = _PG_ILLUSTRATION.sub("", text_body)
    return text_body.strip(), fields


def read_gutenberg(
    path: Path, *, source: str, license: str, pseudonymize: Pseudonymize | None = None
) -> Iterator[dict[str, Any]]:
    """One document per book file: the body without Gutenberg's header and footer.

    Title and author come from the header (`Title:`, `Author:`, or the "Project Gutenberg EBook of …"
    line); a file with no header (a cleaned edition) gets its title from the file name
    (`pg1342_pride_and_prejudice.txt` → "Pride And Prejudice"). Authors are public, not data subjects.
    """
    path = Path(path)
    with open_binary(path) as f:
        text, fields = strip_gutenberg(_decode_book(f.read()))
    title = fields.pop("title", None)
    if title is None:
        title = re.sub(r"^pg\d+_", "", path.stem).replace("_", " ").title()
        fields["title_from"] = "file name"
    number = fields.get("ebook_number") or (
        int(m.group(1)) if (m := re.match(r"pg(\d+)", path.stem)) else None
    )
    if number:
        fields["ebook_number"] = number
    url = f"https://www.gutenberg.org/ebooks/{number}" if number else None
    fields["file"] = path.name
    yield _row(source, license, path.name, text, url=url, title=title, meta=fields)


# --- WikiText ----------------------------------------------------------------------------------------

_WT_ARTICLE = re.compile(r"^ = ([^=].*?) = $")
_WT_SECTION = re.compile(r"^ (?:= )+(.*?)(?: =)+ $")
_WT_RULES = [
    (re.compile(r" @([-,.])@ "), r"\1"),  # number / compound separators: "1 @,@ 000", "guest @-@ star"
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),  # no space before closing punctuation
    (re.compile(r"([(\[{$£]) "), r"\1"),  # nor after opening brackets / currency
    (re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", re.IGNORECASE), r"\1"),  # contractions
    (re.compile(r"\" ([^\"]*?) \""), r'"\1"'),  # paired double quotes
]


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's tokenization (" @-@ ", spaces around punctuation) into ordinary prose."""
    for pattern, repl in _WT_RULES:
        text = pattern.sub(repl, text)
    return text


def read_wikitext(
    path: Path,
    *,
    source: str,
    license: str,
    detokenize: bool = True,
    pseudonymize: Pseudonymize | None = None,
) -> Iterator[dict[str, Any]]:
    """WikiText raw: one document per article (a ` = Title = ` line starts one); ` = = Section = = `
    headings become their own paragraph; with `detokenize`, " @-@ " and " , " become "-" and ", "."""
    path = Path(path)

    def article(title: str, blocks: list[str], index: int) -> dict[str, Any]:
        body = "\n\n".join(blocks)
        if detokenize:
            title, body = detokenize_wikitext(title), detokenize_wikitext(body)
        url = "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")
        return _row(
            source, license, f"{index}:{title}", body, url=url, title=title, meta={"article_index": index}
        )

    title: str | None = None
    blocks: list[str] = []
    index = 0
    with open_binary(path) as fb:
        for line in io.TextIOWrapper(fb, encoding="utf-8", newline=None):
            line = line.rstrip("\n")
            m = _WT_ARTICLE.match(line)
            if m:
                if title is not None:
                    yield article(title, blocks, index)
                    index += 1
                title, blocks = m.group(1), []
                continue
            s = _WT_SECTION.match(line)
            if s:
                blocks.append(s.group(1).strip())
            elif line.strip():
                blocks.append(line.strip())
    if title is not None:
        yield article(title, blocks, index)


# --- MediaWiki XML -----------------------------------------------------------------------------------

_WIKI_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_WIKI_DROP_TAGS = re.compile(
    r"<(ref|math|gallery|timeline|imagemap|score|graph|templatedata|syntaxhighlight|source|chem|ce|hiero"
    r"|references|noinclude|mapframe|maplink)\b[^>]*?(?:/>|>.*?</\1\s*>)",
    re.IGNORECASE | re.DOTALL,
)
_WIKI_SELF_CLOSING = re.compile(r"<(?:ref|references)\b[^>]*/>", re.IGNORECASE)
_WIKI_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_WIKI_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")
_WIKI_EXTLINK = re.compile(
    r"\[(?:https?:|ftp:|mailto:)?//[^\s\]]+(?:\s+([^\]]*))?\]|\[mailto:[^\s\]]+(?:\s+([^\]]*))?\]"
)
_WIKI_BOLD = re.compile(r"'{2,5}")
_WIKI_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$", re.MULTILINE)
_WIKI_LIST = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_WIKI_MAGIC = re.compile(r"__[A-Z]+__")
_WIKI_RULE = re.compile(r"^-{4,}\s*$", re.MULTILINE)
_WIKI_EMPTY_PARENS = re.compile(r"\s?\(\s*[,;:]?\s*\)")
_WIKI_DANGLING = re.compile(r"\(\s*[,;:]\s*|\s*[,;:]\s*\)")  # "(; born …" / "…; )" after a removed template
_WIKI_SPACE_PUNCT = re.compile(r"[ \t]+([,.;:](?:\s|$))")
_WIKI_SPACES = re.compile(r"[ \t]{2,}")
_WIKI_TABLE_LINE = re.compile(
    r"^[ \t]*(?:\{\||\|\}|\|-|\|\+|!|\|).*$\n?", re.MULTILINE
)  # rows of unbalanced tables
_WIKI_BLANKS = re.compile(r"\n\s*\n(?:\s*\n)+")
_WIKI_DROP_NAMESPACES = frozenset(
    {"file", "image", "media", "category", "wikipedia", "wp", "template", "help", "portal", "special", "user"}
)
_KEEP_TEMPLATES = frozenset({"convert", "lang", "nowrap", "nobr", "small", "smaller", "big", "nowiki"})
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)?$|^simple$")


def _balanced(text: str, opener: str, closer: str, replace: Callable[[str], str]) -> str:
    """Replace every outermost `opener … closer` span (nesting-aware) by `replace(inner)`; an unclosed
    opener is dropped and the rest kept."""
    if opener not in text:
        return text
    token = re.compile(re.escape(opener) + "|" + re.escape(closer))
    out: list[str] = []
    depth, start, last = 0, 0, 0
    for m in token.finditer(text):
        if m.group() == opener:
            if depth == 0:
                start = m.start()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                out.append(text[last:start])
                out.append(replace(text[start + len(opener) : m.start()]))
                last = m.end()
    if depth > 0:  # unclosed: drop the opener, keep the text after it
        out.append(text[last:start])
        out.append(_balanced(text[start + len(opener) :], opener, closer, replace))
        return "".join(out)
    out.append(text[last:])
    return "".join(out)


def _split_args(inner: str) -> list[str]:
    """Split template arguments on "|" outside nested [[links]] and {{templates}}."""
    parts, depth, last = [], 0, 0
    for m in re.finditer(r"\[\[|\]\]|\{\{|\}\}|\|", inner):
        tok = m.group()
        if tok in ("[[", "{{"):
            depth += 1
        elif tok in ("]]", "}}"):
            depth = max(0, depth - 1)
        elif depth == 0:
            parts.append(inner[last : m.start()])
            last = m.end()
    parts.append(inner[last:])
    return [p.strip() for p in parts]


def _template(inner: str) -> str:
    """Templates are dropped (infoboxes, citations, navboxes) except the few that carry running text."""
    name = inner.split("|", 1)[0].strip().lower().replace("_", " ")
    if not (name in _KEEP_TEMPLATES or name.startswith("lang-")):
        return ""
    if "{{" in inner:  # a kept template's arguments may hold templates of their own
        inner = _balanced(inner, "{{", "}}", _template)
    parts = _split_args(inner)
    name = parts[0].lower().replace("_", " ")
    args = [p for p in parts[1:] if "=" not in p]
    if name == "convert" and len(args) >= 2:
        if len(args) >= 4 and args[1] in {"to", "-", "and", "or", "–"}:
            return f"{args[0]} {args[1]} {args[2]} {args[3]}"
        return f"{args[0]} {args[1]}"
    if (name == "lang" and len(args) >= 2) or (name.startswith("lang-") and args):
        return args[-1]
    if name in {"nowrap", "nobr", "small", "smaller", "big", "nowiki"} and args:
        return args[0]
    return ""


def _link(inner: str, categories: list[str]) -> str:
    target, _, label = inner.partition("|")
    target = target.strip()
    prefix, colon, rest = target.lstrip(":").partition(":")
    namespace = prefix.strip().lower() if colon else ""
    if namespace == "category" and not target.startswith(":"):
        categories.append(rest.split("|")[0].strip())
        return ""
    if namespace in _WIKI_DROP_NAMESPACES or (
        colon and _INTERLANGUAGE.match(namespace) and not target.startswith(":")
    ):
        return ""
    if "[[" in label:  # a label holding links of its own
        label = _balanced(label, "[[", "]]", lambda x: _link(x, categories))
    if label.strip():
        return label.rsplit("|", 1)[-1].strip()
    shown = target.lstrip(":")
    return re.sub(r"\s*\([^)]*\)$", "", shown) if "|" in inner else shown  # pipe trick "[[A (b)|]]" → "A"


def wiki_to_text(markup: str) -> tuple[str, list[str]]:
    """MediaWiki markup → (plain text, categories).

    Removed: comments, <ref>/<math>/<gallery>… with their content, templates (nesting-aware; a few
    that carry running text such as {{convert}} and {{lang}} keep it), tables, file/image/category and
    interlanguage links, magic words, bold/italic quotes, list markers, HTML tags. Kept: link labels,
    section titles (as their own line), the text of external links.
    """
    categories: list[str] = []
    text = _WIKI_COMMENT.sub("", markup)
    text = _WIKI_SELF_CLOSING.sub("", text)
    text = _WIKI_DROP_TAGS.sub("", text)
    text = _balanced(text, "{{", "}}", _template)
    text = _balanced(text, "{|", "|}", lambda _: "")
    text = _balanced(text, "[[", "]]", lambda inner: _link(inner, categories))
    text = _WIKI_EXTLINK.sub(lambda m: m.group(1) or m.group(2) or "", text)
    text = _WIKI_TABLE_LINE.sub("", text)
    text = _WIKI_BR.sub("\n", text)
    text = _WIKI_TAG.sub("", text)
    text = _WIKI_MAGIC.sub("", text)
    text = _WIKI_BOLD.sub("", text)
    text = _WIKI_HEADING.sub(lambda m: "\n" + m.group(2) + "\n", text)
    text = _WIKI_RULE.sub("", text)
    text = _WIKI_LIST.sub("", text)
    text = html.unescape(text).replace("\u00a0", " ")
    text = _WIKI_EMPTY_PARENS.sub("", text)
    text = _WIKI_DANGLING.sub(lambda m: "(" if "(" in m.group() else ")", text)
    text = _WIKI_SPACE_PUNCT.sub(r"\1", text)
    text = _WIKI_SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = _WIKI_BLANKS.sub("\n\n", text)
    return text.strip(), categories


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(el: ET.Element, name: str) -> ET.Element | None:
    for c in el:
        if _local(c.tag) == name:
            return c
    return None


def _child_text(el: ET.Element | None, name: str) -> str | None:
    if el is None:
        return None
    c = _child(el, name)
    return c.text if c is not None else None


def read_mediawiki(
    path: Path,
    *,
    source: str,
    license: str,
    include_redirects: bool = True,
    pseudonymize: Pseudonymize | None = None,
    on_bad_record: OnBadRecord | None = None,
) -> Iterator[dict[str, Any]]:
    """MediaWiki XML export: one document per `<page>` (its last revision), wiki markup → plain text.

    `subject_id` is the pseudonymized contributor (`mediawiki:<username or IP>`) of that revision;
    `created_at` its timestamp; `meta` the page/revision ids, namespace, categories, redirect target
    (a redirect's text is empty: it is kept so the filters exclude it with a reason).
    """
    path = Path(path)
    base_url: str | None = None
    index = 0
    with open_binary(path) as f:
        context = ET.iterparse(f, events=("start", "end"))
        root: ET.Element | None = None
        try:
            for event, el in context:
                if root is None:
                    root = el
                if event != "end":
                    continue
                tag = _local(el.tag)
                if tag == "base" and el.text:
                    base_url = el.text.rsplit("/", 1)[0] + "/"
                if tag != "page":
                    continue
                index += 1
                row = _mediawiki_page(el, source, license, base_url, pseudonymize)
                root.clear()  # stream: drop the parsed page
                if row is None:
                    _bad(on_bad_record, path, index, b"", "page without title or revision text", "page")
                    continue
                if not include_redirects and orjson.loads(row["meta"]).get("redirect") is not None:
                    continue
                yield row
        except ET.ParseError as e:
            _bad(on_bad_record, path, index + 1, b"", f"invalid XML: {e}", "page")


def _mediawiki_page(
    page: ET.Element, source: str, license: str, base_url: str | None, pseudonymize: Pseudonymize | None
) -> dict[str, Any] | None:
    title = _child_text(page, "title")
    revisions = [c for c in page if _local(c.tag) == "revision"]
    if title is None or not revisions:
        return None
    rev = revisions[-1]
    markup = _child_text(rev, "text") or ""
    redirect_el = _child(page, "redirect")
    redirect = redirect_el.get("title") if redirect_el is not None else None
    if redirect is None and re.match(r"\s*#redirect", markup, re.IGNORECASE):
        m = re.search(r"\[\[([^\]|]+)", markup)
        redirect = m.group(1) if m else ""
    text, categories = ("", []) if redirect is not None else wiki_to_text(markup)
    contributor = _child(rev, "contributor")
    who = _child_text(contributor, "username") or _child_text(contributor, "ip")
    kind = "deleted" if who is None else ("user" if _child_text(contributor, "username") else "ip")
    subject = pseudonymize(f"mediawiki:{who}") if (who and pseudonymize) else None
    page_id = _child_text(page, "id")
    meta = {
        "page_id": int(page_id) if page_id and page_id.isdigit() else page_id,
        "namespace": int(ns) if (ns := _child_text(page, "ns")) and ns.lstrip("-").isdigit() else None,
        "revision_id": _child_text(rev, "id"),
        "contributor_kind": kind,
        "categories": categories,
        "redirect": redirect,
    }
    return _row(
        source,
        license,
        # The same page can appear in two dumps at different revisions: each revision is its own text.
        f"page:{page_id or title}/rev:{meta['revision_id']}",
        text,
        subject_id=subject,
        created_at=_created(_child_text(rev, "timestamp")),
        url=(base_url + title.replace(" ", "_")) if base_url else None,
        title=title,
        meta=meta,
    )


# --- StackExchange -----------------------------------------------------------------------------------

_HTML_BLOCK = re.compile(
    r"</?(?:p|div|pre|blockquote|h[1-6]|ul|ol|table|tr|hr|section|article|header|footer|dl|dt|dd)\b[^>]*>",
    re.IGNORECASE,
)
_HTML_LI = re.compile(r"\s*<li\b[^>]*>", re.IGNORECASE)
_HTML_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_HTML_DROP = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^<>]+>")
_BLANK_RUNS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_EMPTY_ITEM = re.compile(r"^- *\n\s*", re.MULTILINE)  # "<li><p>x" leaves the bullet on a line of its own

POST_TYPES = {
    "1": "question",
    "2": "answer",
    "3": "orphaned_tag_wiki",
    "4": "tag_wiki_excerpt",
    "5": "tag_wiki",
    "6": "moderator_nomination",
    "7": "wiki_placeholder",
    "8": "privilege_wiki",
}


def html_fragment_to_text(fragment: str) -> str:
    """A sanitized HTML fragment (a StackExchange body) → text: blocks become paragraphs, list items
    lines starting "- ", code keeps its characters (entities are decoded after the tags are gone)."""
    text = _HTML_DROP.sub("", fragment)
    text = _HTML_BR.sub("\n", text)
    text = _HTML_LI.sub("\n- ", text)
    text = _HTML_BLOCK.sub("\n\n", text)
    text = _HTML_TAG.sub("", text)
    text = _EMPTY_ITEM.sub("- ", text)
    text = html.unescape(text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def _se_site(path: Path, site: str | None) -> str:
    if site:
        return site
    stem = path.stem  # "tpxml_Posts" → "tpxml"; "Posts" in "coffee.stackexchange.com/" → that folder
    return stem.rsplit("_", 1)[0] if "_" in stem else path.parent.name


def _se_subject(
    site: str, row: dict[str, str], id_attr: str, name_attr: str, pseudonymize: Pseudonymize | None
) -> str | None:
    if pseudonymize is None:
        return None
    if row.get(id_attr):
        return pseudonymize(f"stackexchange:{site}:{row[id_attr]}")
    if row.get(name_attr):  # a deleted account keeps only its display name
        return pseudonymize(f"stackexchange:{site}:name:{row[name_attr]}")
    return None


def _iter_rows(path: Path, on_bad: OnBadRecord | None) -> Iterator[tuple[int, dict[str, str]]]:
    index = 0
    with open_binary(path) as f:
        try:
            for _, el in ET.iterparse(f, events=("end",)):
                if el.tag == "row":
                    index += 1
                    yield index, dict(el.attrib)
                    el.clear()
        except ET.ParseError as e:
            _bad(on_bad, path, index + 1, b"", f"invalid XML: {e}", "row")


def read_stackexchange(
    path: Path,
    *,
    source: str,
    license: str,
    site: str | None = None,
    pseudonymize: Pseudonymize | None = None,
    on_bad_record: OnBadRecord | None = None,
) -> Iterator[dict[str, Any]]:
    """A StackExchange dump file: `*Posts.xml` (questions, answers, wikis) or `*Comments.xml`.

    Posts: text = title + body for questions, body (HTML → text) otherwise; answers name their question
    in `parent_ids`. Comments: `parent_ids` = [the post's doc_id] (same source, key `<site>/post/<Id>`).
    `subject_id` = pseudonymize("stackexchange:<site>:<OwnerUserId | UserId>") (a deleted account:
    "stackexchange:<site>:name:<display name>"). `meta`: ids, post type, score, tags, counts.
    """
    path = Path(path)
    site = _se_site(path, site)
    kind = path.stem.rsplit("_", 1)[-1].lower()
    if kind == "posts":
        yield from _se_posts(path, source, license, site, pseudonymize, on_bad_record)
    elif kind == "comments":
        yield from _se_comments(path, source, license, site, pseudonymize, on_bad_record)
    else:
        raise ValueError(
            f"{path}: not a StackExchange Posts.xml or Comments.xml (users, badges, votes are not documents)"
        )


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _se_posts(
    path: Path,
    source: str,
    license: str,
    site: str,
    pseudonymize: Pseudonymize | None,
    on_bad: OnBadRecord | None,
) -> Iterator[dict[str, Any]]:
    for index, row in _iter_rows(path, on_bad):
        post_id = row.get("Id")
        if not post_id:
            _bad(on_bad, path, index, repr(row).encode(), "post row without Id", "row")
            continue
        post_type = POST_TYPES.get(row.get("PostTypeId", ""), row.get("PostTypeId"))
        body = html_fragment_to_text(row.get("Body", ""))
        title = row.get("Title")
        parent = row.get("ParentId")
        if post_type == "question" and title:
            text = f"{title}\n\n{body}" if body else title
        else:
            # An answer does not copy its question's title: the title is the asker's text (erasing the
            # asker must not leave it on other people's answers); `parent_ids` links the question.
            text = body
        tags = re.findall(r"<([^<>]+)>", row.get("Tags", "")) if row.get("Tags") else []
        meta = {
            "site": site,
            "post_id": _int(post_id),
            "post_type": post_type,
            "score": _int(row.get("Score")),
            "tags": tags,
            "view_count": _int(row.get("ViewCount")),
            "answer_count": _int(row.get("AnswerCount")),
            "comment_count": _int(row.get("CommentCount")),
            "accepted_answer_id": _int(row.get("AcceptedAnswerId")),
            "parent_post_id": _int(parent),
        }
        yield _row(
            source,
            license,
            f"{site}/post/{post_id}",
            text,
            subject_id=_se_subject(site, row, "OwnerUserId", "OwnerDisplayName", pseudonymize),
            created_at=_created(row.get("CreationDate")),
            url=f"https://{site}/q/{post_id}" if "." in site else None,
            title=title,
            parent_ids=[doc_id_for(source, f"{site}/post/{parent}")] if parent else [],
            meta={k: v for k, v in meta.items() if v is not None},
        )


def _se_comments(
    path: Path,
    source: str,
    license: str,
    site: str,
    pseudonymize: Pseudonymize | None,
    on_bad: OnBadRecord | None,
) -> Iterator[dict[str, Any]]:
    for index, row in _iter_rows(path, on_bad):
        comment_id, post_id = row.get("Id"), row.get("PostId")
        if not comment_id or not post_id:
            _bad(on_bad, path, index, repr(row).encode(), "comment row without Id or PostId", "row")
            continue
        yield _row(
            source,
            license,
            f"{site}/comment/{comment_id}",
            row.get("Text", ""),
            subject_id=_se_subject(site, row, "UserId", "UserDisplayName", pseudonymize),
            created_at=_created(row.get("CreationDate")),
            url=f"https://{site}/q/{post_id}#comment{comment_id}_{post_id}" if "." in site else None,
            parent_ids=[doc_id_for(source, f"{site}/post/{post_id}")],
            meta={
                "site": site,
                "comment_id": _int(comment_id),
                "post_id": _int(post_id),
                "score": _int(row.get("Score")),
            },
        )


def stackexchange_subject_ids(path: Path, site: str, pseudonymize: Pseudonymize) -> dict[str, str]:
    """`Users.xml` → {user id: subject id}: the subjects a site's documents can name (for DSR access
    and erasure). Profiles (names, "about me") are personal data and are not read as documents."""
    return {
        row["Id"]: pseudonymize(f"stackexchange:{site}:{row['Id']}")
        for _, row in _iter_rows(Path(path), None)
        if row.get("Id")
    }


# --- WARC --------------------------------------------------------------------------------------------


@dataclass
class WarcRecord:
    """One WARC record: its headers (names lower-cased) and block, and where it starts."""

    offset: int  # byte offset of the record in the uncompressed stream
    headers: dict[str, str]
    block: bytes


def iter_warc_records(path: Path, on_bad_record: OnBadRecord | None = None) -> Iterator[WarcRecord]:
    """The records of a WARC/1.0 or 1.1 file, plain or gzip (one member per record, or one stream)."""
    path = Path(path)
    with open_binary(path) as f:
        offset = 0
        while True:
            line = f.readline()
            if not line:
                return
            if not line.strip():
                offset += len(line)
                continue
            start = offset
            offset += len(line)
            if not line.startswith(b"WARC/"):
                _bad(on_bad_record, path, start, line[:200], "expected a WARC/1.x version line", "byte")
                return  # without a length the stream cannot be resynchronized safely
            headers: dict[str, str] = {}
            while True:
                h = f.readline()
                offset += len(h)
                if not h or h in (b"\r\n", b"\n"):
                    break
                name, _, value = h.decode("utf-8", "replace").partition(":")
                headers[name.strip().lower()] = value.strip()
            try:
                length = int(headers.get("content-length", ""))
            except ValueError:
                _bad(on_bad_record, path, start, line, "record without a valid Content-Length", "byte")
                return
            block = f.read(length)
            offset += len(block)
            if len(block) < length:
                _bad(
                    on_bad_record,
                    path,
                    start,
                    block[:200],
                    f"truncated record: {len(block)} of {length} bytes",
                    "byte",
                )
                return
            yield WarcRecord(start, headers, block)


def _dechunk(body: bytes) -> bytes:
    out, pos = [], 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("chunk size line without CRLF")
        size = int(body[pos:eol].split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            return b"".join(out)
        out.append(body[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2


def parse_http_response(block: bytes) -> tuple[int, dict[str, str], bytes]:
    """An HTTP/1.x response (a WARC response block) → (status, headers lower-cased, decoded body bytes)."""
    head, sep, body = block.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = block.partition(b"\n\n")
    lines = head.decode("iso-8859-1").splitlines()
    if not lines or not lines[0].startswith("HTTP/"):
        raise ValueError("not an HTTP response")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for h in lines[1:]:
        name, _, value = h.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    encoding = headers.get("content-encoding", "").lower()
    if encoding in ("gzip", "x-gzip"):
        body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        try:
            body = zlib.decompress(body)
        except zlib.error:
            body = zlib.decompress(body, -zlib.MAX_WBITS)
    return status, headers, body


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _decode_html(body: bytes, content_type: str) -> str:
    m = re.search(r"charset=([\w.:-]+)", content_type, re.IGNORECASE)
    charset = m.group(1) if m else None
    if charset is None:
        mm = _META_CHARSET.search(body[:4096])
        charset = mm.group(1).decode("ascii") if mm else "utf-8"
    try:
        return body.decode(charset, errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


def extract_main_text(page: str, url: str | None = None, *, include_tables: bool = True) -> str:
    """The main text of an HTML page with trafilatura, offline and fast (no fallback extractors, no
    comments, no metadata/date search)."""
    try:
        import trafilatura
    except ImportError as e:  # trafilatura 2.x needs lxml_html_clean (lxml's html.clean moved out)
        raise ImportError(
            f"WARC main-text extraction needs trafilatura and its dependencies: {e}. "
            "Install `lxml_html_clean` (pip install lxml_html_clean) alongside trafilatura."
        ) from e
    text = trafilatura.extract(
        page,
        url=url,
        fast=True,
        include_comments=False,
        include_tables=include_tables,
        include_images=False,
        include_links=False,
        with_metadata=False,
        deduplicate=False,
    )
    return text or ""


def read_warc(
    path: Path,
    *,
    source: str,
    license: str,
    include_tables: bool = True,
    pseudonymize: Pseudonymize | None = None,
    on_bad_record: OnBadRecord | None = None,
) -> Iterator[dict[str, Any]]:
    """WARC: one document per `response` record with a 2xx HTML (or plain-text) HTTP payload; main text
    by trafilatura (a page with no extractable text is kept with empty text, for the filters to
    exclude). Request, metadata, warcinfo and resource records and non-text payloads are not documents.
    """
    path = Path(path)
    for rec in iter_warc_records(path, on_bad_record):
        if rec.headers.get("warc-type") != "response":
            continue
        url = rec.headers.get("warc-target-uri", "").strip("<>") or None
        try:
            status, http_headers, body = parse_http_response(rec.block)
        except (ValueError, IndexError, zlib.error) as e:
            _bad(on_bad_record, path, rec.offset, rec.block[:200], f"bad HTTP response: {e}", "byte")
            continue
        content_type = http_headers.get("content-type", "")
        mime = content_type.split(";", 1)[0].strip().lower()
        if not 200 <= status < 300 or mime not in {"text/html", "application/xhtml+xml", "text/plain"}:
            continue
        page = _decode_html(body, content_type)
        if mime == "text/plain":
            text, title = page, None
        else:
            text = extract_main_text(page, url, include_tables=include_tables)
            m = _HTML_TITLE.search(page)
            title = html.unescape(re.sub(r"\s+", " ", m.group(1))).strip() if m else None
        record_id = rec.headers.get("warc-record-id", "").strip("<>") or f"{path.name}@{rec.offset}"
        yield _row(
            source,
            license,
            record_id,
            text,
            created_at=_created(rec.headers.get("warc-date")),
            url=url,
            title=title or None,
            meta={
                "warc_record_id": record_id,
                "warc_file": path.name,
                "warc_offset": rec.offset,
                "http_status": status,
                "content_type": mime,
                "extractor": "trafilatura" if mime != "text/plain" else None,
            },
        )


# --- sources ----------------------------------------------------------------------------------------


def read_path(
    fmt: str,
    path: Path,
    *,
    source: str,
    license: str,
    options: dict[str, Any] | None = None,
    pseudonymize: Pseudonymize | None = None,
    on_bad_record: OnBadRecord | None = None,
) -> Iterator[dict[str, Any]]:
    """The documents of one file of format `fmt` (see `sources.FORMATS`)."""
    opts = dict(options or {})
    common = {"source": source, "license": license, "pseudonymize": pseudonymize}
    match fmt:
        case "jsonl":
            return read_jsonl(path, **common, **opts, on_bad_record=on_bad_record)
        case "gutenberg":
            return read_gutenberg(path, **common, **opts)
        case "wikitext":
            return read_wikitext(path, **common, **opts)
        case "mediawiki":
            return read_mediawiki(path, **common, **opts, on_bad_record=on_bad_record)
        case "stackexchange":
            return read_stackexchange(path, **common, **opts, on_bad_record=on_bad_record)
        case "warc":
            return read_warc(path, **common, **opts, on_bad_record=on_bad_record)
    raise ValueError(f"{path}: unknown format {fmt!r}")


def read_source(
    source: Source,
    *,
    pseudonymize: Pseudonymize | None = None,
    on_bad_record: OnBadRecord | None = None,
) -> Iterator[dict[str, Any]]:
    """Every document of a configured source, file by file in path order."""
    for path in source.paths:
        yield from read_path(
            source.format,
            path,
            source=source.name,
            license=source.license,
            options=dict(source.options),
            pseudonymize=pseudonymize,
            on_bad_record=on_bad_record,
        )


def batches(rows: Iterable[dict[str, Any]], batch_size: int = 4096) -> Iterator[pa.Table]:
    """Rows → Arrow tables of `DOC_SCHEMA` with at most `batch_size` rows each."""
    buf: list[dict[str, Any]] = []
    for r in rows:
        buf.append(r)
        if len(buf) >= batch_size:
            yield documents_table(buf)
            buf = []
    if buf:
        yield documents_table(buf)


def main(argv: list[str]) -> int:
    from flywheel.curation.sources import load_sources

    if not argv:
        print(__doc__.strip().splitlines()[-1].strip())
        return 2
    (src,) = load_sources(data_root=argv[1] if len(argv) > 1 else None, names=[argv[0]])
    n = 0
    for row in read_source(src):
        if n < 3:
            print(f"--- {row['doc_id']} {row['title']!r} {row['url']}\n{row['text'][:500]}")
        n += 1
    print(f"{n} documents from {src.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
