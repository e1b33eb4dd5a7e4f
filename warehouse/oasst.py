"""Import OpenAssistant tree exports as production traffic with feedback.

Each line of an OASST tree export (`*_tree.jsonl`) is one conversation tree. Every assistant reply
becomes an `interaction` record: the conversation path from the root prompt to the reply's parent is
the `messages`, the reply is the `response`. Its emoji votes become `feedback` records: one record per
`+1` (thumbs up) and per `-1` (thumbs down).

What the export lacks is filled in deterministically and documented here, so a re-import yields the
same event ids:

- **users**: the export carries no user ids. The prompter of a tree is the synthetic user
  `oasst-tree:<message_tree_id>`; the (anonymous) voters on a reply are `oasst-voters:<message_id>`.
- **times**: the export carries no timestamps. Tree *i* (0-based, in file order) is placed at
  2023-04-12T00:00:00Z + i minutes, its replies one second apart, votes a minute after the reply.
- **model_version**: `model_name` of the reply when present (synthetic replies), else `oasst-human`.
- **latency and tokens**: not in the export; latency is recorded as 0 and tokens are estimated as
  characters / 4 (flagged with the label `oasst-import`).

Deleted messages and non-English trees are imported as they are; filtering is curation's job.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

EPOCH = datetime(2023, 4, 12, tzinfo=UTC)
ROLE = {"prompter": "user", "assistant": "assistant"}


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def tree_to_records(tree: dict[str, Any], index: int) -> Iterator[dict[str, Any]]:
    """The interaction and feedback records of one OASST conversation tree."""
    tree_id = tree["message_tree_id"]
    user = f"oasst-tree:{tree_id}"
    start = EPOCH + timedelta(minutes=index)
    counter = 0

    def walk(node: dict[str, Any], path: list[dict[str, str]]) -> Iterator[dict[str, Any]]:
        nonlocal counter
        here = path + [{"role": ROLE.get(node["role"], node["role"]), "content": node["text"]}]
        if node["role"] == "assistant" and path:
            counter += 1
            ts = start + timedelta(seconds=counter)
            rid = node["message_id"]
            yield {
                "type": "interaction",
                "request_id": rid,
                "user_id": user,
                "session_id": tree_id,
                "model_version": node.get("model_name") or "oasst-human",
                "timestamp": _iso(ts),
                "messages": path,
                "response": node["text"],
                "latency_ms": 0.0,
                "prompt_tokens": sum(len(m["content"]) for m in path) // 4,
                "completion_tokens": len(node["text"]) // 4,
                "status": "ok",
                "labels": ["oasst-import"],
            }
            emojis = node.get("emojis") or {}
            for sign, thumbs in (("+1", 1), ("-1", -1)):
                for k in range(int(emojis.get(sign, 0))):
                    yield {
                        "type": "feedback",
                        "feedback_id": f"{rid}:{sign}:{k}",
                        "request_id": rid,
                        "user_id": f"oasst-voters:{rid}",
                        "timestamp": _iso(ts + timedelta(minutes=1)),
                        "thumbs": thumbs,
                        "labels": ["oasst-import"],
                    }
        for reply in node.get("replies") or []:
            yield from walk(reply, here)

    yield from walk(tree["prompt"], [])


def convert_tree_export(src: Path, dst: Path) -> int:
    """Write the production-log records of an OASST tree export to `dst` (JSONL); returns the count.

    A line that is not a valid tree is passed through unchanged, so ingestion quarantines it with
    its reason instead of it vanishing here.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    with open(src, "rb") as f, open(tmp, "wb") as out:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                tree = orjson.loads(line)
                records = list(tree_to_records(tree, index))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                out.write(line if line.endswith(b"\n") else line + b"\n")
                n += 1
                continue
            for rec in records:
                out.write(orjson.dumps(rec) + b"\n")
                n += 1
    tmp.replace(dst)
    return n
