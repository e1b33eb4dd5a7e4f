"""Synthetic training data from failure clusters: corrected answers, paraphrases, contrastive pairs — validated.

    from text_generation import Client
    clusters = cluster_failures(failures)
    result = synthesize(failures, clusters, Client("http://127.0.0.1:8080", timeout=60),
                        existing_texts=training_prompts, eval_index=EvalNgramIndex(path))
    result.sft            # SFT_SCHEMA: sample_id, messages, parent_ids, subject_ids, kind, source, license, ...
    result.preferences    # PREFERENCE_SCHEMA: pair_id, prompt, chosen, rejected, parent_ids, subject_ids, ...
    result.drops          # DROP_SCHEMA: one row per dropped candidate, with stage, reason and detail
    result.drop_counts    # {"prompt_injection": 2, "exact_duplicate": 1, ...}

Stages, in order, for every member of every cluster (members in log order, `members_per_cluster` each):

1. **select** — a redacted parent (subject erased) or a member over the cluster cap is dropped here;
   the user-written source text (user/tool turns, the correction) is screened for prompt injection
   first, so an injected prompt never reaches the teacher.
2. **answer** — the chosen answer, strongest signal first: the user's *correction* from feedback
   (`kind="correction"`); for a JSON-breakage failure, the failing response *repaired* by
   `repair_json` when that parses (`"json_repair"`); else the *teacher* through
   `text_generation.Client.generate` (greedy, fixed seed, `max_new_tokens` small), accepted only when
   `usable_answer` passes (`"teacher_answer"`; JSON prompts: the repaired teacher output must parse;
   over-refusals: it must not refuse). No usable answer: dropped (`teacher_unusable` / `teacher_error`).
3. **paraphrase** — per cluster, `paraphrases` rewrites of the representative prompt asked of the
   teacher, each checked by `usable_paraphrase`; an unusable one is replaced by a deterministic
   template (`PARAPHRASE_FALLBACKS`, `generator="template"`), so the count never depends on the teacher.
4. **validate** — every SFT sample (the conversation + chosen answer; paraphrases) and every
   preference pair (prompt, chosen, rejected = the failing response) goes through, each gate dropping
   with a recorded reason:
   `prompt_injection` (`screen_injection` over all its text, generated text included) →
   PII scrub (`flywheel.curation.pii`: every item replaced by `<TYPE>`, the types kept in `pii_types`;
   the sample is *kept*; it is dropped as `pii_residual` only if the residual check still finds
   structured PII afterwards) →
   quality (`empty_text`, `too_short`, `too_long`, `invalid_roles`, `chosen_equals_rejected`,
   `answer_echoes_prompt`) →
   dedup (`flywheel.curation.dedup`: `exact_duplicate` / `near_duplicate` of existing data — prompt or
   whole text, MinHash Jaccard ≥ `dedup_threshold` — or of another candidate; a near-duplicate of a
   sibling with the same parents is kept: paraphrase augmentation is the point) →
   contamination (`flywheel.curation.decontam.decontaminate_table`: `contaminated`, the eval item named).

Lineage: every sample and pair carries `parent_ids` (the failing interaction's event id, plus the
feedback event whose correction it uses) and the `subject_ids` of those parents, so erasing a subject
finds its synthetic children (`list_contains(subject_ids, ?)`). `source="synthetic"` and
`license=SYNTHETIC_LICENSE`. Ids are content hashes: the same inputs and teacher give the same tables.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from flywheel.failures import MESSAGE_TYPE, asks_for_json, looks_like_refusal

if TYPE_CHECKING:
    from text_generation import Client

    from flywheel.curation.decontam import EvalNgramIndex
    from flywheel.curation.dedup import MinHashIndex
    from flywheel.curation.pii import PiiScrubber

SYNTHETIC_LICENSE = "LicenseRef-flywheel-synthetic"
SOURCE = "synthetic"
VALID_ROLES = ("system", "user", "assistant")

_LINEAGE = [
    ("parent_ids", pa.list_(pa.string())),
    ("subject_ids", pa.list_(pa.string())),
    ("kind", pa.string()),  # correction / json_repair / teacher_answer / paraphrase / contrastive_*
    ("generator", pa.string()),  # user_correction / json_repair / teacher / template
    ("failure_type", pa.string()),
    ("cluster_id", pa.string()),
    ("source", pa.string()),
    ("license", pa.string()),
    ("pii_types", pa.list_(pa.string())),  # placeholder types the scrubber put in
]
SFT_SCHEMA = pa.schema([("sample_id", pa.string()), ("messages", pa.list_(MESSAGE_TYPE)), *_LINEAGE])
PREFERENCE_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("prompt", pa.string()),  # the last user message
        ("prompt_messages", pa.list_(MESSAGE_TYPE)),  # the whole conversation up to it
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        *_LINEAGE,
    ]
)
DROP_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),  # the sample/pair id it would have had (null before one exists)
        ("output", pa.string()),  # sft / preference / member (dropped before any output was built)
        ("stage", pa.string()),  # select / answer / injection / pii / quality / dedup / contamination
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("kind", pa.string()),
        ("cluster_id", pa.string()),
        ("parent_ids", pa.list_(pa.string())),
        ("subject_ids", pa.list_(pa.string())),
        ("preview", pa.string()),  # first 160 characters, PII-scrubbed
    ]
)

ANSWER_TEMPLATE = (
    "You are a careful assistant. Answer the user's last request correctly and helpfully.{hint}\n\n"
    "{context}Request: {prompt}\n\nAnswer:"
)
JSON_HINT = " Reply with valid JSON only."
REFUSAL_HINT = " The request is harmless: answer it directly, do not refuse."
PARAPHRASE_TEMPLATES: tuple[str, ...] = (
    ("Rewrite the following request in different words, keeping its meaning. Reply with the rewritten "
    "request only.\n\nRequest: {prompt}\n\nRewritten request:"),
    ("Paraphrase this question so that it asks exactly the same thing with other wording.\n\n"
    "Question: {prompt}\n\nParaphrase:"),
)
# Deterministic fallbacks when the teacher's paraphrase is unusable: framings seen in real traffic.
PARAPHRASE_FALLBACKS: tuple[str, ...] = (
    "Can you help me with the following? {prompt}",
    "{prompt}\n\nPlease be precise.",
    "Question: {prompt}",
    "I'd like some help. {prompt}",
)


@dataclass(frozen=True)
class SynthesisConfig:
    """Knobs of `synthesize`; the defaults are what the flywheel runs with."""

    max_new_tokens: int = field(default=96, metadata={"help": "Teacher tokens per answer (small: cost, latency)."})
    paraphrase_max_new_tokens: int = field(default=48, metadata={"help": "Teacher tokens per paraphrase."})
    seed: int = field(default=0, metadata={"help": "Sent with every request; decoding is greedy anyway."})
    temperature: float | None = field(
        default=None, metadata={"help": "None = greedy (deterministic); > 0 samples with `seed`."}
    )
    paraphrases: int = field(default=2, metadata={"help": "Paraphrased prompts per cluster."})
    members_per_cluster: int = field(default=8, metadata={"help": "Members answered per cluster (caps teacher calls)."})
    min_answer_chars: int = field(default=2, metadata={"help": "Shorter answers are dropped (too_short)."})
    max_message_chars: int = field(default=8000, metadata={"help": "Longer messages are dropped (too_long)."})
    dedup_threshold: float = field(default=0.8, metadata={"help": "MinHash Jaccard of a near-duplicate."})
    license: str = field(default=SYNTHETIC_LICENSE, metadata={"help": "License id on every output row."})
    concurrency: int = field(default=1, metadata={"help": "Teacher requests in flight (the server batches them)."})
    context_chars: int = field(default=1500, metadata={"help": "Earlier turns shown to the teacher (tail)."})
    truncate: int | None = field(
        default=None,
        metadata={"help": "TGI `truncate`: keep the last N prompt tokens (the teacher's context minus "
                          "max_new_tokens); None sends prompts whole and a too-long one is a teacher_error."},
    )


@dataclass
class SynthesisResult:
    sft: pa.Table
    preferences: pa.Table
    drops: pa.Table
    drop_counts: dict[str, int]
    stats: dict[str, Any]


# --------------------------------------------------------------------------------------------------------
# Prompt-injection screening

# (name, pattern); matched case-insensitively except where a group says (?-i:...). The source text of a
# synthetic sample is user-controlled: anything that reads as an instruction to the model rather than a
# request of the user is screened out before it reaches the teacher or a training set.
INJECTION_PATTERNS: tuple[tuple[str, str], ...] = (
    # "ignore previous instructions", "disregard all prior rules", "forget your guidelines"
    ("ignore_instructions",
     (r"\b(?:ignore|disregard|forget|override|bypass)\s+(?:all\s+|any\s+|of\s+|the\s+|your\s+|my\s+|these\s+|those\s+)*"
     r"(?:previous|prior|above|earlier|preceding|initial|original|system|existing|safety)?\s*"
     r"(?:instructions?|prompts?|rules|directions|guidelines|directives|programming|constraints)\b"
     r"|\b(?:ignore|disregard|forget)\s+(?:all\s+|everything\s+)?(?:of\s+)?(?:the\s+)?(?:above|previous(?:ly)?|before)\b")),
    # "new instructions:", "your real instructions are"
    ("new_instructions", r"\b(?:new|updated|real|actual|true|secret|hidden)\s+(?:instructions?|rules|directives)\s*(?::|are\b)"),
    # any mention of the system prompt, or asking the model to reveal its instructions
    ("system_prompt",
     (r"\bsystem[\s_-]*(?:prompt|message|instructions?)\b"
     r"|\b(?:reveal|show|print|repeat|output|leak|display|dump)\b[^.\n]{0,30}\b(?:your|the)\s+(?:initial\s+|original\s+|"
     r"hidden\s+|secret\s+|full\s+)?(?:instructions|prompt|rules|guidelines|configuration)\b")),
    # role-play jailbreaks: DAN, developer mode, "pretend you have no restrictions"
    ("roleplay_jailbreak",
     (r"(?-i:\bDAN\b)|\bdo anything now\b|\bdeveloper mode\b|\bjailbr(?:eak|oken)\b|\bgod mode\b|\bstay in character\b"
     r"|\b(?:unfiltered|uncensored|unrestricted|amoral)\s+(?:ai|assistant|model|chatbot|mode|version)\b"
     r"|\b(?:pretend|act|behave|roleplay|role-play|imagine)\b[^.\n]{0,60}\b(?:no|without|free (?:of|from))\s+"
     r"(?:any\s+)?(?:rules|restrictions|filters|limits|limitations|guidelines|ethics|morals|censorship)\b"
     r"|\byou\s+are\s+(?:now|no longer)\b[^.\n]{0,40}\b(?:ai|assistant|model|chatgpt|bound|restricted|limited)\b")),
    # chat-template or role markers smuggled into the text
    ("fake_role_marker",
     (r"^\s*(?:system|assistant)\s*:|<\|(?:im_start|im_end|system|assistant|user|endoftext|end)\|>"
     r"|\[/?INST\]|<</?SYS>>|^\s*#{2,}\s*(?:system|instruction)s?\b")),
    # instructions hidden in HTML/markdown: comments, invisible styling, scripts, markdown comments
    ("hidden_markup",
     (r"<!--.*?-->|<\s*(?:script|style|iframe)\b"
      r"|\bstyle\s*=\s*[\"'][^\"']*(?:display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*0|opacity\s*:\s*0"
      r"|color\s*:\s*(?:white|#fff\b|#ffffff\b))"
      r"|^\s*\[[^\]]*\]:\s*#|!\[[^\]]*(?:ignore|instruction|system|assistant)[^\]]*\]\(")),
    # zero-width and bidi-control characters, Unicode tag characters: text a reader cannot see
    ("invisible_characters", "[\u200b-\u200f\u202a-\u202e\u2060-\u2064\U000e0000-\U000e007f]"),
)
_INJECTION = [(name, re.compile(p, re.IGNORECASE | re.DOTALL | re.MULTILINE)) for name, p in INJECTION_PATTERNS]


def screen_injection(text: str | None) -> str | None:
    """The name of the first injection pattern `text` matches (INJECTION_PATTERNS), or None."""
    if not text:
        return None
    # a byte-order mark at the very start is an encoding artefact, not hidden text
    text = text.removeprefix("\ufeff")
    for name, rx in _INJECTION:
        if rx.search(text):
            return name
    return None


def injection_filter(text: str | None) -> bool | tuple[bool, str]:
    """Filter form (house style): True, or (False, "prompt_injection:<pattern>")."""
    hit = screen_injection(text)
    return True if hit is None else (False, f"prompt_injection:{hit}")


# --------------------------------------------------------------------------------------------------------
# JSON repair

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_OPEN_CLOSE = {"{": "}", "[": "]"}
_LITERALS = {"True": "true", "False": "false", "None": "null", "true": "true", "false": "false",
             "null": "null", "NaN": "null", "Infinity": "null", "undefined": "null"}  # fmt: skip
_SMART = {"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": "'", "\u2019": "'"}


def _first_value(text: str) -> Any | None:
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


def _fix_json(text: str) -> list[str]:
    """Candidate repairs of one JSON-ish text, from a single left-to-right scan.

    Outside strings: smart quotes become straight, single-quoted strings double-quoted, Python/JS
    literals mapped (True→true, None→null, NaN→null), bare identifier keys quoted, comments dropped,
    trailing commas removed, a closer that does not match the open bracket replaced. Inside strings:
    raw newlines escaped. At the end an open string is closed and open brackets closed; a second
    candidate also cuts the last, incomplete member.
    """
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return []
    s = "".join(_SMART.get(c, c) for c in text[start:])
    out: list[str] = []
    stack: list[str] = []
    last_sep: list[int] = []  # per open bracket: output length at its last ',' (or right after it opened)
    i, n = 0, len(s)
    quote: str | None = None
    while i < n:
        c = s[i]
        if quote is not None:
            if c == "\\" and i + 1 < n:
                out.append(s[i : i + 2])
                i += 2
                continue
            if c == quote:
                out.append('"')
                quote = None
            elif c == '"':  # a double quote inside a single-quoted string
                out.append('\\"')
            elif c == "\n":
                out.append("\\n")
            else:
                out.append(c)
            i += 1
            continue
        if c in "\"'":
            quote = c
            out.append('"')
        elif c in "{[":
            stack.append(c)
            out.append(c)
            last_sep.append(len(out))
        elif c in "}]":
            if not stack:
                break  # the value is complete: what follows is prose
            _strip_trailing_comma(out)
            out.append(_OPEN_CLOSE[stack.pop()])
            last_sep.pop()
            if not stack:
                break
        elif c == "," and stack:
            _strip_trailing_comma(out)  # ",," → ","
            out.append(",")
            last_sep[-1] = len(out)
        elif c == "/" and s.startswith("//", i):
            j = s.find("\n", i)
            i = n if j < 0 else j
            continue
        elif c == "/" and s.startswith("/*", i):
            j = s.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        elif c.isalpha() or c == "_":
            m = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*").match(s, i)
            word = m.group(0) if m else c
            rest = s[i + len(word) :].lstrip()
            if word in _LITERALS and not rest.startswith(":"):
                out.append(_LITERALS[word])
            else:
                out.append(json.dumps(word))  # a bare key, or a one-word unquoted value
            i += len(word)
            continue
        else:
            out.append(c)
        i += 1
    if quote is not None:
        out.append('"')
    closers = "".join(_OPEN_CLOSE[b] for b in reversed(stack))
    body = "".join(out).rstrip()
    if body.endswith(":"):
        body += " null"
    candidates = [body.rstrip(",") + closers]
    if stack and last_sep:
        cut = "".join(out[: last_sep[-1]]).rstrip().rstrip(",")
        candidates.append(cut + closers)
    return candidates


def _strip_trailing_comma(out: list[str]) -> None:
    while out and out[-1].isspace():
        out.pop()
    if out and out[-1] == ",":
        out.pop()


def repair_json(text: str | None) -> str | None:
    """A broken JSON answer repaired deterministically: the JSON text (compact, key order kept), or None.

    Tries, in order: the text as is, each code-fenced block, the first embedded object/array; then the
    same after `_fix_json`. Returns only a non-empty object or array, so prose never "repairs" to `{}`.
    """
    if not text:
        return None
    bodies = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for body in bodies:
        value = _first_value(body)
        if value:
            return json.dumps(value, ensure_ascii=False)
    for body in bodies:
        for candidate in _fix_json(body):
            value = _first_value(candidate)
            if value:
                return json.dumps(value, ensure_ascii=False)
    return None


# --------------------------------------------------------------------------------------------------------
# Checks on teacher output

# The most common English words: real prose has ~40% of its words here, token soup from an untrained
# model almost none.
_COMMON = frozenset(re.findall(r"\w+",
    "the of and to a in is it you that he was for on are with as i his they be at one have this from or had "
    "by not but what some we can out other were all there when up use your how said an each she which do "
    "their if will way about many then them would so these her see him has more could go come did my no "
    "most who over know than call first down may been now find any new work part take get made after also "
    "should well because very through just where much before too same our me back give here why help "
    "must only us does such those both between under never another while still own again",
))
_WORD = re.compile(r"[^\W_]+")  # words; snake_case splits


def _script(c: str) -> str:
    name = unicodedata.name(c, "")
    return name.split(" ", 1)[0] if name else "?"


def _wordlike(w: str) -> bool:
    """A plausible word: digits; letters of a caseless script (CJK, Arabic, ...); or cased letters of one
    script in lower, Title or UPPER case ("vBith" and "conriج" are not)."""
    if w.isdigit():
        return True
    if not w.isalpha():
        return False
    if w.lower() == w.upper():  # no cased letter
        return True
    return (w.islower() or w.istitle() or w.isupper()) and len({_script(c) for c in w}) == 1


def _text_problem(text: str) -> str | None:
    """Why generated text is not usable text (non_text / repetitive / incoherent), or None.

    non_text: a U+FFFD replacement or control character (a decoding failure), or > 10% symbols;
    incoherent: < 80% plausible words (`_wordlike`), or, from 8 words on, < 12% of the most common
    English words (real prose has ~40%); repetitive: one word > 40% of the words, or < 30% distinct.
    """
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return "empty"
    if any(c == "\ufffd" or (unicodedata.category(c) == "Cc") for c in visible):
        return "non_text"
    odd = sum(1 for c in visible if unicodedata.category(c)[0] in "CS" and c not in "$%+<=>^`|~")
    if odd / len(visible) > 0.1:
        return "non_text"
    words = _WORD.findall(text)
    if not words:
        return "non_text"
    if sum(_wordlike(w) for w in words) / len(words) < 0.8:
        return "incoherent"
    words = [w.lower() for w in words]
    if len(words) >= 8:
        top = Counter(words).most_common(1)[0][1]
        if top / len(words) > 0.4 or len(set(words)) / len(words) < 0.3:
            return "repetitive"
        if sum(w in _COMMON for w in words) / len(words) < 0.12:
            return "incoherent"
    return None


def usable_answer(text: str | None, prompt: str, *, want_json: bool = False, no_refusal: bool = False,
                  min_chars: int = 2) -> bool | tuple[bool, str]:
    """Is a teacher answer good enough to train on? True, or (False, reason)."""
    text = (text or "").strip()
    if len(text) < min_chars:
        return False, "too_short" if text else "empty"
    if want_json:
        return True if repair_json(text) is not None else (False, "not_json")
    problem = _text_problem(text)
    if problem:
        return False, problem
    if len(_WORD.findall(text)) < 2:
        return False, "too_short"
    if " ".join(text.split()).lower() == " ".join(prompt.split()).lower():
        return False, "echoes_prompt"
    if re.search(r"^\s*(?:Request|Answer|Rewritten request|Paraphrase|Question)\s*:", text, re.MULTILINE):
        return False, "echoes_template"
    if no_refusal and looks_like_refusal(text):
        return False, "refusal"
    return True


def _content_words(text: str) -> set[str]:
    return {w for w in (x.lower() for x in _WORD.findall(text)) if w not in _COMMON and len(w) > 2}


def clean_paraphrase(text: str | None) -> str:
    """The first non-empty line of a teacher paraphrase, without quotes or a 'Paraphrase:' label."""
    for line in (text or "").splitlines():
        line = re.sub(r"^\s*(?:rewritten request|paraphrase|question|request)\s*:\s*", "", line, flags=re.IGNORECASE).strip()
        line = line.strip("\"'\u201c\u201d ")
        if line:
            return line
    return ""


def usable_paraphrase(text: str, original: str) -> bool | tuple[bool, str]:
    """Is `text` (cleaned) a usable paraphrase of `original`? True, or (False, reason).

    It must be text, 0.5–2× the original's length, not the same text, and keep a fifth of its
    content words (Jaccard ≥ 0.2) — a rewrite, not a new question.
    """
    if not text:
        return False, "empty"
    problem = _text_problem(text)
    if problem:
        return False, problem
    ratio = len(text) / max(len(original), 1)
    if not 0.5 <= ratio <= 2.0:
        return False, "length_ratio"
    if " ".join(text.lower().split()) == " ".join(original.lower().split()):
        return False, "identical"
    a, b = _content_words(text), _content_words(original)
    if b and len(a & b) / len(a | b) < 0.2:
        return False, "off_topic"
    return True


# --------------------------------------------------------------------------------------------------------
# The teacher


class Teacher:
    """`text_generation.Client` with the flywheel's generation parameters and call accounting."""

    def __init__(self, client: Client | str, config: SynthesisConfig, *, timeout: int = 60) -> None:
        if isinstance(client, str):
            from text_generation import Client

            client = Client(client, timeout=timeout)
        self.client = client
        self.config = config
        self.calls = 0
        self.errors: Counter[str] = Counter()

    def generate(self, prompt: str, max_new_tokens: int, stop: Sequence[str] = ()) -> tuple[str | None, str | None]:
        """(generated text, None) or (None, error description). Never raises for a server-side failure."""
        c = self.config
        self.calls += 1
        try:
            r = self.client.generate(
                prompt, max_new_tokens=max_new_tokens, do_sample=c.temperature is not None,
                temperature=c.temperature, seed=c.seed, stop_sequences=list(stop) or None, truncate=c.truncate,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - HTTP, overload, validation, timeout: recorded as a drop reason
            self.errors[type(e).__name__] += 1
            return None, f"{type(e).__name__}: {str(e)[:200]}"
        return r.generated_text, None

    def generate_many(
        self, requests: Sequence[tuple[str, int, Sequence[str]]]
    ) -> list[tuple[str | None, str | None]]:
        if self.config.concurrency <= 1 or len(requests) <= 1:
            return [self.generate(*r) for r in requests]
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            return list(pool.map(lambda r: self.generate(*r), requests))


def teacher_prompt(messages: Sequence[Mapping[str, str]], prompt: str, *, want_json: bool, no_refusal: bool,
                   context_chars: int) -> str:
    """The completion prompt that asks the teacher for an answer (ANSWER_TEMPLATE)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages))
    earlier = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages[:last_user])
    context = f"Conversation so far:\n{earlier[-context_chars:]}\n\n" if earlier else ""
    hint = (JSON_HINT if want_json else "") + (REFUSAL_HINT if no_refusal else "")
    return ANSWER_TEMPLATE.format(hint=hint, context=context, prompt=prompt)


# --------------------------------------------------------------------------------------------------------
# Candidates


@dataclass
class _Candidate:
    output: str  # "sft" or "preference"
    kind: str
    generator: str
    failure_type: str
    cluster_id: str
    parent_ids: list[str]
    subject_ids: list[str]
    messages: list[dict[str, str]]  # sft: full conversation; preference: the prompt conversation
    chosen: str | None = None  # preference only
    rejected: str | None = None
    pii_types: list[str] = field(default_factory=list)
    record_id: str = ""
    source_prompt: str | None = None  # paraphrases: the prompt they rewrite (dedup checks it too)

    def texts(self) -> list[str]:
        return [m["content"] or "" for m in self.messages] + [t for t in (self.chosen, self.rejected) if t is not None]

    def prompt(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "") or ""

    def answer(self) -> str:
        if self.output == "preference":
            return self.chosen or ""
        return self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else ""

    def full_text(self) -> str:
        return "\n\n".join(t for t in [self.prompt(), self.answer(), self.rejected or ""] if t)

    def assign_id(self) -> None:
        payload = json.dumps([self.output, self.kind, self.parent_ids, self.messages, self.chosen, self.rejected])
        self.record_id = "syn-" + hashlib.sha256(payload.encode()).hexdigest()[:24]


def _lineage(member: Mapping[str, Any], with_correction: bool) -> tuple[list[str], list[str]]:
    parents = [member["event_id"]]
    subjects = {member["subject_id"]} - {None}
    if with_correction and member["correction_event_id"]:
        parents.append(member["correction_event_id"])
        subjects |= {member["correction_subject_id"]} - {None}
    return parents, sorted(subjects)


class _Drops:
    def __init__(self, scrubber: PiiScrubber) -> None:
        self.rows: list[dict[str, Any]] = []
        self.scrubber = scrubber

    def add(self, stage: str, reason: str, detail: str | None, *, cand: _Candidate | None = None,
            member: Mapping[str, Any] | None = None, cluster_id: str | None = None, kind: str | None = None) -> None:
        if cand is not None:
            text, parents, subjects = cand.full_text(), cand.parent_ids, cand.subject_ids
            record_id, output, kind, cluster_id = cand.record_id or None, cand.output, cand.kind, cand.cluster_id
        else:
            assert member is not None
            text = member.get("prompt") or ""
            parents, subjects = _lineage(member, with_correction=True)
            record_id, output = None, "member"
        preview = self.scrubber.scrub(text[:400]).text[:160] if text else None
        self.rows.append({
            "record_id": record_id, "output": output, "stage": stage, "reason": reason, "detail": detail,
            "kind": kind, "cluster_id": cluster_id, "parent_ids": parents, "subject_ids": subjects,
            "preview": preview,
        })  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# synthesize


def synthesize(
    failures: pa.Table,
    clusters: pa.Table,
    teacher: Client | str | Teacher | None,
    config: SynthesisConfig | None = None,
    *,
    existing_texts: Sequence[str] = (),
    existing_index: MinHashIndex | None = None,
    eval_index: EvalNgramIndex | None = None,
    scrubber: PiiScrubber | None = None,
) -> SynthesisResult:
    """Synthetic SFT samples and preference pairs for every failure cluster (module docstring).

    `teacher` is a `text_generation.Client`, the URL of a TGI-protocol endpoint, or None (then only
    corrections and JSON repairs produce answers, paraphrases come from templates, and members that
    needed the teacher are dropped as `teacher_unavailable`). `existing_texts` (prompts or samples
    already in the training data) and/or `existing_index` (a `MinHashIndex`, queried read-only) are
    what the dedup gate compares against; `eval_index` is the contamination firewall (None: skipped,
    and `stats["contamination_checked"]` says so).
    """
    from flywheel.curation.pii import default_scrubber

    config = config or SynthesisConfig()
    scrubber = scrubber or default_scrubber()
    if teacher is not None and not isinstance(teacher, Teacher):
        teacher = Teacher(teacher, config)
    drops = _Drops(scrubber)
    by_id = {r["event_id"]: r for r in failures.to_pylist()}
    stats: Counter[str] = Counter()

    # stage 1 (select) + stage 2 (answer): corrections and repairs now, teacher requests gathered
    answered: list[tuple[Mapping[str, Any], Mapping[str, Any], str, str, str]] = []  # member, cluster, chosen, kind, gen
    pending: list[tuple[Mapping[str, Any], Mapping[str, Any], bool, bool]] = []
    for cluster in sorted(clusters.to_pylist(), key=lambda c: c["cluster_id"]):
        members = [by_id[i] for i in cluster["member_event_ids"] if i in by_id]
        missing = set(cluster["member_event_ids"]) - set(by_id)
        if missing:
            raise ValueError(f"cluster {cluster['cluster_id']}: member events not in the failures table: "
                             f"{sorted(missing)[:3]}")
        members.sort(key=lambda m: m["position"])
        stats["clusters"] += 1
        for k, m in enumerate(members):
            stats["members"] += 1
            cid = cluster["cluster_id"]
            if k >= config.members_per_cluster:
                drops.add("select", "cluster_cap", f"members_per_cluster={config.members_per_cluster}",
                          member=m, cluster_id=cid)
                continue
            if m["redacted"] or m["prompt"] is None:
                drops.add("select", "parent_redacted", "the subject's key is shredded", member=m, cluster_id=cid)
                continue
            source = [x["content"] for x in m["messages"] if x["role"] in ("user", "tool")] + [m["correction"] or ""]
            hit = next((h for h in map(screen_injection, source) if h), None)
            if hit:
                drops.add("select", "prompt_injection", hit, member=m, cluster_id=cid)
                continue
            want_json = asks_for_json(m["prompt"]) or "json_broken" in m["failure_types"]
            # repair only what is broken: JSON that already parses in a disliked answer is no fix
            repaired = repair_json(m["response"]) if "json_broken" in m["failure_types"] else None
            if m["correction"]:
                answered.append((m, cluster, m["correction"], "correction", "user_correction"))
            elif repaired is not None:
                answered.append((m, cluster, repaired, "json_repair", "json_repair"))
            elif teacher is None:
                drops.add("answer", "teacher_unavailable", None, member=m, cluster_id=cid)
            else:
                pending.append((m, cluster, want_json, cluster["failure_type"] == "over_refusal"))
    if pending:
        assert isinstance(teacher, Teacher)
        requests = [
            (teacher_prompt(m["messages"], m["prompt"], want_json=wj, no_refusal=nr, context_chars=config.context_chars),
             config.max_new_tokens, ("\n\nRequest:", "\nUser:"))
            for m, _, wj, nr in pending
        ]
        for (m, cluster, want_json, no_refusal), (text, error) in zip(pending, teacher.generate_many(requests), strict=True):
            cid = cluster["cluster_id"]
            if error is not None:
                drops.add("answer", "teacher_error", error, member=m, cluster_id=cid, kind="teacher_answer")
                continue
            ok = usable_answer(text, m["prompt"], want_json=want_json, no_refusal=no_refusal,
                               min_chars=config.min_answer_chars)
            if ok is not True:
                drops.add("answer", "teacher_unusable", ok[1], member=m, cluster_id=cid, kind="teacher_answer")
                continue
            chosen = repair_json(text) if want_json else text.strip()
            answered.append((m, cluster, chosen, "teacher_answer", "teacher"))  # type: ignore[arg-type]

    cands: list[_Candidate] = []
    for m, cluster, chosen, kind, gen in answered:
        parents, subjects = _lineage(m, with_correction=kind == "correction")
        base = {"failure_type": cluster["failure_type"], "cluster_id": cluster["cluster_id"], "parent_ids": parents,
                    "subject_ids": subjects, "generator": gen}
        context = [{"role": x["role"], "content": x["content"]} for x in m["messages"]]
        cands.append(_Candidate("sft", kind, messages=context + [{"role": "assistant", "content": chosen}], **base))
        cands.append(_Candidate("preference", f"contrastive_{kind}", messages=context, chosen=chosen,
                                rejected=m["response"], **base))

    # stage 3: paraphrases of each cluster's representative (or its first answered member)
    para_jobs: list[tuple[Mapping[str, Any], Mapping[str, Any], str, str, int]] = []
    first_answer: dict[str, tuple[Mapping[str, Any], str, str]] = {}
    for m, cluster, chosen, kind, _ in answered:
        cid = cluster["cluster_id"]
        if cid not in first_answer or m["event_id"] == cluster["representative_event_id"]:
            first_answer[cid] = (m, chosen, kind)
    clusters_by_id = {c["cluster_id"]: c for c in clusters.to_pylist()}
    for cid in sorted(first_answer):
        m, chosen, kind = first_answer[cid]
        for k in range(config.paraphrases):
            para_jobs.append((m, clusters_by_id[cid], chosen, kind, k))
    if para_jobs:
        outs: list[tuple[str | None, str | None]] = [(None, "no teacher")] * len(para_jobs)
        if isinstance(teacher, Teacher):
            outs = teacher.generate_many([
                (PARAPHRASE_TEMPLATES[k % len(PARAPHRASE_TEMPLATES)].format(prompt=m["prompt"]),
                 config.paraphrase_max_new_tokens, ("\n",))
                for m, _, _, _, k in para_jobs
            ])  # fmt: skip
        for (m, cluster, chosen, kind, k), (text, error) in zip(para_jobs, outs, strict=True):
            para = clean_paraphrase(text)
            ok = usable_paraphrase(para, m["prompt"]) if error is None else (False, "teacher_error")
            generator = "teacher"
            if ok is not True:
                stats[f"paraphrase_fallback:{ok[1]}"] += 1
                para = PARAPHRASE_FALLBACKS[(k + _stable_int(m["event_id"])) % len(PARAPHRASE_FALLBACKS)].format(
                    prompt=m["prompt"])
                generator = "template"
            parents, subjects = _lineage(m, with_correction=kind == "correction")
            context = [{"role": x["role"], "content": x["content"]} for x in m["messages"]]
            last_user = max(i for i, x in enumerate(context) if x["role"] == "user")
            context[last_user] = {"role": "user", "content": para}
            cands.append(_Candidate(
                "sft", "paraphrase", generator, cluster["failure_type"], cluster["cluster_id"], parents, subjects,
                messages=context + [{"role": "assistant", "content": chosen}], source_prompt=m["prompt"],
            ))  # fmt: skip

    # stage 4: validation gates
    for c in cands:
        c.assign_id()
    stats["candidates"] = len(cands)
    cands = _gate_injection(cands, drops)
    cands = _gate_pii(cands, drops, scrubber)
    cands = _gate_quality(cands, drops, config)
    cands = _gate_dedup(cands, drops, config, existing_texts, existing_index)
    cands = _gate_contamination(cands, drops, eval_index)

    sft = [c for c in cands if c.output == "sft"]
    prefs = [c for c in cands if c.output == "preference"]
    common = lambda c: {
        "parent_ids": c.parent_ids, "subject_ids": c.subject_ids, "kind": c.kind, "generator": c.generator,
        "failure_type": c.failure_type, "cluster_id": c.cluster_id, "source": SOURCE, "license": config.license,
        "pii_types": c.pii_types,
    }
    sft_table = pa.Table.from_pylist([{"sample_id": c.record_id, "messages": c.messages, **common(c)} for c in sft],
                                     schema=SFT_SCHEMA)
    pref_table = pa.Table.from_pylist(
        [{"pair_id": c.record_id, "prompt": c.prompt(), "prompt_messages": c.messages, "chosen": c.chosen,
          "rejected": c.rejected, **common(c)} for c in prefs],
        schema=PREFERENCE_SCHEMA,
    )
    drop_table = pa.Table.from_pylist(drops.rows, schema=DROP_SCHEMA)
    drop_counts = dict(sorted(Counter(r["reason"] for r in drops.rows).items()))
    for c in sft:
        stats[f"sft:{c.kind}"] += 1
    out_stats: dict[str, Any] = dict(stats)
    out_stats.update({
        "sft_samples": sft_table.num_rows, "preference_pairs": pref_table.num_rows, "dropped": len(drops.rows),
        "teacher_calls": teacher.calls if isinstance(teacher, Teacher) else 0,
        "teacher_errors": sum(teacher.errors.values()) if isinstance(teacher, Teacher) else 0,
        "contamination_checked": eval_index is not None,
    })  # fmt: skip
    return SynthesisResult(sft_table, pref_table, drop_table, drop_counts, out_stats)


def _stable_int(s: str) -> int:
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)


# --------------------------------------------------------------------------------------------------------
# Gates: each keeps the candidates that pass and records a drop row for every other one


def _gate_injection(cands: list[_Candidate], drops: _Drops) -> list[_Candidate]:
    kept = []
    for c in cands:
        hit = next((h for h in map(screen_injection, c.texts()) if h), None)
        if hit:
            drops.add("injection", "prompt_injection", hit, cand=c)
        else:
            kept.append(c)
    return kept


def _scrub_into(scrubber: PiiScrubber, text: str | None, types: set[str]) -> str | None:
    if text is None:
        return None
    r = scrubber.scrub(text)
    types.update(s.type for s in r.spans)
    return r.text


def _gate_pii(cands: list[_Candidate], drops: _Drops, scrubber: PiiScrubber) -> list[_Candidate]:
    """Replace PII with typed placeholders (kept); drop only what still has structured PII afterwards."""
    kept = []
    for c in cands:
        types: set[str] = set()
        c.messages = [{"role": m["role"], "content": _scrub_into(scrubber, m["content"], types)} for m in c.messages]
        c.chosen, c.rejected = _scrub_into(scrubber, c.chosen, types), _scrub_into(scrubber, c.rejected, types)
        c.pii_types = sorted(types)
        residual = sorted({t for text in c.texts() for t in scrubber.find_residual(text)})
        if residual:
            drops.add("pii", "pii_residual", ",".join(residual), cand=c)
        else:
            if types:  # the id covers the scrubbed content
                c.assign_id()
            kept.append(c)
    return kept


def check_quality(c: _Candidate, config: SynthesisConfig) -> bool | tuple[bool, str]:
    """Data-quality checks of one candidate: True, or (False, reason)."""
    roles = [m["role"] for m in c.messages]
    if any(r not in VALID_ROLES for r in roles) or "user" not in roles:
        return False, "invalid_roles"
    if c.output == "sft" and (roles[-1] != "assistant" or roles.count("assistant") < 1):
        return False, "invalid_roles"
    if c.output == "preference" and roles[-1] != "user":
        return False, "invalid_roles"
    texts = c.texts() if c.output == "sft" else [m["content"] for m in c.messages] + [c.chosen, c.rejected]
    if any(t is None or not t.strip() for t in texts):
        return False, "empty_text"
    if any(len(t) > config.max_message_chars for t in texts):  # type: ignore[arg-type]
        return False, "too_long"
    answer = c.answer().strip()
    if len(answer) < config.min_answer_chars:
        return False, "too_short"
    norm = lambda t: " ".join((t or "").casefold().split())
    if c.output == "preference" and norm(c.chosen) == norm(c.rejected):
        return False, "chosen_equals_rejected"
    if norm(answer) == norm(c.prompt()):
        return False, "answer_echoes_prompt"
    return True


def _gate_quality(cands: list[_Candidate], drops: _Drops, config: SynthesisConfig) -> list[_Candidate]:
    kept = []
    for c in cands:
        ok = check_quality(c, config)
        if ok is True:
            kept.append(c)
        else:
            drops.add("quality", ok[1], None, cand=c)
    return kept


def _gate_dedup(cands: list[_Candidate], drops: _Drops, config: SynthesisConfig, existing_texts: Sequence[str],
                existing_index: MinHashIndex | None) -> list[_Candidate]:
    """Exact/near duplicates of existing data (prompt or whole text), then within the batch per output."""
    import numpy as np

    from flywheel.curation.dedup import MinHashIndex, MinHashParams, dedup_table, signature

    if not cands:
        return cands
    dropped: dict[int, tuple[str, str]] = {}
    indexes: list[tuple[str, MinHashIndex]] = []
    tmp = None
    if existing_index is not None:
        indexes.append(("index", existing_index))
    if len(existing_texts):
        tmp = tempfile.TemporaryDirectory(prefix="flywheel-synth-dedup-")
        idx = MinHashIndex(tmp.name, MinHashParams.for_threshold(config.dedup_threshold))
        ids = [f"text-{i}" for i in range(len(existing_texts))]
        idx.add_batch("existing", ids, signature(list(existing_texts), idx.params))
        indexes.append(("existing", idx))
    try:
        # probes per candidate: its prompt, its whole text, and for a paraphrase the prompt it rewrites
        # (a rewrite of a prompt the training data already has adds nothing new)
        owner, probes = [], []
        for i, c in enumerate(cands):
            for text in (c.prompt(), c.full_text(), c.source_prompt):
                if text:
                    owner.append(i)
                    probes.append(text)
        for name, idx in indexes:
            m = idx.query(signature(probes, idx.params), config.dedup_threshold)
            for q, row in zip(m.exact_query.tolist(), m.exact_row.tolist(), strict=True):
                dropped.setdefault(owner[q], ("exact_duplicate", f"of {name} {idx.doc_id(np.array([row]))[0]}"))
            for q, row, s in zip(m.near_query.tolist(), m.near_row.tolist(), m.near_similarity.tolist(), strict=True):
                dropped.setdefault(owner[q], ("near_duplicate",
                                              f"of {name} {idx.doc_id(np.array([row]))[0]} (jaccard {s:.2f})"))
    finally:
        if tmp is not None:
            tmp.cleanup()
    # identical records (same kind, parents and content: e.g. a teacher that paraphrased twice alike)
    first_of: dict[str, int] = {}
    for i, c in enumerate(cands):
        if i not in dropped and first_of.setdefault(c.record_id, i) != i:
            dropped[i] = ("exact_duplicate", f"identical to synthetic {c.record_id}")
    # within the batch, SFT samples and pairs separately (a pair and its SFT sample share text on purpose)
    for output in ("sft", "preference"):
        rows = [i for i, c in enumerate(cands) if c.output == output and i not in dropped]
        if len(rows) < 2:
            continue
        table = pa.table({"doc_id": [cands[i].record_id for i in rows], "text": [cands[i].full_text() for i in rows]})
        result = dedup_table(table, threshold=config.dedup_threshold)
        row_of = {cands[i].record_id: i for i in rows}
        for r in result.excluded.to_pylist():
            i, keeper = row_of[r["doc_id"]], cands[row_of[r["kept_doc_id"]]]
            if r["reason"] == "near_duplicate" and cands[i].parent_ids == keeper.parent_ids:
                continue  # a paraphrase of its sibling: intended augmentation
            if r["doc_id"] == r["kept_doc_id"]:
                continue
            dropped[i] = (r["reason"], f"of synthetic {r['kept_doc_id']}"
                          + (f" (jaccard {r['similarity']:.2f})" if r["reason"] == "near_duplicate" else ""))
    kept = []
    for i, c in enumerate(cands):
        if i in dropped:
            drops.add("dedup", dropped[i][0], dropped[i][1], cand=c)
        else:
            kept.append(c)
    return kept


def _gate_contamination(cands: list[_Candidate], drops: _Drops, eval_index: EvalNgramIndex | None) -> list[_Candidate]:
    if eval_index is None or not cands:
        return cands
    from flywheel.curation.decontam import decontaminate_table

    table = pa.table({"doc_id": [c.record_id for c in cands], "text": ["\n".join(c.texts()) for c in cands]})
    _, bad = decontaminate_table(table, eval_index)
    why = {r["doc_id"]: f"{r['eval_set']}/{r['eval_item_id']} ({r['reason']}, {r['ngram_hits']} shared 13-grams)"
           for r in bad.to_pylist()}
    kept = []
    for c in cands:
        if c.record_id in why:
            drops.add("contamination", "contaminated", why[c.record_id], cand=c)
        else:
            kept.append(c)
    return kept


def drop_counts_table(drops: pa.Table) -> pa.Table:
    """(stage, reason, count) over a drops table, most frequent first: for asset metadata."""
    counts = Counter(zip(drops["stage"].to_pylist(), drops["reason"].to_pylist(), strict=True))
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return pa.table({"stage": [k[0] for k, _ in rows], "reason": [k[1] for k, _ in rows],
                     "count": pa.array([n for _, n in rows], pa.int64())})


def sample_text(messages: Sequence[Mapping[str, str]]) -> str:
    """How an SFT sample reads for `existing_texts`: its message contents joined by blank lines."""
    return "\n\n".join(m["content"] for m in messages if m.get("content"))

