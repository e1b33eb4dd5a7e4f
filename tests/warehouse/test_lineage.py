"""Lineage queries on a real warehouse: ingested events, real shards and manifests, real dedup.

`build_world` makes a small flywheel state by the real code paths: production logs through the
`Ingester` (one line quarantined), documents through `with_sample_ids` / `scrub_table` /
`write_shard` / `dedup_stage` (a persistent MinHash index across sources), per-version manifest
copies and `ShardMaterialized` events as the curation assets record them, synthetic samples with
parent event ids, `CheckpointTrained` events with inputs manifests (pretrain → SFT → DPO, plus a
model on a badly licensed source) and `EvalScored` events with per-item Parquet. Alice is the
subject; Bob, Carol and Dave are her neighbours in the same shards and interaction streams.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from flywheel.curation.dedup import MinHashIndex
from flywheel.curation.documents import documents_table
from flywheel.curation.pii import scrub_table
from flywheel.curation.pipeline import dedup_stage
from flywheel.shards import with_sample_ids, write_parquet_atomic, write_shard
from flywheel.synthesis import SYNTHETIC_LICENSE
from warehouse import lineage, projections
from warehouse.events import CheckpointTrained, EvalScored, ShardMaterialized
from warehouse.ingest import Ingester
from warehouse.lineage import (
    build_lineage_index,
    ensure_index,
    erasure_plan,
    lineage_model,
    lineage_sample,
    lineage_subject,
    load_catalog,
    render_table,
    subject_events,
)
from warehouse.store import EventStore, NewEvent

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
ALLOWED = ["CC0-1.0", "CC-BY-SA-4.0", SYNTHETIC_LICENSE]
BAD_LICENSE = "LicenseRef-scraped-unknown"


def words(marker: str, n: int = 90) -> str:
    """A paragraph of `n` words unique to `marker` (long enough for 5-gram MinHash)."""
    vocab = [hashlib.sha256(f"{marker}:{i}".encode()).hexdigest()[:7] for i in range(n)]
    return f"{marker} " + " ".join(vocab)


TEXTS = {
    "alice_d1": words("ALICE-POST-ONE") + " Mail me at alice.w@example.org any time.",
    "alice_d2": words("PUBLIC-NOTICE") + " ALICE-REPOST-TAIL",  # a near copy of a public post
    "bob_b1": words("BOB-POST-ONE"),
    "bob_b2": words("BOB-POST-TWO"),
    "carol_c1": words("CAROL-POST-ONE"),
    "anon_f1": words("PUBLIC-NOTICE"),
    "web_w1": words("ALICE-POST-ONE") + " Mail me at alice.w@example.org any time. copied",  # copy of alice_d1
    "web_w2": words("WEB-PAGE-TWO"),
    "dave_k1": words("DAVE-BLOG-ONE"),
    "scraped_x1": words("SCRAPED-PAGE-ONE"),
}
INTERACTIONS = {
    # request id: (user, prompt, response)
    "r-alice-1": ("alice@example.com", "ALICE-PROMPT-ONE return the totals as JSON", "ALICE-ANSWER-ONE not json"),
    "r-alice-2": ("alice@example.com", "ALICE-PROMPT-TWO what is a monad", "ALICE-ANSWER-TWO"),
    "r-bob-1": ("bob@example.com", "BOB-PROMPT-ONE summarise this", "BOB-ANSWER-ONE"),
    "r-carol-1": ("carol@example.com", "CAROL-PROMPT-ONE hello", "CAROL-ANSWER-ONE"),
    "r-dave-1": ("dave@example.com", "DAVE-PROMPT-ONE hi", "DAVE-ANSWER-ONE"),
}


@dataclass
class World:
    home: Path
    store: EventStore
    subjects: dict[str, str]  # alice/bob/carol/dave → subject id
    events: dict[str, str]  # request/feedback id → event id
    docs: dict[str, str]  # name → doc id
    samples: dict[tuple[str, str], str] = field(default_factory=dict)  # (doc name, stage) → sample id
    shard_events: list[dict[str, Any]] = field(default_factory=list)
    synthetic: dict[str, str] = field(default_factory=dict)  # name → sample id
    manifests: dict[str, Path] = field(default_factory=dict)  # model version → inputs manifest


def _ingest(tmp: Path, store: EventStore) -> None:
    lines: list[dict[str, Any]] = []
    for i, (rid, (user, prompt, response)) in enumerate(INTERACTIONS.items()):
        lines.append({"type": "interaction", "request_id": rid, "user_id": user, "model_version": "tiny-llm@1",
                      "timestamp": (T0 + timedelta(seconds=i)).isoformat(), "session_id": f"s-{rid}",
                      "messages": [{"role": "user", "content": prompt}], "response": response, "latency_ms": 10,
                      "prompt_tokens": 5, "completion_tokens": 5})
    lines += [
        {"type": "feedback", "feedback_id": "f-alice-1", "request_id": "r-alice-1", "user_id": "alice@example.com",
         "timestamp": (T0 + timedelta(minutes=1)).isoformat(), "thumbs": -1,
         "correction": "ALICE-CORRECTION {\"total\": 3}"},
        # a neighbour's feedback on Alice's interaction: the same stream, someone else's record
        {"type": "feedback", "feedback_id": "f-bob-on-alice", "request_id": "r-alice-1", "user_id": "bob@example.com",
         "timestamp": (T0 + timedelta(minutes=2)).isoformat(), "thumbs": -1, "correction": "BOB-CORRECTION-TEXT",
         "comment": "BOB-COMMENT-TEXT"},
    ]
    raw = [json.dumps(x).encode() for x in lines]
    # quarantined lines: one names Alice (bad latency), one names Bob
    raw.append(json.dumps({**lines[0], "request_id": "r-alice-bad", "latency_ms": "ALICE-QUARANTINED"}).encode())
    raw.append(json.dumps({**lines[2], "request_id": "r-bob-bad", "latency_ms": "BOB-QUARANTINED"}).encode())
    src = tmp / "logs.jsonl"
    src.write_bytes(b"\n".join(raw) + b"\n")
    report = Ingester(store).ingest_file(src)
    assert (report.ingested, report.quarantined) == (len(lines), 2)
    projections.catch_up(store)


def _docs(world: World, rows: list[tuple[str, str, str, str | None, int]]) -> pa.Table:
    """(name, source, license, subject name, minutes after T0) → a DOC_SCHEMA table."""
    out = []
    for name, source, license_, subject, minutes in rows:
        doc_id = hashlib.sha256(f"{source}:{name}".encode()).hexdigest()[:32]
        world.docs[name] = doc_id
        out.append({"doc_id": doc_id, "source": source, "license": license_, "text": TEXTS[name],
                    "subject_id": world.subjects[subject] if subject else None,
                    "created_at": T0 + timedelta(minutes=minutes)})
    return documents_table(out)


def _publish(world: World, table: pa.Table, stage: str, source: str, excluded: pa.Table | None = None,
             when: datetime | None = None) -> dict[str, Any]:
    """What assets.curation.publish_shard records, without DVC: the md5 is a content hash."""
    directory = world.home / "dvc" / "shards" / stage / source
    info = write_shard(table, directory, stage=stage, source=source)
    md5 = hashlib.md5(f"{stage}:{source}:{info.content_digest}".encode()).hexdigest() + ".dir"
    if excluded is not None:
        write_parquet_atomic(excluded, world.home / "dvc" / "exclusions" / stage / source / "excluded.parquet")
    copy = world.home / "lineage" / "manifests" / stage / source / f"{md5.removesuffix('.dir')}.parquet"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(info.manifest_file, copy)
    event = ShardMaterialized(stage=stage, source=source, path=f"shards/{stage}/{source}", dvc_md5=md5,
                              content_digest=info.content_digest, sample_ids_digest=info.sample_ids_digest,
                              rows=info.rows, manifest=str(copy), data_version=md5)
    world.store.append([NewEvent(event, f"shard-{stage}-{source}", when or datetime.now(UTC))])
    for r in table.select(["doc_id", "sample_id"]).to_pylist():
        name = next(n for n, d in world.docs.items() if d == r["doc_id"]) if r["doc_id"] in world.docs.values() else None
        if name:
            world.samples[(name, stage)] = r["sample_id"]
    shard = {"stage": stage, "source": source, "dvc_md5": md5, "manifest": copy, "table": table}
    world.shard_events.append(shard)
    return shard


def _clean(raw: pa.Table) -> pa.Table:
    scrubbed, _ = scrub_table(raw.drop_columns(["sample_id"]))
    return with_sample_ids(scrubbed)


def _inputs(world: World, version: str, parts: list[tuple[dict[str, Any], list[str] | None]]) -> Path:
    """An inputs manifest: the rows of shard versions (all, or those of the named documents/samples)
    with the shard version each came from, as the training assets write it."""
    tables = []
    for shard, names in parts:
        t = pq.read_table(shard["manifest"])
        if names is not None:
            wanted = {world.docs.get(n) for n in names} | {world.synthetic.get(n) for n in names}
            t = t.filter(pa.array([d in wanted or s in wanted for d, s in
                                   zip(t.column("doc_id").to_pylist(), t.column("sample_id").to_pylist(), strict=True)]))
        n = t.num_rows
        tables.append(t.append_column("shard_stage", pa.array([shard["stage"]] * n, pa.string()))
                      .append_column("shard_source", pa.array([shard["source"]] * n, pa.string()))
                      .append_column("shard_md5", pa.array([shard["dvc_md5"]] * n, pa.string())))
    path = world.home / "lineage" / "checkpoints" / f"tiny-llm-{version}.parquet"
    write_parquet_atomic(pa.concat_tables(tables), path)
    world.manifests[version] = path
    return path


def _train(world: World, stage: str, version: str, parent: str | None, manifest: Path, minutes: int) -> None:
    rows = pq.read_metadata(manifest).num_rows
    ck = CheckpointTrained(stage=stage, model_name="tiny-llm", model_version=version,
                           checkpoint_path=str(world.home / "checkpoints" / stage / version), checkpoint_md5=None,
                           inputs_manifest=str(manifest), inputs_digest=hashlib.sha256(manifest.read_bytes()).hexdigest(),
                           samples=rows, parent_model_version=parent)
    items = pa.table({"suite": ["exact_match"] * 4 + ["safety"] * 2, "slice": ["json", "json", "arith", "arith", "harmful", "benign"],
                      "item_id": [f"i{k}" for k in range(6)], "metric": ["exact_match"] * 4 + ["refused"] * 2,
                      "value": [1.0, 0.0, 1.0, 1.0, 1.0, 0.0], "correct": [True, False, True, True, True, True]})
    items_path = world.home / "evals" / f"tiny-llm-{version}.parquet"
    write_parquet_atomic(items, items_path)
    ev = EvalScored(model_name="tiny-llm", model_version=version, suite="demo_tasks", summary={"exact_match": 0.75},
                    items_path=str(items_path), items_digest="d", eval_set_digest="e", contamination_check_passed=True)
    at = T0 + timedelta(minutes=minutes)
    world.store.append([NewEvent(ck, f"checkpoint-tiny-llm-{version}", at),
                        NewEvent(ev, f"eval-tiny-llm-{version}", at + timedelta(seconds=1))])


def build_world(root: Path) -> World:
    home = root / "home"
    home.mkdir(parents=True)
    store = EventStore(home / "warehouse.duckdb")
    world = World(home, store, {}, {}, {})
    _ingest(root, store)
    for name in ("alice", "bob", "carol", "dave"):
        world.subjects[name] = store.keys.pseudonymize(f"{name}@example.com")
    for e in store.read():
        key = getattr(e.data, "feedback_id", None) or getattr(e.data, "request_id", None)
        world.events[key] = e.event_id

    index = MinHashIndex(home / "indexes" / "minhash")
    # forum: Alice, Bob, Carol and an anonymous public notice that Alice reposted
    forum_raw = with_sample_ids(_docs(world, [
        ("anon_f1", "forum", "CC-BY-SA-4.0", None, 0), ("alice_d1", "forum", "CC-BY-SA-4.0", "alice", 5),
        ("alice_d2", "forum", "CC-BY-SA-4.0", "alice", 6), ("bob_b1", "forum", "CC-BY-SA-4.0", "bob", 7),
        ("bob_b2", "forum", "CC-BY-SA-4.0", "bob", 8), ("carol_c1", "forum", "CC-BY-SA-4.0", "carol", 9)]))
    _publish(world, forum_raw, "raw", "forum", when=T0 + timedelta(hours=1))
    forum_clean = _clean(forum_raw)
    _publish(world, forum_clean, "clean", "forum", when=T0 + timedelta(hours=2))
    # clean re-materialized (Carol edited her post): a second version that still lists Alice's samples
    edited = forum_raw.set_column(forum_raw.schema.get_field_index("text"), "text", pa.array(
        [t + (" edited" if d == world.docs["carol_c1"] else "") for d, t in
         zip(forum_raw.column("doc_id").to_pylist(), forum_raw.column("text").to_pylist(), strict=True)]))
    forum_clean = _clean(edited)
    _publish(world, forum_clean, "clean", "forum", when=T0 + timedelta(hours=3))
    forum_dedup = dedup_stage(forum_clean, index=index, batch_id="forum")
    assert forum_dedup.excluded.column("doc_id").to_pylist() == [world.docs["alice_d2"]]  # kept: anon_f1
    forum_shard = _publish(world, forum_dedup.kept, "dedup", "forum", forum_dedup.excluded, T0 + timedelta(hours=4))

    web_raw = with_sample_ids(_docs(world, [("web_w1", "web", "CC0-1.0", None, 20), ("web_w2", "web", "CC0-1.0", None, 21)]))
    _publish(world, web_raw, "raw", "web", when=T0 + timedelta(hours=5))
    web_clean = _clean(web_raw)
    _publish(world, web_clean, "clean", "web", when=T0 + timedelta(hours=5, minutes=1))
    web_dedup = dedup_stage(web_clean, index=index, batch_id="web")
    assert web_dedup.excluded.column("doc_id").to_pylist() == [world.docs["web_w1"]]  # a copy of Alice's post
    web_shard = _publish(world, web_dedup.kept, "dedup", "web", web_dedup.excluded, T0 + timedelta(hours=5, minutes=2))

    # synthetic samples from failing interactions (flywheel.synthesis lineage: parent event ids)
    synth_rows = [
        ("s_alice", [world.events["r-alice-1"]], "ALICE-SYNTH-ANSWER {\"total\": 3}"),
        ("s_mixed", [world.events["r-alice-1"], world.events["f-bob-on-alice"]], "BOB-CORRECTION-TEXT as synthetic"),
        ("s_bob", [world.events["r-bob-1"]], "BOB-SYNTH-ANSWER"),
    ]
    synth = pa.Table.from_pylist([
        {"doc_id": f"synthetic-{name}", "source": "synthetic", "license": SYNTHETIC_LICENSE, "subject_id": None,
         "parent_ids": parents, "text": text} for name, parents, text in synth_rows])
    synth = with_sample_ids(synth)
    world.synthetic = dict(zip([r[0] for r in synth_rows], synth.column("sample_id").to_pylist(), strict=True))
    synth_shard = _publish(world, synth, "synthetic", "synthetic", when=T0 + timedelta(hours=6))

    blog_raw = with_sample_ids(_docs(world, [("dave_k1", "blog", "CC0-1.0", "dave", 30),
                                             ("scraped_x1", "scraped", BAD_LICENSE, None, 31)]))
    blog_shard = _publish(world, blog_raw.filter(pa.array([True, False])), "dedup", "blog", when=T0 + timedelta(hours=6))
    scraped_shard = _publish(world, blog_raw.filter(pa.array([False, True])), "dedup", "scraped",
                             when=T0 + timedelta(hours=6))

    # pretrain v1 on the dedup shards; SFT v2 on synthetic + two forum samples; DPO v3 on Bob's sample
    _train(world, "pretrain", "1", None, _inputs(world, "1", [(forum_shard, None), (web_shard, None)]), 400)
    _train(world, "sft", "2", "1", _inputs(world, "2", [(synth_shard, None), (forum_shard, ["alice_d1", "bob_b1"])]), 410)
    _train(world, "dpo", "3", "2", _inputs(world, "3", [(synth_shard, ["s_bob"])]), 420)
    _train(world, "pretrain", "4", None, _inputs(world, "4", [(blog_shard, None), (scraped_shard, None)]), 430)
    return world


@pytest.fixture(autouse=True)
def small_event_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seal event-index spans every 4 events, so the tests read sealed sidecars and the tail."""
    monkeypatch.setattr(lineage, "EVENT_INDEX_SPAN", 4)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("lineage"))


def rendered(result: dict[str, Any]) -> str:
    console = Console(record=True, width=200)
    console.print(render_table(result))
    return console.export_text()


# --------------------------------------------------------------------------------------------------------


def test_sample_lineage_follows_a_document_through_versions_checkpoints_and_evals(world: World) -> None:
    raw_sample = world.samples[("alice_d1", "raw")]
    out = lineage_sample(world.store, world.home, raw_sample)
    json.dumps(out)  # serializable as is
    assert out["query"]["resolved_as"] == "sample_id"
    assert [d["doc_id"] for d in out["documents"]] == [world.docs["alice_d1"]]
    # raw → clean (two versions) → dedup, in stage order, each with its md5 and time
    stages = [(v["stage"], v["source"]) for v in out["shard_versions"]]
    assert stages == [("raw", "forum"), ("clean", "forum"), ("clean", "forum"), ("dedup", "forum")]
    assert all(v["dvc_md5"].endswith(".dir") and v["materialized_at"] for v in out["shard_versions"])
    # the clean text differs from the raw text (PII scrubbed), so the sample id changes after raw
    clean_sample = world.samples[("alice_d1", "clean")]
    assert clean_sample != raw_sample
    assert out["shard_versions"][1]["samples"] == [clean_sample] == out["shard_versions"][3]["samples"]
    # two checkpoints trained on it directly, the DPO model inherits it from SFT
    direct = {(c["stage"], c["model_version"]) for c in out["checkpoints"] if c["via"] == "direct"}
    inherited = {(c["stage"], c["model_version"]) for c in out["checkpoints"] if c["via"] == "parent"}
    assert direct == {("pretrain", "1"), ("sft", "2")} and inherited == {("dpo", "3")}
    assert [m["model_version"] for m in out["models"]] == ["1", "2", "3"]
    assert {(e["model_version"], e["items"]) for e in out["evals"]} == {("1", 6), ("2", 6), ("3", 6)}
    assert {s["slice"] for e in out["evals"] for s in e["slices"]} == {"json", "arith", "harmful", "benign"}
    # its copy on the web was dropped by dedup in favour of it
    assert [(d["doc_id"], d["relation"]) for d in out["near_duplicates"]] == [(world.docs["web_w1"], "duplicate_of")]
    assert out["near_duplicates"][0]["shard_versions"][0]["stage"] == "raw"
    # by document id and by a later sample id: the same versions
    for other in (world.docs["alice_d1"], clean_sample):
        again = lineage_sample(world.store, world.home, other)
        assert [v["dvc_md5"] for v in again["shard_versions"]] == [v["dvc_md5"] for v in out["shard_versions"]]
    assert "shard versions" in rendered(out)


def test_sample_lineage_from_an_event_reaches_synthetic_children(world: World) -> None:
    out = lineage_sample(world.store, world.home, world.events["r-alice-1"])
    assert out["query"]["resolved_as"] == "event_id"
    assert out["event"]["type"] == "InteractionLogged" and out["event"]["subject_id"] == world.subjects["alice"]
    assert "messages" not in out["event"]["payload"]  # public fields only: lineage is not an access request
    assert {c["sample_id"] for c in out["children"]} == {world.synthetic["s_alice"], world.synthetic["s_mixed"]}
    assert all(c["kind"] == "synthetic" for c in out["children"])
    assert {(c["stage"], c["model_version"], c["via"]) for c in out["checkpoints"]} == {
        ("sft", "2", "direct"), ("dpo", "3", "parent")}


def test_unknown_id_reaches_nothing(world: World) -> None:
    out = lineage_sample(world.store, world.home, "no-such-id")
    assert out["query"]["resolved_as"] is None
    assert out["shard_versions"] == out["checkpoints"] == out["children"] == []


def test_model_lineage_through_the_parent_chain(world: World) -> None:
    out = lineage_model(world.store, world.home, "tiny-llm", "3", allowed_licenses=ALLOWED)
    json.dumps(out)
    assert [(c["stage"], c["model_version"]) for c in out["chain"]] == [("pretrain", "1"), ("sft", "2"), ("dpo", "3")]
    # counts agree with the manifests read independently
    tables = [pq.read_table(world.manifests[v]) for v in ("1", "2", "3")]
    assert [c["samples"] for c in out["chain"]] == [t.num_rows for t in tables]
    expected: dict[str, int] = {}
    for t in tables:
        for s in t.column("source").to_pylist():
            expected[s] = expected.get(s, 0) + 1
    assert {s["source"]: s["samples"] for s in out["sources"]} == expected
    subjects = {s for t in tables for s in t.column("subject_id").to_pylist() if s}
    assert out["subjects"]["distinct"] == len(subjects) == 3  # Alice, Bob, Carol (via forum)
    assert {(v["stage"], v["source"]) for v in out["shard_versions"]} == {
        ("dedup", "forum"), ("dedup", "web"), ("synthetic", "synthetic")}
    assert all(v["known"] for v in out["shard_versions"])
    assert out["flags"] == [] and out["ok"]
    assert "licenses" in rendered(out)


def test_model_lineage_flags_a_bad_license_and_an_erased_subject(tmp_path: Path) -> None:
    world = build_world(tmp_path)
    before = lineage_model(world.store, world.home, "tiny-llm", "4", allowed_licenses=ALLOWED)
    assert [(f["flag"], f.get("license")) for f in before["flags"]] == [("license_not_allowed", BAD_LICENSE)]
    assert before["flags"][0]["sources"] == ["scraped"]
    world.store.shred_subject(world.subjects["dave"], "dsr-dave")
    after = lineage_model(world.store, world.home, "tiny-llm", "4", allowed_licenses=ALLOWED)
    erased = [f for f in after["flags"] if f["flag"] == "erased_subject"]
    assert [(f["subject_id"], f["samples"], f["via"]) for f in erased] == [(world.subjects["dave"], 1, ["subject_id"])]
    assert not after["ok"]
    # a synthetic sample's parent event is how an erased chat user reaches a model
    world.store.shred_subject(world.subjects["bob"], "dsr-bob")
    dpo = lineage_model(world.store, world.home, "tiny-llm", "3", allowed_licenses=ALLOWED)
    by_subject = {f["subject_id"]: f for f in dpo["flags"] if f["flag"] == "erased_subject"}
    assert set(by_subject) == {world.subjects["bob"]}
    assert "parent_event" in by_subject[world.subjects["bob"]]["via"]  # s_bob, s_mixed via Bob's events
    assert "subject_id" in by_subject[world.subjects["bob"]]["via"]  # Bob's forum posts in pretraining
    with pytest.raises(LookupError, match="known model versions: tiny-llm/1"):
        lineage_model(world.store, world.home, "tiny-llm", "99")


def test_subject_lineage_finds_documents_near_duplicates_and_synthetic_children(world: World) -> None:
    alice = world.subjects["alice"]
    out = lineage_subject(world.store, world.home, alice)
    json.dumps(out)
    assert out["events"]["by_type"] == {"FeedbackGiven": 1, "InteractionLogged": 2}
    assert {e["event_id"] for e in out["events"]["items"]} == {
        world.events["r-alice-1"], world.events["r-alice-2"], world.events["f-alice-1"]}
    assert {d["doc_id"] for d in out["documents"]} == {world.docs["alice_d1"], world.docs["alice_d2"]}
    assert all(d["subject_id"] == alice for d in out["documents"])
    # Alice's repost was dropped as a near-duplicate of the public notice; her post's web copy was dropped for hers
    assert [(e["doc_id"], e["reason"]) for e in out["excluded"]] == [(world.docs["alice_d2"], "near_duplicate")]
    assert {(d["doc_id"], d["relation"]) for d in out["near_duplicates"]} == {
        (world.docs["web_w1"], "duplicate_of"), (world.docs["anon_f1"], "kept_instead_of")}
    assert {c["sample_id"] for c in out["children"]} == {world.synthetic["s_alice"], world.synthetic["s_mixed"]}
    assert {(m["model_version"], m["via"]) for m in out["models"]} == {("1", "direct"), ("2", "direct"), ("3", "parent")}
    # neighbours' own documents are not hers
    assert world.docs["bob_b1"] not in json.dumps(out["documents"])
    assert "near duplicates" in rendered(out)


def test_erasure_plan_lists_every_affected_item_and_partition(world: World) -> None:
    alice = world.subjects["alice"]
    plan = erasure_plan(world.store, world.home, alice)
    json.dumps(plan)
    assert plan["events"]["total"] == 3 and plan["quarantine_rows"] == 1
    assert {(v["stage"], v["source"]) for v in plan["shard_versions"]} == {
        ("raw", "forum"), ("clean", "forum"), ("dedup", "forum"), ("raw", "web"), ("clean", "web"),
        ("synthetic", "synthetic")}
    # forum raw, clean ×2, dedup (hers, and the notice she reposted); web raw, clean (her post's copy); synthetic
    assert len(plan["dvc_versions"]) == 7
    why = {(p["stage"], p["source"]): p["why"] for p in plan["rematerialize"]}
    assert why[("raw", "forum")] == ["near_duplicate", "subject"]
    assert why[("raw", "web")] == ["near_duplicate"]
    assert why[("dedup", "forum")] == ["exclusions:subject", "near_duplicate", "subject"]
    assert why[("dedup", "web")] == ["exclusions:near_duplicate"]
    assert why[("synthetic", "synthetic")] == ["synthetic_child"]
    assert ("dedup", "blog") not in why and ("dedup", "scraped") not in why
    assert {e["doc_id"] for e in plan["exclusions"]} == {world.docs["alice_d2"], world.docs["web_w1"]}
    assert {s["sample_id"] for s in plan["synthetic"]} == {world.synthetic["s_alice"], world.synthetic["s_mixed"]}
    assert {(m["model_version"], m["via"]) for m in plan["models"]} == {("1", "direct"), ("2", "direct"), ("3", "parent")}
    assert {e["model_version"] for e in plan["evals"]} == {"1", "2", "3"}
    # Bob's plan does not name Alice's documents, and vice versa
    bob = erasure_plan(world.store, world.home, world.subjects["bob"])
    assert world.docs["alice_d1"] not in json.dumps(bob["documents"])
    assert {m["model_version"] for m in bob["models"]} == {"1", "2", "3"}
    assert "rematerialize" in rendered(plan)


def test_subject_events_from_sealed_index_spans_and_the_tail_match_a_scan(tmp_path: Path) -> None:
    world = build_world(tmp_path)
    alice = world.subjects["alice"]

    def direct() -> list[str]:
        with world.store.connect() as con:
            return [r[0] for r in con.execute(
                "SELECT event_id::VARCHAR FROM events WHERE subject_id = ? ORDER BY position", [alice]).fetchall()]

    def indexed() -> tuple[list[str], int]:
        with world.store.connect() as con:
            index = ensure_index(con, load_catalog(con, world.home))
            return [e["event_id"] for e in subject_events(con, world.home, alice, index)], index.events_upto

    before, upto = indexed()
    head = world.store.head()
    assert upto == head // lineage.EVENT_INDEX_SPAN * lineage.EVENT_INDEX_SPAN > 0  # sealed spans exist
    assert before == direct() and len(before) == 3
    # new events land in the tail first, then in a sealed span once it fills
    line = {"type": "interaction", "request_id": "r-alice-3", "user_id": "alice@example.com", "model_version": "m",
            "timestamp": T0.isoformat(), "messages": [{"role": "user", "content": "again"}], "response": "ok",
            "latency_ms": 1, "prompt_tokens": 1, "completion_tokens": 1}
    (tmp_path / "more.jsonl").write_text(json.dumps(line) + "\n")
    Ingester(world.store).ingest_file(tmp_path / "more.jsonl")
    after, _ = indexed()
    assert after == direct() and len(after) == 4
    sidecars = sorted((world.home / "lineage" / "index" / "events").glob("*.parquet"))
    assert len(sidecars) == head // lineage.EVENT_INDEX_SPAN
    assert build_lineage_index(world.store, world.home)["manifest_sidecars"] == len(world.shard_events) + 4


def test_the_index_drops_the_sidecar_of_a_deleted_manifest(tmp_path: Path) -> None:
    """Erasure deletes an affected shard version's manifest copy: its sidecar goes with it."""
    world = build_world(tmp_path)
    sidecars = world.home / "lineage" / "index" / "manifests"
    assert build_lineage_index(world.store, world.home)["manifest_sidecars"] == len(list(sidecars.glob("*.parquet")))
    before = set(sidecars.glob("*.parquet"))
    raw_forum = world.shard_events[0]
    assert (raw_forum["stage"], raw_forum["source"]) == ("raw", "forum")
    raw_forum["manifest"].unlink()
    out = lineage_subject(world.store, world.home, world.subjects["alice"])
    after = set(sidecars.glob("*.parquet"))
    assert len(after) == len(before) - 1 and after < before
    assert str(raw_forum["manifest"]) in out["missing_files"]
    assert ("raw", "forum") not in {(v["stage"], v["source"]) for v in out["shard_versions"]}
