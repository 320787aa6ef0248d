"""OpenAI response objects built from engine outputs: full choices, and the chunks of a stream.

SSE and the WebSocket API both send exactly what `ChunkStream.chunks` yields, so the two cannot drift apart.
"""
from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

from engine.llm_engine import PreparedRequest
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from gateway.errors import APIError
from gateway.protocol import GenerationRequest
from gateway.tokens import TokenText


@dataclass(frozen=True)
class Call:
    """One accepted generation request, ready to run."""

    request_id: str
    created: int
    chat: bool
    req: GenerationRequest
    prepared: PreparedRequest  # tokenized and checked: what the engine runs
    response_id: str = ""  # the id the client sees, when not request_id: a batch of prompts shares one
    choice_offset: int = 0  # the index of this call's first choice in a batch (prompt i's: i * n)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.prepared.token_ids

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def envelope(self, obj: str, choices: list[dict], usage: dict | None = None, with_usage: bool = False) -> dict:
        body: dict[str, Any] = {"id": self.response_id or self.request_id, "object": obj, "created": self.created,
                                "model": self.req.model, "choices": choices}
        if usage is not None or with_usage:
            body["usage"] = usage
        return body


class ChunkStream:
    """The chunk objects of one streamed call. `last` is the latest engine output seen (for usage)."""

    def __init__(self, tokens: TokenText, call: Call, usage_chunk: bool = True):
        self.call = call
        self.fmt = Formatter(tokens, call)
        self.last: RequestOutput | None = None
        self.usage_chunk = usage_chunk and call.req.include_usage  # a batch sends one for all its calls

    async def chunks(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[dict]:
        """Every chunk of the call, in order: role deltas (chat), content deltas, the usage chunk if asked.

        A request that fails in the engine raises APIError after the chunks before the failure. One the
        engine aborted (it is stopping) ends normally, its last chunk saying finish_reason "abort".
        Closing this generator closes `outputs`, which aborts the request in the engine.
        """
        call = self.call
        async with contextlib.aclosing(outputs):
            if call.chat:
                yield self._chunk([self.fmt.role_delta(i) for i in range(call.req.params.n)])
            async for out in outputs:
                self.last = out
                raise_if_error(out)
                self.fmt.see(out)
                choices = [d for c in out.outputs if (d := self.fmt.delta_choice(c)) is not None]
                if choices:
                    yield self._chunk(choices)
        if self.usage_chunk and self.last is not None:
            yield call.envelope(call.chunk_object, [], self.usage())

    def usage(self) -> dict:
        return usage([self.usage_part()])

    def usage_part(self) -> tuple[Call, RequestOutput | None]:
        """What this call adds to its response's usage (a batch sums its calls')."""
        return self.call, self.last

    @property
    def finish_reason(self) -> str | None:
        """The first choice's finish reason once the stream has ended (each choice's is in its last chunk)."""
        if self.last is None or not self.last.finished:
            return None
        return min(self.last.outputs, key=lambda c: c.index).finish_reason

    def _chunk(self, choices: list[dict]) -> dict:
        return self.call.envelope(self.call.chunk_object, choices, with_usage=self.call.req.include_usage)


class Formatter:
    """OpenAI choice objects for one call; remembers what each streamed choice has already sent."""

    def __init__(self, tokens: TokenText, call: Call):
        self.tokens = tokens
        self.call = call
        self.sent_logprobs: dict[int, int] = {}
        self.finished: set[int] = set()
        self.echoed: set[int] = set()  # streamed choices whose prompt echo went out
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    def see(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs

    def role_delta(self, index: int) -> dict:
        return {"index": index + self.call.choice_offset, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def full_choice(self, c: CompletionOutput) -> dict:
        logprobs = self._logprobs(c, 0, len(c.token_ids), 0)
        if self.call.chat:
            return {"index": c.index + self.call.choice_offset, "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs, "finish_reason": c.finish_reason}
        return self._text_choice(c, c.text, logprobs)

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
            return {"index": c.index + self.call.choice_offset, "delta": delta, "logprobs": logprobs,
                    "finish_reason": c.finish_reason}
        return self._text_choice(c, c.delta_text, logprobs)

    def _text_choice(self, c: CompletionOutput, text: str, logprobs: dict | None) -> dict:
        """A completions choice; with echo, the first one of each choice leads with the prompt."""
        req, finish = self.call.req, c.finish_reason
        if req.score_only:  # the one token the engine sampled is not part of the answer
            text, logprobs = "", _legacy_logprobs([], [], [], []) if logprobs is not None else None
            finish = finish and "length"
        if req.echo and c.index not in self.echoed:
            self.echoed.add(c.index)
            text = self.prompt_text + text
            logprobs = _join(self._prompt_logprobs(), logprobs)
        return {"index": c.index + self.call.choice_offset, "text": text, "logprobs": logprobs, "finish_reason": finish}

    @functools.cached_property
    def prompt_text(self) -> str:
        """The echoed prompt: as given, or decoded once from its token ids (every streamed echo offset needs it)."""
        prompt = self.call.req.prompt
        return prompt if isinstance(prompt, str) else self.tokens.tokenizer.decode(self.call.prompt_token_ids)

    def _prompt_logprobs(self) -> dict | None:
        """The prompt's legacy logprobs (nothing predicts its first token: null there), when asked for."""
        if self.prompt_logprobs is None:
            return None
        ids = self.call.prompt_token_ids
        entries = self.prompt_logprobs
        return _legacy_logprobs([self.tokens.text(t) for t in ids], [e and _finite(e.logprob) for e in entries],
                                [e and self._top(e) for e in entries], _offsets([self.tokens.text(t) for t in ids], 0))

    def _logprobs(self, c: CompletionOutput, start: int, end: int, text_offset: int) -> dict | None:
        if c.logprobs is None:
            return None
        entries = c.logprobs[start:end]
        if self.call.chat:
            return {"content": [{**self._token(e.token_id, e.logprob),
                                 "top_logprobs": [self._token(t, lp) for t, lp in e.top]} for e in entries]}
        tokens = [self.tokens.text(e.token_id) for e in entries]
        if self.call.req.echo:  # offsets count from the start of the choice's text, the echoed prompt's
            text_offset += len(self.prompt_text)
        return _legacy_logprobs(tokens, [_finite(e.logprob) for e in entries], [self._top(e) for e in entries],
                                _offsets(tokens, text_offset))

    def _top(self, e: TokenLogprob) -> dict[str, float]:
        # The legacy API always lists the sampled token too ("up to logprobs+1 elements"), as vLLM does:
        # with logprobs=0 it is the only one.
        top = {self.tokens.text(t): _finite(lp) for t, lp in e.top}
        top.setdefault(self.tokens.text(e.token_id), _finite(e.logprob))
        return top

    def _token(self, token_id: int, logprob: float) -> dict:
        return {"token": self.tokens.text(token_id), "logprob": _finite(logprob), "bytes": self.tokens.bytes(token_id)}


def _finite(logprob: float) -> float:
    # JSON has no -inf, which a grammar-masked alternative has; vLLM writes -9999.0 for it
    return max(logprob, -9999.0)


def _legacy_logprobs(tokens: list[str], logprobs: list, top: list, offsets: list[int]) -> dict:
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def _offsets(tokens: list[str], start: int) -> list[int]:
    offsets = []
    for t in tokens:
        offsets.append(start)
        start += len(t)
    return offsets


def _join(first: dict | None, then: dict | None) -> dict | None:
    if first is None or then is None:
        return first or then
    return {key: first[key] + then[key] for key in first}


def usage(parts: list[tuple[Call, RequestOutput | None]]) -> dict:
    """Token counts of one response: each call's prompt once, what its choices generated, and (OpenAI's
    prompt_tokens_details) how many prompt tokens the prefix cache served."""
    prompt = sum(len(call.prompt_token_ids) for call, _ in parts)
    completion = sum(len(c.token_ids) for call, out in parts if out is not None and not call.req.score_only
                     for c in out.outputs)
    cached = sum(out.num_cached_tokens for _, out in parts if out is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def raise_if_error(out: RequestOutput) -> None:
    if out.error or any(c.finish_reason == "error" for c in out.outputs):
        raise APIError(500, f"generation failed: {out.error or 'unknown engine error'}", type="server_error")


def aborted(out: RequestOutput) -> bool:
    """The engine stopped under the request (server shutdown): only the engine's own stop shows a consumer this."""
    return any(c.finish_reason == "abort" for c in out.outputs)


def shutdown_error(message: str = "the server is shutting down") -> APIError:
    return APIError(503, message, code="server_shutdown")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
