"""The OpenAI-compatible HTTP app: /health, /v1/models, /v1/chat/completions, /v1/completions, vLLM's
/tokenize and /detokenize (gateway/tokenization.py), the WebSocket API at /v1/ws (gateway/ws.py), and the
browser UI's static files at /.

`build_app` never starts the engine; whoever owns the process (serve's lifespan, or a test) does. Whoever
stops the server calls `Gateway.drain` first (gateway/serve.py does), so open streams end with a final event.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Lifespan, Receive, Scope, Send
from starlette.websockets import WebSocket

from engine.async_engine import AsyncEngine, EngineError
from engine.outputs import RequestOutput
from gateway.collect import collect
from gateway.errors import APIError, bad_request, exception_handlers
from gateway.formatting import Call, ChunkStream, Formatter, aborted, dumps, raise_if_error, shutdown_error, usage
from gateway.merge import merge
from gateway.metrics import Metrics
from gateway.protocol import Body, GenerationRequest, parse_chat, parse_completion, parse_json
from gateway.tokenization import tokenizer_routes
from gateway.tokens import TokenText
from gateway.ws import Session
from grammar import GrammarError

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_IN_FLIGHT = 256  # beyond this a request gets 429 instead of waiting in an unbounded queue
WEB_DIR = Path(__file__).resolve().parents[1] / "web"
DRAIN_S = 5.0  # how long shutdown waits for open streams to send their final events
_KEEPALIVE_S = 15


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None, *,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
              lifespan: Lifespan | None = None, web_dir: Path | None = WEB_DIR) -> Starlette:
    gw = Gateway(engine, model_name, api_key, max_body_bytes, max_in_flight)
    routes = [
        Route("/health", gw.health, methods=["GET"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/v1/models/{model:path}", gw.model, methods=["GET"]),  # :path, as model ids may hold a "/"
        Route("/metrics", gw.metrics.endpoint, methods=["GET"]),
        Route("/v1/chat/completions", gw.chat, methods=["POST"]),
        Route("/v1/completions", gw.completions, methods=["POST"]),
        *tokenizer_routes(gw), WebSocketRoute("/v1/ws", gw.websocket),
    ]
    app = Starlette(routes=routes, exception_handlers=exception_handlers(), lifespan=lifespan)
    if web_dir is not None and (web_dir / "index.html").is_file():
        # The router's fallback rather than a Mount("/"), which would match every path in full: a wrong
        # method on an API route would then get the static files' answer instead of the API's 405.
        app.router.default = _static_fallback(StaticFiles(directory=web_dir, html=True), app.router.default)
    app.state.gateway = gw
    return app


class Gateway:
    def __init__(self, engine: AsyncEngine, model_name: str, api_key: str | None, max_body_bytes: int,
                 max_in_flight: int):
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer
        self.tokens = TokenText(self.tokenizer)  # shared: it caches each token's text and bytes
        self.max_in_flight = max_in_flight
        # Engine requests admitted and not yet answered (the event loop is the only writer). A slot is taken
        # before admission's first await, so a burst cannot overshoot the limit, and given back by the one
        # that answers (_run, the SSE response, a WebSocket job) once it is done, whether or not it streamed.
        self.in_flight = 0
        self.open_sockets = 0  # WebSocket sessions open now
        self.closing = asyncio.Event()  # set once by drain: refuse new work, end open streams
        self.model_name = model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.metrics = Metrics(engine, lambda: (self.in_flight, self.open_sockets))

    # ---- routes ----
    async def health(self, request: Request) -> Response:
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running")
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: Request) -> Response:
        """OpenAI's retrieve-model route (the SDK's `models.retrieve`)."""
        self.authorize(request)
        self.check_model({"model": request.path_params["model"]})
        return JSONResponse(self._card())

    async def chat(self, request: Request) -> Response:
        body = await self.read_body(request)
        return await self._run(request, [self.parse_chat(body)], chat=True)

    async def completions(self, request: Request) -> Response:
        body = await self.read_body(request)
        return await self._run(request, parse_completion(body, self.vocab_size()), chat=False)

    async def websocket(self, websocket: WebSocket) -> None:
        await Session(self, websocket).run()

    # ---- shutdown ----
    async def drain(self, timeout: float = DRAIN_S) -> None:
        """Before the server closes its connections: refuse new work, end every open stream with a final
        event (SSE: finish_reason "abort" then [DONE]; WebSocket: a server_shutdown error), stop the engine."""
        self.closing.set()
        # The engine's stop ends every open engine stream within a step, with finish_reason "abort".
        await self.engine.shutdown()
        deadline = time.monotonic() + timeout
        while (self.in_flight or self.open_sockets) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # ---- shared steps (the WebSocket API uses these too) ----
    def authorize(self, conn: HTTPConnection, query_key: bool = False) -> None:
        """Raise 401 unless the Bearer key (or, with query_key, `?api_key=`, for browsers' WebSockets) is right."""
        if self.api_key is None:
            return
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = conn.query_params.get("api_key", "") if query_key else ""
        # Constant-time compare, so response timing says nothing about the key.
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    def check_model(self, body: Body) -> None:
        model = body.get("model")
        if isinstance(model, str) and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist", "model", "model_not_found")

    def parse_chat(self, body: Body) -> GenerationRequest:
        return parse_chat(body, self.tokenizer, self.vocab_size())

    async def admit(self, req: GenerationRequest, chat: bool) -> Call:
        """Check the server can take the request now, and tokenize it: a Call ready to stream. The caller
        holds an in-flight slot from here and gives it back with `release(1)` once the call is over."""
        return (await self._admit_all([req], chat))[0]

    def release(self, slots: int) -> None:
        self.in_flight -= slots

    async def _prepare(self, req: GenerationRequest, chat: bool) -> Call:
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            # Tokenize and check the context length here, so a bad prompt is a 400 before any stream opens.
            prepared = await asyncio.to_thread(self.engine.engine.prepare_request, request_id, req.prompt, req.params)
        except GrammarError as exc:  # a bad or too complex schema / regex / grammar, or a compile timeout
            raise bad_request(str(exc), req.grammar_field, "invalid_grammar") from None
        except ValueError as exc:
            raise bad_request(str(exc), "messages" if chat else "prompt", "context_length_exceeded") from None
        return Call(request_id, int(time.time()), chat, req, prepared)

    async def stream(self, call: Call) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for a call; closing this aborts the request and waits until it is freed."""
        timer = self.metrics.timer()
        try:
            # aclosing: closing this wrapper must close the engine stream now, which aborts the request
            # the prepared request as admission checked it: no second tokenization or grammar lookup
            async with contextlib.aclosing(self.engine.generate(call.prepared)) as outputs:
                async for out in outputs:
                    timer.observe(out)
                    yield out
        except EngineError as exc:  # the engine stopped after admission: a shutdown, or its thread died
            raise (shutdown_error() if self.closing.is_set() else APIError(503, str(exc))) from None
        finally:
            timer.done()

    def _check_accepting(self) -> None:
        if self.closing.is_set():
            raise shutdown_error()
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running")

    async def read_body(self, request: Request) -> dict:
        self.authorize(request)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise self._too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:  # a chunked body has no length up front
                raise self._too_large()
            chunks.append(chunk)
        body = parse_json(b"".join(chunks))
        self.check_model(body)
        return body

    def _card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "sluice",
                "max_model_len": self.engine.engine.max_model_len}

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes", code="body_too_large")

    def vocab_size(self) -> int:
        return self.engine.engine.model_config.vocab_size

    async def _run(self, request: Request, reqs: list[GenerationRequest], chat: bool) -> Response:
        """One response for the requests of one body: a chat, or a completions body's prompts."""
        calls = await self._admit_all(reqs, chat)
        if reqs[0].stream:
            # keep-alive comments every 15 s, so proxies do not cut a stream that is slow to start; on SIGTERM
            # sse-starlette waits (up to DRAIN_S) for drain to end the stream with its final events
            return _SlotsResponse(self._events(calls), lambda: self.release(len(calls)), sep="\n",
                                  ping=_KEEPALIVE_S, shutdown_grace_period=DRAIN_S)
        try:
            finals = await collect(request, [self.stream(call) for call in calls])
        finally:
            self.release(len(calls))
        if finals is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        return JSONResponse(self._full_response(calls, finals))

    async def _admit_all(self, reqs: list[GenerationRequest], chat: bool) -> list[Call]:
        """Calls for every request, holding one in-flight slot each (all of a batch's prompts run, or none)."""
        self._check_accepting()
        if self.in_flight + len(reqs) > self.max_in_flight:
            what = (f"{len(reqs)} prompts would pass the limit of {self.max_in_flight} requests in flight"
                    if len(reqs) > 1 else f"too many requests in flight (limit {self.max_in_flight})")
            raise APIError(429, f"{what}; retry later", code="rate_limit_exceeded")
        self.in_flight += len(reqs)  # before any await: requests admitted at once count against each other
        try:
            calls = [await self._prepare(req, chat) for req in reqs]
        except BaseException:  # a bad prompt, or the client left: nothing of the batch runs
            self.release(len(reqs))
            raise
        if len(calls) == 1:
            return calls
        # one response: the first prompt's id, each prompt's choices numbered after the previous prompt's
        return [dataclasses.replace(c, response_id=calls[0].request_id, choice_offset=i * c.req.params.n)
                for i, c in enumerate(calls)]

    # ---- non-streaming ----
    def _full_response(self, calls: list[Call], finals: list[RequestOutput]) -> dict:
        choices = []
        for call, final in zip(calls, finals):
            raise_if_error(final)
            if aborted(final):
                raise shutdown_error("the request was aborted: the engine is shutting down")
            fmt = Formatter(self.tokens, call)
            fmt.see(final)
            choices += [fmt.full_choice(c) for c in sorted(final.outputs, key=lambda c: c.index)]
        return calls[0].envelope(calls[0].object, choices, usage(list(zip(calls, finals))))

    # ---- streaming ----
    async def _events(self, calls: list[Call]) -> AsyncIterator[dict]:
        # aclosing: when sse-starlette cancels or closes us (client gone), the engine streams close now and
        # the engine aborts their requests, rather than whenever the generator is garbage collected.
        single = len(calls) == 1
        streams = [ChunkStream(self.tokens, call, usage_chunk=single) for call in calls]
        async with contextlib.aclosing(merge([s.chunks(self.stream(c)) for s, c in zip(streams, calls)])) as chunks:
            try:
                async for chunk in chunks:
                    yield {"data": dumps(chunk)}
                if not single and calls[0].req.include_usage:  # one usage chunk for the whole batch
                    total = usage([s.usage_part() for s in streams])
                    yield {"data": dumps(calls[0].envelope(calls[0].chunk_object, [], total))}
            except APIError as exc:
                yield {"data": dumps(exc.body())}
        yield {"data": "[DONE]"}


class _SlotsResponse(EventSourceResponse):
    """An SSE response that gives its calls' in-flight slots back once it is over, however it ends: when the
    client leaves before the first byte, the event generator never even starts."""

    def __init__(self, events: AsyncIterator[dict], release: Callable[[], None], **options) -> None:
        super().__init__(events, **options)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _static_fallback(static: ASGIApp, not_found: ASGIApp) -> ASGIApp:
    """Unmatched HTTP paths go to the static files, except under /v1/, where a client of the API wants the
    API's JSON 404 (not the UI's 404 page); WebSockets always get not_found (StaticFiles speaks only HTTP)."""

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        ui = scope["type"] == "http" and not scope["path"].startswith("/v1/")
        await (static if ui else not_found)(scope, receive, send)

    return route

