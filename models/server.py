"""Model server speaking Text Generation Inference's HTTP protocol, on the batching engine.

The real `text_generation.Client` / `AsyncClient` (and OpenAI-style chat clients) work against it unmodified:

    POST /                     TGI compat route: a JSON list with one response, or SSE when "stream": true
    POST /generate             {"inputs", "parameters"} -> {"generated_text", "details"?}
    POST /generate_stream      Server-Sent Events, one `data:{...}` per token; the last has generated_text
    POST /v1/chat/completions  OpenAI chat (stream or not), prompt built with the tokenizer's chat template
    POST /feedback             thumbs / rating / correction for an earlier request id -> `on_feedback`
    GET  /info, /health, /metrics (Prometheus text), /v1/models

Integration points for the flywheel are plain callables: `on_interaction(record)` after every request,
`on_feedback(record)` per feedback, and `version_source()` polled for the champion model to serve
(`Server.reload` swaps models between batches). An optional challenger takes a deterministic share of
traffic (canary). Run it:

    python -m models.server var/checkpoints/sft --port 8080 --hooks-jsonl var/landing/serve.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from models.generation import (
    Engine,
    EngineOverloaded,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    Histogram,
    InvalidRequest,
    Prompt,
    SamplingParams,
    TokenEvent,
    TokenInfo,
    encode_prompt,
    load_bundle,
)

log = logging.getLogger("flywheel.serve")

Hook = Callable[[dict[str, Any]], None]
VersionSource = Callable[[], tuple[str, str] | None]  # -> (model_version, model_dir) to serve, or None

SERVER_VERSION = "llm-flywheel-0.1.0 (TGI protocol)"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


# --------------------------------------------------------------------------------------------------------
# Request bodies (TGI and OpenAI shapes; unknown keys are ignored as TGI does)


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Any = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = False
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    adapter_id: str | None = None


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1)
    thumbs: Literal[1, -1] | None = None
    rating: int | None = Field(default=None, ge=1, le=5)
    correction: str | None = None
    comment: str | None = None


# --------------------------------------------------------------------------------------------------------
# Hooks and version sources usable from the command line


class JsonlSink:
    """A hook that appends each record as one JSON line (the production-log drop format). Thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def __call__(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)


def file_version_source(path: str | Path) -> VersionSource:
    """A version source reading {"model_version": ..., "model_dir": ...} from a JSON file (written by a
    deploy step); a missing or half-written file means "no change"."""
    path = Path(path)

    def source() -> tuple[str, str] | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return str(data["model_version"]), str(data["model_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    return source


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def canary_bucket(request_id: str) -> float:
    """A stable number in [0, 1) per request id: the same id always goes to the same model."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2**64


# --------------------------------------------------------------------------------------------------------
# Metrics


class ServerMetrics:
    """Counters and histograms rendered in the Prometheus text format (names follow TGI's `tgi_*`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, str], float] = {}
        self.duration = Histogram(LATENCY_BUCKETS)
        self.generated = Histogram(TOKEN_BUCKETS)
        self.input_length = Histogram(TOKEN_BUCKETS)

    def inc(self, name: str, labels: str = "", by: float = 1.0) -> None:
        with self._lock:
            self.counters[(name, labels)] = self.counters.get((name, labels), 0.0) + by

    def render(self, engines: list[Engine]) -> str:
        with self._lock:
            counters = dict(self.counters)
        lines: list[str] = []
        typed: set[str] = set()
        for (name, labels), value in sorted(counters.items()):
            if name not in typed:
                typed.add(name)
                lines.append(f"# TYPE {name} counter")
            lines.append(f"{name}{{{labels}}} {value:g}" if labels else f"{name} {value:g}")
        lines += ["# TYPE tgi_request_duration histogram", *self.duration.prometheus("tgi_request_duration")]
        lines += ["# TYPE tgi_request_generated_tokens histogram",
                  *self.generated.prometheus("tgi_request_generated_tokens")]
        lines += ["# TYPE tgi_request_input_length histogram", *self.input_length.prometheus("tgi_request_input_length")]
        lines += ["# TYPE tgi_queue_size gauge", "# TYPE tgi_batch_current_size gauge",
                  "# TYPE tgi_batch_size histogram", "# TYPE tgi_batch_prefill_size histogram"]
        for e in engines:
            lab = f'model_version="{e.model_version}"'
            lines += [
                f"tgi_queue_size{{{lab}}} {e.queue_size}",
                f"tgi_batch_current_size{{{lab}}} {e.stats.running}",
                f"tgi_batch_max_size_seen{{{lab}}} {e.stats.max_batch_seen}",
                f"tgi_batch_forward_steps_total{{{lab}}} {e.stats.forward_steps}",
                f"tgi_generated_tokens_total{{{lab}}} {e.stats.generated_tokens}",
                *e.stats.decode_batch_size.prometheus("tgi_batch_size", lab),
                *e.stats.prefill_batch_size.prometheus("tgi_batch_prefill_size", lab),
            ]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Errors


def _error(status: int, message: str, error_type: str, request_id: str | None = None) -> JSONResponse:
    headers = {"X-Request-Id": request_id} if request_id else None
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def _classify(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, asyncio.CancelledError):
        return 499, "cancelled"
    if isinstance(exc, InvalidRequest):
        return 422, "validation"
    if isinstance(exc, EngineOverloaded):
        return 429, "overloaded"
    return 500, "generation"


class RequestIdMiddleware:
    """Pure ASGI: take X-Request-Id from the request (or make a uuid4), expose it as request.state.request_id
    and echo it on every response, streaming ones included."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1").strip()
        request_id = given[:200] or str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        await self.app(scope, receive, send_with_id)


# --------------------------------------------------------------------------------------------------------
# The server


class Server:
    """Owns the engines (champion + optional challenger), the hooks and the FastAPI app (`.app`)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_version: str | None = None,
        tokenizer_dir: str | Path | None = None,
        on_interaction: Hook | None = None,
        on_feedback: Hook | None = None,
        version_source: VersionSource | None = None,
        poll_interval_s: float = 30.0,
        challenger_dir: str | Path | None = None,
        challenger_version: str | None = None,
        canary_share: float = 0.0,
        default_max_new_tokens: int = 100,
        max_best_of: int = 2,
        **engine_options: Any,
    ) -> None:
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        self.engine_options = engine_options
        self.on_interaction = on_interaction
        self.on_feedback = on_feedback
        self.version_source = version_source
        self.poll_interval_s = poll_interval_s
        self.default_max_new_tokens = default_max_new_tokens
        self.max_best_of = max_best_of
        self.metrics = ServerMetrics()
        self.champion = Engine(load_bundle(model_dir, model_version, self.tokenizer_dir), **engine_options)
        self.challenger: Engine | None = None
        self.canary_share = 0.0
        if challenger_dir is not None:
            self.set_challenger(challenger_dir, challenger_version, canary_share)
        self._reload_lock = threading.Lock()
        self._stop_polling = threading.Event()
        self._poller: threading.Thread | None = None
        self._hooks = ThreadPoolExecutor(1, thread_name_prefix="hooks")  # one thread: records keep their order
        self._hooks_closed = False
        self.app = self._build_app()

    # ---- lifecycle, reload and canary

    def start(self) -> None:
        if self._hooks_closed:  # started again after close() (e.g. a second TestClient session)
            self._hooks, self._hooks_closed = ThreadPoolExecutor(1, thread_name_prefix="hooks"), False
        self.champion.start()
        if self.challenger is not None:
            self.challenger.start()
        if self.version_source is not None and self._poller is None:
            self._stop_polling.clear()
            self._poller = threading.Thread(target=self._poll_versions, name="version-poller", daemon=True)
            self._poller.start()

    def close(self) -> None:
        self._stop_polling.set()
        if self._poller is not None:
            self._poller.join(5)
            self._poller = None
        self.champion.stop()
        if self.challenger is not None:
            self.challenger.stop()
        self._hooks.shutdown(wait=True)
        self._hooks_closed = True

    def _tokenizer_for(self, model_dir: Path) -> Path | None:
        return None if (model_dir / "tokenizer_config.json").is_file() else self.tokenizer_dir

    def reload(self, model_dir: str | Path, model_version: str | None = None) -> None:
        """Serve another champion: load it here (the worker keeps serving meanwhile), then swap it in between
        batches; requests already running finish on the old model. Returns once the new one serves."""
        model_dir = Path(model_dir)
        with self._reload_lock:
            bundle = load_bundle(model_dir, model_version, self._tokenizer_for(model_dir))
            self.champion.swap(bundle)
        self.metrics.inc("flywheel_model_reloads_total")
        log.info("serving %s from %s", bundle.version, model_dir)

    def set_challenger(self, model_dir: str | Path | None, model_version: str | None = None, share: float = 0.0) -> None:
        """Route `share` (0..1) of requests, chosen by request-id hash, to a challenger model; None removes it."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"canary share must be within [0, 1], got {share}")
        old = self.challenger
        if model_dir is None:
            self.challenger, self.canary_share = None, 0.0
        else:
            model_dir = Path(model_dir)
            engine = Engine(load_bundle(model_dir, model_version, self._tokenizer_for(model_dir)), **self.engine_options)
            if self.champion.alive:
                engine.start()
            self.challenger, self.canary_share = engine, share
        if old is not None:
            old.stop()

    def _poll_versions(self) -> None:
        assert self.version_source is not None
        while not self._stop_polling.wait(self.poll_interval_s):
            try:
                found = self.version_source()
                if found is not None and found[0] != self.champion.model_version:
                    self.reload(found[1], found[0])
            except Exception:  # a flaky registry must not take the server down; try again next poll
                log.exception("version source failed; still serving %s", self.champion.model_version)

    def route(self, request_id: str) -> Engine:
        if self.challenger is not None and canary_bucket(request_id) < self.canary_share:
            return self.challenger
        return self.champion

    def engines(self) -> list[Engine]:
        return [self.champion] + ([self.challenger] if self.challenger is not None else [])

    # ---- submitting work

    def _submit(
        self, engine: Engine, prompt: Prompt, params: SamplingParams, request_id: str, n: int = 1,
        stream: bool = False,
    ) -> list[tuple[GenerationRequest, asyncio.Queue[Any]]]:
        """Validate + tokenize once, enqueue `n` copies (best_of) all-or-none; results arrive on the queues."""
        loop = asyncio.get_running_loop()
        bundle = engine.bundle
        ids = engine.prepare(prompt, params, bundle)
        out = []
        for i in range(n):
            queue: asyncio.Queue[Any] = asyncio.Queue()

            def sink(item: Any, queue: asyncio.Queue[Any] = queue) -> None:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except RuntimeError:  # the event loop is gone (shutdown): nobody is waiting any more
                    pass

            req = GenerationRequest(
                # best_of copies share params with seed None: the engine draws a fresh seed for each.
                prompt, params, sink, request_id=request_id, stream=stream,
                input_ids=ids, tokenized_by=bundle.version,
            )
            out.append((req, queue))
        engine.enqueue([r for r, _ in out])
        return out

    async def _result(self, queue: asyncio.Queue[Any]) -> GenerationResult:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, GenerationResult):
                return item

    # ---- records for the hooks

    async def _dispatch(self, hook: Hook | None, record: dict[str, Any]) -> None:
        if hook is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._hooks, hook, record)
        except Exception:  # the answer was already produced; a sink failure must not turn it into an error
            self.metrics.inc("flywheel_hook_failures_total", 'hook="interaction"')
            log.exception("on_interaction hook failed for request %s", record.get("request_id"))

    def _interaction(
        self, request: Request, started: float, started_iso: str, messages: list[dict[str, str]],
        engine: Engine, result: GenerationResult | None, error: BaseException | None,
    ) -> dict[str, Any]:
        latency = time.perf_counter() - started
        status = "ok" if error is None else "error"
        self.metrics.duration.observe(latency)
        if error is None and result is not None:
            self.metrics.inc("tgi_request_success", f'model_version="{result.model_version}"')
            self.metrics.generated.observe(result.generated_tokens)
            self.metrics.input_length.observe(result.prompt_tokens)
            self.metrics.inc("tgi_request_generated_tokens_total", "", result.generated_tokens)
        else:
            self.metrics.inc("tgi_request_failure", f'err="{_classify(error)[1] if error else "generation"}"')
        return {
            "type": "interaction",
            "request_id": request.state.request_id,
            "user_id": request.headers.get("x-user-id") or "anonymous",
            "session_id": request.headers.get("x-session-id") or None,
            "model_version": result.model_version if result is not None else engine.model_version,
            "timestamp": started_iso,
            "messages": messages,
            "response": result.generated_text if result is not None else "",
            "latency_ms": round(latency * 1000, 3),
            "prompt_tokens": result.prompt_tokens if result is not None else 0,
            "completion_tokens": result.generated_tokens if result is not None else 0,
            "status": status,
        }

    # ---- TGI generate

    def _sampling(self, p: GenerateParameters) -> SamplingParams:
        if p.grammar is not None:
            raise InvalidRequest("`grammar` is not supported by this server")
        if p.watermark:
            raise InvalidRequest("`watermark` is not supported by this server")
        if p.adapter_id:
            raise InvalidRequest("`adapter_id` is not supported by this server")
        if p.frequency_penalty is not None and p.frequency_penalty <= 0:
            raise InvalidRequest(f"`frequency_penalty` must be strictly positive, got {p.frequency_penalty}")
        return SamplingParams(
            max_new_tokens=p.max_new_tokens if p.max_new_tokens is not None else self.default_max_new_tokens,
            do_sample=p.do_sample,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            typical_p=p.typical_p,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            stop=tuple(p.stop),
            seed=p.seed,
            top_n_tokens=p.top_n_tokens or 0,
            decoder_input_details=p.decoder_input_details,
            truncate=p.truncate,
        )

    def _best_of(self, p: GenerateParameters, params: SamplingParams, stream: bool) -> int:
        n = p.best_of or 1
        if n <= 0:
            raise InvalidRequest("`best_of` must be strictly positive")
        if n > 1:
            if n > self.max_best_of:
                raise InvalidRequest(f"`best_of` must be <= {self.max_best_of}. Given: {n}")
            if stream:
                raise InvalidRequest("`best_of` != 1 is not supported when `stream` == True")
            if params.seed is not None:
                raise InvalidRequest("`seed` must not be set when `best_of` > 1")
            if not params.sampling:
                raise InvalidRequest("you must use sampling when `best_of` is > 1")
        return n

    async def generate(self, body: GenerateBody, request: Request) -> dict[str, Any] | JSONResponse:
        started, started_iso = time.perf_counter(), _now_iso()
        rid = request.state.request_id
        engine = self.route(rid)
        messages = [{"role": "user", "content": body.inputs}]
        self.metrics.inc("tgi_request_count")
        result: GenerationResult | None = None
        try:
            params = self._sampling(body.parameters)
            n = self._best_of(body.parameters, params, stream=False)
            pending = self._submit(engine, body.inputs, params, rid, n=n)
            results = [await self._result(q) for _, q in pending]
        except (InvalidRequest, EngineOverloaded, GenerationFailed) as exc:
            await self._dispatch(self.on_interaction, self._interaction(request, started, started_iso, messages, engine, None, exc))
            status, kind = _classify(exc)
            return _error(status, str(exc), kind, rid)
        results.sort(key=lambda r: r.logprob_sum, reverse=True)
        result = results[0]
        await self._dispatch(self.on_interaction, self._interaction(request, started, started_iso, messages, engine, result, None))
        text = (body.inputs + result.generated_text) if body.parameters.return_full_text else result.generated_text
        out: dict[str, Any] = {"generated_text": text}
        if body.parameters.details:
            out["details"] = _details(result, results[1:] if n > 1 else None)
        return out

    async def generate_stream(self, body: GenerateBody, request: Request) -> Response:
        started, started_iso = time.perf_counter(), _now_iso()
        rid = request.state.request_id
        engine = self.route(rid)
        messages = [{"role": "user", "content": body.inputs}]
        self.metrics.inc("tgi_request_count")
        try:
            params = self._sampling(body.parameters)
            self._best_of(body.parameters, params, stream=True)
            [(req, queue)] = self._submit(engine, body.inputs, params, rid, stream=True)
        except (InvalidRequest, EngineOverloaded) as exc:
            await self._dispatch(self.on_interaction, self._interaction(request, started, started_iso, messages, engine, None, exc))
            status, kind = _classify(exc)
            return _error(status, str(exc), kind, rid)
        prefix = body.inputs if body.parameters.return_full_text else ""

        async def events() -> AsyncIterator[str]:
            result: GenerationResult | None = None
            error: BaseException | None = None
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        error = item
                        yield _sse({"error": str(item), "error_type": _classify(item)[1]})
                        break
                    if isinstance(item, GenerationResult):
                        result = item
                        break
                    yield _sse(_stream_tok(item, prefix))
            finally:
                if result is None and error is None:  # the client went away mid-stream
                    req.cancel()
                    error = asyncio.CancelledError("client disconnected")
            await self._dispatch(
                self.on_interaction, self._interaction(request, started, started_iso, messages, engine, result, error)
            )

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- OpenAI chat

    def _chat_params(self, body: ChatBody, engine: Engine, messages: list[dict[str, str]]) -> SamplingParams:
        if body.n not in (None, 1):
            raise InvalidRequest(f"`n` must be 1 (one choice per request), got {body.n}")
        if body.tools:
            raise InvalidRequest("`tools` are not supported by this server")
        if body.logit_bias:
            raise InvalidRequest("`logit_bias` is not supported by this server")
        if body.presence_penalty:
            raise InvalidRequest("`presence_penalty` is not supported by this server; use `frequency_penalty`")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 5:
            raise InvalidRequest(f"`top_logprobs` must be between 0 and 5, got {body.top_logprobs}")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        max_new = body.max_tokens
        if max_new is None:  # as TGI: as much as fits, here capped by the server's default
            room = engine.max_total_tokens - len(encode_prompt(engine.bundle.tokenizer, messages))
            max_new = max(1, min(self.default_max_new_tokens, engine.max_new_tokens_limit, room))
        # Greedy unless a positive temperature or a top_p asks for sampling (deterministic by default).
        sampling = (body.temperature is not None and body.temperature > 0) or body.top_p is not None
        return SamplingParams(
            max_new_tokens=max_new,
            do_sample=sampling,
            temperature=body.temperature if sampling else (0.0 if body.temperature == 0 else None),
            top_p=body.top_p,
            seed=body.seed,
            stop=stop,
            repetition_penalty=body.repetition_penalty,
            frequency_penalty=body.frequency_penalty,
            top_n_tokens=(body.top_logprobs or 0) if body.logprobs else 0,
        )

    async def chat(self, body: ChatBody, request: Request) -> Response:
        started, started_iso = time.perf_counter(), _now_iso()
        rid = request.state.request_id
        engine = self.route(rid)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        self.metrics.inc("tgi_request_count")
        try:
            params = self._chat_params(body, engine, messages)
            [(req, queue)] = self._submit(engine, messages, params, rid, stream=body.stream)
            if not body.stream:
                result = await self._result(queue)
        except (InvalidRequest, EngineOverloaded, GenerationFailed) as exc:
            record = self._interaction(request, started, started_iso, messages, engine, None, exc)
            await self._dispatch(self.on_interaction, record)
            status, kind = _classify(exc)
            return _error(status, str(exc), kind, rid)
        created = int(time.time())
        head = {
            "id": rid, "created": created, "model": engine.model_version,
            "system_fingerprint": f"{SERVER_VERSION}-{engine.bundle.sha[:12]}",
        }
        if not body.stream:
            await self._dispatch(self.on_interaction, self._interaction(request, started, started_iso, messages, engine, result, None))
            head["model"] = result.model_version  # the model that answered, even across a swap
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.generated_text},
                "logprobs": _chat_logprobs(result.tokens, result.top_tokens) if body.logprobs else None,
                "finish_reason": _openai_finish(result.finish_reason),
            }
            usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generated_tokens,
                     "total_tokens": result.prompt_tokens + result.generated_tokens}
            return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage})

        async def chunks() -> AsyncIterator[str]:
            result: GenerationResult | None = None
            error: BaseException | None = None
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        error = item
                        yield _sse({"error": str(item), "error_type": _classify(item)[1]})
                        break
                    if isinstance(item, GenerationResult):
                        result = item
                        break
                    tok = item.token
                    chunk: dict[str, Any] = {
                        **head, "object": "chat.completion.chunk",
                        "choices": [{
                            "index": 0,
                            "delta": {"role": "assistant", "content": "" if tok.special else tok.text, "tool_calls": None},
                            "logprobs": _chat_logprobs([tok], [item.top_tokens] if item.top_tokens else None)
                            if body.logprobs else None,
                            "finish_reason": _openai_finish(item.result.finish_reason) if item.result else None,
                        }],
                    }
                    if item.result is not None:
                        r = item.result
                        chunk["usage"] = {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generated_tokens,
                                          "total_tokens": r.prompt_tokens + r.generated_tokens}
                    yield _sse(chunk)
            finally:
                if result is None and error is None:
                    req.cancel()
                    error = asyncio.CancelledError("client disconnected")
            await self._dispatch(
                self.on_interaction, self._interaction(request, started, started_iso, messages, engine, result, error)
            )

        return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- feedback, info

    async def feedback(self, body: FeedbackBody, request: Request) -> JSONResponse:
        if body.thumbs is None and body.rating is None and body.correction is None and body.comment is None:
            return _error(422, "feedback needs at least one of `thumbs`, `rating`, `correction`, `comment`",
                          "validation", request.state.request_id)
        record = {
            "type": "feedback",
            "feedback_id": str(uuid.uuid4()),
            "request_id": body.request_id,
            "user_id": request.headers.get("x-user-id") or "anonymous",
            "timestamp": _now_iso(),
            "thumbs": body.thumbs,
            "rating": body.rating,
            "correction": body.correction,
            "comment": body.comment,
        }
        recorded = False
        if self.on_feedback is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(self._hooks, self.on_feedback, record)
                recorded = True
            except Exception as exc:  # feedback is the whole request here: tell the client it was not kept
                self.metrics.inc("flywheel_hook_failures_total", 'hook="feedback"')
                log.exception("on_feedback hook failed for request %s", body.request_id)
                return _error(500, f"feedback for {body.request_id} was not recorded: {exc!r}", "generation",
                              request.state.request_id)
        self.metrics.inc("flywheel_feedback_total", f'recorded="{str(recorded).lower()}"')
        return JSONResponse({"feedback_id": record["feedback_id"], "recorded": recorded})

    def info(self) -> dict[str, Any]:
        e = self.champion
        b = e.bundle
        return {
            "model_id": str(b.model_dir),
            "model_sha": b.sha,
            "model_version": b.version,
            "model_dtype": b.dtype,
            "model_device_type": "cpu",
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": e.max_queue + e.max_batch_size,
            "max_best_of": self.max_best_of,
            "max_stop_sequences": e.max_stop_sequences,
            "max_input_tokens": e.max_input_length,
            "max_input_length": e.max_input_length,
            "max_total_tokens": e.max_total_tokens,
            "max_new_tokens": e.max_new_tokens_limit,
            "max_batch_size": e.max_batch_size,
            "max_batch_total_tokens": e.max_batch_size * e.max_total_tokens,
            "max_waiting_tokens": None,
            "waiting_served_ratio": None,
            "max_wait_ms": e.max_wait_s * 1000,
            "batching": e.batching,
            "max_queue": e.max_queue,
            "validation_workers": 1,
            "max_client_batch_size": 1,
            "router": "llm-flywheel",
            "version": SERVER_VERSION,
            "sha": None,
            "docker_label": None,
            "canary": (
                {"model_version": self.challenger.model_version, "share": self.canary_share,
                 "model_sha": self.challenger.bundle.sha}
                if self.challenger is not None else None
            ),
        }

    # ---- the app

    def _build_app(self) -> FastAPI:
        server = self

        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            await asyncio.to_thread(server.start)
            try:
                yield
            finally:
                await asyncio.to_thread(server.close)

        app = FastAPI(title="llm-flywheel TGI-protocol server", version=SERVER_VERSION,
                      lifespan=asynccontextmanager(lifespan))
        app.add_middleware(RequestIdMiddleware)

        @app.exception_handler(RequestValidationError)
        async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
            parts = []
            for err in exc.errors():
                loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
                parts.append(f"{loc or 'body'}: {err.get('msg')}")
            return _error(422, "Input validation error: " + "; ".join(parts), "validation",
                          getattr(request.state, "request_id", None))

        @app.post("/")
        async def compat(body: GenerateBody, request: Request) -> Any:
            if body.stream:
                return await server.generate_stream(body, request)
            out = await server.generate(body, request)
            return out if isinstance(out, Response) else [out]

        @app.post("/generate")
        async def generate(body: GenerateBody, request: Request) -> Any:
            return await server.generate(body, request)

        @app.post("/generate_stream")
        async def generate_stream(body: GenerateBody, request: Request) -> Response:
            return await server.generate_stream(body, request)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatBody, request: Request) -> Response:
            return await server.chat(body, request)

        @app.post("/feedback")
        async def feedback(body: FeedbackBody, request: Request) -> JSONResponse:
            return await server.feedback(body, request)

        @app.get("/info")
        async def info() -> dict[str, Any]:
            return server.info()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            data = [{"id": e.bundle.model_dir.name, "object": "model", "created": 0, "owned_by": e.model_version}
                    for e in server.engines()]
            return {"object": "list", "data": data}

        @app.get("/health")
        async def health() -> JSONResponse:
            alive = all(e.alive for e in server.engines())
            body = {"status": "ok" if alive else "unavailable", "model_version": server.champion.model_version}
            return JSONResponse(body, status_code=200 if alive else 503)

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(server.metrics.render(server.engines()), media_type="text/plain; version=0.0.4")

        return app


# --------------------------------------------------------------------------------------------------------
# Response shapes


def _tok(t: TokenInfo) -> dict[str, Any]:
    return t.as_dict()


def _details(result: GenerationResult, others: list[GenerationResult] | None = None) -> dict[str, Any]:
    def one(r: GenerationResult) -> dict[str, Any]:
        return {
            "finish_reason": r.finish_reason,
            "generated_tokens": r.generated_tokens,
            "seed": r.seed,
            "prefill": [{"id": t.id, "text": t.text, "logprob": t.logprob} for t in r.prefill],
            "tokens": [_tok(t) for t in r.tokens],
            "top_tokens": [[_tok(t) for t in step] for step in r.top_tokens] if r.top_tokens else None,
        }

    out = one(result)
    out["best_of_sequences"] = [{"generated_text": r.generated_text, **one(r)} for r in others] if others else None
    return out


def _stream_tok(event: TokenEvent, prefix: str) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "index": event.index,
        "token": _tok(event.token),
        "top_tokens": [_tok(t) for t in event.top_tokens] if event.top_tokens else None,
        "generated_text": None,
        "details": None,
    }
    if event.result is not None:
        r = event.result
        payload["generated_text"] = prefix + r.generated_text
        payload["details"] = {"finish_reason": r.finish_reason, "generated_tokens": r.generated_tokens,
                              "seed": r.seed, "input_length": r.prompt_tokens}
    return payload


def _chat_logprobs(tokens: list[TokenInfo], tops: list[list[TokenInfo]] | None) -> dict[str, Any]:
    content = []
    for i, t in enumerate(tokens):
        top = tops[i] if tops and i < len(tops) else []
        content.append({"token": t.text, "logprob": t.logprob,
                        "top_logprobs": [{"token": x.text, "logprob": x.logprob} for x in top]})
    return {"content": content}


def _openai_finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _sse(payload: dict[str, Any]) -> str:
    return f"data:{json.dumps(payload)}\n\n"


# --------------------------------------------------------------------------------------------------------
# Entry points


def serve(
    model_dir: str | Path, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info", **options: Any
) -> None:
    """Run the server until interrupted (the `flywheel serve` command). `options` go to `Server`."""
    import uvicorn

    server = Server(model_dir, **options)
    uvicorn.run(server.app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="transformers save_pretrained directory (safetensors + tokenizer)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--model-version", help="label reported in /info and records (default: sha prefix)")
    parser.add_argument("--tokenizer", help="tokenizer directory, if not inside model_dir")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="how long an idle worker gathers a batch")
    parser.add_argument("--max-queue", type=int, default=128, help="queued requests beyond which 429 overloaded")
    parser.add_argument("--no-batching", action="store_true", help="batches of one (benchmark baseline)")
    parser.add_argument("--max-total-tokens", type=int, default=2048)
    parser.add_argument("--max-input-length", type=int)
    parser.add_argument("--max-new-tokens", type=int, help="upper bound for max_new_tokens (default: total)")
    parser.add_argument("--default-max-new-tokens", type=int, default=100)
    parser.add_argument("--max-best-of", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, help="intra-op threads (default: cores - 1)")
    parser.add_argument("--step-delay-ms", type=float, default=0.0, help="emulate a slower model (tests/demos)")
    parser.add_argument("--challenger", help="model directory of a canary challenger")
    parser.add_argument("--challenger-version")
    parser.add_argument("--canary-share", type=float, default=0.0, help="share of requests for the challenger")
    parser.add_argument("--version-file", help='JSON {"model_version","model_dir"} polled to reload the model')
    parser.add_argument("--poll-interval", type=float, default=30.0, help="seconds between version polls")
    parser.add_argument("--hooks-jsonl", help="append interaction and feedback records to this JSONL file")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sink = JsonlSink(args.hooks_jsonl) if args.hooks_jsonl else None
    serve(
        args.model_dir, host=args.host, port=args.port, log_level=args.log_level,
        model_version=args.model_version, tokenizer_dir=args.tokenizer,
        on_interaction=sink, on_feedback=sink,
        version_source=file_version_source(args.version_file) if args.version_file else None,
        poll_interval_s=args.poll_interval,
        challenger_dir=args.challenger, challenger_version=args.challenger_version, canary_share=args.canary_share,
        default_max_new_tokens=args.default_max_new_tokens, max_best_of=args.max_best_of,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        batching=not args.no_batching, max_total_tokens=args.max_total_tokens,
        max_input_length=args.max_input_length, max_new_tokens_limit=args.max_new_tokens,
        torch_threads=args.torch_threads, step_delay_ms=args.step_delay_ms,
    )


if __name__ == "__main__":
    main()
