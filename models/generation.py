"""Batching generation engine: one torch worker thread, a bounded queue, continuous batching with a KV cache.

Requests are queued by any thread (`Engine.submit`) and picked up by a single worker thread that owns the
model. When the worker is idle it waits for the first request, then up to `max_wait_ms` for more (dynamic
batching), prefills them together (left padding + attention mask + explicit position ids), and decodes one
token per step for the whole batch with a `DynamicCache`. Between decode steps, finished sequences leave
the batch and newly queued requests are prefilled on their own and merged in (continuous batching): the
shorter cache is left-padded with masked zeros so every row keeps its own positions.

Used by `models/server.py` (the TGI-protocol HTTP server); runnable in-process too:

    engine = Engine(load_bundle("var/checkpoints/sft"))
    engine.start()
    print(engine.generate("Hello", SamplingParams(max_new_tokens=16)).generated_text)
    engine.stop()
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase
from transformers.generation.logits_process import TypicalLogitsWarper

Prompt = str | list[dict[str, str]]  # plain text, or chat messages rendered with the tokenizer's template


class InvalidRequest(ValueError):
    """A request the engine will not run (bad parameter, input too long); the server answers 422."""


class EngineOverloaded(RuntimeError):
    """The queue is full; the server answers 429 and the client should retry later."""


class GenerationFailed(RuntimeError):
    """The model failed while running a batch; every request in that batch gets this error."""


# --------------------------------------------------------------------------------------------------------
# Request / result types


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (TGI's `parameters`). temperature 0 or None with no other warper is
    greedy; `seed` makes sampling reproducible."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_n_tokens: int = 0
    decoder_input_details: bool = False
    truncate: int | None = None

    @property
    def sampling(self) -> bool:
        """TGI's rule: sample when asked to or when any warper is set; temperature 0 always means greedy."""
        if self.temperature is not None and self.temperature == 0:
            return False
        warpers = (
            (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )
        return self.do_sample or warpers

    def check(self, *, max_new_tokens_limit: int, max_stop_sequences: int, max_top_n_tokens: int) -> None:
        """Raise InvalidRequest naming the first offending parameter."""
        if self.max_new_tokens <= 0:
            raise InvalidRequest(f"`max_new_tokens` must be strictly positive, got {self.max_new_tokens}")
        if self.max_new_tokens > max_new_tokens_limit:
            raise InvalidRequest(
                f"`max_new_tokens` must be <= {max_new_tokens_limit}. Given: {self.max_new_tokens}"
            )
        if self.temperature is not None and self.temperature < 0:
            raise InvalidRequest(f"`temperature` must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise InvalidRequest(f"`top_k` must be strictly positive, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"`top_p` must be > 0.0 and <= 1.0, got {self.top_p}")
        if self.typical_p is not None and not 0.0 < self.typical_p <= 1.0:
            raise InvalidRequest(f"`typical_p` must be > 0.0 and <= 1.0, got {self.typical_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise InvalidRequest(f"`repetition_penalty` must be strictly positive, got {self.repetition_penalty}")
        if self.seed is not None and self.seed < 0:
            raise InvalidRequest(f"`seed` must be >= 0, got {self.seed}")
        if self.truncate is not None and self.truncate <= 0:
            raise InvalidRequest(f"`truncate` must be strictly positive, got {self.truncate}")
        if len(self.stop) > max_stop_sequences:
            raise InvalidRequest(f"`stop` supports up to {max_stop_sequences} stop sequences. Given: {len(self.stop)}")
        if any(not s for s in self.stop):
            raise InvalidRequest("`stop` sequences must be non-empty strings")
        if not 0 <= self.top_n_tokens <= max_top_n_tokens:
            raise InvalidRequest(f"`top_n_tokens` must be >= 0 and <= {max_top_n_tokens}. Given: {self.top_n_tokens}")


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str
    logprob: float | None
    special: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "logprob": self.logprob, "special": self.special}


@dataclass
class GenerationResult:
    """What one finished request produced, in TGI's terms (`details`)."""

    request_id: str
    generated_text: str
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    tokens: list[TokenInfo]
    prefill: list[TokenInfo]  # only filled with `decoder_input_details`
    top_tokens: list[list[TokenInfo]] | None
    seed: int | None
    prompt_tokens: int
    model_version: str
    queue_s: float
    inference_s: float

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)

    @property
    def logprob_sum(self) -> float:
        return sum(t.logprob or 0.0 for t in self.tokens)


@dataclass(frozen=True)
class TokenEvent:
    """One streamed token; the last event of a request carries the finished `result`."""

    index: int
    token: TokenInfo
    top_tokens: list[TokenInfo] | None
    result: GenerationResult | None = None


Sink = Callable[[TokenEvent | GenerationResult | BaseException], None]


@dataclass
class GenerationRequest:
    """A queued request. `sink` is called from the worker thread: with every TokenEvent when `stream`,
    then exactly once with the GenerationResult or the exception that ended the request."""

    prompt: Prompt
    params: SamplingParams
    sink: Sink
    request_id: str = ""
    stream: bool = False
    input_ids: list[int] = field(default_factory=list)
    tokenized_by: str = ""  # model_version whose tokenizer produced input_ids
    enqueued_at: float = 0.0
    cancelled: bool = False
    done: bool = False  # the final result or error was delivered

    def cancel(self) -> None:
        """Ask the worker to drop this request at the next step (e.g. the streaming client went away)."""
        self.cancelled = True

    def finish(self, item: GenerationResult | BaseException) -> None:
        """Deliver the final result or error, once."""
        if not self.done:
            self.done = True
            self.sink(item)


# --------------------------------------------------------------------------------------------------------
# Model loading


@dataclass
class ModelBundle:
    """A loaded model + tokenizer and what the server reports about them."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    version: str
    model_dir: Path
    sha: str
    eos_ids: frozenset[int]
    special_ids: frozenset[int]
    max_positions: int
    dtype: str


def _digest(model_dir: Path) -> str:
    """sha256 over config and weights, so /info can tell two checkpoints apart whatever their version label."""
    h = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def load_bundle(model_dir: str | Path, version: str | None = None, tokenizer_dir: str | Path | None = None) -> ModelBundle:
    """Load a `save_pretrained` causal LM (safetensors only) and its tokenizer (same dir unless given)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a transformers save_pretrained directory")
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (pickled weights are never loaded)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    # The HTTP thread encodes while the worker decodes. Encoding only mutates the Rust tokenizer when its
    # saved truncation/padding differ from the call's (none): clear them once so calls never mutate.
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    eos: set[int] = set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        eos.add(gen_eos)
    elif gen_eos:
        eos.update(gen_eos)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    sha = _digest(model_dir)
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        version=version or sha[:12],
        model_dir=model_dir,
        sha=sha,
        eos_ids=frozenset(eos),
        special_ids=frozenset(tokenizer.all_special_ids),
        max_positions=int(getattr(model.config, "max_position_embeddings", 2048)),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids for text (with the tokenizer's special tokens, as TGI does) or for chat messages (rendered
    with the chat template and a generation prompt; the template adds its own special tokens)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if not tokenizer.chat_template:
        raise InvalidRequest("this model's tokenizer has no chat template; use /generate with plain text")
    try:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    except TemplateError as exc:  # e.g. a role the template refuses: the caller's messages are at fault
        raise InvalidRequest(f"the chat template rejected these messages: {exc}") from exc
    if isinstance(ids, dict):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


# --------------------------------------------------------------------------------------------------------
# Stats (rendered as Prometheus text by the server)


class Histogram:
    """A Prometheus-style cumulative histogram, thread-safe."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def prometheus(self, name: str, labels: str = "") -> list[str]:
        with self._lock:
            counts, total, n = list(self.counts), self.sum, self.count
        sep = "," if labels else ""
        lines, cum = [], 0
        for bound, c in zip(self.buckets, counts):
            cum += c
            lines.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {cum}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {n}')
        lab = f"{{{labels}}}" if labels else ""
        lines += [f"{name}_sum{lab} {total:.6f}", f"{name}_count{lab} {n}"]
        return lines


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class EngineStats:
    decode_batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    prefill_batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    max_batch_seen: int = 0
    forward_steps: int = 0
    generated_tokens: int = 0
    running: int = 0


# --------------------------------------------------------------------------------------------------------
# Worker-side state


@dataclass
class _Seq:
    req: GenerationRequest
    prompt_ids: list[int]
    generator: torch.Generator | None
    seed: int | None
    started_at: float
    generated: list[int] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    top_tokens: list[list[TokenInfo]] = field(default_factory=list)
    prefill: list[TokenInfo] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)  # generated non-special ids, for detokenization
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # concatenation of emitted (non-special) token texts
    finish_reason: str | None = None

    @property
    def params(self) -> SamplingParams:
        return self.req.params

    @property
    def needs_counts(self) -> bool:
        p = self.params
        return (p.repetition_penalty not in (None, 1.0)) or bool(p.frequency_penalty)


@dataclass
class _Batch:
    seqs: list[_Seq]
    cache: DynamicCache
    mask: torch.Tensor  # [B, L] 1 = real token in the cache, 0 = left padding
    positions: torch.Tensor  # [B] position id of the next input token
    next_ids: torch.Tensor  # [B] last chosen token, not yet in the cache
    counts: torch.Tensor | None = None  # [B, V] token counts (prompt + generated) for penalties


def _cache_layers(cache: DynamicCache) -> list[Any]:
    return list(cache.layers)


def _left_pad_cache(batch: _Batch, length: int) -> None:
    """Grow the cache and mask of `batch` to `length` columns by padding on the left with masked zeros."""
    extra = length - batch.mask.shape[1]
    if extra <= 0:
        return
    for layer in _cache_layers(batch.cache):
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, extra, 0))
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, extra, 0))
    batch.mask = torch.nn.functional.pad(batch.mask, (extra, 0))


def attention_bias(mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, query_len, L] additive mask from a [B, L] padding mask: 0 where a query may attend (a real,
    not-later token), dtype-min elsewhere. transformers uses a 4D mask as given, which skips its per-step
    mask builder (a fifth of a decode step's time for small models on CPU). dtype-min rather than -inf
    keeps the fully-masked rows of left-padding queries finite instead of NaN."""
    keep = mask.bool()[:, None, None, :]
    if query_len > 1:
        length = mask.shape[1]
        keep = keep & torch.ones(query_len, length, dtype=torch.bool).tril(length - query_len)[None, None]
    return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, torch.finfo(dtype).min)


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """Concatenate two running batches along the batch axis (continuous batching)."""
    length = max(a.mask.shape[1], b.mask.shape[1])
    _left_pad_cache(a, length)
    _left_pad_cache(b, length)
    for la, lb in zip(_cache_layers(a.cache), _cache_layers(b.cache)):
        la.keys = torch.cat([la.keys, lb.keys], 0)
        la.values = torch.cat([la.values, lb.values], 0)
    return _Batch(
        seqs=a.seqs + b.seqs,
        cache=a.cache,
        mask=torch.cat([a.mask, b.mask], 0),
        positions=torch.cat([a.positions, b.positions], 0),
        next_ids=torch.cat([a.next_ids, b.next_ids], 0),
    )


def _filter(batch: _Batch, keep: list[int]) -> _Batch:
    """Keep rows `keep`; drop cache columns that became padding for every remaining row."""
    idx = torch.tensor(keep, dtype=torch.long)
    batch.cache.batch_select_indices(idx)
    mask = batch.mask[idx]
    cols = mask.any(0).nonzero()
    first = int(cols[0]) if len(cols) else 0
    if first > 0:
        mask = mask[:, first:]
        for layer in _cache_layers(batch.cache):
            layer.keys = layer.keys[:, :, first:, :]
            layer.values = layer.values[:, :, first:, :]
    return _Batch(
        seqs=[batch.seqs[i] for i in keep],
        cache=batch.cache,
        mask=mask,
        positions=batch.positions[idx],
        next_ids=batch.next_ids[idx],
        counts=batch.counts[idx] if batch.counts is not None else None,
    )


# --------------------------------------------------------------------------------------------------------
# Sampling (vectorised over rows with per-row parameters)


def _top_k(logits: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    sorted_logits = logits.sort(-1, descending=True).values
    kth = sorted_logits.gather(1, (ks.clamp(max=logits.shape[1]) - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
    drop = (probs.cumsum(-1) - probs) >= ps[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def choose_tokens(
    seqs: Sequence[_Seq], logits: torch.Tensor, counts: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick the next token for every row. Returns (ids [B], logprobs [B], logprob table [B, V]); the table is
    the distribution each row was drawn from (after penalties and warpers), which TGI reports logprobs of."""
    logits = logits.float()
    params = [s.params for s in seqs]
    if counts is not None:
        rp = torch.tensor([p.repetition_penalty or 1.0 for p in params])[:, None]
        if bool((rp != 1.0).any()):
            penalised = torch.where(logits > 0, logits / rp, logits * rp)
            logits = torch.where(counts > 0, penalised, logits)
        fp = torch.tensor([p.frequency_penalty or 0.0 for p in params])[:, None]
        if bool((fp != 0).any()):
            logits = logits - fp * counts
    table = torch.log_softmax(logits, -1)
    next_ids = table.argmax(-1)
    rows = [i for i, s in enumerate(seqs) if s.generator is not None]
    if rows:
        idx = torch.tensor(rows, dtype=torch.long)
        params_rows = [params[i] for i in rows]
        temps = torch.tensor([p.temperature or 1.0 for p in params_rows])[:, None]
        scaled = logits[idx] / temps
        if any(p.top_k is not None for p in params_rows):
            ks = torch.tensor([p.top_k or scaled.shape[1] for p in params_rows])
            scaled = _top_k(scaled, ks)
        if any(p.top_p is not None and p.top_p < 1.0 for p in params_rows):
            scaled = _top_p(scaled, torch.tensor([p.top_p or 1.0 for p in params_rows]))
        for j, p in enumerate(params_rows):
            if p.typical_p is not None and p.typical_p < 1.0:
                scaled[j] = TypicalLogitsWarper(mass=p.typical_p)(None, scaled[j : j + 1])[0]
        sampled_table = torch.log_softmax(scaled, -1)
        probs = sampled_table.exp()
        for j, i in enumerate(rows):
            next_ids[i] = torch.multinomial(probs[j], 1, generator=seqs[i].generator)[0]
        table = table.clone()
        table[idx] = sampled_table
    logprobs = table.gather(1, next_ids[:, None])[:, 0]
    return next_ids, logprobs, table


# --------------------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Queue + worker thread around one ModelBundle. Thread-safe `submit`; everything torch happens in the
    worker. `batching=False` forces batches of one (the benchmark's baseline)."""

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 128,
        batching: bool = True,
        max_total_tokens: int | None = None,
        max_input_length: int | None = None,
        max_new_tokens_limit: int | None = None,
        max_stop_sequences: int = 4,
        max_top_n_tokens: int = 5,
        step_delay_ms: float = 0.0,
        torch_threads: int | None = None,
    ) -> None:
        self.bundle = bundle
        self.batching = batching
        self.max_batch_size = max_batch_size if batching else 1
        self.max_wait_s = (max_wait_ms if batching else 0.0) / 1000
        self.max_queue = max_queue
        self.max_total_tokens = min(max_total_tokens or 2048, bundle.max_positions)
        self.max_input_length = min(max_input_length or self.max_total_tokens - 1, self.max_total_tokens - 1)
        self.max_new_tokens_limit = min(max_new_tokens_limit or self.max_total_tokens, self.max_total_tokens)
        self.max_stop_sequences = max_stop_sequences
        self.max_top_n_tokens = max_top_n_tokens
        # A test/demo knob: sleep this long per forward pass to emulate a slower model.
        self.step_delay_s = step_delay_ms / 1000
        # One core stays with the HTTP event loop; more intra-op threads than free cores make OpenMP spin
        # (measured 7x slower per token with 2 threads on 2 busy cores than with 1).
        self.torch_threads = torch_threads or max(1, (os.cpu_count() or 1) - 1)
        self.stats = EngineStats()
        self._queue: collections.deque[GenerationRequest] = collections.deque()
        self._cond = threading.Condition()
        self._pending: ModelBundle | None = None
        self._swapped = threading.Event()
        self._stopping = False
        self._batch: _Batch | None = None
        self._thread: threading.Thread | None = None

    # ---- caller side

    @property
    def model_version(self) -> str:
        return self.bundle.version

    @property
    def queue_size(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"engine-{self.bundle.version}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def prepare(self, prompt: Prompt, params: SamplingParams, bundle: ModelBundle | None = None) -> list[int]:
        """Validate `params` and tokenize `prompt` against the limits; raise InvalidRequest with the reason."""
        bundle = bundle or self.bundle
        params.check(
            max_new_tokens_limit=self.max_new_tokens_limit,
            max_stop_sequences=self.max_stop_sequences,
            max_top_n_tokens=self.max_top_n_tokens,
        )
        if isinstance(prompt, str) and not prompt:
            raise InvalidRequest("`inputs` cannot be empty")
        if not isinstance(prompt, str) and not prompt:
            raise InvalidRequest("`messages` cannot be empty")
        ids = encode_prompt(bundle.tokenizer, prompt)
        if params.truncate is not None:
            ids = ids[-params.truncate :]
        if not ids:
            raise InvalidRequest("`inputs` tokenized to zero tokens")
        if len(ids) > self.max_input_length:
            raise InvalidRequest(
                f"`inputs` must have less than {self.max_input_length} tokens. Given: {len(ids)}"
            )
        if len(ids) + params.max_new_tokens > self.max_total_tokens:
            raise InvalidRequest(
                f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                f"Given: {len(ids)} `inputs` tokens and {params.max_new_tokens} `max_new_tokens`"
            )
        return ids

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Validate, tokenize and enqueue; raises InvalidRequest or EngineOverloaded (queue full)."""
        bundle = self.bundle
        request.input_ids = self.prepare(request.prompt, request.params, bundle)
        request.tokenized_by = bundle.version
        self.enqueue([request])
        return request

    def enqueue(self, requests: list[GenerationRequest]) -> None:
        """Put already-prepared requests on the queue, all or none (best_of submits several at once)."""
        with self._cond:
            if self._stopping:
                raise EngineOverloaded("the engine is shutting down")
            if len(self._queue) + len(requests) > self.max_queue:
                raise EngineOverloaded(
                    f"Model is overloaded: {len(self._queue)} requests queued (max_queue={self.max_queue})"
                )
            now = time.perf_counter()
            for r in requests:
                r.enqueued_at = now
                self._queue.append(r)
            self._cond.notify_all()

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str = "") -> GenerationResult:
        """Blocking convenience for in-process callers (tests, scripts)."""
        fut: Future[GenerationResult] = Future()

        def sink(item: TokenEvent | GenerationResult | BaseException) -> None:
            if isinstance(item, BaseException):
                fut.set_exception(item)
            elif isinstance(item, GenerationResult):
                fut.set_result(item)

        self.submit(GenerationRequest(prompt, params or SamplingParams(), sink, request_id=request_id))
        return fut.result()

    def swap(self, bundle: ModelBundle, timeout: float | None = None) -> None:
        """Serve `bundle` from the next batch on: the worker stops admitting, lets the running batch finish
        on the old model, then switches. Blocks until switched (or `timeout`)."""
        with self._cond:
            self._swapped.clear()
            self._pending = bundle
            self._cond.notify_all()
        if self._thread is None:  # not started: nothing in flight
            self._apply_swap()
            return
        if not self._swapped.wait(timeout):
            raise TimeoutError(f"model swap to {bundle.version} did not happen within {timeout}s")

    # ---- worker side

    def _apply_swap(self) -> None:
        with self._cond:
            if self._pending is not None:
                self.bundle, self._pending = self._pending, None
                self._swapped.set()

    def _run(self) -> None:
        torch.set_num_threads(self.torch_threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    if self._stopping:
                        break
                if self._pending is not None and self._batch is None:
                    self._apply_swap()
                new = self._take_new()
                try:
                    if new:
                        self._prefill(new)
                    if self._batch is not None:
                        self._decode_step()
                except Exception as exc:  # noqa: BLE001 -- a model failure ends the batch, not the server
                    self._fail_all(GenerationFailed(f"generation failed on {self.bundle.version}: {exc!r}"), new)
        closing = EngineOverloaded("the engine is shutting down")
        with self._cond:
            queued, self._queue = list(self._queue), collections.deque()
        self._fail_all(closing, queued)

    def _fail_all(self, exc: BaseException, also: list[GenerationRequest]) -> None:
        """End the running batch (and `also`, e.g. requests caught mid-prefill) with `exc`."""
        running = [s.req for s in self._batch.seqs] if self._batch is not None else []
        for req in running + also:
            req.finish(exc)  # no-op for requests that already got their result
        self._batch = None
        self.stats.running = 0

    def _take_new(self) -> list[GenerationRequest]:
        """Requests to admit now. Idle: block for the first one, then gather more for up to max_wait_ms.
        Busy: whatever is queued, without waiting. Nothing while a swap waits for the batch to drain."""
        running = len(self._batch.seqs) if self._batch is not None else 0
        free = self.max_batch_size - running
        with self._cond:
            if free <= 0 or self._pending is not None:
                return []
            if running == 0:
                while not self._queue and not self._stopping and self._pending is None:
                    self._cond.wait(0.1)
                if not self._queue or self._stopping or self._pending is not None:
                    return []
                deadline = time.perf_counter() + self.max_wait_s
                while len(self._queue) < free and not self._stopping:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            taken = []
            while self._queue and len(taken) < free:
                r = self._queue.popleft()
                if not r.cancelled:
                    taken.append(r)
            return taken

    def _new_seq(self, req: GenerationRequest) -> _Seq | None:
        bundle = self.bundle
        if req.tokenized_by != bundle.version:  # queued across a model swap: re-tokenize for the new model
            try:
                req.input_ids = self.prepare(req.prompt, req.params, bundle)
                req.tokenized_by = bundle.version
            except InvalidRequest as exc:
                req.finish(exc)
                return None
        seed = req.params.seed
        generator = None
        if req.params.sampling:
            seed = seed if seed is not None else random.getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
        else:
            seed = None
        return _Seq(req=req, prompt_ids=req.input_ids, generator=generator, seed=seed, started_at=time.perf_counter())

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.bundle.model.parameters()).dtype

    def _forward(self, **kwargs: Any) -> Any:
        out = self.bundle.model(use_cache=True, **kwargs)
        self.stats.forward_steps += 1
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        return out

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        seqs = [s for s in (self._new_seq(r) for r in requests) if s is not None]
        if not seqs:
            return
        lengths = [len(s.prompt_ids) for s in seqs]
        width = max(lengths)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - lengths[i] :] = torch.tensor(s.prompt_ids)
            mask[i, width - lengths[i] :] = 1
        # Left padding shifts real tokens right; position ids must count real tokens only, or a padded row
        # would see different rotary positions than it does alone (and greedy output would change).
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        want_prefill = any(s.params.decoder_input_details for s in seqs)
        out = self._forward(
            input_ids=ids,
            attention_mask=attention_bias(mask, width, self._dtype),
            position_ids=position_ids,
            past_key_values=DynamicCache(),
            logits_to_keep=0 if want_prefill else 1,
        )
        self.stats.prefill_batch_size.observe(len(seqs))
        if want_prefill:
            self._fill_prefill_details(seqs, ids, out.logits, lengths, width)
        batch = _Batch(
            seqs=seqs,
            cache=out.past_key_values,
            mask=mask,
            positions=torch.tensor(lengths, dtype=torch.long),
            next_ids=torch.zeros(len(seqs), dtype=torch.long),
        )
        kept = self._step_tokens(batch, out.logits[:, -1, :])
        if kept is not None:
            self._batch = kept if self._batch is None else _merge(self._batch, kept)
        self.stats.running = len(self._batch.seqs) if self._batch is not None else 0
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, self.stats.running)

    def _fill_prefill_details(
        self, seqs: list[_Seq], ids: torch.Tensor, logits: torch.Tensor, lengths: list[int], width: int
    ) -> None:
        tok = self.bundle.tokenizer
        for i, s in enumerate(seqs):
            if not s.params.decoder_input_details:
                continue
            off = width - lengths[i]
            logp = torch.log_softmax(logits[i, off : width - 1].float(), -1)
            targets = ids[i, off + 1 : width]
            lps = logp.gather(1, targets[:, None])[:, 0].tolist() if len(targets) else []
            s.prefill = [
                TokenInfo(t, tok.decode([t]), None if j == 0 else lps[j - 1], t in self.bundle.special_ids)
                for j, t in enumerate(s.prompt_ids)
            ]

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch is not None
        mask = torch.nn.functional.pad(batch.mask, (0, 1), value=1)
        out = self._forward(
            input_ids=batch.next_ids[:, None],
            attention_mask=attention_bias(mask, 1, self._dtype),
            position_ids=batch.positions[:, None],
            past_key_values=batch.cache,
        )
        batch.mask = mask
        batch.positions = batch.positions + 1
        self.stats.decode_batch_size.observe(len(batch.seqs))
        self._batch = self._step_tokens(batch, out.logits[:, -1, :])
        self.stats.running = len(self._batch.seqs) if self._batch is not None else 0

    def _counts_for(self, batch: _Batch, vocab: int) -> torch.Tensor | None:
        if not any(s.needs_counts for s in batch.seqs):
            return None
        if batch.counts is None or batch.counts.shape != (len(batch.seqs), vocab):
            counts = torch.zeros((len(batch.seqs), vocab))
            for i, s in enumerate(batch.seqs):
                ids = torch.tensor(s.prompt_ids + s.generated, dtype=torch.long)
                counts[i] = torch.bincount(ids, minlength=vocab)[:vocab].float()
            batch.counts = counts
        return batch.counts

    def _step_tokens(self, batch: _Batch, logits: torch.Tensor) -> _Batch | None:
        """Choose and emit one token per row; return the batch shrunk to the rows still running."""
        counts = self._counts_for(batch, logits.shape[-1])
        next_ids, logprobs, table = choose_tokens(batch.seqs, logits, counts)
        if counts is not None:
            counts.scatter_add_(1, next_ids[:, None], torch.ones((len(batch.seqs), 1)))
        batch.next_ids = next_ids
        ids_list, lp_list = next_ids.tolist(), logprobs.tolist()
        top_n = max(s.params.top_n_tokens for s in batch.seqs)
        tops = table.topk(top_n, -1) if top_n else None
        keep = []
        for i, s in enumerate(batch.seqs):
            if s.req.cancelled:
                continue
            top = None
            if s.params.top_n_tokens and tops is not None:
                n = s.params.top_n_tokens
                pairs = zip(tops.indices[i, :n].tolist(), tops.values[i, :n].tolist())
                # Tokens a warper ruled out (logprob -inf) were never candidates: leave them out.
                top = [self._token_info(t, lp) for t, lp in pairs if math.isfinite(lp)]
            self._emit(s, ids_list[i], lp_list[i], top)
            if s.finish_reason is None:
                keep.append(i)
        self.stats.generated_tokens += len(batch.seqs)
        if len(keep) == len(batch.seqs):
            return batch
        return _filter(batch, keep) if keep else None

    def _token_info(self, token_id: int, logprob: float) -> TokenInfo:
        special = token_id in self.bundle.special_ids
        text = self.bundle.tokenizer.convert_ids_to_tokens(token_id) if special else self.bundle.tokenizer.decode([token_id])
        return TokenInfo(token_id, text, logprob, special)

    def _emit(self, s: _Seq, token_id: int, logprob: float, top: list[TokenInfo] | None) -> None:
        tok = self.bundle.tokenizer
        s.generated.append(token_id)
        special = token_id in self.bundle.special_ids
        if special:
            text = tok.convert_ids_to_tokens(token_id)
        else:
            # Incremental detokenization (as TGI / TextStreamer): a token may end mid-way through a UTF-8
            # character; hold its text back until the character completes.
            s.text_ids.append(token_id)
            prefix = tok.decode(s.text_ids[s.prefix_offset : s.read_offset], clean_up_tokenization_spaces=False)
            full = tok.decode(s.text_ids[s.prefix_offset :], clean_up_tokenization_spaces=False)
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                text = full[len(prefix) :]
                s.prefix_offset, s.read_offset = s.read_offset, len(s.text_ids)
            else:
                text = ""
            s.text += text
        p = s.params
        if token_id in self.bundle.eos_ids:
            s.finish_reason = "eos_token"
        elif p.stop and any(stop in s.text[-(len(stop) + len(text)) :] for stop in p.stop):
            s.finish_reason = "stop_sequence"
        elif len(s.generated) >= p.max_new_tokens:
            s.finish_reason = "length"
        result = None
        if s.finish_reason is not None:
            generated_text = tok.decode(s.text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            if not special and generated_text.startswith(s.text) and len(generated_text) > len(s.text):
                # Flush text held back at the very end so the streamed pieces add up to generated_text.
                text += generated_text[len(s.text) :]
                s.text = generated_text
            info = TokenInfo(token_id, text, logprob, special)
            s.tokens.append(info)
            if top is not None:
                s.top_tokens.append(top)
            now = time.perf_counter()
            result = GenerationResult(
                request_id=s.req.request_id,
                generated_text=generated_text,
                finish_reason=s.finish_reason,
                tokens=s.tokens,
                prefill=s.prefill,
                top_tokens=s.top_tokens if p.top_n_tokens else None,
                seed=s.seed,
                prompt_tokens=len(s.prompt_ids),
                model_version=self.bundle.version,
                queue_s=s.started_at - s.req.enqueued_at,
                inference_s=now - s.started_at,
            )
        else:
            info = TokenInfo(token_id, text, logprob, special)
            s.tokens.append(info)
            if top is not None:
                s.top_tokens.append(top)
        if s.req.stream:
            s.req.sink(TokenEvent(len(s.tokens) - 1, info, top, result))
        if result is not None:
            s.req.finish(result)
