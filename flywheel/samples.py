"""Synthetic, realistic production logs for the demo, tests and benchmarks (deterministic by seed).

The project must run on a fresh machine without the shared data sets, so it generates its own traffic.
Prompts and answers come from a small built-in phrase bank so that sizes and shapes resemble real chat
traffic (a few hundred characters per message, sessions of four requests, feedback on ~15% of answers,
a correction on half of the thumbs-down).

    python -m flywheel.samples OUT.jsonl N      # write N records
"""

from __future__ import annotations

import gzip
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

_TOPICS = [
    "Explain how a hash map handles collisions",
    "Write a JSON object describing a book with title, author and year",
    "What is the capital of Australia and why was it chosen",
    "Summarize the causes of the French Revolution in three sentences",
    "How do I reverse a linked list in Python",
    "Give me a recipe for a vegetarian lasagna",
    "What does the Pythagorean theorem state",
    "Translate 'good morning, how are you' into Spanish",
    "Why is the sky blue",
    "List three differences between TCP and UDP",
    "How many minutes are in a week",
    "Draft a polite email asking for a deadline extension",
]
_WORDS = (
    "the model answer data system request user value result because first then which about would "
    "there their other more time could into only some these also after where most should through "
    "example important general process information different following between number course "
).split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."


def generate_records(n: int, *, seed: int = 0, users: int = 5000, feedback_rate: float = 0.15):
    """Yield `n` log records (dicts): interactions, and feedback on some of them."""
    rng = random.Random(seed)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    produced = 0
    i = 0
    while produced < n:
        user = f"user-{rng.randrange(users):06d}@example.com"
        prompt = rng.choice(_TOPICS) + "? " + _sentence(rng, rng.randint(5, 40))
        answer = " ".join(_sentence(rng, rng.randint(8, 20)) for _ in range(rng.randint(2, 8)))
        ts = t0 + timedelta(seconds=i)
        rid = f"req-{seed}-{i:09d}"
        yield {
            "type": "interaction",
            "request_id": rid,
            "user_id": user,
            "session_id": f"sess-{seed}-{i // 4:08d}",
            "model_version": rng.choice(["tiny-llm@3", "tiny-llm@4"]),
            "timestamp": ts.isoformat().replace("+00:00", "Z"),
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": prompt},
            ],
            "response": answer,
            "latency_ms": round(rng.uniform(40, 900), 1),
            "prompt_tokens": len(prompt) // 4,
            "completion_tokens": len(answer) // 4,
            "status": "ok",
        }
        produced += 1
        if produced < n and rng.random() < feedback_rate:
            thumbs = rng.choice([1, 1, -1])
            rec = {
                "type": "feedback",
                "feedback_id": f"fb-{seed}-{i:09d}",
                "request_id": rid,
                "user_id": user,
                "timestamp": (ts + timedelta(seconds=30)).isoformat().replace("+00:00", "Z"),
                "thumbs": thumbs,
            }
            if thumbs < 0 and rng.random() < 0.5:
                rec["correction"] = _sentence(rng, 20)
            yield rec
            produced += 1
        i += 1


def write_jsonl(path: Path, n: int, *, seed: int = 0, **kw) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        for rec in generate_records(n, seed=seed, **kw):
            f.write(orjson.dumps(rec) + b"\n")
    return path


BROKEN_LINES = [
    b'{"type": "interaction", "request_id": "broken-1", "user_id": "u',  # truncated JSON
    b'{"type": "interaction", "request_id": "broken-2", "latency_ms": "fast"}',  # wrong type
    b'{"type": "telemetry", "request_id": "broken-3"}',  # unknown record type
    b'\xff\xfe not utf-8',  # invalid UTF-8
]


def write_demo_logs(directory: Path, *, n: int = 2000, seed: int = 7) -> list[Path]:
    """The demo's production logs: one clean file and one with a few broken lines."""
    directory.mkdir(parents=True, exist_ok=True)
    clean = write_jsonl(directory / f"traffic-{seed}.jsonl", n, seed=seed)
    messy = directory / f"traffic-{seed}-messy.jsonl"
    with open(messy, "wb") as f:
        for i, rec in enumerate(generate_records(50, seed=seed + 1)):
            f.write(orjson.dumps(rec) + b"\n")
            if i % 12 == 5:
                f.write(BROKEN_LINES[(i // 12) % len(BROKEN_LINES)] + b"\n")
    return [clean, messy]


if __name__ == "__main__":
    import sys

    write_jsonl(Path(sys.argv[1]), int(sys.argv[2]))
