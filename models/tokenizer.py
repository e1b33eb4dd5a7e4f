"""Byte-level BPE tokenizer with a chat template, and the tokenization audit that gates a new version.

    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=4096))
    save_tokenizer(tok, "var/checkpoints/tokenizer")       # tokenizer.json + tokenizer_config.json
    tok = load_tokenizer("var/checkpoints/tokenizer")      # a transformers.PreTrainedTokenizerFast
    rows = audit_tokenizer(tok, {"wiki": wiki_texts, "web": c4_texts}, previous=old_tok)
    check_inflation(rows, max_inflation=1.10)              # True or (False, "domain 'web': ...")

Byte-level BPE (GPT-2 style) starts from the 256 byte values, so every string encodes and decodes back
exactly; there is no unknown token. Special tokens: `<|bos|>` (start of document/conversation),
`<|end|>` (the eos: ends a document and every chat turn), `<|pad|>`, and the role markers `<|system|>`,
`<|user|>`, `<|assistant|>`.

Audit metrics per domain, on the sample texts given for it:
- tokens_per_char, tokens_per_word (whitespace words), bytes_per_token (UTF-8 bytes per token);
- fallback_rate: the share of tokens that are a single byte. Byte-level BPE has no UNK, so text the
  merges did not cover shows up as single-byte tokens; the rate is an upper bound on "uncovered text"
  because a lone punctuation mark or digit is a single byte too;
- partial_char_rate: single-byte tokens that are not a whole character (a byte >= 0x80, i.e. a
  fragment of a multi-byte UTF-8 character): pure fallback, e.g. for scripts the merges never saw;
- with a previous tokenizer: prev_tokens_per_char and inflation = tokens_per_char / prev_tokens_per_char.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.config import BOS_TOKEN, CHAT_ROLE_TOKENS, EOS_TOKEN, PAD_TOKEN, TokenizerConfig

if TYPE_CHECKING:
    import pyarrow as pa
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS: list[str] = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *CHAT_ROLE_TOKENS]

# One turn is `<|role|>\n{content}<|end|>`; the conversation starts with <|bos|>. The assistant's content
# *and* its <|end|> sit inside {% generation %} so assistant-only loss trains the model to stop.
# No newline follows a block tag: transformers renders templates with trim_blocks, which would drop it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported chat role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it, with special tokens and chat template, for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    config = config or TokenizerConfig()
    floor = 256 + len(SPECIAL_TOKENS)
    if config.vocab_size < floor:
        raise ValueError(f"vocab_size={config.vocab_size} is below the {floor} byte + special tokens")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    # Plain-text encoding with special tokens (what TGI does for /generate) starts with <|bos|>, as every
    # pretraining document did. Chat templates render their own <|bos|> and encode without specials.
    bos_id = core.token_to_id(BOS_TOKEN)
    core.post_processor = processors.Sequence(
        [
            # trim_offsets=False: offsets must cover every byte for the assistant mask to be exact.
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(CHAT_ROLE_TOKENS),
        # Without this the wrapper also emits token_type_ids, which Llama's forward rejects.
        model_input_names=["input_ids", "attention_mask"],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """Write the tokenizer as JSON files only (tokenizer.json, tokenizer_config.json with the template)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(str(path), save_jinja_files=False)
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory written by `save_tokenizer` (or any `save_pretrained` with tokenizer.json)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}: train one with models.tokenizer.train_tokenizer")
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def _byte_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[set[int], set[int]]:
    """Ids of single-byte tokens, and the subset that are bytes >= 0x80 (fragments of a UTF-8 character)."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    single: set[int] = set()
    partial: set[int] = set()
    for token, idx in tokenizer.get_vocab().items():
        if idx in special or len(token) != 1 or token not in char_to_byte:
            continue
        single.add(idx)
        if char_to_byte[token] >= 0x80:
            partial.add(idx)
    return single, partial


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def audit_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
    samples: Mapping[str, Iterable[str]],
    previous: PreTrainedTokenizerBase | None = None,
) -> list[dict[str, Any]]:
    """Per-domain tokenization figures (see the module docstring), optionally against a previous version."""
    single, partial = _byte_token_ids(tokenizer)
    prev_single: set[int] = set()
    if previous is not None:
        prev_single, _ = _byte_token_ids(previous)
    rows: list[dict[str, Any]] = []
    for domain, domain_texts in samples.items():
        texts = [t for t in domain_texts if t]
        if not texts:
            raise ValueError(f"tokenization audit: domain {domain!r} has no non-empty sample text")
        ids = _encode(tokenizer, texts)
        n_tokens = sum(len(x) for x in ids)
        n_chars = sum(len(t) for t in texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_words = sum(len(t.split()) for t in texts)
        n_single = sum(1 for x in ids for i in x if i in single)
        n_partial = sum(1 for x in ids for i in x if i in partial)
        # Byte-level BPE must round-trip exactly; a failure means a broken normaliser/decoder.
        roundtrip_errors = sum(
            tokenizer.decode(x, clean_up_tokenization_spaces=False) != t for x, t in zip(ids, texts)
        )
        row: dict[str, Any] = {
            "domain": domain,
            "n_texts": len(texts),
            "n_chars": n_chars,
            "n_tokens": n_tokens,
            "tokens_per_char": n_tokens / n_chars,
            "tokens_per_word": n_tokens / max(n_words, 1),
            "bytes_per_token": n_bytes / max(n_tokens, 1),
            "fallback_rate": n_single / max(n_tokens, 1),
            "partial_char_rate": n_partial / max(n_tokens, 1),
            "roundtrip_errors": roundtrip_errors,
            "vocab_size": len(tokenizer),
            "prev_vocab_size": None,
            "prev_tokens_per_char": None,
            "prev_fallback_rate": None,
            "inflation": None,
        }
        if previous is not None:
            prev_ids = _encode(previous, texts)
            prev_tokens = sum(len(x) for x in prev_ids)
            row["prev_vocab_size"] = len(previous)
            row["prev_tokens_per_char"] = prev_tokens / n_chars
            row["prev_fallback_rate"] = sum(1 for x in prev_ids for i in x if i in prev_single) / max(
                prev_tokens, 1
            )
            row["inflation"] = row["tokens_per_char"] / row["prev_tokens_per_char"]
        rows.append(row)
    return rows


def audit_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The audit rows as a pyarrow table (one row per domain), for asset metadata or Parquet."""
    import pyarrow as pa

    schema = pa.schema(
        [
            ("domain", pa.string()),
            ("n_texts", pa.int64()),
            ("n_chars", pa.int64()),
            ("n_tokens", pa.int64()),
            ("tokens_per_char", pa.float64()),
            ("tokens_per_word", pa.float64()),
            ("bytes_per_token", pa.float64()),
            ("fallback_rate", pa.float64()),
            ("partial_char_rate", pa.float64()),
            ("roundtrip_errors", pa.int64()),
            ("vocab_size", pa.int64()),
            ("prev_vocab_size", pa.int64()),
            ("prev_tokens_per_char", pa.float64()),
            ("prev_fallback_rate", pa.float64()),
            ("inflation", pa.float64()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def check_inflation(rows: list[dict[str, Any]], max_inflation: float) -> bool | tuple[bool, str]:
    """True, or (False, reason naming every domain whose tokens/char grew beyond `max_inflation`x)."""
    failures = []
    for row in rows:
        if row.get("roundtrip_errors"):
            failures.append(f"domain {row['domain']!r}: {row['roundtrip_errors']} texts do not round-trip")
        inflation = row.get("inflation")
        if inflation is not None and inflation > max_inflation:
            failures.append(
                f"domain {row['domain']!r}: tokens/char {row['tokens_per_char']:.4f} vs previous "
                f"{row['prev_tokens_per_char']:.4f} = {inflation:.3f}x > bound {max_inflation:.3f}x"
            )
    if failures:
        return False, "tokenization inflation: " + "; ".join(failures)
    return True
