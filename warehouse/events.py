"""Event types: frozen, typed, past-tense facts with a schema version.

Every event class splits its fields in two:

- public fields go to the `payload` JSON column, readable by anyone with the warehouse;
- personal fields (`PII_FIELDS`) go, as one JSON document, into the `pii` column, encrypted with the
  subject's key (see `warehouse.keystore`). When the key is shredded they read back as `None` and the
  stored event says `redacted=True`.

Decoding is explicit about schema change: fields the class does not know (written by a newer
producer, or arriving as schema drift in production logs) are kept in `extra`, never dropped; an
event type this code does not know decodes to `UnknownEvent` with its raw payload.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, ClassVar

import orjson

# Name-based event ids: the same fact always gets the same id, so replays are no-ops.
EVENT_NAMESPACE = uuid.UUID("6f1c2a4e-55b1-4c8e-9a57-3d4f0e8c2b10")


def derive_event_id(kind: str, natural_key: str) -> str:
    """A stable event id for a fact identified by `(kind, natural_key)` (UUID v5)."""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{kind}:{natural_key}"))


def canonical_json(obj: Any) -> str:
    """The one JSON encoding of payloads: sorted keys, no whitespace, UTC datetimes."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC).decode()


@dataclass(frozen=True)
class Event:
    """Base class of every event. Subclasses are frozen dataclasses named in the past tense."""

    SCHEMA_VERSION: ClassVar[int] = 1
    PII_FIELDS: ClassVar[frozenset[str]] = frozenset()

    # Unknown fields, kept as read (schema drift or a newer producer). Never personal-data-free by
    # assumption: ingestion stores drifted fields encrypted, with the personal part.
    extra: Mapping[str, Any] = field(default_factory=dict, kw_only=True, compare=True)

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    def public_fields(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "extra" and f.name not in self.PII_FIELDS
        }

    def personal_fields(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in sorted(self.PII_FIELDS)}
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    @classmethod
    def decode(cls, payload: Mapping[str, Any], personal: Mapping[str, Any] | None) -> Event:
        """Build the event from stored parts; unknown keys go to `extra`.

        `personal=None` means the subject's key is gone: personal fields decode as `None`.
        """
        names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for part in (payload, personal or {}):
            for k, v in part.items():
                if k == "extra" and isinstance(v, Mapping):
                    extra.update(v)
                elif k in names:
                    values[k] = v
                else:
                    extra[k] = v
        for f in dataclasses.fields(cls):
            if f.name == "extra" or f.name in values:
                continue
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                values[f.name] = None  # redacted personal field, or a field an older producer lacked
        return cls(**values, extra=MappingProxyType(extra))


# --- production traffic --------------------------------------------------------------------------


@dataclass(frozen=True)
class InteractionLogged(Event):
    """A model answered a request in production."""

    PII_FIELDS: ClassVar[frozenset[str]] = frozenset({"user_id", "messages", "response"})

    request_id: str
    model_version: str
    session_id: str | None
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    status: str
    labels: tuple[str, ...] | list[str] | None
    user_id: str | None
    messages: list[dict[str, str]] | None
    response: str | None


@dataclass(frozen=True)
class FeedbackGiven(Event):
    """A user reacted to an answer: thumbs, a rating, and/or a free-text correction."""

    PII_FIELDS: ClassVar[frozenset[str]] = frozenset({"user_id", "correction", "comment"})

    feedback_id: str
    request_id: str
    thumbs: int | None
    rating: int | None
    has_correction: bool | None
    labels: tuple[str, ...] | list[str] | None
    user_id: str | None
    correction: str | None
    comment: str | None


# --- data-subject requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class ErasureRequested(Event):
    """A data subject asked to be forgotten (GDPR Art. 17)."""

    request_id: str
    reason: str | None = None
    requested_by: str | None = None


@dataclass(frozen=True)
class AccessRequested(Event):
    """A data subject asked for a copy of their data (GDPR Art. 15)."""

    request_id: str
    requested_by: str | None = None


@dataclass(frozen=True)
class SubjectShredded(Event):
    """The subject's key was destroyed: their personal fields are unreadable from now on."""

    request_id: str | None = None


# --- data and model lineage -----------------------------------------------------------------------


@dataclass(frozen=True)
class ShardMaterialized(Event):
    """A curated shard version was written and tracked (DVC) — lineage reaches every version."""

    stage: str  # raw / clean / dedup
    source: str
    path: str  # the tracked path, relative to the DVC repository
    dvc_md5: str
    content_digest: str
    sample_ids_digest: str
    rows: int
    manifest: str  # where the version's manifest lives (a copy kept per version)
    data_version: str
    dagster_run_id: str | None = None


@dataclass(frozen=True)
class CheckpointTrained(Event):
    """A checkpoint was trained on exact inputs; the manifest lists every sample id it saw."""

    stage: str  # pretrain / sft / dpo
    model_name: str
    model_version: str | None  # the registry version, when registered
    checkpoint_path: str
    checkpoint_md5: str | None
    inputs_manifest: str  # Parquet: sample_id, source, shard md5, subject_id, ...
    inputs_digest: str
    samples: int
    parent_model_version: str | None = None
    mlflow_run_id: str | None = None
    dagster_run_id: str | None = None
    metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class EvalScored(Event):
    """A model version was scored on a sealed suite; per-item results are in `items_path`."""

    model_name: str
    model_version: str
    suite: str
    summary: dict[str, float]
    items_path: str
    items_digest: str
    eval_set_digest: str
    contamination_check_passed: bool


@dataclass(frozen=True)
class ModelPromoted(Event):
    model_name: str
    model_version: str
    previous_version: str | None
    gates: list[dict]
    forced: bool = False
    actor: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class PromotionRejected(Event):
    model_name: str
    model_version: str
    champion_version: str | None
    gates: list[dict]


@dataclass(frozen=True)
class ModelRolledBack(Event):
    model_name: str
    from_version: str
    to_version: str
    actor: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class CheckpointTainted(Event):
    """A model version was trained on data that has since been erased."""

    model_name: str
    model_version: str
    request_id: str
    reason: str


@dataclass(frozen=True)
class ErasureCompleted(Event):
    """Erasure of a subject finished; the receipt says what was found and removed, per store."""

    request_id: str
    receipt: dict
    verified: bool


@dataclass(frozen=True)
class AlertRaised(Event):
    """Production health crossed a threshold (drift, failure rate)."""

    kind: str
    metric: str
    value: float
    threshold: float
    detail: dict | None = None


@dataclass(frozen=True)
class UnknownEvent:
    """An event whose type this code does not know: kept and readable, never an error."""

    type: str
    payload: Mapping[str, Any]
    personal: Mapping[str, Any] | None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type_name(): cls
    for cls in (
        InteractionLogged, FeedbackGiven, ErasureRequested, AccessRequested, SubjectShredded,
        ShardMaterialized, CheckpointTrained, EvalScored, ModelPromoted, PromotionRejected, ModelRolledBack,
        CheckpointTainted, ErasureCompleted, AlertRaised,
    )
}


@dataclass(frozen=True)
class StoredEvent:
    """An event as recorded: its place in the log plus the decoded fact."""

    position: int
    event_id: str
    stream_id: str
    stream_version: int
    type: str
    schema_version: int
    occurred_at: datetime
    recorded_at: datetime
    subject_id: str | None
    data: Event | UnknownEvent
    redacted: bool
