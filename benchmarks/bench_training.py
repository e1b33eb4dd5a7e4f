"""Training-chain throughput: TRL SFTTrainer vs a plain torch loop, pretraining speed/precision, chain wall time.

    .venv/bin/python benchmarks/bench_training.py            # 300-step pretrain, 40-step SFT runs, x5
    .venv/bin/python benchmarks/bench_training.py --quick    # 60-step pretrain, 20-step SFT runs, x3

1. SFT throughput, side by side in one process, interleaved repeats: `models.sft.sft_trainer` (TRL
   SFTTrainer, assistant-only loss, per-step logging) vs a plain torch loop doing the same work: the
   same tiny base model, the SAME LoRA adapter (r=16 on all attention + MLP projections; base frozen),
   the same tokenized conversations (TRL's prepared dataset, labels -100 outside assistant turns), the
   same batch shape (every batch padded to exactly batch x max_length), AdamW + cosine warmup, grad
   clipping at 1.0, loss read back every step. Tokens/s counts padded positions (batch x max_length per
   step: identical work in both) over the median time between consecutive step ends (data loading,
   optimizer and logging included; one-off setup not; the median resists load bursts from other
   processes). The mean over the whole window and non-padding tokens/s are reported too.
   Also measured: the trainer with TRL's stock loss (its chunked "fused LM head", which `sft_trainer`
   replaces on CPU) and the trainer under bf16 autocast (the measurement behind SFT precision="auto").
2. Pretraining with the default tiny config (`PretrainConfig()`: size tiny, 8 x 128 tokens a step) in a
   fresh process: median tokens/s, wall time, peak RSS. And bf16 autocast vs fp32 on this CPU, two
   identical models trained in alternating steps on the same batches (full training and LoRA) - the
   measurement behind `precision="auto"`.
3. chain_wall_s: tokenizer -> pretrain -> SFT -> DPO on a small sample, in a fresh process.

OMP_WAIT_POLICY=PASSIVE is set (unless already set) before torch loads: with the default spinning
wait, two OpenMP threads on two cores shared with other processes collapse (measured 5.0 s/step vs
0.42 s at load 15; docs/training.md). Writes benchmarks/results/bench_training.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first `import torch`

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
DATA = (ROOT / ".." / "shared" / "data").resolve()


def wiki_texts() -> list[str]:
    path = DATA / "corpora" / "wikitext2" / "wiki.test.raw"
    if not path.is_file():
        raise SystemExit(f"benchmark data missing: {path} (see ../shared/data/README.md)")
    lines = path.read_text(encoding="utf-8").split("\n")
    return [ln.strip() for ln in lines if len(ln.strip()) > 40 and not ln.strip().startswith("=")]


def sft_records() -> list[dict[str, Any]]:
    from models.sft import instruction_records, schema_examples

    return (
        instruction_records(DATA / "sft" / "seed_tasks.jsonl")
        + instruction_records(DATA / "sft" / "user_oriented_instructions.jsonl")
        + schema_examples(200, seed=0)
    )


def hh_pairs(limit: int) -> list[dict[str, Any]]:
    from models.dpo import load_hh_pairs

    pairs, _ = load_hh_pairs(DATA / "preference" / "harmless-base-test.jsonl.gz", limit=limit)
    return pairs


def train_base_tokenizer(texts: list[str], records: list[dict[str, Any]]) -> Any:
    from models.config import TokenizerConfig
    from models.tokenizer import train_tokenizer

    chat = [m["content"] for r in records for m in r["messages"]]
    return train_tokenizer(texts + chat, TokenizerConfig(vocab_size=4096))


# ---------------------------------------------------------------------------------------------- 1. SFT


def median_step(ends: list[float]) -> float:
    """Median time between consecutive step ends: robust to bursts of load from other processes."""
    return statistics.median(b - a for a, b in pairwise(ends))


def trl_sft_run(base_dir: Path, records: list[dict[str, Any]], out: Path, steps: int, batch: int,
                length: int, stock_loss: bool = False, precision: str = "auto") -> dict[str, float]:
    from transformers import TrainerCallback

    from models.config import SFTTrainingConfig
    from models.sft import sft_trainer

    ends: list[float] = []
    real_tokens: list[int] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

    config = SFTTrainingConfig(output_dir=str(out), max_steps=steps, batch_size=batch, max_length=length,
                               learning_rate=1e-3, warmup_steps=2, precision=precision)
    trainer = sft_trainer(config, base_dir, records,
                          on_log=lambda step, m: real_tokens.append(int(m.get("num_tokens", 0))))
    # Fixed batch shape (batch x length) so both loops do identical work per step.
    trainer.data_collator.pad_to_multiple_of = length
    trainer.fused_lm_head_on_cpu = stock_loss
    trainer.add_callback(StepClock())
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    window = ends[-1] - ends[0]
    return {
        "tokens_per_s": batch * length / median_step(ends),
        "window_tokens_per_s": (steps - 1) * batch * length / window,
        "real_tokens_per_s": (real_tokens[-1] - real_tokens[0]) / window,
        "train_wall_s": wall,
        "rows": trainer.train_dataset,
    }


def plain_sft_run(base_dir: Path, rows: Any, pad_id: int, steps: int, batch: int, length: int,
                  seed: int = 0) -> dict[str, float]:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from peft import get_peft_model
    from transformers import get_cosine_schedule_with_warmup, set_seed

    from models.checkpoint import load_model
    from models.config import SFTTrainingConfig
    from models.sft import lora_config

    set_seed(seed)
    model = get_peft_model(load_model(base_dir), lora_config(SFTTrainingConfig(output_dir="unused")))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, 2, steps)
    ids = [list(r) for r in rows["input_ids"]]
    labels = [list(r) for r in rows["labels"]]
    order = np.random.default_rng(seed).permutation(len(ids))
    vocab = model.config.vocab_size
    ends: list[float] = []
    real = 0
    t0 = time.perf_counter()
    for step in range(steps):
        pick = [order[(step * batch + i) % len(order)] for i in range(batch)]
        x = torch.full((batch, length), pad_id, dtype=torch.long)
        y = torch.full((batch, length), -100, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        for row, k in enumerate(pick):
            n = len(ids[k])
            x[row, :n] = torch.tensor(ids[k])
            y[row, :n] = torch.tensor(labels[k])
            mask[row, :n] = 1
        logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), y[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the trainer reads the loss back every logged step too
        if step > 0:
            real += int(mask.sum())
        ends.append(time.perf_counter())
    window = ends[-1] - ends[0]
    return {
        "tokens_per_s": batch * length / median_step(ends),
        "window_tokens_per_s": (steps - 1) * batch * length / window,
        "real_tokens_per_s": real / window,
        "train_wall_s": time.perf_counter() - t0,
    }


def bench_sft(base_dir: Path, records: list[dict[str, Any]], pad_id: int, steps: int, repeats: int,
              batch: int, length: int, work: Path) -> dict[str, Any]:
    trl_runs, stock_runs, plain_runs, bf16_runs = [], [], [], []
    for i in range(repeats):  # interleaved, so machine noise hits all three alike
        t = trl_sft_run(base_dir, records, work / f"trl_{i}", steps, batch, length)
        rows = t.pop("rows")
        trl_runs.append(t)
        stock = trl_sft_run(base_dir, records, work / f"stock_{i}", steps, batch, length, stock_loss=True)
        stock.pop("rows")
        stock_runs.append(stock)
        plain_runs.append(plain_sft_run(base_dir, rows, pad_id, steps, batch, length))
        bf16 = trl_sft_run(base_dir, records, work / f"bf16_{i}", steps, batch, length, precision="bf16")
        bf16.pop("rows")
        bf16_runs.append(bf16)
        print(f"  sft repeat {i + 1}: TRL {t['tokens_per_s']:.0f} tok/s, TRL stock loss "
              f"{stock['tokens_per_s']:.0f}, plain {plain_runs[-1]['tokens_per_s']:.0f}, "
              f"TRL bf16 autocast {bf16['tokens_per_s']:.0f}")
    med = {f"{name}_{k}": statistics.median(r[k] for r in runs)
           for name, runs in (("sft", trl_runs), ("stock", stock_runs), ("plain", plain_runs), ("bf16", bf16_runs))
           for k in trl_runs[0]}
    ratios = [t["tokens_per_s"] / p["tokens_per_s"] for t, p in zip(trl_runs, plain_runs)]
    return {
        "sft_tokens_per_s": med["sft_tokens_per_s"],
        "plain_tokens_per_s": med["plain_tokens_per_s"],
        "sft_ratio_vs_plain": med["sft_tokens_per_s"] / med["plain_tokens_per_s"],
        "sft_ratio_vs_plain_per_repeat_median": statistics.median(ratios),
        "sft_stock_loss_tokens_per_s": med["stock_tokens_per_s"],
        "sft_stock_loss_ratio_vs_plain": med["stock_tokens_per_s"] / med["plain_tokens_per_s"],
        "sft_bf16_tokens_per_s": med["bf16_tokens_per_s"],
        "sft_bf16_speedup": med["bf16_tokens_per_s"] / med["sft_tokens_per_s"],
        "sft_window_tokens_per_s": med["sft_window_tokens_per_s"],
        "plain_window_tokens_per_s": med["plain_window_tokens_per_s"],
        "sft_real_tokens_per_s": med["sft_real_tokens_per_s"],
        "plain_real_tokens_per_s": med["plain_real_tokens_per_s"],
        "sft_train_wall_s": med["sft_train_wall_s"],
        "plain_train_wall_s": med["plain_train_wall_s"],
        "sft_steps": steps,
        "sft_batch": batch,
        "sft_max_length": length,
        "sft_repeats": repeats,
    }


# ----------------------------------------------------------------------------------------- 2. pretrain


def pretrain_job(tokenizer_dir: str, out: str, overrides: dict[str, Any]) -> dict[str, float]:
    """One pretraining run (meant for a fresh process: its peak RSS is the run's own)."""
    import statistics as st

    from models.config import PretrainConfig
    from models.pretrain import pretrain
    from models.tokenizer import load_tokenizer

    texts = wiki_texts()
    config = PretrainConfig(output_dir=out, **overrides)
    result = pretrain(config, load_tokenizer(tokenizer_dir), texts)
    steady = [h["tokens_per_s"] for h in result.history[5:]] or [h["tokens_per_s"] for h in result.history]
    return {
        "tokens_per_s": st.median(steady),
        "wall_s": result.wall_time_s,
        "peak_rss_mb": result.peak_rss_mb,
        "final_loss": result.final_metrics["loss"],
        "parameters": result.final_metrics["parameters"],
        "steps": config.max_steps,
        "threads": float(__import__("torch").get_num_threads()),
        "bf16": result.final_metrics["precision_bf16"],
    }


def in_fresh_process(fn: Any, *args: Any) -> Any:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def precision_ab(base_dir: Path, blocks: Any, steps: int, lora: bool) -> dict[str, float]:
    """fp32 vs bf16 autocast, alternating step by step on two identical models fed the same batches, so load
    from other processes hits both alike. Full training (pretraining) or LoRA (SFT); median step times."""
    import torch
    import torch.nn.functional as F
    from peft import get_peft_model
    from transformers import set_seed

    from models.checkpoint import load_model
    from models.config import PretrainConfig, SFTTrainingConfig
    from models.pretrain import param_groups
    from models.sft import lora_config

    runs = {}
    for precision in ("fp32", "bf16"):
        set_seed(0)
        model = load_model(base_dir)
        if lora:
            model = get_peft_model(model, lora_config(SFTTrainingConfig(output_dir="unused")))
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]
        else:
            groups = param_groups(model, PretrainConfig(output_dir="unused").weight_decay)
        model.train()
        runs[precision] = (model, torch.optim.AdamW(groups, lr=1e-3), [])
    vocab = runs["fp32"][0].config.vocab_size
    batch = 8
    for step in range(steps):
        rows = torch.from_numpy(blocks[(step * batch + torch.arange(batch).numpy()) % len(blocks)])
        x, y = rows[:, :-1], rows[:, 1:]
        for precision, (model, optimizer, times) in runs.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter() - t0)
    tokens = batch * (blocks.shape[1] - 1)
    fp32 = tokens / statistics.median(runs["fp32"][2][2:])
    bf16 = tokens / statistics.median(runs["bf16"][2][2:])
    return {"fp32": fp32, "bf16": bf16, "speedup": bf16 / fp32}


def bench_pretrain(tokenizer_dir: Path, base_dir: Path, steps: int, ab_steps: int, work: Path) -> dict[str, Any]:
    from models.checkpoint import save_for_serving
    from models.config import LMConfig
    from models.lm import build_model
    from models.pretrain import pack_sequences, tokenize_corpus
    from models.tokenizer import load_tokenizer

    default = in_fresh_process(pretrain_job, str(tokenizer_dir), str(work / "pt_default"),
                               {"max_steps": steps, "save_every": 0})
    print(f"  pretrain default tiny: {default['tokens_per_s']:.0f} tok/s, {default['wall_s']:.1f} s, "
          f"{default['peak_rss_mb']:.0f} MB")
    blocks = pack_sequences(tokenize_corpus(wiki_texts()[:3000], load_tokenizer(tokenizer_dir)), 128)
    full = precision_ab(base_dir, blocks, ab_steps, lora=False)
    lora = precision_ab(base_dir, blocks, ab_steps, lora=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    small_dir = save_for_serving(build_model(LMConfig(size="small"), tokenizer), tokenizer, work / "small")
    small = precision_ab(small_dir, blocks, max(ab_steps // 2, 10), lora=False)
    print(f"  bf16 autocast / fp32, step-interleaved: pretraining tiny {full['speedup']:.2f}x, "
          f"small {small['speedup']:.2f}x; LoRA tiny {lora['speedup']:.2f}x")
    return {
        "pretrain_tokens_per_s": default["tokens_per_s"],
        "pretrain_wall_s": default["wall_s"],
        "pretrain_steps": default["steps"],
        "pretrain_final_loss": default["final_loss"],
        "pretrain_parameters": default["parameters"],
        "pretrain_threads": default["threads"],
        "pretrain_auto_is_bf16": default["bf16"],
        "peak_rss_mb": default["peak_rss_mb"],
        "pretrain_fp32_tokens_per_s": full["fp32"],
        "pretrain_bf16_tokens_per_s": full["bf16"],
        "pretrain_bf16_speedup": full["speedup"],
        "pretrain_small_bf16_speedup": small["speedup"],
        "lora_fp32_tokens_per_s": lora["fp32"],
        "lora_bf16_tokens_per_s": lora["bf16"],
        "lora_bf16_speedup": lora["speedup"],
        "precision_ab_steps": ab_steps,
    }


# -------------------------------------------------------------------------------------------- 3. chain


def chain_job(out: str, pretrain_steps: int, sft_steps: int, dpo_steps: int) -> dict[str, float]:
    """tokenizer -> pretrain -> SFT -> DPO, timed end to end (data loading included)."""
    from models.config import DPOTrainingConfig, PretrainConfig, SFTTrainingConfig
    from models.dpo import train_dpo
    from models.pretrain import pretrain
    from models.sft import train_sft

    t0 = time.perf_counter()
    texts, records, pairs = wiki_texts(), sft_records(), hh_pairs(400)
    tokenizer = train_base_tokenizer(texts, records)
    t_tok = time.perf_counter()
    base = pretrain(PretrainConfig(output_dir=f"{out}/base", max_steps=pretrain_steps, save_every=0),
                    tokenizer, texts)
    sft = train_sft(SFTTrainingConfig(output_dir=f"{out}/sft", max_steps=sft_steps, max_length=256),
                    base.output_dir, records)
    dpo = train_dpo(DPOTrainingConfig(output_dir=f"{out}/dpo", max_steps=dpo_steps, max_length=256),
                    sft.output_dir, pairs)
    return {
        "chain_wall_s": time.perf_counter() - t0,
        "chain_tokenizer_s": t_tok - t0,
        "chain_pretrain_s": base.wall_time_s,
        "chain_sft_s": sft.wall_time_s,
        "chain_dpo_s": dpo.wall_time_s,
        "chain_peak_rss_mb": dpo.peak_rss_mb,
        "chain_pretrain_steps": pretrain_steps,
        "chain_sft_steps": sft_steps,
        "chain_dpo_steps": dpo_steps,
        "chain_dpo_final_loss": dpo.final_metrics.get("loss", float("nan")),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about 3 minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of each side-by-side measurement")
    args = parser.parse_args(argv)
    import torch

    repeats = args.repeats or (3 if args.quick else 5)
    sft_steps = 20 if args.quick else 40
    pretrain_steps = 60 if args.quick else 300
    ab_steps = 20 if args.quick else 60
    chain_steps = (60, 20, 10) if args.quick else (300, 60, 30)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()

    from models.checkpoint import save_for_serving
    from models.config import LMConfig
    from models.lm import build_model
    from models.tokenizer import save_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        work = Path(tmp)
        texts, records = wiki_texts(), sft_records()
        tokenizer = train_base_tokenizer(texts, records)
        tok_dir = save_tokenizer(tokenizer, work / "tokenizer")
        # Throughput does not depend on the weights: the SFT base is a freshly initialised tiny model.
        base_dir = save_for_serving(build_model(LMConfig(), tokenizer), tokenizer, work / "base")
        print("SFT: TRL SFTTrainer vs plain torch loop (same LoRA, data, batch shape, steps)")
        figures = bench_sft(base_dir, records, tokenizer.pad_token_id, sft_steps, repeats, 8, 128, work)
        print("pretraining: default tiny config; bf16 autocast vs fp32")
        figures |= bench_pretrain(tok_dir, base_dir, pretrain_steps, ab_steps, work)
        print("chain: tokenizer -> pretrain -> SFT -> DPO")
        figures |= in_fresh_process(chain_job, str(work / "chain"), *chain_steps)

    figures |= {
        "command": "python benchmarks/bench_training.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU"
        if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg()[0],
        "bench_wall_s": time.perf_counter() - started,
    }
    rows = [
        ("SFT TRL SFTTrainer (LoRA)", f"{figures['sft_tokens_per_s']:.0f} tok/s"),
        ("SFT plain torch loop (LoRA)", f"{figures['plain_tokens_per_s']:.0f} tok/s"),
        ("SFT ratio TRL / plain", f"{figures['sft_ratio_vs_plain']:.2f}x (target >= 0.8)"),
        ("SFT TRL stock fused-head loss", (f"{figures['sft_stock_loss_tokens_per_s']:.0f} tok/s, "
                                          f"{figures['sft_stock_loss_ratio_vs_plain']:.2f}x plain")),
        ("pretrain tiny default", (f"{figures['pretrain_tokens_per_s']:.0f} tok/s, "
                                   f"{figures['pretrain_steps']} steps in {figures['pretrain_wall_s']:.1f} s")),
        ("pretrain bf16 / fp32 (tiny, small)", (f"{figures['pretrain_bf16_speedup']:.2f}x, "
                                               f"{figures['pretrain_small_bf16_speedup']:.2f}x")),
        ("LoRA step bf16 / fp32", f"{figures['lora_bf16_speedup']:.2f}x"),
        ("SFT trainer bf16 / fp32", f"{figures['sft_bf16_speedup']:.2f}x"),
        ("pretrain peak RSS", f"{figures['peak_rss_mb']:.0f} MB"),
        ("chain wall (tok->pt->sft->dpo)", f"{figures['chain_wall_s']:.1f} s"),
    ]
    print(f"\nmedian of {repeats} repeats; load average {load_start:.1f} -> {figures['load_avg_end']:.1f}")
    for name, value in rows:
        print(f"  {name:<34} {value}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_training.json"
    out.write_text(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()},
                              indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return figures


if __name__ == "__main__":
    main()
