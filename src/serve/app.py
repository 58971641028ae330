"""The HTTP server: OpenAI's API over the continuous-batching engine, and the chat page.

    GET  /                      the web chat page (src/serve/static/)
    GET  /health                200 {"status": "ok", ...} while serving, 503 when stopping
    GET  /v1/models             the one model served (the run's folder name)
    POST /v1/chat/completions   OpenAI's chat completions, streaming or not (with logprobs)
    POST /v1/completions        OpenAI's (legacy) text completions, streaming or not
    POST /v1/internals/attention  our extension: a text's tokens, attention maps and next
                                token distribution (``src.infer.internals.attention_maps``)

Each request's choices go to the engine as separate sequences; their updates come back from
the engine's thread through a ``Mailbox`` into the request's asyncio queue. A client that
disconnects is noticed at once (a watcher puts ``GONE`` in its queue) and its requests are
cancelled: their slots free at the next step. The attention maps run in the engine's thread
between two steps (``Engine.call``): ``record_attention`` changes the model while it is on,
so it must never overlap a step's forward pass. Errors are OpenAI's JSON (see
``protocol.APIError``); a bad request is refused before it reaches the engine, so it never
disturbs the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from src.infer.engine import Engine, QueueFullError, TokenLogprob, Update
from src.infer.internals import attention_maps
from src.serve.protocol import (
    APIError,
    CompletionLogprobs,
    ParsedRequest,
    chat_logprobs,
    new_id,
    now,
    openai_finish_reason,
    parse_attention_request,
    parse_request,
    usage,
)

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20
# Attention maps waiting for the engine: each pauses every stream for its forward pass (up to
# about half a second at 256 tokens on a CPU), so a flood of them is refused, not queued.
MAX_PENDING_INSPECTIONS = 4
# The page's own scripts and styles only: even if model text ever reached the DOM as HTML,
# an injected <script> or inline handler would not run.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; object-src 'none'; "
                "base-uri 'none'; frame-ancestors 'none'", "X-Content-Type-Options": "nosniff"}


class ClientGone(Exception):
    """The client closed the connection while its request was being generated."""


GONE = object()  # put in a request's queue when its client disconnects
GENERATION_FAILED = APIError(500, "The server failed while generating this reply; it has "
                             "been logged. Retry the request.", type="server_error")


class Mailbox:
    """Carries updates from the engine's thread to the event loop, waking the loop once per
    batch of updates (about once per engine step) instead of once per token of each stream:
    a wake-up costs a system call and a trip through the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, object]] = []

    def post(self, queue: asyncio.Queue, item: object) -> None:
        """Called from any thread: ``item`` will be put in ``queue`` on the loop."""
        with self.lock:
            self.pending.append((queue, item))
            if len(self.pending) > 1:
                return  # a delivery is already scheduled and will take this one too
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, item in pending:
            queue.put_nowait(item)


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The ASGI app serving ``engine`` as the model ``model_name``. With ``api_key``, every
    /v1 request needs ``Authorization: Bearer <api_key>`` (the page and /health do not)."""
    app = FastAPI(title="gpt-model", docs_url=None, redoc_url=None, openapi_url=None)
    created = now()
    mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}  # per loop serving the app

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404
                   else str(exc.detail))
        return JSONResponse(APIError(exc.status_code, message).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        error = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(401, "You didn't provide an API key. Provide it in an "
                           "Authorization header: 'Authorization: Bearer YOUR_KEY'.",
                           code="missing_api_key")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            raise APIError(413, f"The request body is {length} bytes; the limit is "
                           f"{max_body_bytes}.", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise APIError(413, f"The request body exceeds the limit of {max_body_bytes} "
                               "bytes.", code="request_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"We could not parse the JSON body of your request ({exc}).",
                           code="invalid_json") from None

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> JSONResponse:
        active, waiting = engine.load
        status = 503 if engine.stopping else 200
        return JSONResponse({"status": "stopping" if engine.stopping else "ok",
                             "model": model_name, "active": active, "waiting": waiting},
                            status_code=status)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created,
                "owned_by": "gpt-model", "max_model_len": engine.context_length}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict:
        check_key(request)
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist", param="model",
                           code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        parsed = parse_request(await read_json(request), "chat", engine, model_name)
        return await answer(request, parsed, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        parsed = parse_request(await read_json(request), "completions", engine, model_name)
        return await answer(request, parsed, chat=False)

    pending_inspections = 0

    @app.post("/v1/internals/attention")
    async def attention(request: Request) -> Response:
        nonlocal pending_inspections
        check_key(request)
        parsed = parse_attention_request(await read_json(request), model_name)
        if pending_inspections >= MAX_PENDING_INSPECTIONS:
            raise APIError(503, f"The server is busy with {pending_inspections} attention "
                           "requests. Retry shortly.", type="server_error",
                           code="server_overloaded")

        def inspect() -> dict:  # in the engine's thread, between two steps
            return attention_maps(engine.model, engine.tokenizer, text=parsed.text,
                                  messages=parsed.messages, max_tokens=parsed.max_tokens,
                                  decimals=parsed.decimals).to_dict()

        pending_inspections += 1
        try:
            maps = await asyncio.wrap_future(engine.call(inspect))
        except RuntimeError:
            if not engine.stopping:
                raise  # a real failure: a 500
            raise APIError(503, "The server is shutting down.", type="server_error",
                           code="server_shutting_down") from None
        except ValueError as exc:  # too many tokens for the limit or the context
            raise APIError(400, f"{exc}.", param="text" if parsed.text is not None
                           else "messages", code="invalid_value") from None
        finally:
            pending_inspections -= 1
        content = await asyncio.to_thread(_attention_json, model_name, maps)
        return Response(content, media_type="application/json")

    async def answer(request: Request, parsed: ParsedRequest, chat: bool):
        loop = asyncio.get_running_loop()
        mailbox = mailboxes.setdefault(loop, Mailbox(loop))
        queue: asyncio.Queue = asyncio.Queue()

        def on_update(index: int, update: Update) -> None:  # called in the engine's thread
            mailbox.post(queue, (index, update))

        try:
            handles = engine.submit(parsed.requests, on_update)
        except QueueFullError as exc:
            raise APIError(503, f"The server is overloaded: {exc}. Retry shortly.",
                           type="server_error", code="server_overloaded") from None
        except RuntimeError:
            raise APIError(503, "The server is shutting down.", type="server_error",
                           code="server_shutting_down") from None
        updates = _updates(request, queue, len(handles))
        reply = _Reply(parsed, model_name, chat, engine.tokenizer)
        if parsed.stream:
            async def events() -> AsyncIterator[str]:
                try:
                    for chunk in reply.opening_chunks():
                        yield _sse(chunk)
                    async with contextlib.aclosing(updates):
                        async for index, update in updates:
                            if update.finish_reason == "error":  # as vLLM: an error event
                                yield _sse(GENERATION_FAILED.body())
                                yield "data: [DONE]\n\n"
                                return
                            for chunk in reply.chunks(index, update):
                                yield _sse(chunk)
                    if parsed.include_usage:
                        yield _sse(reply.usage_chunk())
                    yield "data: [DONE]\n\n"
                except ClientGone:
                    pass
                finally:
                    for handle in handles:
                        handle.cancel()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        try:
            async for index, update in updates:
                if update.finish_reason == "error":
                    raise GENERATION_FAILED
                reply.add(index, update)
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody is listening
        finally:
            for handle in handles:
                handle.cancel()
        return JSONResponse(reply.whole())

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                   include_in_schema=False)
    async def unknown(path: str, request: Request) -> None:
        raise APIError(404, f"Invalid URL ({request.method} /{path})", code="unknown_url")

    return app


async def _watch_for_disconnect(request: Request, queue: asyncio.Queue) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(GONE)


async def _updates(request: Request, queue: asyncio.Queue,
                   count: int) -> AsyncIterator[tuple[int, Update]]:
    """The engine's updates for ``count`` sequences, until each has finished; raises
    ClientGone as soon as the client disconnects."""
    watcher = asyncio.ensure_future(_watch_for_disconnect(request, queue))
    try:
        remaining = count
        while remaining:
            item = await queue.get()
            if item is GONE:
                raise ClientGone
            index, update = item
            remaining -= update.finish_reason is not None
            yield index, update
    finally:
        watcher.cancel()


def _attention_json(model_name: str, maps: dict) -> str:
    """The attention endpoint's body. The weights are up to layers * heads * 256^2 numbers
    (5 MB of JSON for the small preset): encoded off the event loop, and one head at a time,
    because one ``json.dumps`` call holds the GIL throughout and would stall the engine's
    thread (every stream's next token) for the whole encoding."""
    layers = ",".join("[" + ",".join(json.dumps(head) for head in layer) + "]"
                      for layer in maps["attention"])
    rest = json.dumps({"object": "attention_maps", "model": model_name, "tokens": maps["tokens"],
                       "next_tokens": maps["next_tokens"]})
    return rest[:-1] + ', "attention": [' + layers + "]}"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Reply:
    """Builds the response objects of one request, streamed (chunks) or whole."""

    def __init__(self, parsed: ParsedRequest, model_name: str, chat: bool, tokenizer) -> None:
        self.parsed, self.chat, self.tokenizer = parsed, chat, tokenizer
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.model = model_name
        n = len(parsed.requests)
        self.texts = [[] for _ in range(n)]
        self.finish = ["length"] * n
        self.tokens = [0] * n
        self.wants_logprobs = parsed.logprobs is not None
        self.records = [[] for _ in range(n)]  # each choice's TokenLogprobs (whole replies)
        legacy = self.wants_logprobs and not chat
        self.legacy = [CompletionLogprobs(tokenizer) for _ in range(n)] if legacy else []

    def _logprobs(self, index: int, records: Sequence[TokenLogprob]) -> dict | None:
        """Choice ``index``'s ``logprobs`` object for ``records`` (None if not asked for)."""
        if not self.wants_logprobs:
            return None
        if self.chat:
            return chat_logprobs(self.tokenizer, records)
        return self.legacy[index].add(records)

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat
                 else "text_completion", "created": self.created, "model": self.model,
                 "choices": choices}
        if self.parsed.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, index: int, text: str | None, finish: str | None,
                role: bool = False, logprobs: dict | None = None) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", "content": ""}
            return {"index": index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": logprobs,
                "finish_reason": finish}

    def opening_chunks(self) -> list[dict]:
        """Chat streams open with each choice's role (OpenAI's first chunk)."""
        if not self.chat:
            return []
        return [self._chunk([self._choice(i, None, None, role=True)])
                for i in range(len(self.texts))]

    def chunks(self, index: int, update: Update) -> list[dict]:
        self.tokens[index] = update.completion_tokens
        out = []
        if update.text or update.logprobs:  # tokens whose text is held back come with logprobs
            logprobs = self._logprobs(index, update.logprobs)
            out.append(self._chunk([self._choice(index, update.text, None, logprobs=logprobs)]))
        if update.finish_reason:
            finish = openai_finish_reason(update.finish_reason)
            self.finish[index] = finish
            out.append(self._chunk([self._choice(index, None, finish)]))
        return out

    def usage_chunk(self) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = self._usage()
        return chunk

    def _usage(self) -> dict:
        return usage(self.parsed.prompt_tokens, sum(self.tokens))

    def add(self, index: int, update: Update) -> None:
        self.texts[index].append(update.text)
        self.records[index].extend(update.logprobs)
        self.tokens[index] = update.completion_tokens
        if update.finish_reason:
            self.finish[index] = openai_finish_reason(update.finish_reason)

    def whole(self) -> dict:
        choices = []
        for i, pieces in enumerate(self.texts):
            text = "".join(pieces)
            logprobs = self._logprobs(i, self.records[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs,
                                "finish_reason": self.finish[i]})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": self._usage()}
