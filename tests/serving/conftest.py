"""Fixtures for the serving tests: a tiny random Llama + a byte-level BPE tokenizer trained on WikiText-2,
saved like a real checkpoint, and a helper that runs `python -m models.server` as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, shared

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# The prompt the fixture model is rigged to answer with an end-of-sequence token (see build_model).
EOS_PROMPT = "The history of the"


def train_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE trained on the first ~300 KB of WikiText-2, saved as a PreTrainedTokenizerFast
    with a chat template (what models/tokenizer.py will produce, built independently here)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = shared("corpora/wikitext2/wiki.test.raw").read_text(encoding="utf-8")[:300_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


def build_model(
    out_dir: Path, tokenizer_dir: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2,
    heads: int = 4, kv_heads: int = 2, rig_eos: bool = True,
) -> Path:
    """A random-init LlamaForCausalLM saved with save_pretrained (safetensors) next to its tokenizer.

    Random weights are scaled up (initializer_range 0.3) so logits are well separated and greedy argmax
    is not decided by float noise. With `rig_eos`, the lm_head row of the EOS token becomes 1.05x the row of
    the token the model greedily emits 3rd after EOS_PROMPT, so EOS beats that token wherever it would
    win: that prompt ends with finish_reason "eos_token" within 3 tokens, deterministically.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        initializer_range=0.3, eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    if rig_eos:
        ids = torch.tensor([tok(EOS_PROMPT)["input_ids"]])
        with torch.no_grad():
            for _ in range(3):
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
            target = int(ids[0, -1])
            # 1.05x the winning token's row: EOS out-scores it wherever it wins with a positive logit.
            model.lm_head.weight[tok.eos_token_id] = model.lm_head.weight[target] * 1.05
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return build_model(tmp_path_factory.mktemp("model_v1"), tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def model_dir_v2(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return build_model(tmp_path_factory.mktemp("model_v2"), tokenizer_dir, seed=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m models.server MODEL_DIR ...` as a real subprocess on a free loopback port."""

    def __init__(self, model_dir: Path | None, *args: str, log_path: Path, command: list[str] | None = None) -> None:
        """`command` replaces `python -m models.server MODEL_DIR` (e.g. `flywheel serve`); `--port` is appended."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        base = command or [sys.executable, "-m", "models.server", str(model_dir)]
        cmd = [*base, "--port", str(self.port), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_healthy(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server on {self.url} not healthy after {timeout}s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def metrics(self) -> str:
        import httpx

        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def records(self, path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, model_dir_v2: Path
) -> Iterator[dict[str, ServerProcess]]:
    """The three servers the tests use, launched together so their (import-bound) startups overlap:

    - main: batching on, hooks logged to a JSONL file;
    - slow: batches of one, a queue of one and 100 ms per forward pass (overload, streaming pace);
    - canary: champion v1 + challenger v2 on half the traffic, champion polled from a version file.
    """
    tmp = tmp_path_factory.mktemp("servers")
    procs: dict[str, ServerProcess] = {}
    try:
        procs["main"] = ServerProcess(
            model_dir, "--model-version", "v1", "--max-batch-size", "16", "--max-wait-ms", "50",
            "--max-new-tokens", "64", "--hooks-jsonl", str(tmp / "main_hooks.jsonl"),
            log_path=tmp / "main.log",
        )
        procs["slow"] = ServerProcess(
            model_dir, "--max-batch-size", "1", "--max-queue", "1", "--max-wait-ms", "0",
            "--step-delay-ms", "100", log_path=tmp / "slow.log",
        )
        procs["canary"] = ServerProcess(
            model_dir, "--model-version", "v1", "--challenger", str(model_dir_v2), "--challenger-version", "v2",
            "--canary-share", "0.5", "--version-file", str(tmp / "champion.json"), "--poll-interval", "0.3",
            "--hooks-jsonl", str(tmp / "canary_hooks.jsonl"), log_path=tmp / "canary.log",
        )
        procs["main"].hooks_path = tmp / "main_hooks.jsonl"  # type: ignore[attr-defined]
        procs["canary"].hooks_path = tmp / "canary_hooks.jsonl"  # type: ignore[attr-defined]
        procs["canary"].version_file = tmp / "champion.json"  # type: ignore[attr-defined]
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="session")
def server(fleet: dict[str, ServerProcess]) -> ServerProcess:
    fleet["main"].wait_healthy()
    return fleet["main"]


@pytest.fixture(scope="session")
def slow_server(fleet: dict[str, ServerProcess]) -> ServerProcess:
    fleet["slow"].wait_healthy()
    return fleet["slow"]


@pytest.fixture(scope="session")
def canary_server(fleet: dict[str, ServerProcess]) -> ServerProcess:
    fleet["canary"].wait_healthy()
    return fleet["canary"]
