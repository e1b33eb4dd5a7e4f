"""Evaluation harness and promotion gate speed on the project's tiny model shape.

    .venv/bin/python benchmarks/bench_eval.py            # default suites, median of 3 runs, peers
    .venv/bin/python benchmarks/bench_eval.py --quick    # default suites, 1 run, smaller peer slices

The model is a randomly initialised Llama of the project's "tiny" shape (d_model 128, 4 layers, 4 heads
of 32, 2 kv heads, SwiGLU 384, context 256, tied embeddings) with a 4096-token byte-level BPE trained here
on C4 + Gutenberg text (not on any eval set), saved with save_pretrained and evaluated from its directory,
as the promotion asset will. A random model never emits eos, so every generation runs to its budget:
the generative suites' figures are the worst case.

1. `evaluate` on the default sealed suites (EvalSetConfig.from_root defaults: 62 WikiText articles cut at
   4000 chars, 4 MMLU questions x 57 subjects, 100 exact-match, 100 safety, 50 JSON prompts):
   wall time, process CPU time and items/s per suite, with torch on 1 thread (the default; median of
   repeats) and on 2 threads. The machine is shared: CPU seconds are the steadier figure.
2. Peer, same process: the naive path, one item per forward pass / per `generate` call
   (batch_size=1), on the same slice of every suite, runs interleaved with the batched path; the ratio
   is batched items/s over naive items/s (medians).
3. `decide` on the resulting item tables (candidate = the random model's table with 30 exact-match
   items flipped to correct), 2000 paired bootstrap samples per gate; and the paired bootstrap CI alone
   against `scipy.stats.bootstrap(paired=True, method="percentile")` on the same data.

Writes benchmarks/results/bench_eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flywheel.gates import GatePolicy, bootstrap_ci, decide, metric_data
from models.evalsets import DEFAULT_SUITES, EvalSetConfig, generate_json_task, load_suites
from models.evaluation import evaluate

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SPECIAL = ["<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tokenizer_texts() -> list[str]:
    texts = []
    with open(DATA / "corpora" / "c4_demo.jsonl", encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for line in f if line.strip()]
    book = (DATA / "corpora" / "gutenberg" / "pg1342_pride_and_prejudice.txt").read_text(encoding="utf-8")
    texts += [book[i : i + 4000] for i in range(0, len(book), 4000)]
    texts += [r["prompt"] + " " + r["answer"] for r in generate_json_task(500, seed=1)]  # train split
    return texts


def build_model_dir(root: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=2, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(tokenizer_texts(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
        additional_special_tokens=SPECIAL[3:], model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )  # fmt: skip
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    path = root / "tiny"
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def per_suite(result: object) -> dict[str, dict]:
    return result.summary["suites"]  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 run instead of 3, smaller naive-path slices")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else 3
    naive_n = 16 if args.quick else 32
    if not (DATA / "evals" / "mmlu" / "test").is_dir():
        sys.exit(f"shared data not found at {DATA}: this benchmark reads the sealed sets from there")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        model_dir = build_model_dir(tmp_path)
        build_s = time.perf_counter() - t0
        cfg = EvalSetConfig.from_root(DATA)
        t0 = time.perf_counter()
        suites = load_suites(DEFAULT_SUITES, cfg, access_log=tmp_path / "access.jsonl", purpose="benchmark",
                             model_id="bench-tiny-random")
        load_s = time.perf_counter() - t0

        runs, cpu = [], []
        for _ in range(repeats):
            c0 = time.process_time()
            runs.append(evaluate(model_dir, None, suites, num_threads=1))
            cpu.append(time.process_time() - c0)
        walls = [r.wall_s for r in runs]
        median_run = runs[walls.index(statistics.median_low(walls))]
        c0 = time.process_time()
        two_threads = evaluate(model_dir, None, suites, num_threads=2)
        cpu_two = time.process_time() - c0
        assert all(r.items.equals(runs[0].items) for r in runs[1:]), "evaluation is not deterministic"

        # Naive peer: one item per forward / generate call, on the same `naive_n` items of each suite,
        # interleaved with the batched path so both see the same machine load.
        limits = {name: naive_n for name in suites}
        batched_runs, naive_runs = [], []
        for _ in range(repeats):
            batched_runs.append(evaluate(model_dir, None, suites, limits=limits, num_threads=1))
            naive_runs.append(evaluate(model_dir, None, suites, limits=limits, batch_size=1,
                                       generation_batch_size=1, num_threads=1))

        # Gate: candidate = champion with 30 more exact-match items right.
        champion = median_run.items
        values = champion.column("value").to_numpy(zero_copy_only=False).copy()
        em = np.flatnonzero(pc.equal(champion.column("suite"), "exact_match").to_numpy(zero_copy_only=False))
        values[em[:30]] = 1.0
        candidate = champion.set_column(champion.schema.get_field_index("value"), "value", pa.array(values))
        policy = GatePolicy(primary_metric="exact_match", min_gain=0.05, bootstrap_samples=2000, seed=0,
                            json_validity_floor=0.0)
        decision_times = []
        for _ in range(7):
            t0 = time.perf_counter()
            decision = decide(candidate, champion, policy)
            decision_times.append(time.perf_counter() - t0)
        gate_s = statistics.median(decision_times)

        # Bootstrap CI alone vs scipy's paired percentile bootstrap, on a 10,000-item paired sample.
        from scipy import stats

        rng = np.random.default_rng(0)
        champ_v = (rng.random(10_000) > 0.5).astype(float)
        cand_v = np.where(rng.random(10_000) < 0.2, 1.0, champ_v)
        big = [pa.table({
            "suite": ["exact_match"] * 10_000, "slice": ["all"] * 10_000,
            "item_id": [f"{i:05d}" for i in range(10_000)], "value": v,
            "tokens": pa.nulls(10_000, pa.int64()), "n_bytes": pa.nulls(10_000, pa.int64()),
            "prompt_sha256": [str(i) for i in range(10_000)],
        }) for v in (cand_v, champ_v)]  # fmt: skip
        a, b = metric_data(big[0], "exact_match"), metric_data(big[1], "exact_match")
        ours, theirs = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            ci = bootstrap_ci(a, b, samples=2000, seed=0)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = stats.bootstrap((cand_v, champ_v), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True,
                                  vectorized=True, n_resamples=2000, method="percentile",
                                  rng=np.random.default_rng(0))
            theirs.append(time.perf_counter() - t0)

    load_after = os.getloadavg()
    total_items = sum(f["n_items"] for f in per_suite(median_run).values())
    result: dict = {
        "quick": args.quick,
        "repeats": repeats,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "load_avg_before": round(load_before[0], 2),
        "load_avg_after": round(load_after[0], 2),
        "build_model_s": round(build_s, 3),
        "load_suites_s": round(load_s, 3),
        "eval_wall_s": round(median_run.wall_s, 3),
        "eval_wall_s_runs": [round(w, 3) for w in walls],
        "eval_cpu_s": round(statistics.median(cpu), 3),
        "eval_wall_s_2_threads": round(two_threads.wall_s, 3),
        "eval_cpu_s_2_threads": round(cpu_two, 3),
        "eval_items": total_items,
        "perplexity_tokens": int(pc.sum(pc.filter(median_run.items.column("tokens"), pc.equal(
            median_run.items.column("suite"), "perplexity"))).as_py()),
        "gate_decision_s": round(gate_s, 4),
        "gate_n_gates": len(decision.gates),
        "gate_promote": decision.promote,
        "bootstrap_ci_s": round(statistics.median(ours), 4),
        "scipy_bootstrap_ci_s": round(statistics.median(theirs), 4),
        "bootstrap_speedup_vs_scipy": round(statistics.median(theirs) / statistics.median(ours), 2),
        "bootstrap_ci": [round(ci[1], 5), round(ci[2], 5)],
        "scipy_bootstrap_ci": [round(float(ref.confidence_interval.low), 5),
                               round(float(ref.confidence_interval.high), 5)],
        "naive_slice_items": naive_n,
    }
    for name, facts in per_suite(median_run).items():
        result[f"{name}_items"] = facts["n_items"]
        result[f"{name}_wall_s"] = round(facts["wall_s"], 3)
        result[f"{name}_items_per_s"] = round(facts["items_per_s"], 2)
        result[f"{name}_items_per_s_2_threads"] = round(per_suite(two_threads)[name]["items_per_s"], 2)
        b_ips = statistics.median(per_suite(r)[name]["items_per_s"] for r in batched_runs)
        n_ips = statistics.median(per_suite(r)[name]["items_per_s"] for r in naive_runs)
        result[f"{name}_naive_items_per_s"] = round(n_ips, 2)
        result[f"{name}_batched_vs_naive"] = round(b_ips / n_ips, 2)

    print(f"evaluate: {total_items} items, wall {result['eval_wall_s']} s, cpu {result['eval_cpu_s']} s (median "
          f"of {repeats}, 1 thread; 2 threads: wall {result['eval_wall_s_2_threads']} s, cpu "
          f"{result['eval_cpu_s_2_threads']} s); load avg {result['load_avg_before']} -> "
          f"{result['load_avg_after']} on {result['machine']}")
    print(f"{'suite':<15}{'items':>7}{'wall s':>9}{'items/s':>10}{'2 thr':>9}{'naive/s':>10}{'batched/naive':>15}")
    for name in suites:
        print(f"{name:<15}{result[f'{name}_items']:>7}{result[f'{name}_wall_s']:>9.2f}"
              f"{result[f'{name}_items_per_s']:>10.1f}{result[f'{name}_items_per_s_2_threads']:>9.1f}"
              f"{result[f'{name}_naive_items_per_s']:>10.1f}{result[f'{name}_batched_vs_naive']:>14.1f}x")
    print(f"decide: {result['gate_decision_s'] * 1000:.1f} ms for {result['gate_n_gates']} gates "
          f"(2000 bootstrap samples each), promote={result['gate_promote']}")
    print(f"paired bootstrap CI, 10k items x 2000: ours {result['bootstrap_ci_s'] * 1000:.0f} ms "
          f"{result['bootstrap_ci']}, scipy {result['scipy_bootstrap_ci_s'] * 1000:.0f} ms "
          f"{result['scipy_bootstrap_ci']} ({result['bootstrap_speedup_vs_scipy']}x)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_eval.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
