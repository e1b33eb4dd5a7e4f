"""Serving: the TGI-protocol server with dynamic/continuous batching against the same server with batching
off (batches of one), same model, same prompts, same run.

A random-init Llama (hidden 256, 4 layers, 8 heads / 4 KV heads, a 2,048-token byte-level BPE trained on
WikiText-2) is saved like a real checkpoint; two `python -m models.server` processes load it on loopback
ports: `--max-batch-size 32 --max-wait-ms 10` and `--no-batching`. This process drives them with the real
`text_generation.AsyncClient`: a fixed number of requests at concurrency 1, 8 and 32 (real user prompts
from OpenAssistant, greedy, fixed max_new_tokens), modes interleaved within each repeat so both see the
same background load. Reported: generated tokens/s, P50/P95 request latency, medians over repeats; the
speedup is the median of the per-repeat paired ratios. Every request loop is bounded and the servers are
stopped at the end.

    .venv/bin/python benchmarks/bench_serving.py           # 5 repeats; 8 / 32 / 128 requests at c1 / c8 / c32
    .venv/bin/python benchmarks/bench_serving.py --quick   # 3 repeats; 4 / 16 / 64 requests

Writes benchmarks/results/bench_serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = (ROOT / ".." / "shared" / "data").resolve()
WIKITEXT = DATA / "corpora" / "wikitext2" / "wiki.test.raw"
PROMPTS = DATA / "logs" / "oasst_prompt_lottery_en_250_text.jsonl"
OUT = ROOT / "benchmarks" / "results" / "bench_serving.json"
CONCURRENCY = (1, 8, 32)


def corpus_text() -> str:
    """Training text for the tokenizer: WikiText-2 when the shared data is there, the repo's docs if not."""
    if WIKITEXT.exists():
        return WIKITEXT.read_text(encoding="utf-8")[:1_000_000]
    return "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *ROOT.glob("docs/*.md")])


def load_prompts(n: int) -> list[str]:
    if PROMPTS.exists():
        lines = [json.loads(x) for x in PROMPTS.read_text(encoding="utf-8").splitlines() if x.strip()]
        prompts = [p[:300] for p in lines if isinstance(p, str) and p.strip()]
    else:
        prompts = [line[:300] for line in corpus_text().splitlines() if len(line) > 40]
    return [prompts[i % len(prompts)] for i in range(n)]


def build_model(out: Path) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         eos_token_id=fast.eos_token_id, bos_token_id=None, pad_token_id=fast.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters()), "vocab": len(fast)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "models.server", str(model_dir), "--port", str(port), "--log-level", "warning",
           "--max-queue", "512", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {url} exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"server {url} not healthy after {timeout}s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


async def load(url: str, prompts: list[str], concurrency: int, max_new_tokens: int) -> dict[str, float]:
    """Send every prompt once with at most `concurrency` in flight; bounded by len(prompts)."""
    from text_generation import AsyncClient

    client = AsyncClient(url, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(prompt: str) -> None:
        nonlocal tokens
        async with gate:
            t0 = time.perf_counter()
            r = await client.generate(prompt, max_new_tokens=max_new_tokens)
            latencies.append(time.perf_counter() - t0)
            tokens += r.details.generated_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"tokens_per_s": tokens / wall, "p50_ms": q[49] * 1000, "p95_ms": q[94] * 1000, "tokens": tokens,
            "wall_s": wall}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats and fewer requests")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 5
    scale = 1 if args.quick else 2
    n_requests = {1: 4 * scale, 8: 16 * scale, 32: 64 * scale}

    with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
        model_dir = Path(tmp) / "model"
        shape = build_model(model_dir)
        servers = {"batched": start_server(model_dir, "--max-batch-size", "32", "--max-wait-ms", "10"),
                   "unbatched": start_server(model_dir, "--no-batching")}
        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        try:
            for proc, url in servers.values():
                wait_healthy(proc, url)
            for _, url in servers.values():  # warm-up: first-call allocations, lazy imports
                asyncio.run(load(url, load_prompts(4), 4, 4))
            for rep in range(repeats):
                for c in CONCURRENCY:
                    prompts = load_prompts(n_requests[c])
                    for mode in (("batched", "unbatched") if rep % 2 == 0 else ("unbatched", "batched")):
                        res = asyncio.run(load(servers[mode][1], prompts, c, args.max_new_tokens))
                        runs.setdefault((mode, c), []).append(res)
                        print(f"  repeat {rep + 1}/{repeats} c={c:<2} {mode:<9} {res['tokens_per_s']:8.1f} tok/s "
                              f"p50 {res['p50_ms']:7.1f} ms  p95 {res['p95_ms']:7.1f} ms", flush=True)
        finally:
            for proc, _ in servers.values():
                stop_server(proc)

    def med(mode: str, c: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[(mode, c)])

    def speedup(c: int) -> float:
        pairs = zip(runs[("batched", c)], runs[("unbatched", c)])
        return statistics.median(b["tokens_per_s"] / u["tokens_per_s"] for b, u in pairs)

    out: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
        "model_params": shape["params"],
        "vocab": shape["vocab"],
        "max_new_tokens": args.max_new_tokens,
        "repeats": repeats,
        "tokens_per_s_c1": round(med("batched", 1, "tokens_per_s"), 1),
    }
    for c in CONCURRENCY:
        out[f"requests_c{c}"] = n_requests[c]
        for mode in ("batched", "unbatched"):
            suffix = "" if mode == "batched" else "_unbatched"
            out[f"tokens_per_s_c{c}_{mode}"] = round(med(mode, c, "tokens_per_s"), 1)
            out[f"p50_ms_c{c}{suffix}"] = round(med(mode, c, "p50_ms"), 1)
            out[f"p95_ms_c{c}{suffix}"] = round(med(mode, c, "p95_ms"), 1)
        out[f"batching_speedup_c{c}"] = round(speedup(c), 2)

    print(f"\nmedian of {repeats} repeats, max_new_tokens={args.max_new_tokens}, greedy, "
          f"{shape['params'] / 1e6:.1f}M-param Llama, {out['machine']}")
    print(f"{'conc':>4} | {'batched tok/s':>13} {'p50 ms':>8} {'p95 ms':>8} | {'unbatched tok/s':>15} "
          f"{'p50 ms':>8} {'p95 ms':>8} | speedup")
    for c in CONCURRENCY:
        print(f"{c:>4} | {out[f'tokens_per_s_c{c}_batched']:>13} {out[f'p50_ms_c{c}']:>8} {out[f'p95_ms_c{c}']:>8} | "
              f"{out[f'tokens_per_s_c{c}_unbatched']:>15} {out[f'p50_ms_c{c}_unbatched']:>8} "
              f"{out[f'p95_ms_c{c}_unbatched']:>8} | {out[f'batching_speedup_c{c}']:.2f}x")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return out


if __name__ == "__main__":
    main()
