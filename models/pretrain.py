"""Next-token pretraining of the tiny LM on packed token sequences: a lean, resumable torch loop.

    from models.config import PretrainConfig
    from models.pretrain import pretrain
    result = pretrain(PretrainConfig(output_dir="var/checkpoints/base"), tokenizer, texts,
                      on_log=lambda step, m: print(step, m["loss"]))
    result.output_dir   # var/checkpoints/base/final: model + tokenizer, save_pretrained, safetensors

Recipe (nanoGPT/nanochat style): each document becomes `<|bos|> text <|end|>`, all are concatenated and
cut into blocks of seq_len + 1 tokens (inputs and next-token targets); AdamW with decoupled weight decay
on matrices and embeddings but never on norms/biases; linear warmup then cosine decay to
`min_lr_ratio` x peak; global gradient-norm clipping; bf16 autocast where the hardware has native bf16
(CUDA Ampere+, CPUs with AVX512-BF16/AMX: measured faster there, docs/training.md), fp32 otherwise.
Master weights and optimizer state stay fp32 either way.

Resumability: the batch of step k is a pure function of (seed, k) — each epoch is a seeded permutation
of the blocks — and the learning rate is a pure function of k, so a checkpoint needs only the weights,
the optimizer tensors, the RNG states and k (see models/checkpoint.py). Resuming from step k replays
the exact loss curve of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.checkpoint import (
    latest_checkpoint,
    load_model,
    prune_checkpoints,
    restore_training_state,
    save_checkpoint,
    save_for_serving,
    step_dir_name,
)
from models.config import OnLog, PretrainConfig, TrainResult, peak_rss_mb

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def tokenize_corpus(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, chunk: int = 1024) -> np.ndarray:
    """One token stream: `<|bos|> doc <|end|>` per non-empty text, in order (uint16 when the vocab fits)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    parts: list[np.ndarray] = []
    buffer: list[str] = []

    def flush() -> None:
        for ids in tokenizer(buffer, add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray([bos, *ids, eos], dtype=dtype))
        buffer.clear()

    for text in texts:
        if text and not text.isspace():
            buffer.append(text)
            if len(buffer) >= chunk:
                flush()
    if buffer:
        flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def pack_sequences(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Blocks of seq_len + 1 tokens at stride seq_len: block[:-1] are inputs, block[1:] the targets."""
    n = (len(tokens) - 1) // seq_len
    index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[index].astype(np.int64)


def batch_rows(step: int, micro: int, config: PretrainConfig, n_blocks: int) -> np.ndarray:
    """Block indices of micro-batch `micro` of step `step`: seeded per-epoch permutations, no state."""
    per_step = config.batch_size * config.grad_accum_steps
    first = step * per_step + micro * config.batch_size
    positions = np.arange(first, first + config.batch_size)
    epochs = positions // n_blocks
    rows = np.empty_like(positions)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([config.seed, int(epoch)]).permutation(n_blocks)
        where = epochs == epoch
        rows[where] = perm[positions[where] % n_blocks]
    return rows


def lr_at(step: int, config: PretrainConfig) -> float:
    """Learning rate of 0-based step `step`: linear warmup, then cosine down to min_lr_ratio x peak."""
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    span = max(config.max_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = peak * config.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: PreTrainedModel, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on >= 2-D tensors (linear weights, embeddings); none on 1-D ones (RMSNorm gains, biases)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied embeddings appear once
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU has bf16 dot-product instructions, so bf16 matmuls beat fp32 ones."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu has no public probe
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means plain fp32."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 where the hardware does bf16 natively. On CUDA that is Ampere and later; on CPU, AVX512-BF16 /
    # AMX, where bf16 autocast measured 1.0-1.16x (tiny) and ~1.4x (small) the fp32 tokens/s with the same
    # loss curve (docs/training.md). Without them bf16 is emulated and slower: fp32.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def _resume_dir(config: PretrainConfig) -> Path | None:
    if config.resume_from is None:
        return None
    if config.resume_from == "latest":
        return latest_checkpoint(config.output_dir)  # None: nothing to resume, start fresh
    path = Path(config.resume_from)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from={config.resume_from!r}: no such checkpoint directory")
    return path


def pretrain(
    config: PretrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    on_log: OnLog | None = None,
) -> TrainResult:
    """Pretrain (or resume pretraining) a model on `texts`; returns where the final model is and the curve."""
    import torch
    import torch.nn.functional as F

    from models.lm import build_model, count_parameters

    started = time.perf_counter()
    out = Path(config.output_dir)
    device = resolve_device(config.device)
    amp = autocast_dtype(config.precision, device)

    tokens = tokenize_corpus(texts, tokenizer)
    blocks = torch.from_numpy(pack_sequences(tokens, config.seq_len))
    if len(blocks) < config.batch_size:
        raise ValueError(
            f"corpus too small: {len(tokens)} tokens make {len(blocks)} blocks of {config.seq_len + 1}, "
            f"fewer than batch_size={config.batch_size}"
        )
    data_digest = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]

    resume = _resume_dir(config)
    model = load_model(resume, str(device)) if resume else build_model(config.lm_config(), tokenizer).to(device)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay),
        lr=config.learning_rate,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=device.type == "cuda",
    )
    start_step, tokens_seen, history = 0, 0, []
    if resume:
        state = restore_training_state(resume, optimizer)
        if state["data_digest"] != data_digest:
            raise ValueError(
                f"cannot resume from {resume}: it was trained on token stream {state['data_digest']}, this "
                f"run's is {data_digest} (different texts or tokenizer); resuming would not continue the run"
            )
        if state["param_names"] != names:
            raise ValueError(f"cannot resume from {resume}: its parameters differ from this model's")
        # These define the model and the data order; a resumed run that changed them is a different run.
        for key in ("size", "context_length", "seq_len", "batch_size", "grad_accum_steps", "seed"):
            if state["config"][key] != getattr(config, key):
                raise ValueError(
                    f"cannot resume from {resume}: it was trained with {key}={state['config'][key]!r}, "
                    f"this config has {key}={getattr(config, key)!r}"
                )
        start_step, tokens_seen, history = state["step"], state["tokens_seen"], state["history"]
    else:
        torch.manual_seed(config.seed)

    tokens_per_step = config.batch_size * config.grad_accum_steps * config.seq_len
    trainable = [p for p in model.parameters() if p.requires_grad]
    vocab = model.config.vocab_size
    model.train()

    def checkpoint(step: int) -> None:
        state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "history": history,
            "data_digest": data_digest,
            "param_names": names,
            "config": asdict(config),
        }
        save_checkpoint(out / "checkpoints" / step_dir_name(step), model, optimizer, state)
        prune_checkpoints(out, config.keep_last)

    for step in range(start_step, config.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(config.grad_accum_steps):
            batch = blocks[batch_rows(step, micro, config, len(blocks))].to(device, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(input_ids=inputs, use_cache=False).logits
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))
            (loss / config.grad_accum_steps).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        tokens_seen += tokens_per_step
        if done % config.log_every == 0 or done == config.max_steps:
            loss_value = (loss_sum / config.grad_accum_steps).item()  # the one host sync per logged step
            elapsed = time.perf_counter() - t0
            metrics = {
                "loss": loss_value,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_step / elapsed,
                "step_time_s": elapsed,
                "tokens_seen": float(tokens_seen),
            }
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"pretraining diverged at step {done}: loss={loss_value}")
            history.append({"step": done, **metrics})
            if on_log is not None:
                on_log(done, metrics)
        if config.save_every and done % config.save_every == 0 and done < config.max_steps:
            checkpoint(done)

    if start_step < config.max_steps or latest_checkpoint(out) is None:
        checkpoint(config.max_steps)
    final = save_for_serving(model, tokenizer, out / "final")
    wall = time.perf_counter() - started
    run = [h for h in history if h["step"] > start_step]
    final_metrics = {
        "loss": history[-1]["loss"] if history else float("nan"),
        "steps": float(config.max_steps),
        "parameters": float(count_parameters(model)),
        "tokens_per_s": float(np.median([h["tokens_per_s"] for h in run])) if run else 0.0,
        "precision_bf16": float(amp is not None),
    }
    return TrainResult(
        output_dir=str(final),
        history=history,
        final_metrics=final_metrics,
        wall_time_s=wall,
        tokens_seen=tokens_seen,
        peak_rss_mb=peak_rss_mb(),
    )
