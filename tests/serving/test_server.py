"""The TGI-protocol server, end to end: a real `python -m models.server` subprocess driven by the real
`text_generation` Client/AsyncClient (and httpx for raw HTTP), plus in-process tests of the batching engine
(KV cache vs full recompute, batched vs sequential greedy, swaps) and of the Python-level hooks."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import torch
from text_generation import AsyncClient, Client
from text_generation.errors import OverloadedError, ValidationError

from models.generation import Engine, InvalidRequest, SamplingParams, load_bundle
from models.server import Server, canary_bucket
from tests.serving.conftest import EOS_PROMPT, ServerProcess

PROMPTS = [
    "The cat sat",
    "In 1995 , the band released their second album",
    "Hello",
    "A long prompt that goes on and on about the history of the war in the north",
    "Robert",
    "x y z",
]
INTERACTION_KEYS = {
    "type", "request_id", "user_id", "session_id", "model_version", "timestamp", "messages", "response",
    "latency_ms", "prompt_tokens", "completion_tokens", "status",
}
FEEDBACK_KEYS = {"type", "feedback_id", "request_id", "user_id", "timestamp", "thumbs", "rating", "correction", "comment"}


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached within {timeout}s")


def metric(text: str, name: str) -> float:
    """Sum of all samples of `name` (any labels) in a Prometheus text page."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"metric {name} missing from /metrics"
    return total


# ------------------------------------------------------------------------------------------------------
# Engine, in-process


@pytest.fixture(scope="module")
def bundle(model_dir: Path):
    return load_bundle(model_dir, "v1")


def full_recompute_greedy(bundle, prompt: str, n: int) -> list[int]:
    """Reference decoder: no cache, the whole sequence re-run for every token."""
    ids = torch.tensor([bundle.tokenizer(prompt)["input_ids"]])
    out: list[int] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra OpenMP threads only spin on a shared 2-core box
    with torch.no_grad():
        for _ in range(n):
            nxt = bundle.model(ids, use_cache=False).logits[0, -1].argmax()
            out.append(int(nxt))
            if int(nxt) in bundle.eos_ids:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    torch.set_num_threads(threads)
    return out


def test_engine_kv_cache_greedy_equals_full_recompute(bundle) -> None:
    engine = Engine(bundle, max_batch_size=8).start()
    try:
        for prompt in PROMPTS[:4]:
            result = engine.generate(prompt, SamplingParams(max_new_tokens=12))
            assert [t.id for t in result.tokens] == full_recompute_greedy(bundle, prompt, 12), prompt
    finally:
        engine.stop()


def test_engine_batched_and_merged_greedy_equals_sequential(bundle) -> None:
    """Requests of different lengths arriving while others decode are merged into the running batch
    (left-padded caches); greedy output must be exactly what each gives alone."""
    lengths = [30, 8, 21, 17, 5, 26]
    engine = Engine(bundle, max_batch_size=8, max_wait_ms=0, step_delay_ms=2).start()
    try:
        alone = [engine.generate(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, lengths)]

        def staggered(i: int):
            time.sleep(0.012 * i)
            return engine.generate(PROMPTS[i], SamplingParams(max_new_tokens=lengths[i]))

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(staggered, range(len(PROMPTS))))
        assert [[t.id for t in r.tokens] for r in together] == [[t.id for t in r.tokens] for r in alone]
        assert [r.generated_text for r in together] == [r.generated_text for r in alone]
        assert engine.stats.max_batch_seen > 1  # the requests really shared batches
        assert engine.stats.prefill_batch_size.count > 1  # and joined at different steps (continuous)
    finally:
        engine.stop()


def test_engine_sampling_rules(bundle) -> None:
    engine = Engine(bundle).start()
    try:
        greedy = engine.generate("Hello", SamplingParams(max_new_tokens=10))
        top1 = engine.generate("Hello", SamplingParams(max_new_tokens=10, do_sample=True, top_k=1, seed=5))
        assert [t.id for t in top1.tokens] == [t.id for t in greedy.tokens]  # top_k=1 sampling is greedy
        assert top1.seed == 5 and greedy.seed is None
        zero_temp = engine.generate("Hello", SamplingParams(max_new_tokens=10, temperature=0.0))
        assert zero_temp.generated_text == greedy.generated_text and zero_temp.seed is None
        penalised = engine.generate("Hello", SamplingParams(max_new_tokens=30, repetition_penalty=5.0))
        plain = engine.generate("Hello", SamplingParams(max_new_tokens=30))
        assert len({t.id for t in penalised.tokens}) >= len({t.id for t in plain.tokens})
        assert penalised.generated_text != plain.generated_text
        with pytest.raises(InvalidRequest, match="top_p"):
            engine.prepare("Hello", SamplingParams(top_p=1.5))
        with pytest.raises(InvalidRequest, match="temperature"):
            engine.prepare("Hello", SamplingParams(temperature=-0.1))
        with pytest.raises(InvalidRequest, match="less than"):
            engine.prepare("word " * 1000, SamplingParams())
    finally:
        engine.stop()


def test_engine_swap_lets_inflight_finish_on_old_model(bundle, model_dir_v2: Path) -> None:
    engine = Engine(bundle, step_delay_ms=5).start()
    try:
        results: dict[str, object] = {}
        t = threading.Thread(target=lambda: results.setdefault(
            "old", engine.generate("Hello", SamplingParams(max_new_tokens=40))))
        t.start()
        wait_for(lambda: engine.stats.running == 1, what="request running")
        engine.swap(load_bundle(model_dir_v2, "v2"), timeout=60)
        t.join()
        assert results["old"].model_version == "v1" and results["old"].generated_tokens == 40
        assert engine.generate("Hello").model_version == "v2"
    finally:
        engine.stop()


# ------------------------------------------------------------------------------------------------------
# Python-level Server: hooks as plain callables, version_source polling


def test_server_hooks_and_version_source_in_process(model_dir: Path, model_dir_v2: Path) -> None:
    from fastapi.testclient import TestClient

    interactions: list[dict] = []
    feedback: list[dict] = []
    champion = {"found": None}
    server = Server(
        model_dir, model_version="v1", on_interaction=interactions.append, on_feedback=feedback.append,
        version_source=lambda: champion["found"], poll_interval_s=0.2,
    )
    with TestClient(server.app) as http:
        r = http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}},
                      headers={"X-User-Id": "u1", "X-Request-Id": "req-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-1"
        assert interactions[-1]["request_id"] == "req-1" and interactions[-1]["model_version"] == "v1"
        assert interactions[-1]["response"] == r.json()["generated_text"]
        http.post("/feedback", json={"request_id": "req-1", "thumbs": -1}, headers={"X-User-Id": "u1"})
        assert len(feedback) == 1 and set(feedback[0]) == FEEDBACK_KEYS
        assert {k: feedback[0][k] for k in ("type", "request_id", "user_id", "thumbs", "rating", "comment")} == {
            "type": "feedback", "request_id": "req-1", "user_id": "u1", "thumbs": -1, "rating": None, "comment": None}
        champion["found"] = ("v2", str(model_dir_v2))  # the registry names a new champion
        wait_for(lambda: http.get("/info").json()["model_version"] == "v2", what="reload to v2")
        http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}})
        assert interactions[-1]["model_version"] == "v2"


def test_failing_hooks_do_not_lose_answers_or_fake_feedback(model_dir: Path) -> None:
    from fastapi.testclient import TestClient

    def broken(record: dict) -> None:
        raise OSError(f"sink unavailable for {record['request_id']}")

    server = Server(model_dir, model_version="v1", on_interaction=broken, on_feedback=broken)
    with TestClient(server.app) as http:
        r = http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200 and r.json()["generated_text"]  # the answer survives the sink
        fb = http.post("/feedback", json={"request_id": r.headers["x-request-id"], "thumbs": 1})
        assert fb.status_code == 500 and "not recorded" in fb.json()["error"]  # never acknowledged
        assert metric(http.get("/metrics").text, "flywheel_hook_failures_total") == 2


# ------------------------------------------------------------------------------------------------------
# The real server process, the real TGI client


def test_generate_details_and_logprobs(server: ServerProcess) -> None:
    client = Client(server.url, timeout=60)
    r = client.generate("Hello", max_new_tokens=12, decoder_input_details=True, top_n_tokens=2)
    d = r.details
    assert d.finish_reason.value == "length" and d.generated_tokens == 12 == len(d.tokens)
    assert d.seed is None  # greedy
    assert all(t.logprob is not None and t.logprob <= 0 for t in d.tokens)
    assert "".join(t.text for t in d.tokens if not t.special) == r.generated_text
    assert len(d.prefill) == len(httpx.post(f"{server.url}/generate", json={
        "inputs": "Hello", "parameters": {"max_new_tokens": 1, "decoder_input_details": True, "details": True},
    }).json()["details"]["prefill"])
    assert d.prefill[0].logprob is None and all(p.logprob <= 0 for p in d.prefill[1:])
    assert len(d.top_tokens) == 12 and all(len(step) == 2 for step in d.top_tokens)
    # Greedy: the chosen token is the most likely one.
    assert all(step[0].id == tok.id for step, tok in zip(d.top_tokens, d.tokens))
    # /generate returns an object, / a list, both the same text.
    plain = httpx.post(f"{server.url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 12}}).json()
    assert plain == {"generated_text": r.generated_text}
    full = client.generate("Hello", max_new_tokens=12, return_full_text=True)
    assert full.generated_text == "Hello" + r.generated_text


def test_finish_reasons_eos_and_stop_sequence(server: ServerProcess) -> None:
    client = Client(server.url, timeout=60)
    eos = client.generate(EOS_PROMPT, max_new_tokens=20)
    assert eos.details.finish_reason.value == "eos_token"
    assert eos.details.tokens[-1].special and eos.details.generated_tokens <= 3
    assert "<|endoftext|>" not in eos.generated_text

    full = client.generate("Hello", max_new_tokens=20).generated_text
    stop = full[6:9]
    assert stop.strip(), f"pick another slice of {full!r}"
    r = client.generate("Hello", max_new_tokens=20, stop_sequences=[stop])
    assert r.details.finish_reason.value == "stop_sequence"
    assert stop in r.generated_text and full.startswith(r.generated_text)
    assert r.details.generated_tokens < 20


def test_seeded_sampling_is_reproducible(server: ServerProcess) -> None:
    client = Client(server.url, timeout=60)
    kw = {"max_new_tokens": 16, "do_sample": True, "temperature": 1.5, "top_p": 0.95, "top_k": 50}
    a = client.generate("The cat sat", seed=1234, **kw)
    b = client.generate("The cat sat", seed=1234, **kw)
    assert a.generated_text == b.generated_text and a.details.seed == 1234
    others = {client.generate("The cat sat", seed=s, **kw).generated_text for s in range(1, 6)}
    assert len(others) > 1  # different seeds draw different texts
    unseeded = client.generate("The cat sat", **kw)
    assert unseeded.details.seed is not None
    best = client.generate("The cat sat", best_of=2, **kw)
    assert len(best.details.best_of_sequences) == 1
    chosen = sum(t.logprob for t in best.details.tokens)
    other = sum(t.logprob for t in best.details.best_of_sequences[0].tokens)
    assert chosen >= other  # best_of returns the most likely draw


def test_generate_stream_token_by_token(server: ServerProcess) -> None:
    client = Client(server.url, timeout=60)
    events = list(client.generate_stream("The cat sat", max_new_tokens=15))
    assert [e.token for e in events] and len(events) == events[-1].details.generated_tokens
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    final = events[-1]
    assert final.generated_text == "".join(e.token.text for e in events if not e.token.special)
    assert final.generated_text == client.generate("The cat sat", max_new_tokens=15).generated_text

    async def async_stream() -> list:
        return [e async for e in AsyncClient(server.url, timeout=60).generate_stream("Hello", max_new_tokens=9)]

    aevents = asyncio.run(async_stream())
    assert len(aevents) == 9 and aevents[-1].details.finish_reason.value == "length"
    # Raw SSE on /generate_stream: one `data:` line per token.
    with httpx.stream("POST", f"{server.url}/generate_stream",
                      json={"inputs": "Hello", "parameters": {"max_new_tokens": 9}}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        datas = [json.loads(line[5:]) for line in resp.iter_lines() if line.startswith("data:")]
    assert [d["token"]["id"] for d in datas] == [e.token.id for e in aevents]


def test_chat_completions(server: ServerProcess) -> None:
    client = Client(server.url, timeout=60)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a cat?"}]
    done = client.chat(messages, max_tokens=10)
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert done.usage["completion_tokens"] <= 10 and done.usage["prompt_tokens"] > 5
    chunks = list(client.chat(messages, max_tokens=10, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    async def achat():
        return await AsyncClient(server.url, timeout=60).chat(messages, max_tokens=10)

    assert asyncio.run(achat()).choices[0].message.content == choice.message.content
    # The chat prompt is the tokenizer's chat template: same text via /generate gives the same answer.
    templated = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages) + "<|assistant|>"
    assert client.generate(templated, max_new_tokens=10).generated_text == choice.message.content
    with_lp = httpx.post(f"{server.url}/v1/chat/completions",
                         json={"messages": messages, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}).json()
    content = with_lp["choices"][0]["logprobs"]["content"]
    assert len(content) == with_lp["usage"]["completion_tokens"] and len(content[0]["top_logprobs"]) == 2


def test_validation_errors(server: ServerProcess) -> None:
    client = Client(server.url, timeout=60)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        client.generate("Hello", max_new_tokens=0)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        client.generate("Hello", max_new_tokens=1000)  # server limit is 64
    with pytest.raises(ValidationError, match="tokens"):
        client.generate("word " * 2000, max_new_tokens=5)
    with pytest.raises(ValidationError, match="stop"):
        client.generate("Hello", stop_sequences=["a", "b", "c", "d", "e"])
    with pytest.raises(ValidationError):
        list(client.generate_stream("Hello", max_new_tokens=0))
    with pytest.raises(ValidationError, match="`n`"):
        client.chat([{"role": "user", "content": "hi"}], n=2)
    # Parameters the Python client already refuses are checked by the server too.
    bad = [
        {"inputs": "", "parameters": {}},
        {"inputs": "Hello", "parameters": {"temperature": -1}},
        {"inputs": "Hello", "parameters": {"top_p": 1.5}},
        {"inputs": "Hello", "parameters": {"top_p": 0}},
        {"inputs": "Hello", "parameters": {"max_new_tokens": "many"}},
        {"parameters": {}},
    ]
    for body in bad:
        r = httpx.post(f"{server.url}/generate", json=body)
        assert r.status_code == 422, body
        assert r.json()["error_type"] == "validation" and r.json()["error"], body


def test_info_health_and_metrics(server: ServerProcess, model_dir: Path) -> None:
    info = httpx.get(f"{server.url}/info").json()
    assert info["model_version"] == "v1" and info["model_id"] == str(model_dir)
    assert len(info["model_sha"]) == 64 and info["max_total_tokens"] == 512
    assert info["max_input_tokens"] == info["max_input_length"] == 511 and info["max_new_tokens"] == 64
    assert info["batching"] is True and info["max_batch_size"] == 16
    assert httpx.get(f"{server.url}/health").status_code == 200
    Client(server.url).generate("Hello", max_new_tokens=3)
    text = server.metrics()
    for name in ("tgi_request_count", "tgi_request_success", "tgi_request_duration_count", "tgi_queue_size",
                 "tgi_batch_size_count", "tgi_request_generated_tokens_total", "tgi_batch_current_size"):
        assert metric(text, name) >= 0
    assert metric(text, "tgi_request_success") >= 1 and metric(text, "tgi_request_duration_count") >= 1
    assert 'tgi_request_duration_bucket{le="+Inf"}' in text


def test_concurrent_requests_are_batched_and_match_sequential(server: ServerProcess) -> None:
    lengths = [24, 10, 18, 6, 30, 12] * 2
    prompts = PROMPTS * 2
    client = AsyncClient(server.url, timeout=120)

    async def sequential() -> list[str]:
        return [(await client.generate(p, max_new_tokens=n)).generated_text for p, n in zip(prompts, lengths)]

    async def concurrent() -> list[str]:
        rs = await asyncio.gather(*(client.generate(p, max_new_tokens=n) for p, n in zip(prompts, lengths)))
        return [r.generated_text for r in rs]

    before = server.metrics()
    alone = asyncio.run(sequential())
    together = asyncio.run(concurrent())
    after = server.metrics()
    assert together == alone
    assert metric(after, "tgi_batch_max_size_seen") > 1
    # Some decode steps ran with more than one sequence: the histogram's count above le="1" grew.
    def above_one(text: str) -> float:
        return metric(text, "tgi_batch_size_count") - metric(text, 'tgi_batch_size_bucket{model_version="v1",le="1"}')
    assert above_one(after) > above_one(before)


def test_interaction_and_feedback_records(server: ServerProcess) -> None:
    hooks: Path = server.hooks_path  # type: ignore[attr-defined]
    rid = f"req-{uuid.uuid4()}"
    headers = {"X-Request-Id": rid, "X-User-Id": "user-42", "X-Session-Id": "sess-7"}
    resp = httpx.post(f"{server.url}/generate", headers=headers,
                      json={"inputs": "Hello", "parameters": {"max_new_tokens": 5, "details": True}})
    assert resp.headers["x-request-id"] == rid
    body = resp.json()
    rec = wait_for(lambda: [r for r in server.records(hooks) if r["request_id"] == rid], what="record")[0]
    assert set(rec) == INTERACTION_KEYS
    assert rec["type"] == "interaction" and rec["status"] == "ok"
    assert (rec["user_id"], rec["session_id"], rec["model_version"]) == ("user-42", "sess-7", "v1")
    assert rec["messages"] == [{"role": "user", "content": "Hello"}]
    assert rec["response"] == body["generated_text"] and rec["completion_tokens"] == 5
    assert rec["prompt_tokens"] > 0 and rec["latency_ms"] > 0
    assert datetime.fromisoformat(rec["timestamp"]).utcoffset() == UTC.utcoffset(None)

    # Client requests (no headers): a uuid4 request id is made up and echoed; defaults apply.
    chat = Client(server.url, headers={"X-User-Id": "user-9"}).chat([{"role": "user", "content": "hi"}], max_tokens=3)
    crec = wait_for(lambda: [r for r in server.records(hooks) if r["request_id"] == chat.id], what="chat record")[0]
    assert uuid.UUID(chat.id).version == 4
    assert crec["user_id"] == "user-9" and crec["session_id"] is None
    assert crec["messages"] == [{"role": "user", "content": "hi"}]
    assert crec["response"] == chat.choices[0].message.content

    # A refused request is logged too, as an error.
    bad = httpx.post(f"{server.url}/generate", headers={"X-Request-Id": rid + "-bad"},
                     json={"inputs": "Hello", "parameters": {"max_new_tokens": 0}})
    assert bad.status_code == 422 and bad.headers["x-request-id"] == rid + "-bad"
    erec = wait_for(lambda: [r for r in server.records(hooks) if r["request_id"] == rid + "-bad"], what="error")[0]
    assert set(erec) == INTERACTION_KEYS and erec["status"] == "error" and erec["response"] == ""

    fb = httpx.post(f"{server.url}/feedback", headers={"X-User-Id": "user-42"},
                    json={"request_id": rid, "thumbs": 1, "rating": 4, "correction": "Hi!", "comment": "ok"})
    assert fb.status_code == 200 and fb.json()["recorded"] is True
    frec = next(r for r in server.records(hooks) if r["type"] == "feedback" and r["request_id"] == rid)
    assert set(frec) == FEEDBACK_KEYS
    assert frec["feedback_id"] == fb.json()["feedback_id"] and uuid.UUID(frec["feedback_id"]).version == 4
    assert (frec["user_id"], frec["thumbs"], frec["rating"], frec["correction"], frec["comment"]) == (
        "user-42", 1, 4, "Hi!", "ok")
    for invalid in ({"request_id": rid, "rating": 6}, {"request_id": rid, "thumbs": 0}, {"request_id": rid},
                    {"thumbs": 1}):
        r = httpx.post(f"{server.url}/feedback", json=invalid)
        assert r.status_code == 422 and r.json()["error_type"] == "validation", invalid


# ------------------------------------------------------------------------------------------------------
# Overload and streaming pace: a slow server with a queue of one


def test_overload_raises_overloaded_error(slow_server: ServerProcess) -> None:
    client = AsyncClient(slow_server.url, timeout=60)

    async def burst() -> list:
        return await asyncio.gather(*(client.generate("Hello", max_new_tokens=8) for _ in range(6)),
                                    return_exceptions=True)

    outcomes = asyncio.run(burst())
    rejected = [o for o in outcomes if isinstance(o, OverloadedError)]
    served = [o for o in outcomes if not isinstance(o, BaseException)]
    assert rejected and served and len(rejected) + len(served) == 6, outcomes
    r = httpx.post(f"{slow_server.url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 200  # the burst is over: accepted again


def test_stream_tokens_arrive_while_generation_runs(slow_server: ServerProcess) -> None:
    stream = Client(slow_server.url, timeout=60).generate_stream("Hello", max_new_tokens=8)
    first = next(stream)
    assert first.details is None
    # The first token is in our hands while the server is still generating the rest.
    assert metric(slow_server.metrics(), "tgi_batch_current_size") == 1
    rest = list(stream)
    assert len(rest) == 7 and rest[-1].details.generated_tokens == 8


# ------------------------------------------------------------------------------------------------------
# Canary and reload: champion v1 + challenger v2, champion polled from a version file


def test_canary_routes_by_request_id(canary_server: ServerProcess) -> None:
    info = httpx.get(f"{canary_server.url}/info").json()
    assert info["canary"]["model_version"] == "v2" and info["canary"]["share"] == 0.5
    champion = info["model_version"]
    ids = [f"canary-{i}" for i in range(16)]
    texts = {}
    for rid in ids:
        texts[rid] = httpx.post(f"{canary_server.url}/generate", headers={"X-Request-Id": rid},
                                json={"inputs": "Hello", "parameters": {"max_new_tokens": 6}}).json()["generated_text"]
    records = {r["request_id"]: r for r in canary_server.records(canary_server.hooks_path)}  # type: ignore[attr-defined]
    expected = {rid: ("v2" if canary_bucket(rid) < 0.5 else champion) for rid in ids}
    assert {rid: records[rid]["model_version"] for rid in ids} == expected
    assert set(expected.values()) == {"v2", champion}  # both models answered
    by_model = {v: {texts[r] for r in ids if expected[r] == v} for v in set(expected.values())}
    assert all(len(t) == 1 for t in by_model.values()) and by_model["v2"] != by_model[champion]
    # The same request id always goes to the same model.
    again = httpx.post(f"{canary_server.url}/generate", headers={"X-Request-Id": ids[0]},
                       json={"inputs": "Hello", "parameters": {"max_new_tokens": 6}}).json()
    assert again["generated_text"] == texts[ids[0]]


def test_reload_switches_champion_version(canary_server: ServerProcess, model_dir_v2: Path) -> None:
    champion_ids = [rid for rid in (f"reload-{i}" for i in range(20)) if canary_bucket(rid) >= 0.5][:4]
    before = Client(canary_server.url, headers={"X-Request-Id": champion_ids.pop()}).generate(
        "The cat sat", max_new_tokens=8).generated_text
    vf: Path = canary_server.version_file  # type: ignore[attr-defined]
    vf.write_text(json.dumps({"model_version": "v3", "model_dir": str(model_dir_v2)}))
    wait_for(lambda: httpx.get(f"{canary_server.url}/info").json()["model_version"] == "v3", timeout=60,
             what="champion v3 served")
    for rid in champion_ids:
        r = httpx.post(f"{canary_server.url}/generate", headers={"X-Request-Id": rid},
                       json={"inputs": "The cat sat", "parameters": {"max_new_tokens": 8}})
        assert r.json()["generated_text"] != before  # v3 has other weights
    records = {r["request_id"]: r for r in canary_server.records(canary_server.hooks_path)}  # type: ignore[attr-defined]
    assert {records[rid]["model_version"] for rid in champion_ids} == {"v3"}
    assert metric(canary_server.metrics(), "flywheel_model_reloads_total") == 1
