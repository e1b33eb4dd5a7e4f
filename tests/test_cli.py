"""The `flywheel` command line, run as a user would (a real process, a real FLYWHEEL_HOME)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

COMMANDS = [[], ["ingest"], ["events"], ["projections"], ["projections", "rebuild"], ["quarantine"], ["dsr"],
            ["dsr", "shred"], ["dsr", "subject-of"], ["demo"], ["dev"], ["serve"]]


def flywheel(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run([str(Path(sys.executable).parent / "flywheel"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_has_help(home: Path, command: list[str]) -> None:
    out = flywheel(home, *command, "--help").stdout
    assert "Usage" in out and "--help" in out


def test_ingest_quarantine_events_shred_roundtrip(home: Path, tmp_path: Path) -> None:
    log = tmp_path / "logs.jsonl"
    recs = [
        {"type": "interaction", "request_id": "q1", "user_id": "zoe@example.com", "model_version": "m@1",
         "timestamp": "2026-11-01T00:00:00Z", "messages": [{"role": "user", "content": "secret question"}],
         "response": "answer", "latency_ms": 3, "prompt_tokens": 2, "completion_tokens": 1},
    ]
    log.write_text("\n".join(json.dumps(r) for r in recs) + "\n{not json\n")
    report = json.loads(flywheel(home, "ingest", str(log), "--json").stdout)
    assert (report[0]["read"], report[0]["ingested"], report[0]["quarantined"]) == (2, 1, 1)
    assert "invalid JSON" in flywheel(home, "quarantine").stdout
    subject = flywheel(home, "dsr", "subject-of", "zoe@example.com").stdout.strip()
    events = [json.loads(x) for x in flywheel(home, "events", "--subject", subject, "--json").stdout.splitlines()]
    assert events[0]["data"]["messages"][0]["content"] == "secret question"
    flywheel(home, "dsr", "shred", subject, "--request-id", "dsr-7")
    after = [json.loads(x) for x in flywheel(home, "events", "--subject", subject, "--json").stdout.splitlines()]
    interaction = next(e for e in after if e["type"] == "InteractionLogged")
    assert interaction["redacted"] and interaction["data"]["messages"] is None
    assert any(e["type"] == "SubjectShredded" for e in after)
    assert "unchanged" in flywheel(home, "projections", "rebuild").stdout


def test_missing_file_is_a_clear_error(home: Path) -> None:
    proc = flywheel(home, "ingest", "/nonexistent/logs.jsonl", check=False)
    assert proc.returncode != 0 and "not a file: /nonexistent/logs.jsonl" in proc.stderr + proc.stdout

