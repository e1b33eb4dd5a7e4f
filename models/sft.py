"""Supervised fine-tuning: TRL's SFTTrainer + a LoRA adapter on the base checkpoint, assistant-only loss.

    records = instruction_records("seed_tasks.jsonl") + schema_examples(200, seed=0)
    result = train_sft(SFTTrainingConfig(output_dir="var/checkpoints/sft"), "var/checkpoints/base/final",
                       records, on_log=lambda step, m: mlflow.log_metrics(m, step=step))
    result.output_dir   # .../sft/merged: LoRA merged into the weights, safetensors, + tokenizer

Data is conversational: `{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}`.
The tokenizer's chat template wraps each assistant turn (and its `<|end|>`) in `{% generation %}`, so
TRL builds an assistant mask and only assistant tokens carry loss; the model learns to answer and to
stop, not to imitate the prompt. `instruction_records` turns self-instruct style records
(instruction/instances[input, output]) into that shape; `schema_examples` makes deterministic
"Return a JSON object with keys ..." tasks with exact JSON answers, checked by `check_json_answer`.

After training the adapter is saved (adapter/, PEFT safetensors) and merged (`merge_and_unload`) into a
plain LlamaForCausalLM in merged/, which is what DPO and serving load. Trainer checkpoints are off:
transformers pickles optimizer/scheduler/RNG state in them, and these runs are minutes long.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.checkpoint import load_model, save_for_serving
from models.config import DPOTrainingConfig, OnLog, SFTTrainingConfig, TrainResult, peak_rss_mb
from models.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import Trainer, TrainerCallback
    from trl import SFTTrainer

ROLES = ("system", "user", "assistant")


def read_jsonl(path: str | Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a .jsonl or .jsonl.gz file."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e


def instruction_records(path: str | Path) -> list[dict[str, Any]]:
    """Self-instruct style records (instruction + instances of input/output) as conversations, one per instance."""
    out = []
    for lineno, rec in read_jsonl(path):
        instruction = (rec.get("instruction") or "").strip()
        instances = rec.get("instances") or []
        if not instruction or not instances:
            raise ValueError(f"{path}:{lineno}: record {rec.get('id')!r} lacks an instruction or instances")
        for inst in instances:
            answer = (inst.get("output") or "").strip()
            if not answer:
                continue  # an instance without an answer teaches nothing
            extra = (inst.get("input") or "").strip()
            prompt = f"{instruction}\n\n{extra}" if extra else instruction
            out.append(
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            )
    return out


_NAMES = ["Alice Martin", "Bob Chen", "Carla Diaz", "Dmitri Ivanov", "Emeka Obi", "Fatima Khan", "Greta Lund",
          "Hiro Tanaka", "Ines Costa", "Jonas Weber", "Kira Novak", "Liam Byrne", "Maya Patel", "Noor Haddad"]
_CITIES = [("Lyon", "France"), ("Porto", "Portugal"), ("Osaka", "Japan"), ("Cork", "Ireland"),
           ("Graz", "Austria"), ("Quito", "Ecuador"), ("Perth", "Australia"), ("Tartu", "Estonia"),
           ("Mombasa", "Kenya"), ("Calgary", "Canada"), ("Bergen", "Norway"), ("Cusco", "Peru")]
_PRODUCTS = ["kettle", "desk lamp", "backpack", "keyboard", "water bottle", "notebook", "umbrella", "headset"]
_BOOKS = [("Middlemarch", "George Eliot", 1871), ("Dracula", "Bram Stoker", 1897), ("Emma", "Jane Austen", 1815),
          ("Ulysses", "James Joyce", 1922), ("Walden", "Henry David Thoreau", 1854),
          ("Moby-Dick", "Herman Melville", 1851), ("The Trial", "Franz Kafka", 1925)]


def _schema_task(rng: random.Random) -> tuple[list[str], str, dict[str, Any]]:
    kind = rng.randrange(4)
    if kind == 0:
        name, age = rng.choice(_NAMES), rng.randint(18, 90)
        return ["name", "age"], rng.choice([f"{name} is {age} years old.", f"{name}, aged {age}."]), {
            "name": name, "age": age}
    if kind == 1:
        city, country = rng.choice(_CITIES)
        return ["city", "country"], f"{city} is a city in {country}.", {"city": city, "country": country}
    if kind == 2:
        product, price = rng.choice(_PRODUCTS), round(rng.uniform(3, 250), 2)
        return ["product", "price"], f"The {product} costs {price:.2f} dollars.", {
            "product": product, "price": price}
    title, author, year = rng.choice(_BOOKS)
    return ["title", "author", "year"], f"{title} was written by {author} in {year}.", {
        "title": title, "author": author, "year": year}


def schema_examples(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` deterministic JSON-output tasks: 'Return a JSON object with keys a and b for: ...' + exact answer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        keys, fact, answer = _schema_task(rng)
        key_list = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        prompt = f"Return a JSON object with keys {key_list} for: {fact}"
        out.append(
            {"messages": [{"role": "user", "content": prompt},
                          {"role": "assistant", "content": json.dumps(answer)}]}
        )
    return out


def check_json_answer(text: str, keys: Sequence[str]) -> bool | tuple[bool, str]:
    """True when `text` is one JSON object with exactly `keys`; else (False, reason)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return False, f"not JSON: {e.msg} at char {e.pos}"
    if not isinstance(value, dict):
        return False, f"JSON {type(value).__name__}, not an object"
    if set(value) != set(keys):
        return False, f"keys {sorted(value)} != expected {sorted(keys)}"
    return True


def validate_conversations(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep only `messages`; fail naming the record index when a conversation is malformed."""
    out = []
    for i, rec in enumerate(records):
        messages = rec.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"SFT record {i}: needs a non-empty 'messages' list, got keys {sorted(rec)}")
        for j, m in enumerate(messages):
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"SFT record {i} message {j}: needs role in {ROLES} and string content, got {m}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"SFT record {i}: no assistant turn, nothing to learn from")
        out.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
    if not out:
        raise ValueError("SFT needs at least one conversation")
    return out


def lora_config(config: SFTTrainingConfig | DPOTrainingConfig) -> LoraConfig:
    """The PEFT LoraConfig of a run's lora_* fields."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def use_bf16(precision: str) -> bool:
    """The Trainer's bf16 flag for `precision`. auto = bf16 on CUDA with bf16 only: on CPU (even with
    AVX512-BF16) bf16 autocast measured no gain for LoRA on the tiny model (0.98-1.06x per step; the
    adapter's many small matmuls are dominated by casts), so fp32 there (docs/training.md)."""
    import torch

    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: use 'auto', 'fp32' or 'bf16'")
    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def trainer_device_args(precision: str) -> dict[str, Any]:
    """TrainingArguments that differ between CPU and GPU, plus the ones TRL defaults unhelpfully here."""
    import torch

    return {
        "bf16": use_bf16(precision),
        "use_cpu": not torch.cuda.is_available(),
        "gradient_checkpointing": False,  # TRL turns it on by default; tiny models are compute-bound
        "report_to": "none",  # the caller logs through on_log
        "save_strategy": "no",  # trainer checkpoints pickle; see module docstring
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "lr_scheduler_type": "cosine",
        "optim": "adamw_torch",
    }


def metrics_recorder(on_log: OnLog | None) -> TrainerCallback:
    """A TrainerCallback that turns Trainer logs into our per-step history (`.history`) and calls `on_log`."""
    from transformers import TrainerCallback

    class MetricsRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.created = time.perf_counter()
            self.history: list[dict[str, float]] = []
            self.last_time = self.created
            self.last_tokens = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last_time = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not logs or "loss" not in logs:  # the closing summary (train_runtime, ...) is not a step
                return
            now = time.perf_counter()
            tokens = float(logs.get("num_tokens", self.last_tokens))
            metrics = {k.replace("/", "_"): float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            metrics["lr"] = float(logs.get("learning_rate", 0.0))
            # num_tokens counts non-padding tokens seen so far (TRL); per-log delta over wall time.
            metrics["tokens_per_s"] = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
            self.last_time, self.last_tokens = now, tokens
            self.history.append({"step": state.global_step, **metrics})
            if on_log is not None:
                on_log(state.global_step, metrics)

    return MetricsRecorder()


def _recorder(trainer: Trainer) -> Any:
    for cb in trainer.callback_handler.callbacks:
        if hasattr(cb, "history") and hasattr(cb, "created"):
            return cb
    raise ValueError("trainer has no metrics recorder: build it with sft_trainer() or dpo_trainer()")


def quiet(trainer: Trainer) -> Trainer:
    """Drop the Trainer's stdout printer: metrics go to on_log / the history instead."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def finish_lora_run(trainer: Trainer, output_dir: str | Path) -> TrainResult:
    """Save the adapter, merge it into the weights, save the merged model: the shared tail of SFT and DPO."""
    out = Path(output_dir)
    recorder = _recorder(trainer)
    trainer.model.save_pretrained(str(out / "adapter"), safe_serialization=True)
    merged = trainer.model.merge_and_unload()
    merged_dir = save_for_serving(merged, trainer.processing_class, out / "merged")
    history = recorder.history
    last = history[-1] if history else {}
    final = {k: v for k, v in last.items() if k != "step"}
    final["steps"] = float(trainer.state.global_step)
    final["examples_dropped"] = float(getattr(trainer, "examples_dropped", 0))
    return TrainResult(
        output_dir=str(merged_dir),
        history=history,
        final_metrics=final,
        wall_time_s=time.perf_counter() - recorder.created,
        tokens_seen=int(last.get("num_tokens", 0)),
        peak_rss_mb=peak_rss_mb(),
    )


def sft_trainer_class() -> type[SFTTrainer]:
    """TRL's SFTTrainer, with the plain full-logits loss where TRL's fused LM head has no Triton kernel (CPU)."""
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    class FlywheelSFTTrainer(SFTTrainer):
        """SFTTrainer whose CPU loss is logits + cross-entropy instead of TRL's chunked "fused LM head".

        TRL 1.16 computes the loss tile by tile through the LM head so the (batch, seq, vocab) logits are
        never materialised: a memory win on GPUs with Triton, and it is kept there. Without Triton it falls
        back to torch ops per tile plus entropy and top-1 bookkeeping, which measured 0.53-0.59x the
        throughput of a plain loop on the tiny model (benchmarks/bench_training.py); with a 4k vocabulary
        the full logits are small. Same normalisation as TRL (sum over label tokens / num_items_in_batch); logged
        metrics: num_tokens, mean_token_accuracy (entropy is not computed on this path).
        """

        fused_lm_head_on_cpu = False  # True: TRL's own loss everywhere (the benchmark measures both)

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            fused = self.fused_lm_head_on_cpu or self.args.device.type != "cpu"
            if fused or return_outputs or self.args.loss_type != "nll":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            labels = inputs["labels"][:, 1:]
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits[:, :-1]
            mask = labels != -100
            count = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
            ) / torch.as_tensor(count).clamp(min=1)
            with torch.no_grad():
                valid = int(mask.sum())
                correct = int(((logits.argmax(-1) == labels) & mask).sum())
            # The same bookkeeping TRL's compute_loss does, so logs carry num_tokens / accuracy as usual.
            self._metrics[mode]["mean_token_accuracy"].append(correct / valid if valid else 0.0)
            if mode == "train":
                self._total_train_tokens += int(inputs["attention_mask"].sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return FlywheelSFTTrainer


def sft_trainer(
    config: SFTTrainingConfig,
    base_model_dir: str | Path,
    records: Iterable[dict[str, Any]],
    on_log: OnLog | None = None,
) -> SFTTrainer:
    """The configured SFTTrainer (LoRA-wrapped model, tokenized data), ready for `.train()`."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig

    recorder = metrics_recorder(on_log)  # created first: its clock includes loading and tokenizing
    tokenizer = load_tokenizer(base_model_dir)
    model = load_model(base_model_dir)
    dataset = Dataset.from_list(validate_conversations(records))
    args = SFTConfig(
        output_dir=str(Path(config.output_dir) / "trainer"),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        max_length=config.max_length,
        assistant_only_loss=True,
        packing=False,
        **trainer_device_args(config.precision),
    )
    set_seed(config.seed)  # the LoRA init happens inside the trainer, before it seeds anything itself
    trainer = sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(config),
        callbacks=[recorder],
    )
    # TRL silently filters conversations whose prompt fills max_length (nothing left to learn); count them.
    trainer.examples_dropped = len(dataset) - len(trainer.train_dataset)
    return quiet(trainer)


def train_sft(
    config: SFTTrainingConfig,
    base_model_dir: str | Path,
    records: Iterable[dict[str, Any]],
    on_log: OnLog | None = None,
) -> TrainResult:
    """LoRA-SFT the model in `base_model_dir` (model + tokenizer) on conversations; returns the merged model."""
    trainer = sft_trainer(config, base_model_dir, records, on_log)
    trainer.train()
    return finish_lora_run(trainer, config.output_dir)
