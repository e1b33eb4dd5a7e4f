"""Direct preference optimisation: TRL's DPOTrainer + a LoRA adapter on the SFT model.

    pairs, dropped = load_hh_pairs("harmless-base-test.jsonl.gz", limit=500)
    result = train_dpo(DPOTrainingConfig(output_dir="var/checkpoints/dpo"), "var/checkpoints/sft/merged", pairs)
    result.output_dir   # .../dpo/merged: adapter merged, safetensors, + tokenizer

Pairs are `{"prompt", "chosen", "rejected"}`, either conversational (prompt = list of messages ending
with a user turn, chosen/rejected = [one assistant message]) or plain strings. The reference policy is
the model with the adapter switched off (`ref_model=None` + a PEFT config), so no second copy of the
weights is held in memory.

hh-rlhf records hold two whole dialogues, `"\\n\\nHuman: ...\\n\\nAssistant: ..."`, that share every
turn but the last; `split_hh_pair` parses both, checks that they share the prompt, and returns the
prompt turns plus the two final assistant turns. Records that cannot be split (the prompts differ, the
final turn is not the assistant's, the answers are empty or identical) are counted by reason, never
silently dropped.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.checkpoint import load_model
from models.config import DPOTrainingConfig, OnLog, TrainResult
from models.sft import finish_lora_run, lora_config, metrics_recorder, quiet, read_jsonl, trainer_device_args
from models.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from trl import DPOTrainer

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """`"\\n\\nHuman: a\\n\\nAssistant: b"` -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError(f"text before the first turn marker: {parts[0][:60]!r}")
    return [
        {"role": _HH_ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])
    ]


def split_hh_pair(chosen: str, rejected: str) -> dict[str, Any]:
    """The shared prompt turns and the two final assistant turns of an hh-rlhf record (ValueError: why not)."""
    c, r = parse_hh_dialogue(chosen), parse_hh_dialogue(rejected)
    if not c or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise ValueError("final turn is not the assistant's")
    prompt = c[:-1]
    if prompt != r[:-1]:
        raise ValueError("chosen and rejected do not share the prompt turns")
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("prompt does not end with a human turn")
    if not c[-1]["content"] or not r[-1]["content"]:
        raise ValueError("empty final answer")
    if c[-1]["content"] == r[-1]["content"]:
        raise ValueError("chosen and rejected answers are identical")
    return {"prompt": prompt, "chosen": [c[-1]], "rejected": [r[-1]]}


def load_hh_pairs(path: str | Path, limit: int | None = None) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Up to `limit` preference pairs from an hh-rlhf .jsonl(.gz), and the count of records dropped per reason."""
    pairs: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    for lineno, rec in read_jsonl(path):
        if limit is not None and len(pairs) >= limit:
            break
        if not isinstance(rec.get("chosen"), str) or not isinstance(rec.get("rejected"), str):
            raise TypeError(f"{path}:{lineno}: needs string 'chosen' and 'rejected' fields")
        try:
            pairs.append(split_hh_pair(rec["chosen"], rec["rejected"]))
        except ValueError as e:
            dropped[str(e)] += 1
    return pairs, dropped


def validate_pairs(pairs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep prompt/chosen/rejected; fail naming the pair index when one is missing or of mixed kinds."""
    out = []
    for i, p in enumerate(pairs):
        missing = {"prompt", "chosen", "rejected"} - set(p)
        if missing:
            raise ValueError(f"preference pair {i}: missing {sorted(missing)}")
        kinds = {type(p[k]).__name__ for k in ("prompt", "chosen", "rejected")}
        if len(kinds) != 1 or kinds - {"str", "list"}:
            raise ValueError(f"preference pair {i}: prompt/chosen/rejected must all be strings or all message lists")
        out.append({k: p[k] for k in ("prompt", "chosen", "rejected")})
    if not out:
        raise ValueError("DPO needs at least one preference pair")
    return out


def dpo_trainer(
    config: DPOTrainingConfig,
    sft_model_dir: str | Path,
    pairs: Iterable[dict[str, Any]],
    on_log: OnLog | None = None,
) -> DPOTrainer:
    """The configured DPOTrainer (LoRA-wrapped SFT model, tokenized pairs), ready for `.train()`."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    recorder = metrics_recorder(on_log)
    tokenizer = load_tokenizer(sft_model_dir)
    model = load_model(sft_model_dir)
    dataset = Dataset.from_list(validate_pairs(pairs))
    args = DPOConfig(
        output_dir=str(Path(config.output_dir) / "trainer"),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        beta=config.beta,
        loss_type=list(config.loss_type),
        loss_weights=list(config.loss_weights) if config.loss_weights else None,
        max_length=config.max_length,
        **trainer_device_args(config.precision),
    )
    set_seed(config.seed)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,  # with a PEFT adapter, the reference is the same model with the adapter disabled
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(config),
        callbacks=[recorder],
    )
    # TRL filters pairs whose prompt fills max_length (nothing left to compare); count them.
    trainer.examples_dropped = len(dataset) - len(trainer.train_dataset)
    if len(trainer.train_dataset) == 0:
        raise ValueError(
            f"every preference pair's prompt fills max_length={config.max_length} tokens; raise max_length"
        )
    return quiet(trainer)


def train_dpo(
    config: DPOTrainingConfig,
    sft_model_dir: str | Path,
    pairs: Iterable[dict[str, Any]],
    on_log: OnLog | None = None,
) -> TrainResult:
    """LoRA-DPO the model in `sft_model_dir` against its adapter-off self; returns the merged model."""
    trainer = dpo_trainer(config, sft_model_dir, pairs, on_log)
    trainer.train()
    return finish_lora_run(trainer, config.output_dir)
