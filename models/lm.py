"""The tiny Llama-style language model, sized by one dial.

`llama_config(LMConfig(size="tiny"), tokenizer)` derives a `transformers.LlamaConfig` (RMSNorm, SwiGLU
MLP, RoPE, grouped-query attention) from a single width `d_model`; `build_model` instantiates it with a
seeded, deterministic initialisation. Because it is a stock `LlamaForCausalLM`, `save_pretrained`
output loads in transformers, TRL, PEFT and the serving code with no custom code.

    d_model   layers  heads (dim)  kv-heads  ffn    params (vocab 4096, tied)
    128       4       4 (32)       2         384    1.31M   "tiny": 300 steps of 8x128 tokens in ~1 min, 2 CPU cores
    256       4       4 (64)       2         704    4.00M   "small"
    512       8       8 (64)       4         1408   25.7M   "medium"
    768       12      12 (64)      3         2048   77.5M   "base"
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from models.config import LMConfig

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

SIZES: dict[str, int] = {"tiny": 128, "small": 256, "medium": 512, "base": 768}


def d_model_for(size: str | int) -> int:
    """The model width the size dial names: a preset name, or the width itself."""
    if isinstance(size, int) or str(size).isdigit():
        d = int(size)
    elif size in SIZES:
        d = SIZES[size]
    else:
        raise ValueError(f"unknown model size {size!r}: use one of {sorted(SIZES)} or a width like '384'")
    if d < 64 or d % 32:
        raise ValueError(f"model width {d} must be a multiple of 32 and at least 64")
    return d


def derived_dims(size: str | int) -> dict[str, int]:
    """Layers, heads, kv-heads and FFN width derived from the one width dial."""
    d = d_model_for(size)
    # Small widths get 32-dim heads so the tiny model still has 4 heads to group; from 256 on, the
    # usual 64.
    head_dim = 32 if d < 256 else 64
    n_heads = d // head_dim
    # Grouped-query attention: pairs of query heads share a key/value head while heads are few, groups
    # of four from 12 heads up (Llama-3 uses 8 kv heads for 32 query heads).
    n_kv_heads = n_heads // 2 if n_heads < 12 else n_heads // 4
    while n_heads % n_kv_heads:
        n_kv_heads -= 1
    # Depth grows with width (d/64, GPT-2-small-like aspect ratio), with a floor so tiny still has depth.
    n_layers = max(4, d // 64)
    # SwiGLU has three matrices, so 8/3 * d keeps the MLP's parameter count at the classic 4d FFN's;
    # rounded up to a multiple of 64 for matmul-friendly shapes.
    ffn = 64 * math.ceil(8 * d / 3 / 64)
    return {
        "d_model": d,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "ffn_dim": ffn,
    }


def llama_config(config: LMConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """A LlamaConfig for `config.size`, with vocabulary and special ids taken from the tokenizer."""
    from transformers import LlamaConfig

    dims = derived_dims(config.size)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims["d_model"],
        intermediate_size=dims["ffn_dim"],
        num_hidden_layers=dims["n_layers"],
        num_attention_heads=dims["n_heads"],
        num_key_value_heads=dims["n_kv_heads"],
        head_dim=dims["head_dim"],
        max_position_embeddings=config.context_length,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        # Tied input/output embeddings: at small widths the embedding is a large share of the weights.
        tie_word_embeddings=dims["d_model"] < 1024,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        use_cache=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(config: LMConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A freshly initialised model; the same config and seed give bit-identical weights."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = llama_config(config, tokenizer)
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
