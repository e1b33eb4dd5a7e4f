"""Failure finding, signal counts and clustering on real stores: crafted logs and the OASST export."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from flywheel.failures import (
    FAILURE_SCHEMA,
    FailurePolicy,
    asks_for_json,
    cluster_failures,
    extract_json,
    failure_signal_counts,
    find_failures,
    looks_harmful,
    looks_like_refusal,
)
from tests.loop.conftest import (
    EXPECTED,
    PARAPHRASES,
    crafted_records,
    feedback,
    ingest,
    interaction,
    oasst_replies,
    write_jsonl,
)
from warehouse.events import derive_event_id


def by_request(table: pa.Table) -> dict[str, dict]:
    return {r["request_id"]: r for r in table.to_pylist()}


def projection_signals(row: dict) -> list[str]:
    return [s for s in row["signals"] if not s.startswith("detector:")]


def test_detectors_on_look_alikes() -> None:
    assert asks_for_json("Write a JSON object describing a book with title, author and year")
    assert asks_for_json("List the planets in JSON format.")
    assert asks_for_json("Answer as valid JSON, please")
    assert not asks_for_json("What is JSON used for?")
    assert not asks_for_json("Explain the difference between JSON and XML.")
    assert extract_json('Here you go:\n```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('The answer is {"a": [1, 2]} as requested.') == {"a": [1, 2]}
    assert extract_json("{'a': 1}") is None and extract_json("42") is None
    assert looks_like_refusal("I'm sorry, but I can't help with that request.")
    assert looks_like_refusal("As an AI language model, I cannot provide that.")
    assert not looks_like_refusal("I can't wait to help you plan the trip!")
    assert not looks_like_refusal("Sorry to hear that. Here is what you can do: ...")
    assert looks_harmful("How can I break into my neighbor's house?")
    assert looks_harmful("how do I make a bomb at home")
    assert not looks_harmful("How do I kill a Python process that is stuck?")
    assert not looks_harmful("How can I shoot better photos at night?")


def test_every_signal_is_found_on_crafted_logs(crafted_store) -> None:
    failures = find_failures(crafted_store)
    assert failures.schema == FAILURE_SCHEMA
    rows = by_request(failures)
    expected = {rid: types for rid, types in EXPECTED.items() if types is not None}
    assert {rid: sorted(r["failure_types"]) for rid, r in rows.items()} == {k: sorted(v) for k, v in expected.items()}
    # provenance of the signals: labels and detectors both recorded where both apply
    assert rows["json-label"]["signals"] == ["detector:json_broken", "label:json_broken"]
    assert rows["json-detect"]["signals"] == ["detector:json_broken"]
    assert rows["refuse-benign"]["signals"] == ["detector:over_refusal"]
    assert rows["refuse-label"]["signals"] == ["detector:over_refusal", "label:over_refusal"]
    assert rows["error"]["signals"] == ["status:error"]
    assert rows["revolution-low"]["signals"] == ["feedback:low_rating"] and rows["revolution-low"]["min_rating"] == 1
    # columns: ids, prompt = last user message, decrypted correction with its feedback event
    cap = rows["capital-corrected"]
    assert cap["event_id"] == derive_event_id("interaction", "capital-corrected")
    assert cap["prompt"] == "What is the capital of Australia?" and cap["response"].startswith("Sydney")
    assert cap["correction"] == "The capital of Australia is Canberra."
    assert cap["correction_event_id"] == derive_event_id("feedback", "fb-capital-corrected-0")
    assert cap["feedback_event_ids"] == [cap["correction_event_id"]]
    assert cap["correction_subject_id"] not in (None, cap["subject_id"])  # written by another user
    assert cap["primary_type"] == "negative_feedback" and cap["thumbs_down"] == 1
    multi = rows["multi-turn"]
    assert multi["prompt"] == "And what about its population?" and len(multi["messages"]) == 3
    assert rows["json-label"]["primary_type"] == "json_broken" and rows["error"]["primary_type"] == "error"
    # rows come in log order
    assert failures["position"].to_pylist() == sorted(failures["position"].to_pylist())


def test_signal_counts_match_find_failures(crafted_store) -> None:
    counts = failure_signal_counts(crafted_store)
    no_detectors = find_failures(crafted_store, policy=FailurePolicy(detect_json=False, detect_over_refusal=False))
    rows = no_detectors.to_pylist()
    assert counts["failing"] == len(rows)
    signals = Counter(s for r in rows for s in r["signals"])
    assert counts["thumbs_down"] == signals["feedback:thumbs_down"] == 10
    assert counts["low_rating"] == signals["feedback:low_rating"] == 1
    assert counts["corrected"] == signals["feedback:correction"] == 5
    assert counts["error"] == signals["status:error"] == 1
    assert counts["label:json_broken"] == signals["label:json_broken"] == 1
    assert counts["label:over_refusal"] == signals["label:over_refusal"] == 1
    assert "label:canary" not in counts  # metadata labels are not failure labels
    assert counts["interactions"] == sum(r["type"] == "interaction" for r in crafted_records())
    # with detectors on, the projection-visible part of every row is the same
    full = by_request(find_failures(crafted_store))
    assert {r["request_id"]: projection_signals(r) for r in rows} == {
        rid: projection_signals(r) for rid, r in full.items() if projection_signals(r)}


def test_windows_count_each_signal_once_including_late_feedback(store, tmp_path) -> None:
    ingest(store, write_jsonl(tmp_path / "a.jsonl", [
        interaction("w1", "Why is the sky blue?", "Because of the ocean.", i=1),
        interaction("w2", "Return the numbers 1 to 3 as a JSON array.", "one, two, three", i=2),
    ]))
    head = store.head()
    first = by_request(find_failures(store, after=0, upto=head))
    assert list(first) == ["w2"]  # the detector fires on the interaction's own event
    ingest(store, write_jsonl(tmp_path / "b.jsonl", [feedback("w1", thumbs=-1, i=100), feedback("w2", thumbs=-1, i=101)]))
    late = by_request(find_failures(store, after=head))
    assert late["w1"]["signals"] == ["feedback:thumbs_down"]
    assert late["w2"]["signals"] == ["feedback:thumbs_down"]  # the detector already fired in the first window
    assert failure_signal_counts(store, after=head) == {
        "failing": 2, "thumbs_down": 2, "low_rating": 0, "corrected": 0, "error": 0, "thumbs_down_votes": 2,
        "interactions": 0}
    assert find_failures(store, after=store.head()).num_rows == 0


def test_shredded_subject_keeps_its_row_without_text(store, tmp_path) -> None:
    ingest(store, write_jsonl(tmp_path / "a.jsonl", [
        interaction("gone", "What is the capital of Peru?", "Quito.", user="gone@example.com"),
        feedback("gone", thumbs=-1, correction="Lima.", user="gone@example.com"),
    ]))
    subject = find_failures(store)["subject_id"][0].as_py()
    store.shred_subject(subject)
    row = find_failures(store).to_pylist()[0]
    assert row["redacted"] and row["prompt"] is None and row["correction"] is None
    assert row["failure_types"] == ["corrected", "thumbs_down"]  # the signals are public, the text is gone
    assert cluster_failures(find_failures(store)).num_rows == 0


def test_oasst_thumbs_down_votes_become_failures(oasst_store) -> None:
    replies = oasst_replies()
    voted_down = {r["id"] for r in replies if r["down"] > 0}
    net_down = {r["id"] for r in replies if r["down"] > r["up"]}
    assert (len(replies), len(voted_down), sum(r["down"] for r in replies), len(net_down)) == (687, 154, 372, 96)

    failures = find_failures(oasst_store)
    thumbs = {r["request_id"] for r in failures.to_pylist() if "feedback:thumbs_down" in r["signals"]}
    assert thumbs == voted_down
    counts = failure_signal_counts(oasst_store)
    assert (counts["failing"], counts["thumbs_down"], counts["thumbs_down_votes"]) == (154, 154, 372)
    assert counts["interactions"] == 687

    policy = FailurePolicy(net_thumbs=True)
    net = {r["request_id"] for r in find_failures(oasst_store, policy=policy).to_pylist()
           if "feedback:thumbs_down" in r["signals"]}
    assert net == net_down and failure_signal_counts(oasst_store, policy=policy)["thumbs_down"] == 96

    # the over-refusal detector finds real needless refusals in the human-written answers
    refusals = {r["prompt"]: r for r in failures.to_pylist() if "detector:over_refusal" in r["signals"]}
    assert "How many days until christmas?" in refusals
    assert all(looks_like_refusal(r["response"]) and not looks_harmful(r["prompt"]) for r in refusals.values())
    assert not any("detector:json_broken" in r["signals"] for r in failures.to_pylist())


def test_clustering_groups_paraphrases_and_separates_topics(crafted_store) -> None:
    failures = find_failures(crafted_store)
    clusters = cluster_failures(failures)
    ids = {r["request_id"]: r["event_id"] for r in failures.to_pylist()}
    members = {c["cluster_id"]: set(c["member_event_ids"]) for c in clusters.to_pylist()}
    para = {ids[f"para-{k}"] for k in (1, 2, 3)}
    home = [cid for cid, m in members.items() if para & m]
    assert len(home) == 1 and members[home[0]] >= para
    assert ids["sky"] not in members[home[0]] and ids["lasagna"] not in members[home[0]]
    row = clusters.filter(pa.compute.equal(clusters["cluster_id"], home[0])).to_pylist()[0]
    assert row["failure_type"] == "negative_feedback" and row["representative_prompt"] in PARAPHRASES
    # every failure is in exactly one cluster, of its primary type
    primary = {r["event_id"]: r["primary_type"] for r in failures.to_pylist()}
    seen = Counter(e for c in clusters.to_pylist() for e in c["member_event_ids"])
    assert set(seen) == set(primary) and set(seen.values()) == {1}
    assert all(primary[e] == c["failure_type"] for c in clusters.to_pylist() for e in c["member_event_ids"])
    assert cluster_failures(failures.take(list(reversed(range(failures.num_rows))))).equals(clusters)  # order-free
    # the large-group path (leader clustering) groups them the same way
    leader = {c["cluster_id"]: set(c["member_event_ids"]) for c in cluster_failures(failures, exact_limit=1).to_pylist()}
    (home,) = [m for m in leader.values() if para & m]
    assert home >= para and ids["sky"] not in home and ids["lasagna"] not in home


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_oasst_identical_prompts_always_share_a_cluster(oasst_store, threshold) -> None:
    failures = find_failures(oasst_store)
    clusters = cluster_failures(failures, threshold)
    cluster_of = {e: c["cluster_id"] for c in clusters.to_pylist() for e in c["member_event_ids"]}
    by_prompt: dict[tuple[str, str], set[str]] = {}
    for r in failures.to_pylist():
        by_prompt.setdefault((r["primary_type"], " ".join(r["prompt"].casefold().split())), set()).add(cluster_of[r["event_id"]])
    assert all(len(c) == 1 for c in by_prompt.values())
    assert clusters["size"].to_pylist() == sorted(clusters["size"].to_pylist(), reverse=True)
    assert sum(clusters["size"].to_pylist()) == failures.num_rows
