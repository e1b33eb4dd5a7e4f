"""`flywheel lineage …` and `flywheel dsr access|plan|erase` through typer's CliRunner, on the lineage
tests' world (real ingested events, shards, manifests, checkpoints and evals: Alice and her
neighbours). `dsr erase --now` on the trained demo state is in tests/erasure/test_erasure_parts.py.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.cli import app
from tests.warehouse.test_lineage import World, build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("cli-dsr"))


@pytest.fixture
def cli(world: World, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(world.home))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def run(*args: str, code: int = 0):
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, (result.output, result.exception)
        return result

    return run


def test_lineage_sample_json_and_table(cli, world: World) -> None:
    sample = world.samples[("alice_d1", "raw")]
    out = json.loads(cli("lineage", "sample", sample, "--json").stdout)
    assert out["kind"] == "sample_lineage"
    assert {c["model_version"] for c in out["checkpoints"]} >= {"1", "2", "3"}
    table = cli("lineage", "sample", sample).stdout
    assert "shard versions" in table and "checkpoints" in table and "tiny-llm/1" in table


def test_lineage_model_by_version_and_name(cli) -> None:
    out = json.loads(cli("lineage", "model", "3", "--model", "tiny-llm", "--json").stdout)
    assert [c["model_version"] for c in out["chain"]] == ["1", "2", "3"]
    assert json.loads(cli("lineage", "model", "tiny-llm@3", "--json").stdout)["chain"] == out["chain"]
    assert "licenses" in cli("lineage", "model", "tiny-llm/4").stdout
    missing = cli("lineage", "model", "99", code=2)
    assert "99" in missing.output


def test_lineage_subject_and_dsr_plan(cli, world: World) -> None:
    alice = world.subjects["alice"]
    out = json.loads(cli("lineage", "subject", alice, "--json").stdout)
    assert out["query"]["subject_id"] == alice and out["events"]["total"] >= 2
    assert {d["doc_id"] for d in out["documents"]} >= {world.docs["alice_d1"], world.docs["alice_d2"]}
    plan = json.loads(cli("dsr", "plan", alice, "--json").stdout)
    assert plan["kind"] == "erasure_plan"
    assert world.docs["web_w1"] in {d["doc_id"] for d in plan["near_duplicates"]}  # her copied post
    assert {("dedup", "forum"), ("dedup", "web")} <= {(p["stage"], p["source"]) for p in plan["rematerialize"]}
    assert "rematerialize" in cli("dsr", "plan", alice).stdout


def test_dsr_access_writes_a_private_export(cli, world: World, tmp_path: Path) -> None:
    out = tmp_path / "alice.json"
    printed = cli("dsr", "access", world.subjects["alice"], "--out", str(out)).stdout
    assert str(out) in printed.replace("\n", "")
    export = json.loads(out.read_text())
    assert export["confirmation"]["processed"] is True and export["subject_id"] == world.subjects["alice"]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert "BOB-POST-ONE" not in out.read_text()  # nothing about her neighbours


def test_dsr_erase_records_the_request_for_the_sensor(cli, world: World) -> None:
    from flywheel.erasure import pending_erasure_requests

    dave = world.subjects["dave"]
    printed = cli("dsr", "erase", dave, "--reason", "asked by e-mail", "--request-id", "dsr-cli-1").stdout
    assert "ErasureRequested dsr-cli-1" in printed and "erasure sensor" in printed
    (pending,) = [p for p in pending_erasure_requests(world.store, 0) if p["request_id"] == "dsr-cli-1"]
    assert pending["subject_ids"] == [dave]
    requested = [e for e in world.store.read_subject(dave) if e.type == "ErasureRequested"]
    assert requested[-1].data.reason == "asked by e-mail" and requested[-1].data.requested_by.startswith("cli:")
    cli("dsr", "erase", dave, "--request-id", "dsr-cli-1")  # the same request again: idempotent
    assert len([e for e in world.store.read_subject(dave) if e.type == "ErasureRequested"]) == len(requested)
    assert not world.store.keys.is_shredded(dave)  # the job, not the command, shreds


def test_help_lists_the_new_commands(cli) -> None:
    assert {"sample", "model", "subject"} <= set(cli("lineage", "--help").stdout.split())
    dsr = cli("dsr", "--help").stdout
    assert all(c in dsr for c in ("access", "plan", "erase", "shred", "subject-of"))
