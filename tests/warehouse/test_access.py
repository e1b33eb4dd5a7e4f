"""The access export (GDPR Art. 15): exactly the subject's records, nothing about the neighbours.

The world (`tests.warehouse.test_lineage.build_world`) puts Bob, Carol and Dave in the same shards as
Alice, Bob's feedback (with a correction) on Alice's interaction, a synthetic sample mixing Alice's
interaction with Bob's correction, and a quarantined line for each of Alice and Bob.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.warehouse.test_lineage import INTERACTIONS, TEXTS, World, build_world
from warehouse.access import access_export, dsr_access_cmd, write_access_export

NEIGHBOURS = ("bob", "carol", "dave")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("access"))


def sources_config(tmp_path: Path) -> Path:
    p = tmp_path / "sources.toml"
    p.write_text(
        '[sources.forum]\nformat = "jsonl"\npaths = ["forum.jsonl"]\nlicense = "CC-BY-SA-4.0"\nretention_days = 730\n'
        '[sources.web]\nformat = "jsonl"\npaths = ["web.jsonl"]\nlicense = "CC0-1.0"\n'
    )
    return p


def neighbour_strings(world: World) -> list[str]:
    """Every text and id that belongs to a neighbour (and not also to Alice)."""
    out = []
    for name in NEIGHBOURS:
        out.append(world.subjects[name])
        out += [f"{name}@example.com", name.upper()]  # raw ids and the markers in their texts
    # (the public notice's text is not listed: Alice's repost of it is her own document)
    out += [TEXTS[n] for n in ("bob_b1", "bob_b2", "carol_c1", "dave_k1", "web_w2")]
    out += [world.docs[n] for n in ("bob_b1", "bob_b2", "carol_c1", "dave_k1", "anon_f1", "web_w1", "web_w2")]
    out += [s for (n, _), s in world.samples.items() if n.split("_")[0] in NEIGHBOURS + ("anon", "web")]
    out += [world.events[k] for k in ("r-bob-1", "r-carol-1", "r-dave-1", "f-bob-on-alice")]
    out += [world.synthetic["s_bob"], "BOB-CORRECTION-TEXT", "BOB-COMMENT-TEXT", "BOB-QUARANTINED"]
    return out


def test_access_export_holds_exactly_the_subjects_records(world: World, tmp_path: Path) -> None:
    alice = world.subjects["alice"]
    export = access_export(world.store, world.home, alice, sources_config=sources_config(tmp_path))
    text = json.dumps(export)
    assert export["confirmation"]["processed"] is True and export["confirmation"]["erased"] is False

    # her events, decrypted: both interactions with prompts and answers, her feedback with its correction
    events = {e["data"].get("request_id") if e["type"] == "InteractionLogged" else e["data"]["feedback_id"]: e
              for e in export["events"]}
    assert set(events) == {"r-alice-1", "r-alice-2", "f-alice-1"}
    for rid in ("r-alice-1", "r-alice-2"):
        _, prompt, response = INTERACTIONS[rid]
        assert events[rid]["data"]["messages"][0]["content"] == prompt and events[rid]["data"]["response"] == response
    assert events["f-alice-1"]["data"]["correction"] == 'ALICE-CORRECTION {"total": 3}'
    assert not any(e["redacted"] for e in export["events"])

    # her documents: current text per stage (raw keeps her e-mail, clean has it scrubbed), PII types only
    docs = {d["doc_id"]: d for d in export["documents"]}
    assert set(docs) == {world.docs["alice_d1"], world.docs["alice_d2"]}
    d1 = {s["sample_id"]: s for s in docs[world.docs["alice_d1"]]["samples"]}
    raw, clean = d1[world.samples[("alice_d1", "raw")]], d1[world.samples[("alice_d1", "clean")]]
    assert raw["stages"] == ["raw"] and raw["text"] == TEXTS["alice_d1"]
    assert clean["stages"] == ["clean", "dedup"] and "<EMAIL>" in clean["text"] and "alice.w@" not in clean["text"]
    assert clean["pii_types"] == ["EMAIL"]
    assert len(clean["shard_versions"]) == 3  # clean v1, clean v2, dedup
    # her repost, excluded by dedup: its text is hers; the public notice it duplicates is not named
    (excluded,) = docs[world.docs["alice_d2"]]["excluded"]
    assert excluded["reason"] == "near_duplicate" and excluded["duplicate_of"] is None
    assert "ALICE-REPOST-TAIL" in excluded["text"]

    # synthetic samples from her interaction: her own one with text; the mixed one without
    synth = {s["sample_id"]: s for s in export["synthetic"]}
    assert set(synth) == {world.synthetic["s_alice"], world.synthetic["s_mixed"]}
    assert synth[world.synthetic["s_alice"]]["text"].startswith("ALICE-SYNTH-ANSWER")
    assert synth[world.synthetic["s_mixed"]]["contains_other_peoples_data"] is True
    assert synth[world.synthetic["s_mixed"]]["text"] is None
    assert synth[world.synthetic["s_mixed"]]["derived_from"] == [world.events["r-alice-1"]]

    assert {(m["model_version"], m["via"]) for m in export["models"]} == {("1", "direct"), ("2", "direct"), ("3", "parent")}
    assert {e["model_version"] for e in export["evals"]} == {"1", "2", "3"}
    assert {(v["stage"], v["source"]) for v in export["shard_versions"]} == {
        ("raw", "forum"), ("clean", "forum"), ("dedup", "forum")}
    (q,) = export["quarantine"]
    assert "ALICE-QUARANTINED" in q["raw"] and q["reason"]

    processing = export["processing"]
    assert processing["recipients"] == []
    forum = next(s for s in processing["sources"] if s["source"] == "forum")
    assert (forum["license"], forum["retention_days"]) == ("CC-BY-SA-4.0", 730)

    # nothing about anyone else
    leaked = [s for s in neighbour_strings(world) if s in text]
    assert leaked == []


def test_access_export_for_an_unknown_subject_confirms_nothing_is_processed(world: World) -> None:
    export = access_export(world.store, world.home, "0" * 32)
    assert export["confirmation"]["processed"] is False
    assert export["events"] == export["documents"] == export["synthetic"] == export["quarantine"] == []


def test_access_export_after_shredding_is_only_the_tombstone(tmp_path: Path) -> None:
    world = build_world(tmp_path)
    alice = world.subjects["alice"]
    world.store.shred_subject(alice, "dsr-alice-1")
    out = tmp_path / "export" / "alice.json"
    summary = dsr_access_cmd(alice, out, home=world.home)
    export = json.loads(out.read_text())
    assert set(export) == {"kind", "format_version", "subject_id", "generated_at", "request_id", "confirmation",
                           "tombstone"}
    assert export["confirmation"] == {**export["confirmation"], "processed": False, "erased": True}
    assert export["tombstone"]["subject_id"] == alice
    assert export["tombstone"]["request_ids"] == ["dsr-alice-1"]
    assert export["tombstone"]["shredded_at"]
    text = out.read_text()
    for needle in ("ALICE", "alice@example.com", world.docs["alice_d1"], world.events["r-alice-1"]):
        assert needle not in text
    assert summary["erased"] is True and summary["out"] == str(out)


def test_write_access_export_is_private_json(world: World, tmp_path: Path) -> None:
    out = tmp_path / "alice.json"
    export = write_access_export(world.store, world.home, world.subjects["alice"], out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert json.loads(out.read_text())["counts"] == export["counts"]
    assert export["counts"]["events"] == 3 and export["counts"]["documents"] == 2
