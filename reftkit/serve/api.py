"""The OpenAI-compatible HTTP surface: FastAPI routes over an :class:`~reftkit.serve.engine.Engine`.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream: true`` answers server-sent events, one
chunk per decided piece of text, then ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, and with an
admin key ``GET/POST /v1/adapters`` and ``DELETE /v1/adapters/{name}``. Every error is an OpenAI error body
with a 4xx/5xx status; nothing a client sends stops the server. A client that disconnects frees its row.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import AdapterError
from .engine import Engine, GenerationRequest, QueueFull, ShuttingDown
from .requests import ApiError, Parsed, parse_chat, parse_completion

__all__ = ["create_app"]

MAX_BODY_BYTES = 4 << 20


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def create_app(engine: Engine, base: str, *, api_key: str | None = None, admin_key: str | None = None,
               default_max_tokens: int = 256, max_prompts: int = 16) -> FastAPI:
    """The app serving ``engine``'s model as ``base`` and its adapters as ``base:<name>``."""
    for name, key in (("api_key", api_key), ("admin_key", admin_key)):
        if key is not None and (not isinstance(key, str) or not key.strip()):
            raise ValueError(f"{name}={key!r}: give a non-empty key, or None for no key")
    app = FastAPI(title="reftkit serve", docs_url=None, redoc_url=None, openapi_url=None)
    adapters, tokenizer = engine.adapters, engine.tokenizer
    config = adapters.model.config
    context = next((int(v) for v in (getattr(config, n, None) for n in ("max_position_embeddings", "n_positions",
                                                                         "max_sequence_length", "n_ctx"))
                    if isinstance(v, int) and v > 0), 2048)
    limits = {"context": context, "default_max_tokens": default_max_tokens, "max_prompts": max_prompts}
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        what = "no such route" if err.status_code == 404 else str(err.detail)
        return _error(ApiError(err.status_code, f"{request.method} {request.url.path}: {what}"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        return _error(ApiError(500, f"internal error: {type(err).__name__}: {err}"))

    def check_key(request: Request, key: str | None, what: str) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, f"Incorrect or missing {what} key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body has {len(raw)} bytes; at most {MAX_BODY_BYTES}")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if engine.accepting else "draining", "model": base, "adapters": adapters.names(),
                "waiting": engine.waiting, "running": engine.running, **engine.stats}

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "reftkit"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request, api_key, "API")
        return {"object": "list", "data": [model_card(base)] + [model_card(f"{base}:{n}") for n in adapters.names()]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str) -> dict[str, Any]:
        check_key(request, api_key, "API")
        if name != base and not (name.startswith(base + ":") and name[len(base) + 1:] in adapters):
            raise ApiError(404, f"The model {name!r} does not exist", "model", "model_not_found")
        return model_card(name)

    async def completion(request: Request, chat: bool) -> Any:
        check_key(request, api_key, "API")
        body = await read_json(request)
        parse = parse_chat if chat else parse_completion
        parsed = parse(body, base, adapters, tokenizer, limits)
        if parsed.route is not None and "*" in parsed.route:
            parsed.route = await between_batches(lambda: adapters.mixture(parsed.route), "model")
        queues = [asyncio.Queue() for _ in parsed.prompts]
        loop = asyncio.get_running_loop()
        requests = [GenerationRequest(prompt_ids=ids, route=parsed.route, max_tokens=parsed.max_tokens,
                                      temperature=parsed.temperature, top_p=parsed.top_p,
                                      seed=None if parsed.seed is None else parsed.seed + i, stop=parsed.stop,
                                      sink=_sink(loop, queue))
                    for i, (ids, queue) in enumerate(zip(parsed.prompts, queues))]
        try:
            for r in requests:
                engine.submit(r)
        except (QueueFull, ShuttingDown) as err:
            for r in requests:
                r.cancelled.set()
            raise ApiError(429 if isinstance(err, QueueFull) else 503, str(err),
                           code="rate_limit_exceeded" if isinstance(err, QueueFull) else "shutting_down") from None
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if parsed.stream:
            return EventSourceResponse(_stream(request, requests, queues, parsed, ident, chat), ping=0,
                                       sep="\n")
        return await _collect(request, requests, queues, parsed, ident, chat)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await completion(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await completion(request, chat=False)

    # -- adapters at run time -----------------------------------------------------------------------
    def check_admin(request: Request) -> None:
        if admin_key is None:
            raise ApiError(403, "adapter management is off; start the server with --admin-key to use it",
                           code="admin_disabled")
        check_key(request, admin_key, "admin")

    def describe(which: Any = None) -> list[dict[str, Any]]:
        return [{"name": a.name, "model": f"{base}:{a.name}", "kind": a.kind, "folder": str(a.folder),
                 "parameters": a.parameters} for a in (adapters.adapters.values() if which is None else which)]

    @app.get("/v1/adapters")
    async def list_adapters(request: Request) -> dict[str, Any]:
        check_admin(request)
        return {"object": "list", "data": describe()}

    async def between_batches(fn: Any, param: str = "name") -> Any:
        try:
            return await asyncio.wrap_future(engine.call_between_batches(fn))
        except AdapterError as err:
            missing = "is not loaded" in str(err)
            raise ApiError(404 if missing else 400, str(err), param,
                           "model_not_found" if missing and param == "model" else None) from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), code="shutting_down") from None

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> JSONResponse:
        check_admin(request)
        body = await read_json(request)
        if not isinstance(body, dict) or set(body) - {"name", "path"} or not isinstance(body.get("path"), str):
            raise ApiError(400, "send {'name': <adapter name>, 'path': <save folder on the server>}", "path")
        loaded = await between_batches(lambda: adapters.load(body.get("name"), body["path"]))
        return JSONResponse({"object": "list", "data": describe(loaded)}, status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(request: Request, name: str) -> dict[str, Any]:
        check_admin(request)
        await between_batches(lambda: adapters.unload(name))
        return {"name": name, "deleted": True}

    return app


def _sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Any:
    def put(event: str, payload: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (event, payload))
    return put


def _usage(done: list[dict[str, Any]]) -> dict[str, int]:
    prompt = sum(d["prompt_tokens"] for d in done)
    completion = sum(d["completion_tokens"] for d in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _collect(request: Request, requests: list[GenerationRequest], queues: list[asyncio.Queue],
                   parsed: Parsed, ident: str, chat: bool) -> JSONResponse:
    """Wait for every row (checking that the client is still there), then one OpenAI response."""
    texts, done = [[] for _ in queues], [None] * len(queues)
    checked = time.monotonic()
    try:
        for i, queue in enumerate(queues):
            while done[i] is None:
                try:
                    event, payload = await asyncio.wait_for(queue.get(), 0.5)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - checked >= 0.5:  # text keeps coming: look for a client gone on the clock
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                if event is None:
                    continue
                if event == "text":
                    texts[i].append(payload)
                elif event == "done":
                    done[i] = payload
                else:
                    raise ApiError(500, payload)
    finally:
        for r in requests:  # a client that left, or an error: the other rows stop too
            r.cancelled.set()
    created = int(time.time())
    if chat:
        choices = [{"index": 0, "message": {"role": "assistant", "content": "".join(texts[0])},
                    "finish_reason": done[0]["finish_reason"], "logprobs": None}]
        return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": parsed.model,
                             "choices": choices, "usage": _usage(done), "system_fingerprint": None})
    choices = [{"index": i, "text": "".join(t), "finish_reason": d["finish_reason"], "logprobs": None}
               for i, (t, d) in enumerate(zip(texts, done))]
    return JSONResponse({"id": ident, "object": "text_completion", "created": created, "model": parsed.model,
                         "choices": choices, "usage": _usage(done)})


async def _stream(request: Request, requests: list[GenerationRequest], queues: list[asyncio.Queue],
                  parsed: Parsed, ident: str, chat: bool) -> AsyncIterator[str]:
    """Server-sent chunks as the rows make text; ``[DONE]`` last. Cancelled (client gone): rows are freed."""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return json.dumps({"id": ident, "object": kind, "created": created, "model": parsed.model,
                           "choices": [choice], "system_fingerprint": None})

    merged: asyncio.Queue = asyncio.Queue()

    async def forward(i: int, queue: asyncio.Queue) -> None:
        while True:
            event, payload = await queue.get()
            await merged.put((i, event, payload))
            if event != "text":
                return
    tasks = [asyncio.create_task(forward(i, q)) for i, q in enumerate(queues)]
    done: list[dict[str, Any]] = []
    try:
        if chat:
            yield chunk(0, None, None, first=True)
        while len(done) < len(queues):
            i, event, payload = await merged.get()
            if event == "text":
                yield chunk(i, payload, None)
            elif event == "done":
                done.append(payload)
                yield chunk(i, None, payload["finish_reason"])
            else:
                yield json.dumps(ApiError(500, payload).body())
                break
        if parsed.include_usage and len(done) == len(queues):
            yield json.dumps({"id": ident, "object": kind, "created": created, "model": parsed.model,
                              "choices": [], "usage": _usage(done)})
        yield "[DONE]"
    finally:
        for r in requests:
            r.cancelled.set()
        for t in tasks:
            t.cancel()
