"""Tokenizer: JSON-only round trip, exact byte-level coding, generation-masked chat template, audit + gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models.config import TokenizerConfig
from models.tokenizer import (
    audit_table,
    audit_tokenizer,
    check_inflation,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from tests.conftest import shared

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _domain_samples(wiki_texts: list[str]) -> dict[str, list[str]]:
    """Real text from four sources; the tokenizer under test saw only the first."""
    web = [json.loads(ln)["text"] for ln in shared("corpora/c4_demo.jsonl").read_text().splitlines()[:150]]
    book = shared("corpora/gutenberg/pg1342_pride_and_prejudice.txt").read_text(encoding="utf-8")
    speeches = [json.loads(ln)["text"] for ln in shared("corpora/speeches/inaugural.jsonl").read_text().splitlines()]
    return {
        "wiki": wiki_texts[-200:],
        "web": web,
        "books": [p for p in book[20000:120000].split("\n\n") if p.strip()],  # read_text() maps CRLF to \n
        "speeches": speeches[:10],
    }


def test_save_load_round_trip_is_json_only_and_exact(tokenizer: Any, tmp_path: Path) -> None:
    path = save_tokenizer(tokenizer, tmp_path / "tok")
    files = sorted(p.name for p in path.iterdir())
    assert files == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    loaded = load_tokenizer(path)
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|bos|>", "<|end|>", "<|pad|>")
    assert loaded.model_input_names == ["input_ids", "attention_mask"]
    assert len(loaded) == len(tokenizer) == 4096
    # Byte-level BPE: any string, any script, round-trips exactly; plain text starts with <|bos|>.
    text = "Zoë's café — 東京 🚀\ttabs\n\nand  double  spaces"
    ids = loaded(text)["input_ids"]
    assert ids[0] == loaded.bos_token_id
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids[1:]
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_chat_template_masks_exactly_the_assistant_turns(tokenizer: Any) -> None:
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green, of course."},
    ]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids[0] == tokenizer.bos_token_id
    trained = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(trained) == "Blue.<|end|>Green, of course.<|end|>"
    untrained = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert "Name a colour." in untrained and "Blue" not in untrained and "Green" not in untrained
    # TRL's own check: the end-of-turn token is trained, so the model learns to stop.
    assert is_chat_template_stop_token_trained(tokenizer)
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|system|>\nBe brief.<|end|><|user|>\nName a colour.<|end|><|assistant|>\n"
    with pytest.raises(Exception, match="unsupported chat role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_audit_figures_are_sane_on_real_domains(tokenizer: Any, wiki_texts: list[str]) -> None:
    rows = audit_tokenizer(tokenizer, _domain_samples(wiki_texts))
    by = {r["domain"]: r for r in rows}
    assert set(by) == {"wiki", "web", "books", "speeches"}
    for r in rows:
        assert r["roundtrip_errors"] == 0
        # English prose with a 4k vocab: ~3-4 bytes per token, 1.2-2 tokens per word.
        assert 0.2 < r["tokens_per_char"] < 0.5, r
        assert 2.0 < r["bytes_per_token"] < 5.0, r
        assert 1.0 < r["tokens_per_word"] < 2.5, r
        assert 0.0 < r["fallback_rate"] < 0.3, r
        assert r["partial_char_rate"] <= r["fallback_rate"]
        assert r["inflation"] is None
    # It was trained on wiki, so wiki text compresses better than web pages or 19th-century prose.
    assert by["wiki"]["tokens_per_char"] < min(by["web"]["tokens_per_char"], by["books"]["tokens_per_char"])
    assert by["books"]["n_texts"] > 100
    # Text in a script the merges never saw falls back to raw UTF-8 bytes.
    cjk = audit_tokenizer(tokenizer, {"cjk": ["東京は日本の首都です。大阪は大きい都市です。"]})[0]
    assert cjk["partial_char_rate"] > 0.9 and cjk["bytes_per_token"] == pytest.approx(1.0)
    table = audit_table(rows)
    assert table.num_rows == 4 and table.column("domain").to_pylist() == ["wiki", "web", "books", "speeches"]


def test_inflation_check_fails_on_a_worse_tokenizer_naming_the_domain(tokenizer: Any, wiki_texts: list[str]) -> None:
    samples = _domain_samples(wiki_texts)
    same = audit_tokenizer(tokenizer, samples, previous=tokenizer)
    assert all(r["inflation"] == pytest.approx(1.0) for r in same)
    assert check_inflation(same, max_inflation=1.10) is True

    worse = train_tokenizer(wiki_texts, TokenizerConfig(vocab_size=300))
    rows = audit_tokenizer(worse, samples, previous=tokenizer)
    for r in rows:
        assert r["inflation"] > 1.5 and r["prev_vocab_size"] == 4096 and r["vocab_size"] == 300
        assert r["fallback_rate"] > r["prev_fallback_rate"]
    verdict = check_inflation(rows, max_inflation=1.10)
    assert verdict[0] is False
    reason = verdict[1]
    web = next(r for r in rows if r["domain"] == "web")
    assert "domain 'web'" in reason and "domain 'wiki'" in reason
    assert f"{web['tokens_per_char']:.4f}" in reason and f"{web['inflation']:.3f}x" in reason and "1.100x" in reason
    assert audit_table(rows).column("inflation").to_pylist() == [r["inflation"] for r in rows]
