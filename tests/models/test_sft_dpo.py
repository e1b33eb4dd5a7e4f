"""SFT and DPO: real instruction and preference data, assistant-only loss, every LoRA weight trains, merged
models load for serving and match the adapter they came from."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from models.checkpoint import load_model
from models.config import DPOTrainingConfig, SFTTrainingConfig
from models.dpo import dpo_trainer, load_hh_pairs, parse_hh_dialogue, split_hh_pair
from models.sft import (
    check_json_answer,
    finish_lora_run,
    instruction_records,
    schema_examples,
    sft_trainer,
    validate_conversations,
)
from tests.conftest import shared

pytestmark = pytest.mark.usefixtures("torch_one_thread")

LORA = {"lora_r": 4, "lora_alpha": 8}


def _snapshot_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _short_pairs(tokenizer: Any, limit: int = 16) -> list[dict[str, Any]]:
    pairs, _ = load_hh_pairs(shared("preference/harmless-base-test.jsonl.gz"), limit=400)
    short = [
        p for p in pairs
        if len(tokenizer.apply_chat_template(p["prompt"] + p["chosen"], tokenize=True)) < 120
        and len(tokenizer.apply_chat_template(p["prompt"] + p["rejected"], tokenize=True)) < 120
    ]
    assert len(short) >= limit
    return short[:limit]


def test_instruction_records_become_conversations(tmp_path: Path) -> None:
    seed = instruction_records(shared("sft/seed_tasks.jsonl"))
    user = instruction_records(shared("sft/user_oriented_instructions.jsonl"))
    assert len(seed) >= 170 and len(user) >= 250
    first = json.loads(shared("sft/seed_tasks.jsonl").read_text().splitlines()[0])
    assert seed[0]["messages"] == [
        {"role": "user", "content": first["instruction"]},
        {"role": "assistant", "content": first["instances"][0]["output"]},
    ]
    with_input = next(r for r in user if "\n\n" in r["messages"][0]["content"])
    assert with_input["messages"][1]["role"] == "assistant"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "instances": [{"input": "", "output": "y"}]}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        instruction_records(bad)
    with pytest.raises(ValueError, match="SFT record 1 message 0"):
        validate_conversations(seed[:1] + [{"messages": [{"role": "robot", "content": "hi"}]}])


def test_schema_examples_are_deterministic_valid_json() -> None:
    a, b, c = schema_examples(40, seed=1), schema_examples(40, seed=1), schema_examples(40, seed=2)
    assert a == b and a != c
    for rec in a:
        prompt, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
        assert prompt.startswith("Return a JSON object with keys ")
        keys_part = prompt.removeprefix("Return a JSON object with keys ").split(" for: ")[0]
        keys = keys_part.replace(" and ", ", ").split(", ")
        assert check_json_answer(answer, keys) is True
    assert check_json_answer('{"name": "x"}', ["name", "age"])[0] is False
    assert "not JSON" in check_json_answer("name: x", ["name"])[1]


def test_sft_trains_every_lora_weight_on_assistant_tokens_and_merges(
    tmp_path: Path, base_model_dir: Path, sft_records: list[dict[str, Any]]
) -> None:
    logged: list[int] = []
    config = SFTTrainingConfig(output_dir=str(tmp_path), **LORA, max_steps=4, batch_size=4, max_length=128)
    trainer = sft_trainer(config, base_model_dir, sft_records[:40] + sft_records[-24:],
                          on_log=lambda step, m: logged.append(step))
    # Assistant-only loss: TRL labels exactly the assistant answer and its <|end|>; the prompt is -100.
    records = sft_records[:40] + sft_records[-24:]
    tok = trainer.processing_class
    # TRL drops conversations whose prompt alone fills max_length; we count them.
    assert len(trainer.train_dataset) + trainer.examples_dropped == len(records)
    for i in (0, 1, 2):
        row = trainer.train_dataset[i]
        trained = tok.decode([t for t in row["labels"] if t != -100])
        answer = records[i]["messages"][-1]["content"] + "<|end|>"
        assert trained and answer.startswith(trained), (trained, answer)  # a prefix when truncated
        assert row["labels"][: row["input_ids"].index(tok.convert_tokens_to_ids("<|assistant|>")) + 2] == [
            -100
        ] * (row["input_ids"].index(tok.convert_tokens_to_ids("<|assistant|>")) + 2)
    before = _snapshot_trainable(trainer.model)
    assert before and all("lora_" in n for n in before)
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if name in before:
            assert not torch.equal(param, before[name]), f"{name} did not change"
    x = torch.randint(0, 4096, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = trainer.model.eval()(input_ids=x).logits
    result = finish_lora_run(trainer, config.output_dir)
    assert logged == [1, 2, 3, 4] and [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert all(h["loss"] > 0 and h["tokens_per_s"] > 0 and "lr" in h for h in result.history)
    assert result.tokens_seen > 0 and result.final_metrics["steps"] == 4
    assert result.final_metrics["examples_dropped"] == trainer.examples_dropped
    merged = Path(result.output_dir)
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    with torch.no_grad():
        served = load_model(merged).eval()(input_ids=x).logits
    assert torch.allclose(served, adapted, atol=1e-4)  # merging changes the arithmetic, not the function
    assert "lora" not in json.dumps(json.loads((merged / "config.json").read_text()))


def test_cpu_loss_equals_trl_fused_lm_head_loss(
    tmp_path: Path, base_model_dir: Path, sft_records: list[dict[str, Any]]
) -> None:
    """Our CPU loss path (logits + cross-entropy) is the same number TRL's fused LM head computes."""
    config = SFTTrainingConfig(output_dir=str(tmp_path), max_steps=1, batch_size=4, max_length=128)
    trainer = sft_trainer(config, base_model_dir, sft_records[:8])
    batch = next(iter(trainer.get_train_dataloader()))
    n_items = (batch["labels"][:, 1:] != -100).sum()
    losses = {}
    for fused in (False, True):
        trainer.fused_lm_head_on_cpu = fused
        with torch.no_grad():
            losses[fused] = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n_items)
    assert losses[False].item() == pytest.approx(losses[True].item(), rel=1e-5)
    assert losses[False].item() > 0


def test_hh_rlhf_records_split_into_prompt_and_final_answers() -> None:
    path = shared("preference/harmless-base-test.jsonl.gz")
    pairs, dropped = load_hh_pairs(path, limit=300)
    assert len(pairs) == 300 and sum(dropped.values()) < 15
    with gzip.open(path, "rt") as f:
        raw = json.loads(f.readline())
    first = split_hh_pair(raw["chosen"], raw["rejected"])
    assert pairs[0] == first
    assert first["prompt"][-1]["role"] == "user" and first["chosen"][0]["role"] == "assistant"
    assert first["prompt"] == parse_hh_dialogue(raw["chosen"])[:-1]
    rebuilt = "".join(
        f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
        for m in first["prompt"] + first["chosen"]
    )
    assert rebuilt.split() == raw["chosen"].split()
    with pytest.raises(ValueError, match="identical"):
        split_hh_pair("\n\nHuman: hi\n\nAssistant: yo", "\n\nHuman: hi\n\nAssistant: yo")
    with pytest.raises(ValueError, match="do not share the prompt"):
        split_hh_pair("\n\nHuman: hi\n\nAssistant: yo", "\n\nHuman: hey\n\nAssistant: no")


def test_dpo_trains_every_lora_weight_against_the_adapter_free_reference(
    tmp_path: Path, sft_model_dir: Path, tokenizer: Any, no_pickle_loads: None
) -> None:
    from peft import PeftModel

    pairs = _short_pairs(tokenizer)  # pickle patched (fixture): loading SFT, training, merging, reloading
    config = DPOTrainingConfig(output_dir=str(tmp_path), **LORA, max_steps=3, batch_size=4, max_length=128,
                               learning_rate=5e-3)
    trainer = dpo_trainer(config, sft_model_dir, pairs)
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    before = _snapshot_trainable(trainer.model)
    assert before and all("lora_" in n for n in before)
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if name in before:
            assert not torch.equal(param, before[name]), f"{name} did not change"
    result = finish_lora_run(trainer, config.output_dir)
    assert [h["step"] for h in result.history] == [1, 2, 3]
    for h in result.history:
        assert h["loss"] > 0 and "rewards_margins" in h and "rewards_accuracies" in h
    # First step: policy == reference, so the DPO loss is exactly log 2.
    assert result.history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    sft, dpo = load_model(sft_model_dir), load_model(result.output_dir)
    changed = [n for (n, p), q in zip(sft.named_parameters(), dpo.parameters()) if not torch.equal(p, q)]
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)
