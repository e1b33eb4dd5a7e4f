"""Pretraining: the size dial, loss falls on real text, every weight trains, checkpoints reload and resume exactly,
and nothing is ever unpickled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_model,
    restore_training_state,
    save_checkpoint,
    save_for_serving,
)
from models.config import LMConfig, PretrainConfig
from models.lm import SIZES, build_model, count_parameters, derived_dims
from models.pretrain import batch_rows, lr_at, pack_sequences, pretrain, tokenize_corpus
from models.tokenizer import load_tokenizer
from tests.models.conftest import one_torch_thread

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STEPS = 60


def _config(out: Path, **overrides: Any) -> PretrainConfig:
    base = {"output_dir": str(out), "max_steps": STEPS, "warmup_steps": 6, "learning_rate": 3e-3, "seq_len": 64,
            "batch_size": 8, "save_every": 30, "log_every": 1, "keep_last": 3, "seed": 0}
    return PretrainConfig(**(base | overrides))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any, wiki_texts: list[str]) -> dict[str, Any]:
    """One uninterrupted 60-step run on WikiText-2, with a checkpoint at step 30."""
    out = tmp_path_factory.mktemp("pretrain")
    logged: list[tuple[int, dict[str, float]]] = []
    with one_torch_thread():
        result = pretrain(_config(out), tokenizer, wiki_texts, on_log=lambda step, m: logged.append((step, m)))
    return {"out": out, "result": result, "logged": logged}


def test_size_dial_derives_a_gqa_llama(tokenizer: Any) -> None:
    for name, width in SIZES.items():
        dims = derived_dims(name)
        assert dims == derived_dims(width) and dims["d_model"] == width
        assert dims["n_heads"] * dims["head_dim"] == width
        assert 1 <= dims["n_kv_heads"] < dims["n_heads"] and dims["n_heads"] % dims["n_kv_heads"] == 0
        assert dims["ffn_dim"] % 64 == 0 and dims["ffn_dim"] >= 8 * width // 3
    assert derived_dims("small")["n_layers"] <= derived_dims("base")["n_layers"]
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        derived_dims("huge")
    a, b = build_model(LMConfig(seed=3), tokenizer), build_model(LMConfig(seed=3), tokenizer)
    c = build_model(LMConfig(seed=4), tokenizer)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert type(a).__name__ == "LlamaForCausalLM" and a.config.num_key_value_heads < a.config.num_attention_heads
    assert 1_000_000 < count_parameters(a) < 2_000_000


def test_packing_schedule_and_data_order_are_pure(tokenizer: Any, wiki_texts: list[str]) -> None:
    tokens = tokenize_corpus(wiki_texts[:50], tokenizer)
    assert tokens[0] == tokenizer.bos_token_id and tokens[-1] == tokenizer.eos_token_id
    assert (tokens == tokenizer.bos_token_id).sum() == 50
    blocks = pack_sequences(tokens, 64)
    assert blocks.shape == ((len(tokens) - 1) // 64, 65)
    assert np.array_equal(blocks[1, :-1], tokens[64:128]) and blocks[0, -1] == blocks[1, 0]
    cfg = _config(Path("unused"), batch_size=4)
    n = 10
    epoch0 = np.concatenate([batch_rows(s, 0, cfg, n) for s in range(3)])[:n]
    assert sorted(epoch0) == list(range(n))  # each epoch visits every block once
    assert np.array_equal(batch_rows(7, 0, cfg, n), batch_rows(7, 0, cfg, n))
    lrs = [lr_at(s, cfg) for s in range(cfg.max_steps)]
    assert lrs[0] == pytest.approx(cfg.learning_rate / cfg.warmup_steps)
    assert max(lrs) == pytest.approx(cfg.learning_rate) and lrs.index(max(lrs)) == cfg.warmup_steps - 1
    assert lrs[-1] == pytest.approx(cfg.learning_rate * cfg.min_lr_ratio, rel=0.01)
    assert all(a >= b for a, b in zip(lrs[cfg.warmup_steps:], lrs[cfg.warmup_steps + 1:]))


def test_loss_is_logged_and_falls_and_every_parameter_trains(run: dict[str, Any], tokenizer: Any) -> None:
    result = run["result"]
    assert [s for s, _ in run["logged"]] == list(range(1, STEPS + 1))
    assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen"):
        assert all(np.isfinite(h[key]) for h in result.history), key
    losses = [h["loss"] for h in result.history]
    assert losses[0] == pytest.approx(np.log(len(tokenizer)), abs=0.5)  # ~uniform over the vocab at init
    # 60 steps take it from uniform (ln 4096 = 8.3) to about unigram statistics (~7).
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.6, losses
    assert np.mean(losses[-10:]) < 7.4, losses
    assert result.tokens_seen == STEPS * 8 * 64 and result.peak_rss_mb > 0 and result.wall_time_s > 0
    assert result.final_metrics["loss"] == losses[-1]

    initial = build_model(LMConfig(seed=0), tokenizer)  # the run's init: same config, same seed
    trained = load_model(result.output_dir)
    before = dict(initial.named_parameters())
    for name, param in trained.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"


def test_final_and_checkpoints_reload_to_identical_logits(run: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    final = Path(run["result"].output_dir)
    assert {p.name for p in final.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert [p.name for p in list_checkpoints(run["out"])] == ["step_000030", "step_000060"]
    x = torch.randint(0, 4096, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = LlamaForCausalLM.from_pretrained(final, use_safetensors=True).eval()(x).logits
        b = load_model(latest_checkpoint(run["out"])).eval()(x).logits
    assert torch.equal(a, b)
    assert AutoTokenizer.from_pretrained(final)("a b")["input_ids"] == load_tokenizer(final)("a b")["input_ids"]
    # An in-memory model saved for serving comes back bit-identical.
    model = load_model(final).eval()
    with torch.no_grad():
        expected = model(x).logits
        again = load_model(save_for_serving(model, load_tokenizer(final), tmp_path / "copy")).eval()(x).logits
    assert torch.equal(expected, again)


def test_resume_from_mid_run_checkpoint_continues_the_same_curve(
    run: dict[str, Any], tmp_path: Path, tokenizer: Any, wiki_texts: list[str]
) -> None:
    mid = run["out"] / "checkpoints" / "step_000030"
    resumed = pretrain(_config(tmp_path, resume_from=str(mid)), tokenizer, wiki_texts)
    full = run["result"].history
    assert [h["step"] for h in resumed.history] == list(range(1, STEPS + 1))
    assert resumed.history[:30] == full[:30]  # carried over from the checkpoint
    for h_full, h_res in zip(full[30:], resumed.history[30:]):
        assert h_res["loss"] == pytest.approx(h_full["loss"], abs=1e-6), h_res["step"]
        assert h_res["grad_norm"] == pytest.approx(h_full["grad_norm"], rel=1e-5)
        assert h_res["lr"] == h_full["lr"]
    a, b = load_model(run["result"].output_dir), load_model(resumed.output_dir)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_resume_refuses_a_different_corpus_or_run_shape(run: dict[str, Any], tmp_path: Path, tokenizer: Any,
                                           wiki_texts: list[str]) -> None:
    mid = run["out"] / "checkpoints" / "step_000030"
    with pytest.raises(ValueError, match="trained on token stream"):
        pretrain(_config(tmp_path, resume_from=str(mid)), tokenizer, wiki_texts[:-5])
    with pytest.raises(ValueError, match="trained with batch_size=8, this config has batch_size=4"):
        pretrain(_config(tmp_path, resume_from=str(mid), batch_size=4), tokenizer, wiki_texts)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        pretrain(_config(tmp_path, resume_from=str(tmp_path / "nope")), tokenizer, wiki_texts)


def test_no_pickle_is_loaded_in_save_load_round_trips(
    no_pickle_loads: None, tmp_path: Path, tokenizer: Any, wiki_texts: list[str]
) -> None:
    # A full resumable cycle under the patch: train, checkpoint, resume, export, reload.
    cfg = _config(tmp_path, max_steps=4, save_every=2, warmup_steps=1)
    pretrain(cfg, tokenizer, wiki_texts[:200])
    resumed = pretrain(_config(tmp_path, max_steps=6, save_every=2, warmup_steps=1, resume_from="latest"),
                       tokenizer, wiki_texts[:200])
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    model = load_model(resumed.output_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(tmp_path / "direct", model, optimizer, {"step": 6})
    assert restore_training_state(ckpt, optimizer) == {"step": 6}
    load_tokenizer(resumed.output_dir)
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
