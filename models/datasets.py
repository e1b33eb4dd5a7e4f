"""Training datasets for SFT and DPO, assembled from every source with lineage on each row.

SFT conversations come from:
- instruction data: files (self-instruct JSONL, `models.sft.instruction_records`) and/or the demo's
  generated instructions and structured tasks (JSON formatting, arithmetic: the *train* split);
- production traffic: interactions users gave a thumbs-up (and no thumbs-down), decrypted from the
  event log and PII-scrubbed; the row keeps the subject and the event it came from;
- synthetic samples made from failure cases (`flywheel.synthesis`), with their parents.

Preference pairs come from:
- feedback: a user's correction (chosen) against the answer they corrected (rejected), and, for the
  same prompt, an answer with a thumbs-up against one with a thumbs-down;
- safety pairs: refusals of harmful requests, help for benign look-alikes (generated, or hh-rlhf);
- synthetic contrastive pairs.

Every row has `sample_id`/`pair_id`, `source`, `license`, `subject_ids`, `origin_event_id`,
`parent_ids`, so lineage can answer "which models saw this person's data".
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
LINEAGE = [
    ("source", pa.string()),
    ("license", pa.string()),
    ("subject_id", pa.string()),  # the first subject (the lineage contract's column)
    ("subject_ids", pa.list_(pa.string())),
    ("origin_event_id", pa.string()),
    ("parent_ids", pa.list_(pa.string())),
    ("kind", pa.string()),
]
SFT_SCHEMA = pa.schema([("sample_id", pa.string()), ("messages", pa.list_(MESSAGE)), *LINEAGE])
PAIR_SCHEMA = pa.schema([("pair_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
                         ("rejected", pa.string()), *LINEAGE])
PRODUCTION_LICENSE = "LicenseRef-flywheel-production"  # users' traffic under the service's terms
GENERATED_LICENSE = "LicenseRef-flywheel-synthetic"


def _id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def _row(messages: list[dict[str, str]], *, source: str, license: str, kind: str, subject_ids: Sequence[str] = (),
         origin_event_id: str | None = None, parent_ids: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "sample_id": _id(source, json.dumps(messages, sort_keys=True)),
        "messages": messages, "source": source, "license": license, "subject_id": subject_ids[0] if subject_ids else None,
        "subject_ids": list(subject_ids), "origin_event_id": origin_event_id, "parent_ids": list(parent_ids), "kind": kind,
    }


def _pair(prompt: str, chosen: str, rejected: str, *, source: str, license: str, kind: str,
          subject_ids: Sequence[str] = (), origin_event_id: str | None = None, parent_ids: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "pair_id": _id(source, prompt, chosen, rejected), "prompt": prompt, "chosen": chosen, "rejected": rejected,
        "source": source, "license": license, "subject_id": subject_ids[0] if subject_ids else None,
        "subject_ids": list(subject_ids), "origin_event_id": origin_event_id, "parent_ids": list(parent_ids), "kind": kind,
    }


def _chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


# --- SFT ------------------------------------------------------------------------------------------


def generated_instructions(n_instructions: int, n_tasks: int, seed: int) -> list[dict[str, Any]]:
    """The demo's instruction data: general instructions + structured tasks from their train split."""
    from flywheel.tasks import instruction_records
    from models.evalsets import generate_arithmetic_task, generate_json_task

    rows = [_row(r["messages"], source="generated_instructions", license=GENERATED_LICENSE, kind="instruction")
            for r in instruction_records(n_instructions, seed)]
    for task in generate_json_task(n_tasks, seed) + generate_arithmetic_task(n_tasks, seed):
        rows.append(_row(_chat(task["prompt"], task["answer"]), source="generated_tasks", license=GENERATED_LICENSE,
                         kind=task.get("task", "task")))
    return rows


def file_instructions(paths: Iterable[Path], *, license: str) -> list[dict[str, Any]]:
    from models.sft import instruction_records

    rows = []
    for path in paths:
        rows += [_row(r["messages"], source=f"file:{Path(path).name}", license=license, kind="instruction")
                 for r in instruction_records(path)]
    return rows


def _interactions_with_feedback(store) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Decrypted interactions by request id, and their feedback events."""
    interactions = {e.data.request_id: e for e in store.read(types=["InteractionLogged"]) if not e.redacted}
    feedback: dict[str, list[Any]] = defaultdict(list)
    for e in store.read(types=["FeedbackGiven"]):
        feedback[e.data.request_id].append(e)
    return interactions, feedback


def _last_user(messages: Sequence[Mapping[str, str]] | None) -> str | None:
    for m in reversed(messages or []):
        if m.get("role") == "user":
            return m.get("content")
    return None


def production_sft(store, scrubber=None) -> list[dict[str, Any]]:
    """Interactions with a net thumbs-up and no thumbs-down: prompt and answer, PII-scrubbed."""
    from flywheel.curation.pii import PiiScrubber

    scrubber = scrubber or PiiScrubber()
    interactions, feedback = _interactions_with_feedback(store)
    rows = []
    for rid, e in interactions.items():
        votes = [f.data.thumbs for f in feedback.get(rid, []) if f.data.thumbs is not None]
        if not votes or min(votes) < 0 or e.data.status != "ok" or not e.data.response:
            continue
        messages = [{"role": m["role"], "content": scrubber.scrub(m["content"]).text} for m in e.data.messages or []]
        messages.append({"role": "assistant", "content": scrubber.scrub(e.data.response).text})
        rows.append(_row(messages, source="production", license=PRODUCTION_LICENSE, kind="thumbs_up",
                         subject_ids=[e.subject_id] if e.subject_id else [], origin_event_id=e.event_id,
                         parent_ids=[e.event_id] + [f.event_id for f in feedback.get(rid, [])]))
    return rows


def synthetic_sft(table: pa.Table | None) -> list[dict[str, Any]]:
    if table is None or not table.num_rows:
        return []
    rows = []
    for r in table.to_pylist():
        rows.append({**_row([{"role": m["role"], "content": m["content"]} for m in r["messages"]], source="synthetic",
                            license=r.get("license") or GENERATED_LICENSE, kind=r.get("kind") or "synthetic",
                            subject_ids=r.get("subject_ids") or [], origin_event_id=(r.get("parent_ids") or [None])[0],
                            parent_ids=r.get("parent_ids") or []), "sample_id": r["sample_id"]})
    return rows


def sft_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows → SFT_SCHEMA, one row per sample_id (first wins)."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault(r["sample_id"], r)
    return pa.Table.from_pylist(list(seen.values()), schema=SFT_SCHEMA)


# --- preferences ----------------------------------------------------------------------------------


def feedback_pairs(store, scrubber=None) -> list[dict[str, Any]]:
    """Corrections vs the corrected answer; thumbs-up vs thumbs-down answers to the same prompt."""
    from flywheel.curation.pii import PiiScrubber

    scrubber = scrubber or PiiScrubber()
    clean = lambda t: scrubber.scrub(t or "").text
    interactions, feedback = _interactions_with_feedback(store)
    pairs = []
    by_prompt: dict[str, dict[int, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for rid, e in interactions.items():
        prompt = _last_user(e.data.messages)
        if not prompt or not e.data.response:
            continue
        fbs = feedback.get(rid, [])
        for f in fbs:
            if f.data.correction and f.data.correction.strip() != e.data.response.strip():
                pairs.append(_pair(clean(prompt), clean(f.data.correction), clean(e.data.response), source="production",
                                   license=PRODUCTION_LICENSE, kind="correction",
                                   subject_ids=[s for s in (e.subject_id, f.subject_id) if s],
                                   origin_event_id=e.event_id, parent_ids=[e.event_id, f.event_id]))
        votes = [f.data.thumbs for f in fbs if f.data.thumbs is not None]
        if votes:
            by_prompt[" ".join(prompt.lower().split())][1 if sum(votes) > 0 else -1].append(e)
    for groups in by_prompt.values():
        for up in groups.get(1, []):
            for down in groups.get(-1, []):
                if up.data.response.strip() == down.data.response.strip():
                    continue
                pairs.append(_pair(clean(_last_user(up.data.messages)), clean(up.data.response), clean(down.data.response),
                                   source="production", license=PRODUCTION_LICENSE, kind="thumbs",
                                   subject_ids=[s for s in (up.subject_id, down.subject_id) if s],
                                   origin_event_id=up.event_id, parent_ids=[up.event_id, down.event_id]))
    return pairs


def generated_safety_pairs(n: int, seed: int) -> list[dict[str, Any]]:
    from flywheel.tasks import safety_pairs

    return [_pair(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"],
                  source="generated_safety", license=GENERATED_LICENSE, kind=f"safety_{p['kind']}")
            for p in safety_pairs(n, seed)]


def hh_rlhf_pairs(path: Path, limit: int, *, license: str = "MIT") -> list[dict[str, Any]]:
    from models.dpo import load_hh_pairs

    pairs, _ = load_hh_pairs(path, limit=limit)
    out = []
    for p in pairs:
        prompt = _last_user(p["prompt"]) if isinstance(p["prompt"], list) else p["prompt"]
        chosen = p["chosen"][-1]["content"] if isinstance(p["chosen"], list) else p["chosen"]
        rejected = p["rejected"][-1]["content"] if isinstance(p["rejected"], list) else p["rejected"]
        if prompt and chosen and rejected:
            out.append(_pair(prompt, chosen, rejected, source=f"file:{path.name}", license=license, kind="safety_hh"))
    return out


def synthetic_pairs(table: pa.Table | None) -> list[dict[str, Any]]:
    if table is None or not table.num_rows:
        return []
    return [{**_pair(r["prompt"], r["chosen"], r["rejected"], source="synthetic", license=r.get("license") or GENERATED_LICENSE,
                     kind=r.get("kind") or "synthetic", subject_ids=r.get("subject_ids") or [],
                     origin_event_id=(r.get("parent_ids") or [None])[0], parent_ids=r.get("parent_ids") or []),
             "pair_id": r["pair_id"]}
            for r in table.to_pylist()]


def pair_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault(r["pair_id"], r)
    return pa.Table.from_pylist(list(seen.values()), schema=PAIR_SCHEMA)


def as_trl_pairs(table: pa.Table) -> list[dict[str, Any]]:
    """Conversational DPO records for TRL."""
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in table.to_pylist()]


def texts_of_sft(table: pa.Table) -> list[str]:
    return [" ".join(m["content"] for m in msgs) for msgs in table.column("messages").to_pylist()]
