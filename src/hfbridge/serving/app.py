"""The HTTP face: a FastAPI app with OpenAI-compatible endpoints over a :class:`~hfbridge.serving.batcher.Batcher`.

* ``GET /health`` (no key needed), ``GET /v1/models``;
* ``POST /v1/chat/completions`` (messages rendered with the chat template exactly as training renders them) and
  ``POST /v1/completions`` (a prompt string rendered as the ``prompt_completion`` format does, or token ids),
  with ``stream: true`` as server-sent events in OpenAI's chunk format;
* ``POST /predict`` for a declarative LLM;
* ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``, and ``GET /metrics`` (Prometheus' format).

Every request is read with a size limit and a time limit, parsed and checked (:mod:`hfbridge.serving.schemas`)
before it reaches the model; errors are JSON in OpenAI's shape. The event loop only waits: prompts are encoded by
a bounded pool of worker threads, and the model runs on the batcher's one thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from hfbridge.serving.batcher import Batcher
from hfbridge.serving.engine import Engine, Event, Row, TokenLogprob
from hfbridge.serving.errors import APIError, bad_request
from hfbridge.serving.metrics import Metrics, MetricsMiddleware
from hfbridge.serving.model import ServedModel
from hfbridge.serving.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_json,
    validate,
)

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    """The server's limits; each has a ``hfbridge serve`` flag (docs/serving.md)."""

    api_key: str | None = None
    max_new_tokens: int = 512  # the most tokens one choice may ask for (and the default: what the context allows)
    max_n: int = 8  # choices per request
    max_batch_size: int = 16  # rows decoded together
    batch_wait_ms: float = 20.0  # a batch starts when no request came for this long (at most 5x after its first)
    continuous_batching: bool = True  # requests join a decoding batch between steps (on the fast greedy loop)
    max_queue: int = 256  # requests waiting for the model; more get a 503
    workers: int = 2  # threads that encode prompts and check /predict records
    request_timeout: float = 300.0  # seconds from arrival to the last token; past it a 504 and the rows stop
    read_timeout: float = 30.0  # seconds to send the request line, headers and body
    max_body_bytes: int = 1 << 20
    max_records: int = 256  # records in one /predict request
    max_connections: int = 512  # open connections; more are closed at once


class Served:
    """Everything the endpoints share: the model, the batcher, the worker pool and the settings."""

    def __init__(self, served: ServedModel, settings: ServeSettings):
        self.served = served
        self.settings = settings
        self.engine = Engine(served.model, served.tokenizer)
        self.batcher = Batcher(self.engine, max_batch=settings.max_batch_size,
                               window_s=settings.batch_wait_ms / 1000, max_queue=settings.max_queue,
                               continuous=settings.continuous_batching)
        self.pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="hfbridge-worker")
        self.metrics = Metrics()

    @property
    def model_id(self) -> str:
        return self.served.model_id

    async def in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        self.batcher.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ reading requests
async def read_body(request: Request, settings: ServeSettings) -> bytes:
    """The body, at most ``max_body_bytes`` (413), sent within ``read_timeout`` seconds (408)."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise APIError(413, f"the body is {declared} bytes; the limit is {limit}", code="body_too_large")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the body is over the limit of {limit} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), settings.read_timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the body was not sent within {settings.read_timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None


async def read_json(request: Request, settings: ServeSettings, lists: bool = False):
    return parse_json(await read_body(request, settings), lists)


async def checked_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` when the server has a key (compared in constant time)."""
    key = request.app.state.served.settings.api_key
    if not key:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


# ------------------------------------------------------------------------------------------------ generating
class Pending:
    """One request's rows on their way through the batcher: their events, in order, on the event loop."""

    def __init__(self, rows: list[Row], deadline: float):
        self.rows = rows
        self.deadline = deadline
        self.open = len(rows)
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop closed: the server is stopping
                pass

        for row in rows:
            row.sink = sink

    def cancel(self) -> None:
        for row in self.rows:
            row.cancel()

    async def next(self, disconnected: asyncio.Future | None = None) -> Event:
        """The next event; a 504 past the deadline; ``ClientGone`` when ``disconnected`` resolves first."""
        left = self.deadline - time.monotonic()
        get = asyncio.ensure_future(self.queue.get())
        waiting = {get} if disconnected is None else {get, disconnected}
        done, _ = await asyncio.wait(waiting, timeout=max(left, 0), return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            event = get.result()
            self.open -= event.kind in ("end", "error")
            if event.kind == "end" and event.finish_reason == "timeout":  # the engine saw the deadline pass first
                raise _timeout()
            return event
        get.cancel()
        if disconnected is not None and disconnected in done:
            raise ClientGone
        raise _timeout()


def _timeout() -> APIError:
    return APIError(504, "the request did not finish within the server's request timeout", code="timeout")


class ClientGone(Exception):
    pass


async def _disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def resolve_tokens(req, prompt: list[int], served: Served) -> int:
    """The request's ``max_tokens`` (by default what the context and the server allow), checked against both."""
    settings, context = served.settings, served.engine.context
    limit = settings.max_new_tokens
    asked = req.requested_tokens
    if asked is not None and asked > limit:
        raise bad_request(f"max_tokens={asked} is above this server's limit of {limit}", param="max_tokens")
    room = math.inf if context is None else context - len(prompt)
    tokens = asked if asked is not None else int(min(limit, room))
    if len(prompt) + tokens > (context or math.inf) or tokens < 1:
        raise bad_request(f"this model's context is {context} tokens; the prompt has {len(prompt)} and "
                          f"{tokens if asked is not None else 'at least 1'} more were asked for",
                          param="messages" if isinstance(req, ChatRequest) else "prompt",
                          code="context_length_exceeded")
    return tokens


def check_request(served: Served, req, n_prompts: int = 1):
    """What the settings bound, checked before any prompt is encoded; returns ``req``."""
    settings = served.settings
    if req.n > settings.max_n:
        raise bad_request(f"n={req.n} is above this server's limit of {settings.max_n}", param="n")
    if n_prompts * req.n > settings.max_batch_size:
        raise bad_request(f"{n_prompts} prompts x n={req.n} is more than {settings.max_batch_size} choices in "
                          "one request", param="n")
    check_model_name(served, req)
    return req


def check_model_name(served: Served, req) -> None:
    """A request naming a model must name the served one (else 404)."""
    if req.model is not None and req.model != served.model_id:
        raise APIError(404, f"the model {req.model!r} is not served here; this server serves "
                            f"{served.model_id!r}", param="model", code="model_not_found")


async def start_rows(served: Served, req, prompts: list[list[int]]) -> Pending:
    settings = served.settings
    defaults = served.served.sampling
    temperature = req.temperature if req.temperature is not None else defaults.get("temperature", 0.0)
    top_p = req.top_p if req.top_p is not None else defaults.get("top_p", 1.0)
    deadline = time.monotonic() + settings.request_timeout
    biases = req.biases
    check_token_ids(served, biases, "logit_bias", "logit_bias token ids")
    rows = []
    for p, prompt in enumerate(prompts):
        if not prompt:
            raise bad_request("a prompt renders to no tokens", param="prompt")
        check_token_ids(served, prompt, "prompt")
        max_tokens = resolve_tokens(req, prompt, served)
        rows += [Row(prompt, max_tokens, index=p * req.n + j, stops=req.stops, temperature=temperature,
                     top_p=top_p, seed=req.seed, stream=req.stream, deadline=deadline, logprobs=req.top_k_logprobs,
                     echo=getattr(req, "echo", False), presence_penalty=req.presence_penalty or 0.0,
                     frequency_penalty=req.frequency_penalty or 0.0, logit_bias=biases) for j in range(req.n)]
    pending = Pending(rows, deadline)
    served.batcher.submit(rows)
    return pending


def _usage(prompts: list[list[int]], counts: dict[int, int]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(counts.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


class Reply:
    """The OpenAI objects of one request: whole (``chat.completion``, ``text_completion``) or chunked."""

    def __init__(self, chat: bool, model_id: str):
        self.chat = chat
        self.model_id = model_id
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id, "choices": choices,
                **extra}

    def whole(self, ends: dict[int, Event], usage: dict, rows: dict[int, Row], engine) -> dict:
        choices = []
        for index in sorted(ends):
            end, row = ends[index], rows[index]
            choice = {"index": index, "logprobs": None, "finish_reason": _finish_reason(end.finish_reason)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": end.text}
                if row.logprobs is not None:
                    choice["logprobs"] = {"content": _chat_logprobs(engine, row.token_logprobs), "refusal": None}
            else:
                echoed = engine.decode(row.prompt) if row.echo else ""
                choice["text"] = echoed + end.text
                if row.logprobs is not None:
                    choice["logprobs"] = _completion_logprobs(engine, row)
            choices.append(choice)
        return self._object("chat.completion" if self.chat else "text_completion", choices, usage=usage)

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None,
              role: bool = False, logprobs: dict | list | None = None) -> str:
        choice: dict = {"index": index, "logprobs": None, "finish_reason": finish_reason}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs, "refusal": None} if self.chat else logprobs
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return sse(self._object("chat.completion.chunk" if self.chat else "text_completion", [choice]))

    def usage_chunk(self, usage: dict) -> str:
        return sse(self._object("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage))


def _token_names(engine, logprobs: list[TokenLogprob]) -> dict[int, str]:
    """Each token's own text, for the tokens of ``logprobs`` and their most likely alternatives."""
    ids = [t.token for t in logprobs] + [i for t in logprobs for i, _ in t.top]
    return dict(zip(ids, engine.token_texts(ids)))


def _chat_logprobs(engine, logprobs: list[TokenLogprob]) -> list[dict]:
    """``choices[i].logprobs.content`` of a chat completion: each generated token, its log-probability and the
    most likely tokens at its step (token texts with their UTF-8 bytes)."""
    named = _token_names(engine, logprobs)

    def entry(token: int, logprob: float) -> dict:
        return {"token": named[token], "logprob": logprob, "bytes": list(named[token].encode("utf-8"))}

    return [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in logprobs]


def _completion_logprobs(engine, row: Row) -> dict:
    """``choices[i].logprobs`` of a (legacy) completion; with ``echo`` the prompt tokens come first."""
    return _legacy_logprobs(engine, (row.echoed_logprobs() if row.echo else []) + row.token_logprobs)


def _legacy_logprobs(engine, logprobs: list[TokenLogprob], start: int = 0) -> dict:
    """OpenAI's legacy ``logprobs`` object: token texts, their log-probabilities, the most likely tokens at each
    position, and where each token's text starts in ``text`` (from ``start``)."""
    texts = _token_names(engine, logprobs)
    offsets, at = [], start
    for t in logprobs:
        offsets.append(at)
        at += len(texts[t.token])

    def ranked(top: list[tuple[int, float]]) -> dict[str, float]:
        named: dict[str, float] = {}
        for i, value in top:  # most likely first: tokens of the same text (partial bytes) keep the likelier
            named.setdefault(texts[i], value)
        return named

    return {"tokens": [texts[t.token] for t in logprobs], "token_logprobs": [t.logprob for t in logprobs],
            "top_logprobs": [None if t.logprob is None else ranked(t.top) for t in logprobs],
            "text_offset": offsets}


def check_token_ids(served: Served, ids, param: str, what: str = "token ids") -> None:
    """Token ids outside the served model's vocabulary are a 400 naming ``param``."""
    if any(not 0 <= t < served.engine.vocab_size for t in ids):
        raise bad_request(f"{what} must lie in [0, {served.engine.vocab_size})", param=param)


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def answer(request: Request, served: Served, req, prompts: list[list[int]], chat: bool) -> Response:
    pending = await start_rows(served, req, prompts)
    reply = Reply(chat, served.model_id)
    if req.stream:
        return StreamingResponse(stream(pending, reply, prompts, req.include_usage, served),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    gone = asyncio.ensure_future(_disconnect(request))
    ends: dict[int, Event] = {}
    try:
        while pending.open:
            event = await pending.next(gone)
            if event.kind == "error":
                raise APIError(500, event.text, code="generation_failed")
            if event.kind == "end":
                ends[event.index] = event
    except ClientGone:
        return Response(status_code=499)
    finally:
        gone.cancel()
        pending.cancel()  # nothing, unless the request failed or timed out: then its rows stop decoding
    usage = _usage(prompts, {i: e.tokens for i, e in ends.items()})
    served.metrics.add_usage(usage)
    rows = {row.index: row for row in pending.rows}
    if any(row.logprobs is not None or row.echo for row in rows.values()):  # token texts: tokenizer work
        return JSONResponse(await served.in_pool(reply.whole, ends, usage, rows, served.engine))
    return JSONResponse(reply.whole(ends, usage, rows, served.engine))


async def stream(pending: Pending, reply: Reply, prompts: list[list[int]], include_usage: bool, served: Served):
    """Server-sent events: a role chunk per choice (chat), text chunks as tokens come (with ``logprobs``, each
    carries the log-probabilities of the tokens its text completes), a last chunk with the finish reason, the usage
    chunk when asked (``stream_options.include_usage``), then ``[DONE]``. When the client goes away, Starlette
    cancels this generator and the request's rows stop decoding."""
    counts: dict[int, int] = {}
    offsets: dict[int, int] = {}

    async def shaped(event: Event):
        """The event's log-probabilities as the chunk carries them (token texts: tokenizer work, off the loop)."""
        if event.logprobs is None:
            return None
        if reply.chat:
            return await served.in_pool(_chat_logprobs, served.engine, event.logprobs)
        shaped = await served.in_pool(_legacy_logprobs, served.engine, event.logprobs, offsets.get(event.index, 0))
        offsets[event.index] = offsets.get(event.index, 0) + sum(len(t) for t in shaped["tokens"])
        return shaped

    rows = {row.index: row for row in pending.rows}
    echoing = {row.index for row in pending.rows if row.echo}

    async def echo(index: int) -> str:
        """The prompt chunk of an ``echo`` row, sent before its first new text (its prompt log-probabilities are
        computed when its batch starts)."""
        row = rows[index]
        text = await served.in_pool(served.engine.decode, row.prompt)
        logprobs = None
        if row.logprobs is not None:
            logprobs = await served.in_pool(_legacy_logprobs, served.engine, row.echoed_logprobs())
            offsets[index] = sum(len(t) for t in logprobs["tokens"])
        return reply.chunk(index, text, logprobs=logprobs)

    try:
        if reply.chat:
            for row in pending.rows:
                yield reply.chunk(row.index, role=True)
        while pending.open:
            try:
                event = await pending.next()
            except APIError as e:
                yield sse(e.body())
                break
            if event.index in echoing and event.kind in ("delta", "end"):
                echoing.discard(event.index)
                yield await echo(event.index)
            if event.kind == "delta":
                yield reply.chunk(event.index, event.text, logprobs=await shaped(event))
            elif event.kind == "end":
                counts[event.index] = event.tokens
                yield reply.chunk(event.index, finish_reason=_finish_reason(event.finish_reason),
                                  logprobs=await shaped(event) if event.logprobs else None)
            else:
                yield sse(APIError(500, event.text, code="generation_failed").body())
                break
        else:
            usage = _usage(prompts, counts)
            served.metrics.add_usage(usage)
            if include_usage:
                yield reply.usage_chunk(usage)
        yield sse("[DONE]")
    finally:
        pending.cancel()


# ------------------------------------------------------------------------------------------------ the app
def build_app(served_model: ServedModel, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``served_model``; its batcher and worker threads stop when the app shuts down."""
    settings = settings or ServeSettings()
    served = Served(served_model, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        served.close()

    app = FastAPI(title="hfbridge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.served = served
    app.add_middleware(MetricsMiddleware, metrics=served.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        message = f"no endpoint {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return APIError(exc.status_code, str(message), headers=exc.headers).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return bad_request("the request is malformed").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}").response()

    keyed = [Depends(checked_key)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.model_id}

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return {"object": "list", "data": [{"id": served.model_id, "object": "model", "created": 0,
                                            "owned_by": "hfbridge"}]}

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(request: Request):
        req = check_request(served, validate(ChatRequest, await read_json(request, settings)))
        if not served.engine.has_chat_template:
            raise bad_request("this model's tokenizer has no chat template; use /v1/completions", param="messages")
        prompt = await served.in_pool(served.engine.encode, [m.as_dict() for m in req.messages])
        return await answer(request, served, req, [prompt], chat=True)

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request):
        req = validate(CompletionRequest, await read_json(request, settings))
        check_request(served, req, len(req.prompts))
        prompts = [p if isinstance(p, list) else await served.in_pool(served.engine.encode, p) for p in req.prompts]
        return await answer(request, served, req, prompts, chat=False)

    @app.get("/metrics", dependencies=keyed)
    async def metrics():
        return Response(served.metrics.render(served.batcher), media_type="text/plain; version=0.0.4")

    @app.get("/tokenizer_info", dependencies=keyed)
    async def tokenizer_info():
        return served.engine.tokenizer_info()

    @app.post("/tokenize", dependencies=keyed)
    async def tokenize(request: Request):
        req = validate(TokenizeRequest, await read_json(request, settings))
        check_model_name(served, req)
        if req.messages is not None:
            if not served.engine.has_chat_template:
                raise bad_request("this model's tokenizer has no chat template; tokenize a prompt",
                                  param="messages")
            tokens = await served.in_pool(served.engine.encode, [m.as_dict() for m in req.messages])
        else:
            tokens = await served.in_pool(served.engine.tokenize, req.prompt, req.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.engine.context}

    @app.post("/detokenize", dependencies=keyed)
    async def detokenize(request: Request):
        req = validate(DetokenizeRequest, await read_json(request, settings))
        check_model_name(served, req)
        check_token_ids(served, req.tokens, "tokens")
        return {"prompt": await served.in_pool(served.engine.decode, req.tokens, False)}

    @app.post("/predict", dependencies=keyed)
    async def predict(request: Request):
        from hfbridge.serving.predict import predict_response

        return await predict_response(served, await read_json(request, settings, lists=True))

    return app
