"""Configs in, results out: the plain dataclasses every training step of the chain shares.

Each config is a TRL-style dataclass whose fields carry `metadata={"help": ...}`, so
`transformers.HfArgumentParser` turns any of them into command-line flags and a Dagster asset can
build one from its run config. The training functions (`models.pretrain.pretrain`,
`models.sft.train_sft`, `models.dpo.train_dpo`) take one of these plus data and return a
`TrainResult`; nothing here imports torch.

Scaling to a GPU is a config change only: `device="auto"` picks CUDA when present and
`precision="auto"` then trains in bf16 autocast; raise `size`, `context_length`, `batch_size`.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# Special tokens of the byte-level BPE tokenizer. `<|end|>` is the eos token: it ends a pretraining
# document and every chat turn, so one stop token serves base and chat models alike.
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
CHAT_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# The per-step hook every training function accepts: on_log(step, {"loss": ..., "lr": ..., ...}),
# e.g. `lambda step, m: mlflow.log_metrics(m, step=step)`.
OnLog = Callable[[int, dict[str, float]], None]


@dataclass
class TokenizerConfig:
    """How the byte-level BPE tokenizer is trained, and the bound its audit enforces."""

    vocab_size: int = field(
        default=4096,
        metadata={"help": "Vocabulary size including the 256 byte tokens and the special tokens."},
    )
    min_frequency: int = field(
        default=2, metadata={"help": "A pair must occur at least this often to become a merge."}
    )
    max_inflation: float = field(
        default=1.10,
        metadata={
            "help": "Largest allowed ratio new/previous tokens-per-character in any audited domain; above it "
            "the tokenization audit fails (more tokens per character = less context, slower training)."
        },
    )


@dataclass
class LMConfig:
    """The tiny Llama-style model: one size dial, the rest derived (see `models.lm.llama_config`)."""

    size: str = field(
        default="tiny",
        metadata={
            "help": "The size dial: a preset name (tiny=128, small=256, medium=512, base=768) or a model width "
            "d_model as digits (e.g. '384'). Layers, heads, kv-heads and FFN width are derived from it."
        },
    )
    context_length: int = field(
        default=256, metadata={"help": "Maximum sequence length (RoPE positions) the model is built for."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the deterministic weight initialisation."})


@dataclass
class PretrainConfig:
    """Next-token pretraining on packed token sequences with a hand-written loop (see models/pretrain.py)."""

    output_dir: str = field(metadata={"help": "Directory for checkpoints/ and the final model in final/."})
    size: str = field(default="tiny", metadata={"help": LMConfig.__dataclass_fields__["size"].metadata["help"]})
    context_length: int = field(
        default=256, metadata={"help": "Maximum sequence length (RoPE positions) the model is built for."}
    )
    seq_len: int = field(
        default=128, metadata={"help": "Tokens per packed training sequence (<= model.context_length)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per micro-batch."})
    grad_accum_steps: int = field(
        default=1, metadata={"help": "Micro-batches accumulated into one optimizer step."}
    )
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps to train for."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate after warmup."})
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "Cosine schedule floor, as a fraction of the peak learning rate."}
    )
    warmup_steps: int = field(default=20, metadata={"help": "Linear warmup steps from 0 to the peak rate."})
    weight_decay: float = field(
        default=0.1,
        metadata={"help": "Decoupled (AdamW) weight decay on matrices and embeddings; never on norms/biases."},
    )
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this."})
    precision: str = field(
        default="auto",
        metadata={
            "help": "'auto' (bf16 autocast on CUDA with bf16 and on CPUs with AVX512-BF16/AMX, where it measured "
            "faster; fp32 elsewhere, see docs/training.md), 'fp32' or 'bf16' (autocast; master weights and "
            "optimizer stay fp32).",
            "choices": ["auto", "fp32", "bf16"],
        },
    )
    device: str = field(default="auto", metadata={"help": "'auto' (CUDA when available), 'cpu' or 'cuda'."})
    log_every: int = field(default=1, metadata={"help": "Record metrics (and call on_log) every N steps."})
    save_every: int = field(
        default=100, metadata={"help": "Write a resumable checkpoint every N steps (0 = only at the end)."}
    )
    keep_last: int = field(default=2, metadata={"help": "Resumable checkpoints kept on disk (oldest pruned)."})
    seed: int = field(
        default=0, metadata={"help": "Seed of the weight initialisation, the data order and torch's RNG."}
    )
    resume_from: str | None = field(
        default=None,
        metadata={"help": "A checkpoint directory to resume from, or 'latest' for the newest in output_dir."},
    )

    def __post_init__(self) -> None:
        if self.seq_len > self.context_length:
            raise ValueError(
                f"seq_len={self.seq_len} exceeds context_length={self.context_length}; "
                "raise context_length or lower seq_len"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r}: use 'auto', 'fp32' or 'bf16'")


    def lm_config(self) -> LMConfig:
        """The model this run builds (when not resuming)."""
        return LMConfig(size=self.size, context_length=self.context_length, seed=self.seed)


@dataclass
class SFTTrainingConfig:
    """Supervised fine-tuning with TRL's SFTTrainer + a LoRA adapter, assistant-only loss."""

    output_dir: str = field(metadata={"help": "Directory for adapter/ and the merged model in merged/."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layers that get an adapter (default: all attention and MLP projections)."},
    )
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Conversations per step."})
    max_length: int = field(default=256, metadata={"help": "Tokens per conversation (longer are truncated)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (LoRA takes high rates)."})
    warmup_steps: int = field(default=5, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the adapter."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    precision: str = field(
        default="auto",
        metadata={
            "help": "'auto' (bf16 on CUDA with bf16, fp32 on CPU: bf16 autocast measured no gain for LoRA on "
            "the tiny model, docs/training.md), 'fp32' or 'bf16'."
        },
    )
    logging_steps: int = field(default=1, metadata={"help": "Log (and call on_log) every N steps."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order and the adapter init."})


@dataclass
class DPOTrainingConfig:
    """Direct preference optimisation with TRL's DPOTrainer + LoRA; the reference is the adapter-off model."""

    output_dir: str = field(metadata={"help": "Directory for adapter/ and the merged model in merged/."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layers that get an adapter (default: all attention and MLP projections)."},
    )
    beta: float = field(default=0.1, metadata={"help": "DPO beta: strength of the KL tie to the reference."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "TRL DPO loss terms; ['sigmoid', 'sft'] adds the NLL of the chosen answer (RPO), which "
                          "keeps DPO from pushing down the likelihood of both answers of near-identical pairs."},
    )
    loss_weights: list[float] | None = field(default=None, metadata={"help": "Weights of `loss_type` terms."})
    max_steps: int = field(default=50, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=4, metadata={"help": "Preference pairs per step."})
    max_length: int = field(default=256, metadata={"help": "Tokens of prompt + completion (keep_start)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate."})
    warmup_steps: int = field(default=2, metadata={"help": "Linear warmup steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    precision: str = field(
        default="auto",
        metadata={
            "help": "'auto' (bf16 on CUDA with bf16, fp32 on CPU: bf16 autocast measured no gain for LoRA on "
            "the tiny model, docs/training.md), 'fp32' or 'bf16'."
        },
    )
    logging_steps: int = field(default=1, metadata={"help": "Log (and call on_log) every N steps."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order and the adapter init."})


@dataclass
class TrainResult:
    """What every training function returns: where the model is and how the run went."""

    output_dir: str  # the directory a transformers/TRL/serving `from_pretrained` loads
    history: list[dict[str, float]]  # per logged step: step, loss, lr, grad_norm, tokens_per_s, ...
    final_metrics: dict[str, float]
    wall_time_s: float
    tokens_seen: int
    peak_rss_mb: float  # the process's peak resident set size (ru_maxrss) at the end of the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
