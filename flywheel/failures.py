"""Failure cases from production traffic: find them in the event log, count them cheaply, cluster them.

    failures = find_failures(store, after=cursor, upto=store.head())        # pa.Table, FAILURE_SCHEMA
    counts = failure_signal_counts(store, after=cursor)                       # SQL over projections only
    clusters = cluster_failures(failures, threshold=0.5)                      # pa.Table, CLUSTER_SCHEMA

Failure signals (an interaction fails when any applies; `signals` says which, `failure_types` the
resulting types):

| signal | type | where it is read | needs decryption |
|---|---|---|---|
| `feedback:thumbs_down` — a thumbs-down on the answer | `thumbs_down` | `proj_feedback` | no |
| `feedback:low_rating` — a rating ≤ `policy.low_rating` (2) | `low_rating` | `proj_feedback` | no |
| `feedback:correction` — the user wrote a better answer | `corrected` | `proj_feedback` | no |
| `label:<x>` — a failure label on the interaction or its feedback | `<x>` | both projections | no |
| `status:error` — the request failed | `error` | `proj_interactions` | no |
| `detector:json_broken` — the prompt asks for JSON, no JSON value parses | `json_broken` | events | yes |
| `detector:over_refusal` — a refusal to a prompt the harm check passes | `over_refusal` | events | yes |

Windows: a signal counts in `(after, upto]` when the *event that carries it* is in that position range —
the feedback event for feedback signals, the `InteractionLogged` event for labels, status and the
detectors. A sensor that moves its cursor to `upto` therefore sees each signal exactly once, including
late feedback on an old answer. `failure_signal_counts` is the SQL half of `find_failures` (same
statement), so for the projection signals the two always agree.

Clustering (`cluster_failures`): every failure goes to one cluster of its *primary* type
(`primary_type`: json_broken, over_refusal, unsafe, error, other failure labels, then
`negative_feedback` for thumbs-down / low rating / correction alone), so a thumbs-down JSON answer is
repaired as JSON and plain dissatisfaction clusters by topic. Within a type, identical prompts (NFKC,
casefolded, whitespace collapsed) always share a cluster; distinct prompts are grouped by TF-IDF cosine
similarity (scikit-learn: word unigrams, English stop words removed, sublinear tf, L2-normalised, IDF
fitted on every failure prompt plus an optional background sample) with average-linkage agglomerative
clustering cut at cosine distance `1 - threshold` (default threshold 0.5). Types with more than
`exact_limit` (2000) distinct prompts use leader clustering instead (`_leader_labels`: each prompt joins
the first earlier leader it is ≥ threshold similar to; no n × n matrix). Deterministic: rows are sorted by event id first, cluster ids
are hashes of their members. docs/flywheel-loop.md has the measured separations.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from warehouse.events import StoredEvent
    from warehouse.store import EventStore

# Labels (on interactions or on feedback) that mark a failure. Any other label ("oasst-import",
# "canary", ...) is metadata and ignored.
DEFAULT_FAILURE_LABELS: tuple[str, ...] = (
    "json_broken", "over_refusal", "hallucination", "incorrect", "unsafe", "toxic", "off_topic",
    "incomplete", "format_error", "too_long", "wrong_language",
)  # fmt: skip

# Primary type of a failure with several types, most specific first: the cluster it joins and the
# synthesis path it takes. Label types not listed here come next; thumbs-down, low rating and
# correction alone give the primary type "negative_feedback".
PRIMARY_ORDER: tuple[str, ...] = ("json_broken", "over_refusal", "unsafe", "error")
_GENERIC_ORDER: tuple[str, ...] = ("corrected", "low_rating", "thumbs_down")
# The primary type of a failure whose only signals are generic dissatisfaction: they cluster by topic.
NEGATIVE_FEEDBACK = "negative_feedback"

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
FAILURE_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),  # the InteractionLogged event id
        ("request_id", pa.string()),
        ("subject_id", pa.string()),
        ("model_version", pa.string()),
        ("position", pa.int64()),
        ("occurred_at", pa.timestamp("us", tz="UTC")),
        ("failure_types", pa.list_(pa.string())),
        ("primary_type", pa.string()),
        ("signals", pa.list_(pa.string())),
        ("prompt", pa.string()),  # the last user message
        ("messages", pa.list_(MESSAGE_TYPE)),  # the conversation the model answered
        ("response", pa.string()),
        ("status", pa.string()),
        ("correction", pa.string()),  # the latest correction given as feedback, if any
        ("correction_event_id", pa.string()),
        ("correction_subject_id", pa.string()),  # who wrote it (may differ from subject_id)
        ("feedback_event_ids", pa.list_(pa.string())),  # every feedback event on it, up to `upto`
        ("thumbs_up", pa.int64()),
        ("thumbs_down", pa.int64()),
        ("min_rating", pa.int64()),
        ("redacted", pa.bool_()),  # the subject's key is shredded: no text
    ]
)
CLUSTER_SCHEMA = pa.schema(
    [
        ("cluster_id", pa.string()),
        ("failure_type", pa.string()),
        ("size", pa.int64()),
        ("representative_event_id", pa.string()),
        ("representative_prompt", pa.string()),
        ("member_event_ids", pa.list_(pa.string())),
        ("mean_similarity", pa.float64()),  # mean cosine of members to the representative
    ]
)


@dataclass(frozen=True)
class FailurePolicy:
    """What counts as a failure."""

    low_rating: int = field(default=2, metadata={"help": "A rating at or below this is a failure."})
    failure_labels: tuple[str, ...] = field(
        default=DEFAULT_FAILURE_LABELS, metadata={"help": "Labels that mark a failure; others are ignored."}
    )
    net_thumbs: bool = field(
        default=False,
        metadata={"help": "Count a thumbs-down only when thumbs-down outnumber thumbs-up on that answer "
                          "(crowd-voted traffic such as OASST); default: any thumbs-down counts."},
    )
    corrections: bool = field(default=True, metadata={"help": "A correction alone marks a failure."})
    errors: bool = field(default=True, metadata={"help": "status = 'error' marks a failure."})
    detect_json: bool = field(default=True, metadata={"help": "Run the JSON-breakage detector (decrypts)."})
    detect_over_refusal: bool = field(default=True, metadata={"help": "Run the over-refusal detector (decrypts)."})
    read_batch: int = field(default=20_000, metadata={"help": "Events decrypted per batch."})


# --------------------------------------------------------------------------------------------------------
# Detectors


# A prompt "asks for JSON" when a request verb governs the word JSON ("return ... as JSON", "write a
# JSON object"), or it asks for the output in/as JSON. "What is JSON?" or "explain JSON vs XML" do not.
_JSON_ASK = re.compile(
    r"\b(?:return|respond|reply|answer|output|give|write|produce|generate|provide|emit|create|format|send|"
    r"print|make|build|convert|transform|serialize|list|extract)\b[^.?!\n]{0,60}?\bjson\b"
    r"|\b(?:in|as|into|using)\s+(?:a\s+|an\s+|the\s+|valid\s+|strict\s+|pure\s+|proper\s+)*json\b"
    r"|\bjson\s+(?:only|output|response|format)\b",
    re.IGNORECASE,
)
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|\Z)", re.DOTALL)


def asks_for_json(prompt: str | None) -> bool:
    """Does the prompt ask for a JSON answer? (regex: a request verb or "in/as" governing "JSON")."""
    # the substring test first: most prompts never mention JSON and skip the regex
    return bool(prompt) and "json" in prompt.lower() and _JSON_ASK.search(prompt) is not None


def extract_json(text: str | None) -> Any | None:
    """The first JSON object or array in `text` (whole text, a code fence, or embedded), else None."""
    if not text:
        return None
    decoder = json.JSONDecoder()
    candidates = [text.strip()] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for c in candidates:
        try:
            value = json.loads(c)
        except ValueError:
            continue
        if isinstance(value, (dict, list)):
            return value
    for m in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(value, (dict, list)):
            return value
    return None


def json_broken(prompt: str | None, response: str | None) -> bool:
    """The prompt asks for JSON and no JSON object/array can be read from the response."""
    return asks_for_json(prompt) and extract_json(response) is None


# Refusal phrases, matched case-insensitively in the first 400 characters (curly apostrophes made
# straight). Each needs a refusal *verb phrase*: "I can't wait to help" and "Sorry to hear that" are not
# refusals. models/evaluation.py has its own detector for the eval harness; the two may be merged.
_REFUSE_VERB = (
    r"(?:help|assist|provide|do|comply|answer|share|give|create|write|tell|generate|fulfil+|support|"
    r"engage|discuss|explain|make|offer|complete|continue)"
)
_REFUSAL = re.compile(
    "|".join(
        [
            (rf"\bI (?:really |simply |just )?(?:can ?not|can't|won't|will not|am unable to|'m unable to|"
            rf"am not able to|'m not able to|refuse to) {_REFUSE_VERB}\b"),
            r"\bI(?:'m| am) (?:so |very |really )?sorry,? but\b",
            r"\b(?:sorry|apologies|I apologi[sz]e),? (?:but )?I (?:can ?not|can't|won't|will not|am unable|'m unable)\b",
            r"\bI (?:must|have to) (?:respectfully )?(?:decline|refuse)\b",
            (r"\bas an ai(?: language model| assistant| model)?,? I (?:can ?not|can't|won't|will not|am unable|"
            r"am not able|'m not able|'m unable)\b"),
            rf"\bI(?:'m| am) not (?:able|allowed|permitted|willing|comfortable) to {_REFUSE_VERB}\b",
            rf"\b(?:that|this|it)(?:'s| is) not something I (?:can|will) {_REFUSE_VERB}\b",
        ]
    ),
    re.IGNORECASE,
)


def looks_like_refusal(text: str | None) -> bool:
    """Is `text` a refusal? A refusal phrase (see `_REFUSAL`) in its first 400 characters."""
    if not text:
        return False
    head = text[:400].replace("\u2019", "'").replace("\u2018", "'")
    return _REFUSAL.search(head) is not None


# The "simple benign check": a prompt is treated as possibly harmful when it matches one of these
# phrases. Deliberately phrase-level ("kill someone", not "kill"): "How do I kill a stuck process?" is
# benign. When it fires, a refusal is NOT counted as over-refusal — missing an over-refusal costs less
# than teaching the model to comply with a harmful request.
HARM_PATTERNS: tuple[str, ...] = (
    (r"\b(?:kill|murder|hurt|harm|poison|attack|stab|shoot|kidnap|torture) (?:a |an |the |my |your |his |her )?"
    r"(?:person|people|someone|somebody|him|her|them|neighbou?r|wife|husband|kid|child|children|baby|coworker|boss)\b"),
    (r"\b(?:make|build|assemble|create|synthesi[sz]e|cook|manufacture)\b[^.?!\n]{0,40}\b(?:bomb|explosive|weapon|"
    r"nerve agent|bioweapon|meth|methamphetamine|napalm|poison|gun)s?\b"),
    (r"\b(?:break|broke|get) into (?:a |an |my |the |someone'?s? |their |his |her )?(?:neighbou?r'?s? )?"
    r"(?:house|home|car|apartment|account|phone|email)\b"),
    r"\b(?:steal|shoplift|rob|launder)\b",
    r"\bhack(?:ing)? (?:into|someone|a |an |my (?:ex|neighbou?r))",
    (r"\b(?:password|passcode)s? (?:of|for) (?:someone|my (?:ex|wife|husband|boss|neighbou?r))\b|"
    r"\bsomeone'?s? password\b"),
    r"\b(?:malware|ransomware|keylogger|botnet|phishing (?:email|site|page))\b",
    r"\b(?:suicide|kill myself|self[- ]harm|hurt myself|end my life)\b",
    r"\b(?:threaten|blackmail|stalk|harass|bully|dox)\b",
    r"\b(?:cheat on (?:my |the )?tax(?:es)?|tax fraud|fake (?:id|passport|review)s?|counterfeit)\b",
    r"\b(?:child (?:porn|sexual)|csam)\b",
)
_HARM = re.compile("|".join(f"(?:{p})" for p in HARM_PATTERNS), re.IGNORECASE)


def looks_harmful(prompt: str | None) -> bool:
    """The simple benign check: does the prompt match a harmful-request phrase (HARM_PATTERNS)?"""
    return bool(prompt) and _HARM.search(prompt) is not None


def over_refusal(prompt: str | None, response: str | None) -> bool:
    """A refusal to a prompt the benign check does not flag as harmful."""
    return looks_like_refusal(response) and not looks_harmful(prompt)


def last_user_message(messages: Sequence[Mapping[str, Any]] | None) -> str | None:
    for m in reversed(messages or []):
        if m.get("role") == "user":
            return m.get("content")
    return None


# --------------------------------------------------------------------------------------------------------
# Projection signals (SQL only: no decryption)

# One row per interaction with a projection-visible signal in (after, upto]. `$labels` are the failure
# labels; a label counts when the event carrying it (interaction or feedback) is in the window.
_SIGNALS_SQL = """
WITH fb AS (
    SELECT request_id,
           count(*) FILTER (thumbs = -1) AS down_events,
           count(*) FILTER (rating <= $low_rating) AS low_events,
           count(*) FILTER (has_correction) AS correction_events,
           list_distinct(flatten(list(list_intersect(coalesce(labels, []::VARCHAR[]), CAST($labels AS VARCHAR[]))))) AS fb_labels
    FROM proj_feedback
    WHERE position > $after AND position <= $upto
    GROUP BY request_id
),
totals AS (
    SELECT request_id, count(*) FILTER (thumbs = 1) AS up, count(*) FILTER (thumbs = -1) AS down
    FROM proj_feedback WHERE position <= $upto GROUP BY request_id
),
sig AS (
    SELECT i.event_id::VARCHAR AS event_id, i.request_id, i.position,
           (i.position > $after) AS in_window,
           coalesce(fb.down_events, 0) > 0 AND (NOT $net_thumbs OR t.down > t.up) AS thumbs_down,
           coalesce(fb.low_events, 0) > 0 AS low_rating,
           $corrections AND coalesce(fb.correction_events, 0) > 0 AS corrected,
           $errors AND i.position > $after AND i.status = 'error' AS error,
           list_sort(list_distinct(list_concat(
               CASE WHEN i.position > $after
                    THEN list_intersect(coalesce(i.labels, []::VARCHAR[]), CAST($labels AS VARCHAR[])) ELSE []::VARCHAR[] END,
               coalesce(fb.fb_labels, []::VARCHAR[])))) AS labels,
           coalesce(fb.down_events, 0) AS down_events
    FROM proj_interactions i
    LEFT JOIN fb USING (request_id)
    LEFT JOIN totals t USING (request_id)
    WHERE i.position <= $upto AND (i.position > $after OR fb.request_id IS NOT NULL)
)
"""
_SIGNAL_ROWS = _SIGNALS_SQL + """
SELECT * FROM sig WHERE thumbs_down OR low_rating OR corrected OR error OR len(labels) > 0 ORDER BY position
"""
_SIGNAL_COUNTS = _SIGNALS_SQL + """
SELECT count(*) FILTER (thumbs_down OR low_rating OR corrected OR error OR len(labels) > 0),
       count(*) FILTER (thumbs_down), count(*) FILTER (low_rating), count(*) FILTER (corrected),
       count(*) FILTER (error), sum(down_events) FILTER (thumbs_down),
       count(*) FILTER (in_window)
FROM sig
"""
_LABEL_COUNTS = _SIGNALS_SQL + "SELECT l, count(*) FROM (SELECT unnest(labels) AS l FROM sig) GROUP BY l ORDER BY l"


def _params(store: EventStore, after: int, upto: int | None, policy: FailurePolicy) -> dict[str, Any]:
    return {
        "after": after, "upto": store.head() if upto is None else upto, "low_rating": policy.low_rating,
        "labels": list(policy.failure_labels), "net_thumbs": policy.net_thumbs,
        "corrections": policy.corrections, "errors": policy.errors,
    }  # fmt: skip


def failure_signal_counts(
    store: EventStore, after: int = 0, upto: int | None = None, policy: FailurePolicy | None = None,
    *, catch_up: bool = True,
) -> dict[str, int]:
    """Interactions with each projection-visible failure signal in `(after, upto]` (SQL, no decryption).

    Keys: `failing` (interactions with any such signal), `thumbs_down`, `low_rating`, `corrected`,
    `error`, `label:<x>` per failure label seen, `thumbs_down_votes` (feedback events behind the
    thumbs-down signal) and `interactions` (InteractionLogged events in the window). The detectors
    (JSON breakage, over-refusal) need decrypted text and are not counted here.
    """
    policy = policy or FailurePolicy()
    if catch_up:
        from warehouse import projections

        projections.catch_up(store)
    params = _params(store, after, upto, policy)
    with store.connect() as con:
        row = con.execute(_SIGNAL_COUNTS, params).fetchall()[0]
        labels = con.execute(_LABEL_COUNTS, params).fetchall()
    keys = ("failing", "thumbs_down", "low_rating", "corrected", "error", "thumbs_down_votes", "interactions")
    out = {k: int(v or 0) for k, v in zip(keys, row, strict=True)}
    out.update({f"label:{name}": int(n) for name, n in labels})
    return out


# --------------------------------------------------------------------------------------------------------
# find_failures


def primary_type(types: Iterable[str]) -> str:
    """The type a failure is clustered and synthesized under: PRIMARY_ORDER first, then other labels
    (alphabetically), then `negative_feedback` for thumbs-down / low rating / correction alone."""
    types = set(types)
    for t in PRIMARY_ORDER:
        if t in types:
            return t
    labels = sorted(types - set(_GENERIC_ORDER))
    if labels:
        return labels[0]
    if types:
        return NEGATIVE_FEEDBACK
    raise ValueError("primary_type: no failure types")


def _events_by_id(store: EventStore, event_ids: Sequence[str]) -> list[StoredEvent]:
    from warehouse.store import EVENT_COLUMNS

    if not event_ids:
        return []
    with store.connect() as con:
        table = con.sql(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE event_id IN (SELECT unnest(CAST(? AS UUID[]))) ORDER BY position",
            params=[list(event_ids)],
        ).to_arrow_table()
    return store.decode(table)


def _iter_interactions(store: EventStore, after: int, upto: int, batch: int) -> Iterable[StoredEvent]:
    pos = after
    while pos < upto:
        table = store.read_arrow(types=["InteractionLogged"], after=pos, upto=upto, limit=batch)
        if table.num_rows == 0:
            return
        events = store.decode(table)
        yield from events
        pos = events[-1].position


def find_failures(
    store: EventStore, after: int = 0, upto: int | None = None, policy: FailurePolicy | None = None,
    *, catch_up: bool = True,
) -> pa.Table:
    """Failing interactions with a failure signal in `(after, upto]`, one row each (FAILURE_SCHEMA).

    Reads the projections for the feedback/label/status signals, decrypts the interactions in the window
    for the detectors, then decrypts the failing interactions and their feedback (the latest correction).
    Rows are in log order. Interactions of shredded subjects keep their row with `redacted=True` and no
    text (the synthesis step drops them).
    """
    policy = policy or FailurePolicy()
    if catch_up:
        from warehouse import projections

        projections.catch_up(store)
    with store.connect():  # one connection for every read below (connect() is re-entrant per thread)
        return _find_failures(store, _params(store, after, upto, policy), policy)


def _find_failures(store: EventStore, params: dict[str, Any], policy: FailurePolicy) -> pa.Table:
    after, upto = params["after"], params["upto"]
    with store.connect() as con:
        sig_rows = con.execute(_SIGNAL_ROWS, params).fetchall()
        names = [d[0] for d in con.description]
    signals: dict[str, list[str]] = {}
    for r in sig_rows:
        row = dict(zip(names, r, strict=True))
        s = signals.setdefault(row["event_id"], [])
        if row["thumbs_down"]:
            s.append("feedback:thumbs_down")
        if row["low_rating"]:
            s.append("feedback:low_rating")
        if row["corrected"]:
            s.append("feedback:correction")
        if row["error"]:
            s.append("status:error")
        s.extend(f"label:{lb}" for lb in row["labels"])

    events: dict[str, StoredEvent] = {}
    if policy.detect_json or policy.detect_over_refusal:
        for ev in _iter_interactions(store, after, upto, policy.read_batch):
            data = ev.data
            if ev.redacted or getattr(data, "status", "ok") == "error":
                continue
            prompt = last_user_message(data.messages)
            found = []
            if policy.detect_json and json_broken(prompt, data.response):
                found.append("detector:json_broken")
            if policy.detect_over_refusal and over_refusal(prompt, data.response):
                found.append("detector:over_refusal")
            if found:
                signals.setdefault(ev.event_id, []).extend(found)
                events[ev.event_id] = ev
            elif ev.event_id in signals:
                events[ev.event_id] = ev
    events.update({e.event_id: e for e in _events_by_id(store, [i for i in signals if i not in events])})
    missing = set(signals) - set(events)
    if missing:  # the projections name an event the log does not have: a corrupt projection
        raise RuntimeError(f"{store.path}: projection rows name events not in the log: {sorted(missing)[:3]}")

    feedback = _feedback_of(store, [events[i].data.request_id for i in signals], upto)
    rows: list[dict[str, Any]] = []
    for event_id in sorted(signals, key=lambda i: events[i].position):
        ev, data = events[event_id], events[event_id].data
        fb = feedback.get(data.request_id, [])
        types = sorted({_type_of(s) for s in signals[event_id]}, key=_type_rank)
        correction = next((f for f in reversed(fb) if getattr(f.data, "correction", None)), None)
        ratings = [f.data.rating for f in fb if f.data.rating is not None]
        rows.append({
            "event_id": event_id, "request_id": data.request_id, "subject_id": ev.subject_id,
            "model_version": data.model_version, "position": ev.position, "occurred_at": ev.occurred_at,
            "failure_types": types, "primary_type": primary_type(types), "signals": sorted(set(signals[event_id])),
            "prompt": last_user_message(data.messages),
            "messages": [{"role": m.get("role"), "content": m.get("content")} for m in data.messages]
            if data.messages is not None else None,
            "response": data.response, "status": data.status,
            "correction": correction.data.correction if correction else None,
            "correction_event_id": correction.event_id if correction else None,
            "correction_subject_id": correction.subject_id if correction else None,
            "feedback_event_ids": [f.event_id for f in fb],
            "thumbs_up": sum(f.data.thumbs == 1 for f in fb), "thumbs_down": sum(f.data.thumbs == -1 for f in fb),
            "min_rating": min(ratings) if ratings else None, "redacted": ev.redacted,
        })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA)


def _type_of(signal: str) -> str:
    kind, _, name = signal.partition(":")
    return {"thumbs_down": "thumbs_down", "low_rating": "low_rating", "correction": "corrected",
            "error": "error"}.get(name, name) if kind in ("feedback", "status") else name


def _type_rank(t: str) -> tuple[int, str]:
    if t in PRIMARY_ORDER:
        return (0, f"{PRIMARY_ORDER.index(t):03d}")
    if t in _GENERIC_ORDER:
        return (2, f"{_GENERIC_ORDER.index(t):03d}")
    return (1, t)


def _feedback_of(store: EventStore, request_ids: Sequence[str], upto: int) -> dict[str, list[StoredEvent]]:
    """Decrypted feedback events (position ≤ upto) of the given requests, in log order."""
    if not request_ids:
        return {}
    with store.connect() as con:
        ids = [r[0] for r in con.execute(
            "SELECT event_id::VARCHAR FROM proj_feedback "
            "WHERE position <= $upto AND request_id IN (SELECT unnest($rids)) ORDER BY position",
            {"upto": upto, "rids": list(request_ids)},
        ).fetchall()]
    out: dict[str, list[StoredEvent]] = {}
    for ev in _events_by_id(store, ids):
        out.setdefault(ev.data.request_id, []).append(ev)
    return out


# --------------------------------------------------------------------------------------------------------
# Clustering

DEFAULT_CLUSTER_THRESHOLD = 0.5


def _tfidf(texts: Sequence[str], fit_texts: Sequence[str]) -> Any:
    """L2-normalised TF-IDF rows of `texts` (word unigrams, English stop words removed; IDF from `fit_texts`)."""
    from scipy.sparse import csr_matrix
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(stop_words="english", sublinear_tf=True, dtype=np.float64)
    try:
        vec.fit(fit_texts)
    except ValueError:  # empty vocabulary: nothing but stop words and punctuation
        return csr_matrix((len(texts), 1))
    return vec.transform(texts)  # TfidfVectorizer L2-normalises rows


def _group_labels(x: Any, threshold: float, exact_limit: int) -> np.ndarray:
    n = x.shape[0]
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    if n <= exact_limit:
        from sklearn.cluster import AgglomerativeClustering

        sim = np.asarray((x @ x.T).todense(), dtype=np.float64)
        dist = np.clip(1.0 - sim, 0.0, 2.0)
        np.fill_diagonal(dist, 0.0)
        model = AgglomerativeClustering(
            n_clusters=None, metric="precomputed", linkage="average", distance_threshold=1.0 - threshold
        )
        return model.fit_predict(dist).astype(np.int64)
    return _leader_labels(x, threshold)


def _leader_labels(x: Any, threshold: float, block: int = 512) -> np.ndarray:
    """Leader clustering for large groups: in row order, a prompt joins the first leader it is ≥ threshold
    similar to, or becomes a leader. Every member is within the threshold of its leader (no chaining, unlike
    single linkage); cost O(n × leaders) sparse products, a block of rows at a time."""
    from scipy.sparse import vstack

    n = x.shape[0]
    labels = np.full(n, -1, dtype=np.int64)
    leaders: list[int] = []
    leader_mat = None
    for s in range(0, n, block):
        rows = np.arange(s, min(s + block, n))
        if leader_mat is not None:
            sim = np.asarray((x[rows] @ leader_mat.T).todense())
            hit = sim >= threshold
            first = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
            labels[rows[first >= 0]] = first[first >= 0]
        new: list[int] = []
        for r in rows[labels[rows] < 0]:  # unmatched: compare with the leaders made in this block, in order
            if new:
                sim_new = np.asarray((x[r] @ x[new].T).todense()).ravel()
                k = int(np.argmax(sim_new >= threshold)) if (sim_new >= threshold).any() else -1
                if k >= 0:
                    labels[r] = len(leaders) + k
                    continue
            labels[r] = len(leaders) + len(new)
            new.append(int(r))
        if new:
            leaders.extend(new)
            leader_mat = x[new] if leader_mat is None else vstack([leader_mat, x[new]]).tocsr()
    return labels


def cluster_failures(
    failures: pa.Table, threshold: float = DEFAULT_CLUSTER_THRESHOLD, *, background: Sequence[str] = (),
    exact_limit: int = 2000,
) -> pa.Table:
    """Group failures by primary type, then by prompt similarity (module docstring); CLUSTER_SCHEMA.

    Identical prompts (after NFKC, casefolding and whitespace collapsing) always share a cluster; the
    distinct prompts of one type are clustered at cosine `threshold`. IDF weights come from every
    failure prompt plus `background` (e.g. recent traffic), which makes them less noisy on small sets.
    The representative is the member whose prompt has the highest mean similarity to the others (ties:
    smallest event id). Redacted failures (no prompt) are left out. Sorted by size, type, then id.
    """
    from flywheel.curation.dedup import comparison_text

    rows = [r for r in failures.select(["event_id", "primary_type", "prompt"]).to_pylist() if r["prompt"] is not None]
    rows.sort(key=lambda r: r["event_id"])
    fit_texts = sorted({r["prompt"] for r in rows}) + list(background)
    by_type: dict[str, dict[str, list[dict[str, Any]]]] = {}  # type -> normalized prompt -> members
    for r in rows:
        by_type.setdefault(r["primary_type"], {}).setdefault(comparison_text(r["prompt"]), []).append(r)
    out: list[dict[str, Any]] = []
    for ftype in sorted(by_type):
        groups = sorted(by_type[ftype].values(), key=lambda g: g[0]["event_id"])
        x = _tfidf([g[0]["prompt"] for g in groups], fit_texts)
        weight = np.array([len(g) for g in groups], dtype=np.float64)
        labels = _group_labels(x, threshold, exact_limit)
        for label in np.unique(labels):
            idx = np.flatnonzero(labels == label)
            sub = x[idx]
            w = weight[idx]
            if len(idx) == 1:
                best, mean_sim = 0, 1.0
            else:
                # mean similarity of each distinct prompt to every member (its own copies count 1):
                # x_i · (Σ_j w_j x_j) / W, without the n × n matrix
                total = np.asarray(sub.T @ w).ravel()
                dots = np.asarray(sub @ total).ravel()
                self_sim = np.asarray(sub.multiply(sub).sum(axis=1)).ravel()
                dots = dots + w * (1.0 - self_sim)  # copies of an all-stop-word prompt are still identical
                mean = (dots - 1.0) / max(w.sum() - 1.0, 1.0)
                best = int(np.argmax(mean))  # groups are in event-id order: ties go to the smallest id
                mean_sim = float(dots[best] / w.sum())
            members = sorted(m["event_id"] for i in idx for m in groups[i])
            rep = groups[idx[best]][0]
            out.append({
                "cluster_id": "fc-" + hashlib.sha256(f"{ftype}\x1f{','.join(members)}".encode()).hexdigest()[:16],
                "failure_type": ftype, "size": len(members), "representative_event_id": rep["event_id"],
                "representative_prompt": rep["prompt"], "member_event_ids": members, "mean_similarity": mean_sim,
            })  # fmt: skip
    out.sort(key=lambda c: (-c["size"], c["failure_type"], c["cluster_id"]))
    return pa.Table.from_pylist(out, schema=CLUSTER_SCHEMA)
