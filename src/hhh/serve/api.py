"""`hhh serve`: an OpenAI-compatible API over the continuous-batching engine, and the feedback that flows back.

    GET  /v1/models               the base model and each adapter, by the name a request's `model` picks
    POST /v1/chat/completions     messages through the tokenizer's chat template; stream (SSE) or not; n, seed,
                                  stop, temperature, top_p, max_tokens, logprobs + top_logprobs; tools accepted
    POST /v1/completions          raw prompts (one or several), the legacy logprobs (alternatives per token)
    POST /v1/embeddings           the packaged all-MiniLM-L6-v2
    POST /v1/feedback             thumbs, a 1-5 rating, the preferred choice or an edited answer, for a response id
    GET  /health, GET /metrics    liveness; Prometheus text (requests, tokens, batch size, queue, time to first token)

Every answered completion is recorded in the preference store (prompt, texts, model, adapter) before the client
sees its last byte, so feedback sent right after it finds it. Errors are OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, one line, no stack trace; bodies over `max_body` bytes are refused
before they are read; with API keys, every /v1 route needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from hhh.serve.engine import Engine, Event, Job, RequestError, SamplingParams
from hhh.serve.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, FeedbackRequest

log = logging.getLogger("hhh.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               kind: str | None = None) -> dict:
    kind = kind or {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                    429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Settings:
    base_name: str                                  # the `model` that picks the base model
    adapters: dict[str, str] = field(default_factory=dict)   # request name -> adapter folder
    default_max_tokens: int = 256
    max_tokens: int = 1024                          # a request asking for more is refused
    max_body: int = 1024 * 1024
    api_keys: frozenset[str] = frozenset()
    model_spec: str = ""                            # what the store records as the model


def create_app(engine: Engine, settings: Settings, *, store=None,
               embed: Callable[[list[str]], Any] | None = None) -> FastAPI:
    """The API over a started engine. `store`: a hhh.feedback.store.Store (None: no recording, /v1/feedback 503);
    `embed`: texts -> (N, D) array (None: the packaged MiniLM on first use)."""
    from hhh.feedback.app import EdgeGuard, invalid_field

    app = FastAPI(title="hhh serve", docs_url="/docs", openapi_url="/openapi.json")
    app.add_middleware(EdgeGuard, max_body=settings.max_body, check_origin=False,
                       error_body=lambda status, message: error_body(status, message))
    app.state.engine, app.state.settings, app.state.store = engine, settings, store
    tokenizer = engine.tokenizer
    key_hashes = [hashlib.sha256(k.encode()).digest() for k in settings.api_keys]
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(error_body(err.status, err.message, param=err.param, code=err.code, kind=err.kind),
                            status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        where, message = invalid_field(err)
        return JSONResponse(error_body(400, message, param=where), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(500, "internal error (the server log has the details)"), status_code=500)

    if key_hashes:
        app.add_middleware(KeyGuard, key_hashes=key_hashes)

    def adapter_for(model: str) -> str | None:
        if model == settings.base_name:
            return None
        if model in settings.adapters:
            return model
        names = ", ".join([settings.base_name, *settings.adapters])
        raise APIError(404, f"model {model!r} does not exist here; served: {names}", param="model",
                       code="model_not_found")

    def sampling(body: ChatRequest | CompletionRequest, top_logprobs: int) -> SamplingParams:
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > settings.max_tokens:
            raise APIError(400, f"max_tokens={asked} is over this server's limit of {settings.max_tokens}",
                           param="max_tokens")
        return SamplingParams(max_tokens=asked or settings.default_max_tokens, temperature=body.temperature,
                              top_p=body.top_p, n=body.n, stop=body.stops(), seed=body.seed,
                              top_logprobs=top_logprobs, adapter=adapter_for(body.model))

    def check(ids: list[int], params: SamplingParams, *, implicit_max: bool) -> SamplingParams:
        if implicit_max and len(ids) + params.max_tokens > engine.context:  # no max_tokens asked: fit the context
            params = SamplingParams(**{**params.__dict__, "max_tokens": max(1, engine.context - len(ids))})
        try:
            engine.check(ids, params)
        except RequestError as e:
            raise APIError(400, str(e), param="messages" if "prompt" in str(e) else None,
                           code="context_length_exceeded" if "context" in str(e) else None) from None
        return params

    async def run(request: Request, ids: list[int], params: SamplingParams) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        try:
            job = engine.submit(ids, params, deliver)
        except RequestError as e:
            raise APIError(503 if "shutting down" in str(e) else 400, str(e)) from None
        return job, events

    async def collect(request: Request, job: Job, events: asyncio.Queue) -> list[dict]:
        """Wait for every choice to end; a client that disconnects meanwhile cancels the job."""
        choices: list[dict[str, Any]] = [{"text": "", "tokens": [], "logprobs": [], "top": [], "finish_reason": None}
                   for _ in range(job.params.n)]
        open_choices = job.params.n
        checked = time.monotonic()
        while open_choices:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= 0.5:  # tokens may flow without a pause: look at the clock, not gaps
                checked = time.monotonic()
                if await request.is_disconnected():
                    job.cancel()
                    raise APIError(499, "client closed the request")
            if event is None:
                continue
            c = choices[event.index]
            c["text"] += event.text
            c["tokens"] += event.tokens
            c["logprobs"] += event.logprobs
            c["top"] += event.top
            if event.finish_reason is not None:
                c["finish_reason"] = event.finish_reason
                open_choices -= 1
        if any(c["finish_reason"] == "error" for c in choices):
            raise APIError(500, "generation failed (the server log has the details)", kind="server_error")
        return choices

    async def record(response_id: str, prompt: Any, texts: list[str], params: SamplingParams,
                     user: str | None) -> None:
        if store is None:
            return
        adapter = settings.adapters.get(params.adapter) if params.adapter else None
        await run_in_threadpool(store.record_served, response_id, prompt, texts,
                                model=settings.model_spec or settings.base_name, adapter=adapter,
                                served_as=params.adapter or settings.base_name, user=user)

    def token_logprobs(c: dict, alternatives: int) -> list[dict]:
        out = []
        for i, (t, lp) in enumerate(zip(c["tokens"], c["logprobs"], strict=True)):
            text = tokenizer.decode([t])
            item = {"token": text, "logprob": lp, "bytes": list(text.encode())}
            if alternatives:
                item["top_logprobs"] = [{"token": tokenizer.decode([a]), "logprob": v,
                                         "bytes": list(tokenizer.decode([a]).encode())} for a, v in c["top"][i]]
            else:
                item["top_logprobs"] = []
            out.append(item)
        return out

    # --- routes ------------------------------------------------------------------------------------------

    from pathlib import Path

    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    static = Path(__file__).resolve().parent / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    def chat_page() -> FileResponse:
        return FileResponse(static / "chat.html")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "running": engine.running(), "waiting": engine.waiting()}

    @app.get("/metrics")
    def metrics() -> Response:
        s = engine.stats
        lines = []
        for name, kind, value, helptext in (
                ("hhh_requests_total", "counter", s.requests, "requests admitted to the batch"),
                ("hhh_requests_finished_total", "counter", s.finished, "requests whose every choice ended"),
                ("hhh_requests_cancelled_total", "counter", s.cancelled, "choices stopped because the client left"),
                ("hhh_engine_errors_total", "counter", s.errors, "engine steps that failed"),
                ("hhh_prompt_tokens_total", "counter", s.prompt_tokens, "prompt tokens prefilled"),
                ("hhh_generated_tokens_total", "counter", s.generated_tokens, "tokens generated"),
                ("hhh_decode_steps_total", "counter", s.steps, "batched decode steps"),
                ("hhh_batch_rows_total", "counter", s.rows_stepped, "rows over all decode steps (/ steps: mean batch)"),
                ("hhh_time_to_first_token_seconds_sum", "counter", s.time_to_first_token, "time to first token"),
                ("hhh_time_to_first_token_seconds_count", "counter", s.first_tokens, "requests with a first token"),
                ("hhh_running_rows", "gauge", engine.running(), "rows in the running batch"),
                ("hhh_waiting_requests", "gauge", engine.waiting(), "requests waiting to join")):
            lines += [f"# HELP {name} {helptext}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict:
        names = [settings.base_name, *settings.adapters]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "hhh"}
                                           for n in names]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        alternatives = body.top_logprobs or 0
        if alternatives and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params = sampling(body, alternatives)
        try:  # in a worker thread: a long prompt or a slow template must not hold up every other client
            ids = list((await run_in_threadpool(tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                                tokenize=True, return_dict=True))["input_ids"])
        except Exception as e:  # a template that refuses the conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template refused the messages: {str(e).splitlines()[0][:200]}",
                           param="messages") from None
        params = check(ids, params, implicit_max=body.max_tokens is None and body.max_completion_tokens is None)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        prompt: Any = messages[-1]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else messages
        job, events = await run(request, ids, params)
        if body.stream:
            return StreamingResponse(
                _chat_stream(job, events, response_id, body, ids, prompt, params, record, token_logprobs,
                             created=int(time.time())),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = await collect(request, job, events)
        await record(response_id, prompt, [c["text"] for c in choices], params, body.user)
        return JSONResponse({
            "id": response_id, "object": "chat.completion", "created": int(time.time()), "model": body.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": {"content": token_logprobs(c, alternatives)} if body.logprobs else None,
                         "finish_reason": _reason(c["finish_reason"])} for i, c in enumerate(choices)],
            "usage": _usage(len(ids), job.completion_tokens)})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        alternatives = body.logprobs or 0
        params = sampling(body, alternatives)
        encoded = await run_in_threadpool(lambda: [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts])
        checked = [check(ids, params, implicit_max=body.max_tokens is None) for ids in encoded]
        response_id = f"cmpl-{uuid.uuid4().hex}"
        runs = [await run(request, ids, p) for ids, p in zip(encoded, checked, strict=True)]
        if body.stream:
            legacy = (lambda part: _legacy_logprobs(tokenizer, part, alternatives)) if body.logprobs is not None \
                else None
            return StreamingResponse(_completion_stream(runs, response_id, body, encoded, prompts, record, legacy,
                                                        created=int(time.time())),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            results = [await collect(request, job, events) for job, events in runs]
        finally:
            for job, _ in runs:
                if job.open_choices:  # one prompt's wait failed (client gone): the others stop too
                    job.cancel()
        choices, n = [], body.n
        for pi, cs in enumerate(results):
            await record(response_id if len(prompts) == 1 else f"{response_id}-{pi}", prompts[pi],
                         [c["text"] for c in cs], runs[pi][0].params, body.user)
            for j, c in enumerate(cs):
                choices.append({"index": pi * n + j, "text": c["text"], "finish_reason": _reason(c["finish_reason"]),
                                "logprobs": _legacy_logprobs(tokenizer, c, alternatives) if body.logprobs is not None
                                else None})
        return JSONResponse({"id": response_id, "object": "text_completion", "created": int(time.time()),
                             "model": body.model, "choices": choices,
                             "usage": _usage(sum(len(e) for e in encoded), sum(j.completion_tokens for j, _ in runs))})

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if embed is None:
            from hhh.models.embed import count_tokens
            from hhh.models.embed import embed as minilm

            vectors = await run_in_threadpool(minilm, texts)
            tokens = count_tokens(texts)
        else:
            vectors = await run_in_threadpool(embed, texts)
            tokens = sum(len(t.split()) for t in texts)  # a caller's embedder: words stand in for its tokens
        return {"object": "list", "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": _vector(v, body.encoding_format)}
                         for i, v in enumerate(vectors)]}

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest) -> JSONResponse:
        if store is None:
            raise APIError(503, "this server has no preference store (start it with --db)")
        try:
            kind, value = body.kind()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        from hhh.feedback.store import StoreError

        try:
            saved = await run_in_threadpool(store.add_served_feedback, body.id, kind, value, choice=body.choice,
                                            feedback_id=body.feedback_id)
        except StoreError as e:
            raise APIError(e.status, str(e)) from None
        return JSONResponse({"object": "feedback", **saved}, status_code=201)

    return app


class KeyGuard:
    """Pure ASGI middleware (a BaseHTTPMiddleware would hide a client's disconnect from the routes): every /v1
    request needs `Authorization: Bearer KEY` with a known key, compared by hash in constant time."""

    def __init__(self, app, *, key_hashes: list[bytes]) -> None:
        self.app, self.key_hashes = app, key_hashes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            digest = hashlib.sha256(given[7:].strip().encode()).digest() if given.lower().startswith("bearer ") \
                else b""
            if not any(hmac.compare_digest(digest, h) for h in self.key_hashes):
                response = JSONResponse(error_body(401, "missing or unknown API key (Authorization: Bearer KEY)",
                                                   code="invalid_api_key"), status_code=401)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _vector(v, encoding: str) -> list[float] | str:
    import base64

    import numpy as np

    if encoding == "base64":
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
    return [float(x) for x in v]


def _reason(reason: str | None) -> str | None:
    return {"cancelled": "stop", "error": "stop"}.get(reason or "", reason)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _legacy_logprobs(tokenizer, c: dict, alternatives: int) -> dict:
    tokens = [tokenizer.decode([t]) for t in c["tokens"]]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": list(c["logprobs"]), "text_offset": offsets,
            "top_logprobs": [{tokenizer.decode([a]): v for a, v in top} for top in c["top"]] if alternatives
            else None}


async def _recorded(saving) -> bool:
    """Await the store write of a streamed answer; False (logged) when it failed: the stream then ends with an
    error event instead of [DONE], since feedback on that answer could not find it."""
    try:
        await saving
        return True
    except Exception:
        log.exception("a served answer could not be recorded in the store")
        return False


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


# the last event of a stream that cannot end well (instead of [DONE])
GENERATION_FAILED = _sse(error_body(500, "generation failed (the server log has the details)"))
NOT_RECORDED = _sse(error_body(500, "the answer could not be recorded (the server log has the details)"))


async def _chat_stream(job: Job, events: asyncio.Queue, response_id: str, body: ChatRequest, ids: list[int],
                       prompt: Any, params: SamplingParams, record, token_logprobs, *,
                       created: int) -> AsyncIterator[bytes]:
    head = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": body.model}
    texts = [""] * params.n
    alternatives = body.top_logprobs or 0
    try:
        for i in range(params.n):
            yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        open_choices = params.n
        while open_choices:
            event = await events.get()
            if event.finish_reason == "error":
                yield GENERATION_FAILED
                return
            texts[event.index] += event.text
            if event.text or event.finish_reason is None:
                part = {"tokens": event.tokens, "logprobs": event.logprobs, "top": event.top}
                yield _sse({**head, "choices": [{
                    "index": event.index, "delta": {"content": event.text},
                    "logprobs": {"content": token_logprobs(part, alternatives)} if body.logprobs else None,
                    "finish_reason": None}]})
            if event.finish_reason is not None:
                open_choices -= 1
                yield _sse({**head, "choices": [{"index": event.index, "delta": {}, "logprobs": None,
                                                 "finish_reason": _reason(event.finish_reason)}]})
        if not await _recorded(record(response_id, prompt, texts, params, body.user)):
            yield NOT_RECORDED
            return
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(len(ids), job.completion_tokens)})
        yield b"data: [DONE]\n\n"
    finally:
        if job.open_choices:  # the client went away mid-stream: stop generating for it
            job.cancel()


async def _completion_stream(runs: list[tuple[Job, asyncio.Queue]], response_id: str, body: CompletionRequest,
                             encoded: list[list[int]], prompts: list[str], record,
                             legacy: Callable[[dict], dict] | None, *, created: int) -> AsyncIterator[bytes]:
    head = {"id": response_id, "object": "text_completion", "created": created, "model": body.model}
    try:
        for pi, (job, events) in enumerate(runs):
            texts = [""] * job.params.n
            open_choices = job.params.n
            while open_choices:
                event = await events.get()
                if event.finish_reason == "error":
                    yield GENERATION_FAILED
                    return
                texts[event.index] += event.text
                if event.finish_reason is not None:
                    open_choices -= 1
                part = {"tokens": event.tokens, "logprobs": event.logprobs, "top": event.top}
                yield _sse({**head, "choices": [{
                    "index": pi * body.n + event.index, "text": event.text,
                    "logprobs": legacy(part) if legacy is not None and event.tokens else None,
                    "finish_reason": _reason(event.finish_reason)}]})
            if not await _recorded(record(response_id if len(prompts) == 1 else f"{response_id}-{pi}", prompts[pi],
                                          texts, job.params, body.user)):
                yield NOT_RECORDED
                return
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(sum(len(e) for e in encoded),
                                                               sum(j.completion_tokens for j, _ in runs))})
        yield b"data: [DONE]\n\n"
    finally:
        for job, _ in runs:
            if job.open_choices:
                job.cancel()
