"""Fixtures for the training-chain tests: real text, a tokenizer and tiny models trained once per session.

Everything is trained from scratch on ../shared/data (skipped where absent); sizes are tiny so the
whole chain (tokenizer -> pretrain -> SFT -> DPO) fits in the default suite's time budget.

Training here runs on ONE torch thread. With two OpenMP threads on two shared cores (other test
processes running), each parallel region waits for a descheduled peer: measured 5.0 s/step vs 0.34 s
on one thread at load 15. The tiny model gains little from a second core, and one fixed thread count
also keeps the resumed-vs-uninterrupted comparison bit-exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import shared


@contextmanager
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """For test modules: `pytestmark = pytest.mark.usefixtures("torch_one_thread")`."""
    with one_torch_thread():
        yield


@pytest.fixture
def no_pickle_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any unpickling (pickle.load/loads/Unpickler, torch.load without weights_only=True) fail the test."""
    import pickle

    import torch

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle load attempted")

    real_torch_load = torch.load

    def torch_load(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("weights_only") is not True:
            raise AssertionError("torch.load without weights_only=True")
        return real_torch_load(*args, **kwargs)

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", torch_load)


@pytest.fixture(scope="session")
def wiki_texts() -> list[str]:
    """WikiText-2 test split, one paragraph per line (headings and blank lines dropped)."""
    lines = shared("corpora/wikitext2/wiki.test.raw").read_text(encoding="utf-8").split("\n")
    return [ln.strip() for ln in lines if len(ln.strip()) > 40 and not ln.strip().startswith("=")]


@pytest.fixture(scope="session")
def sft_records() -> list[dict[str, Any]]:
    from models.sft import instruction_records, schema_examples

    return (
        instruction_records(shared("sft/seed_tasks.jsonl"))
        + instruction_records(shared("sft/user_oriented_instructions.jsonl"))
        + schema_examples(64, seed=0)
    )


@pytest.fixture(scope="session")
def tokenizer(wiki_texts: list[str], sft_records: list[dict[str, Any]]) -> Any:
    from models.config import TokenizerConfig
    from models.tokenizer import train_tokenizer

    chat = [m["content"] for r in sft_records for m in r["messages"]]
    return train_tokenizer(wiki_texts + chat, TokenizerConfig(vocab_size=4096))


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any, wiki_texts: list[str]) -> Path:
    """A tiny base model, briefly pretrained (SFT and DPO tests start from it)."""
    from models.config import PretrainConfig
    from models.pretrain import pretrain

    out = tmp_path_factory.mktemp("base")
    config = PretrainConfig(output_dir=str(out), max_steps=20, warmup_steps=4, seq_len=64, batch_size=8,
                            save_every=0, log_every=5)
    with one_torch_thread():
        return Path(pretrain(config, tokenizer, wiki_texts[:400]).output_dir)


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path,
                  sft_records: list[dict[str, Any]]) -> Path:
    """The base model after a short LoRA SFT, adapter merged (DPO starts from it)."""
    from models.config import SFTTrainingConfig
    from models.sft import train_sft

    out = tmp_path_factory.mktemp("sft")
    config = SFTTrainingConfig(output_dir=str(out), max_steps=3, batch_size=4, max_length=128)
    with one_torch_thread():
        return Path(train_sft(config, base_model_dir, sft_records[:48]).output_dir)
