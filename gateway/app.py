"""The OpenAI-compatible HTTP app: /health, /v1/models, /v1/chat/completions, /v1/completions.

`build_app` never starts the engine; whoever owns the process (serve's lifespan, or a test) does.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Lifespan

from engine.async_engine import AsyncEngine, EngineError
from engine.outputs import CompletionOutput, RequestOutput
from gateway.errors import APIError, bad_request, exception_handlers
from gateway.metrics import Metrics
from gateway.protocol import GenerationRequest, parse_chat, parse_completion, parse_json

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_IN_FLIGHT = 256  # beyond this a request gets 429 instead of waiting in an unbounded queue
_DISCONNECT_POLL_S = 0.1
_KEEPALIVE_S = 15


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None, *,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
              lifespan: Lifespan | None = None) -> Starlette:
    gw = _Gateway(engine, model_name, api_key, max_body_bytes, max_in_flight)
    routes = [
        Route("/health", gw.health, methods=["GET"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/metrics", gw.metrics.endpoint, methods=["GET"]),
        Route("/v1/chat/completions", gw.chat, methods=["POST"]),
        Route("/v1/completions", gw.completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers=exception_handlers(), lifespan=lifespan)


@dataclass(frozen=True)
class _Call:
    """One accepted generation request, ready to run."""

    request_id: str
    created: int
    chat: bool
    req: GenerationRequest
    prompt_token_ids: list[int]

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def envelope(self, obj: str, choices: list[dict], usage: dict | None = None, with_usage: bool = False) -> dict:
        body: dict[str, Any] = {"id": self.request_id, "object": obj, "created": self.created,
                                "model": self.req.model, "choices": choices}
        if usage is not None or with_usage:
            body["usage"] = usage
        return body


class _Gateway:
    def __init__(self, engine: AsyncEngine, model_name: str, api_key: str | None, max_body_bytes: int,
                 max_in_flight: int):
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # generation streams open now (the event loop is the only writer)
        self.model_name = model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.metrics = Metrics(engine)

    # ---- routes ----
    async def health(self, request: Request) -> Response:
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running")
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "sluice",
                "max_model_len": self.engine.engine.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    async def chat(self, request: Request) -> Response:
        body = await self._body(request)
        req = parse_chat(body, self.engine.engine.tokenizer, self._vocab_size())
        return await self._run(request, req, chat=True)

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        req = parse_completion(body, self._vocab_size())
        return await self._run(request, req, chat=False)

    # ---- shared steps ----
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Constant-time compare, so response timing says nothing about the key.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    async def _body(self, request: Request) -> dict:
        self._authorize(request)
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
        model = body.get("model")
        if isinstance(model, str) and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist", "model", "model_not_found")
        return body

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes", code="body_too_large")

    def _vocab_size(self) -> int:
        return self.engine.engine.model_config.vocab_size

    async def _run(self, request: Request, req: GenerationRequest, chat: bool) -> Response:
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running")
        if self.in_flight >= self.max_in_flight:
            raise APIError(429, f"too many requests in flight (limit {self.max_in_flight}); retry later",
                           code="rate_limit_exceeded")
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            # Tokenize and check the context length here, so a bad prompt is a 400 before any stream opens.
            prepared = await asyncio.to_thread(self.engine.engine.prepare_request, request_id, req.prompt, req.params)
        except ValueError as exc:
            raise bad_request(str(exc), "messages" if chat else "prompt", "context_length_exceeded") from None
        call = _Call(request_id, int(time.time()), chat, req, prepared.token_ids)
        if req.stream:
            # keep-alive comments every 15 s, so proxies do not cut a stream that is slow to start
            return EventSourceResponse(self._events(call), sep="\n", ping=_KEEPALIVE_S)
        final = await self._collect(request, call)
        if final is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        return JSONResponse(self._full_response(call, final))

    async def _stream(self, call: _Call) -> AsyncIterator[RequestOutput]:
        timer = self.metrics.timer()
        self.in_flight += 1
        try:
            # aclosing: closing this wrapper must close the engine stream now, which aborts the request
            async with contextlib.aclosing(self.engine.generate(call.prompt_token_ids, call.req.params,
                                                                call.request_id)) as stream:
                async for out in stream:
                    timer.observe(out)
                    yield out
        finally:
            self.in_flight -= 1
            timer.done()

    # ---- non-streaming ----
    async def _collect(self, request: Request, call: _Call) -> RequestOutput | None:
        """The final output, or None if the client disconnected first (the request is then aborted)."""
        async with contextlib.aclosing(self._stream(call)) as stream:
            consume = asyncio.ensure_future(_last(stream))
            watch = asyncio.ensure_future(_wait_disconnect(request))
            try:
                await asyncio.wait({consume, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Cancelling the consumer throws into the engine stream, whose cleanup aborts the request.
                for task in (consume, watch):
                    task.cancel()
                await asyncio.gather(consume, watch, return_exceptions=True)
            if consume.cancelled():
                return None
            try:
                return consume.result()
            except EngineError as exc:
                raise APIError(503, str(exc)) from None

    def _full_response(self, call: _Call, final: RequestOutput) -> dict:
        _raise_if_failed(final)
        fmt = _Formatter(self.engine.engine.tokenizer, call)
        choices = [fmt.full_choice(c) for c in sorted(final.outputs, key=lambda c: c.index)]
        return call.envelope(call.object, choices, _usage(call, final.outputs))

    # ---- streaming ----
    async def _events(self, call: _Call) -> AsyncIterator[dict]:
        fmt = _Formatter(self.engine.engine.tokenizer, call)
        obj = "chat.completion.chunk" if call.chat else "text_completion"
        include_usage = call.req.include_usage
        last: RequestOutput | None = None

        def event(choices: list[dict], usage: dict | None = None) -> dict:
            return {"data": _json(call.envelope(obj, choices, usage, with_usage=include_usage))}

        # aclosing: when sse-starlette cancels or closes us (client gone), the engine stream closes now and
        # the engine aborts the request, rather than whenever the generator is garbage collected.
        async with contextlib.aclosing(self._stream(call)) as stream:
            if call.chat:
                yield event([fmt.role_delta(i) for i in range(call.req.params.n)])
            try:
                async for out in stream:
                    last = out
                    _raise_if_failed(out)
                    choices = [d for c in out.outputs if (d := fmt.delta_choice(c)) is not None]
                    if choices:
                        yield event(choices)
            except (APIError, EngineError) as exc:
                err = exc if isinstance(exc, APIError) else APIError(503, str(exc))
                yield {"data": _json(err.body())}
                yield {"data": "[DONE]"}
                return
        if include_usage and last is not None:
            yield {"data": _json(call.envelope(obj, [], _usage(call, last.outputs)))}
        yield {"data": "[DONE]"}


class _Formatter:
    """OpenAI choice objects for one call; remembers what each streamed choice has already sent."""

    def __init__(self, tokenizer, call: _Call):
        self.tokenizer = tokenizer
        self.call = call
        self.sent_logprobs: dict[int, int] = {}
        self.finished: set[int] = set()

    def role_delta(self, index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def full_choice(self, c: CompletionOutput) -> dict:
        logprobs = self._logprobs(c, 0, len(c.token_ids), 0)
        if self.call.chat:
            return {"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs, "finish_reason": c.finish_reason}
        return {"index": c.index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}

    def delta_choice(self, c: CompletionOutput) -> dict | None:
        if c.index in self.finished:
            return None
        start = self.sent_logprobs.get(c.index, 0)
        end = len(c.logprobs) if c.logprobs is not None else 0
        if not c.delta_text and not c.finished and end == start:
            return None
        self.sent_logprobs[c.index] = end
        if c.finished:
            self.finished.add(c.index)
        logprobs = self._logprobs(c, start, end, len(c.text) - len(c.delta_text))
        if self.call.chat:
            delta = {"content": c.delta_text} if c.delta_text or not c.finished else {}
            return {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": c.finish_reason}
        return {"index": c.index, "text": c.delta_text, "logprobs": logprobs, "finish_reason": c.finish_reason}

    def _logprobs(self, c: CompletionOutput, start: int, end: int, text_offset: int) -> dict | None:
        if c.logprobs is None:
            return None
        entries = c.logprobs[start:end]
        if self.call.chat:
            return {"content": [{**self._token(e.token_id, e.logprob),
                                 "top_logprobs": [self._token(t, lp) for t, lp in e.top]} for e in entries]}
        tokens = [self._text(e.token_id) for e in entries]
        offsets, pos = [], text_offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self._text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _usage(call: _Call, outputs: list[CompletionOutput]) -> dict:
    prompt, completion = len(call.prompt_token_ids), sum(len(c.token_ids) for c in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _raise_if_failed(out: RequestOutput) -> None:
    if out.error or any(c.finish_reason == "error" for c in out.outputs):
        raise APIError(500, f"generation failed: {out.error or 'unknown engine error'}", type="server_error")
    if any(c.finish_reason == "abort" for c in out.outputs):
        raise APIError(503, "the request was aborted: the engine is shutting down")


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    assert last is not None  # a stream always ends with a finished output
    return last


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(_DISCONNECT_POLL_S)


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
