"""Request bodies of the OpenAI API, checked and turned into (prompt, SamplingParams).

Every malformed or out-of-range field becomes an APIError 400 naming the field, so no client input
reaches the engine in a shape that could fail there as a 500.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from engine.sampling_params import SamplingParams
from engine.tokenizer import render_chat
from gateway.errors import APIError, bad_request
from gateway.structured import constraint_field, parse_structured_output

Body = dict[str, Any]
_MISSING = object()
MAX_N = 128  # OpenAI's own limit; each sample costs a sequence slot and its KV blocks
MAX_LOGPROBS = 20  # OpenAI's limit, and SamplingParams'
MAX_PROMPTS = 64  # prompts in one completions request: each runs as its own engine request
_TOKEN_ID = re.compile(r"-?[0-9]{1,20}")
_INT64 = 1 << 63  # sampling tensors are int64: a wider value would fail the whole batch's step


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    prompt: str | list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    grammar_field: str = "response_format"  # where the output constraint came from, for compile errors
    echo: bool = False  # completions: each choice's text (and logprobs) starts with the prompt's
    score_only: bool = False  # echo with max_tokens 0: the prompt's logprobs, nothing generated


def parse_json(raw: bytes) -> Body:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    check_unicode(body)
    return body


def check_unicode(value: Any) -> None:
    """400 for a lone UTF-16 surrogate: JSON's `\\ud800` escapes decode to one, which is no Unicode text.
    Left in, the tokenizer fails on it (a 500), and a response echoing it (a WebSocket id) cannot be
    encoded, which drops the connection."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request("the request contains an unpaired UTF-16 surrogate (a \\ud800-\\udfff escape); "
                                  "strings must be valid Unicode", code="invalid_unicode") from None
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_chat(body: Body, tokenizer, vocab_size: int) -> GenerationRequest:
    messages = _field(body, "messages", list)
    if not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    prompt = render_messages(tokenizer, [_message(m, i) for i, m in enumerate(messages)])
    want_logprobs = _field(body, "logprobs", bool, False)
    top = _field(body, "top_logprobs", int, None)
    if top is not None and not want_logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:  # else SamplingParams' error would name "logprobs"
        raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
    # OpenAI's newer name wins; an error names the field the client actually sent
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params = _sampling(body, vocab_size, max_tokens=_max_tokens(body, key, None),
                       logprobs=(top or 0) if want_logprobs else None)
    return _request(body, prompt, params)


def parse_completion(body: Body, vocab_size: int) -> list[GenerationRequest]:
    """One request per prompt: `prompt` may be a batch (a list of strings or of token id lists)."""
    prompts = _prompts(_field(body, "prompt", (str, list)), vocab_size)
    echo = _field(body, "echo", bool, False)
    # echo with max_tokens 0 scores the prompt (its logprobs) and generates nothing, as in OpenAI's legacy
    # API and vLLM; the engine still samples one token, which the response leaves out
    score_only = echo and _field(body, "max_tokens", int, 16) == 0
    # The completions API's default is 16 tokens; chat's is "until the context is full".
    max_tokens = 1 if score_only else _max_tokens(body, "max_tokens", 16)
    logprobs = _field(body, "logprobs", int, None)
    params = _sampling(body, vocab_size, max_tokens=max_tokens, logprobs=logprobs,
                       prompt_logprobs=logprobs if echo else None)
    return [_request(body, prompt, params, echo, score_only) for prompt in prompts]


def _max_tokens(body: Body, key: str, default: int | None) -> int | None:
    value = _field(body, key, int, default)
    if value is not None and value < 1:
        raise bad_request(f"{key} must be at least 1, got {value}", key)
    return value


@dataclass
class TokenizeRequest:
    """vLLM's /tokenize body: the text (a `prompt`, or `messages` rendered as chat completions renders
    them, `add_generation_prompt` true by default), whether to add special tokens as generation does, and
    whether to return each token's text."""

    text: str
    add_special_tokens: bool
    return_token_strs: bool


def parse_tokenize(body: Body, tokenizer) -> TokenizeRequest:
    if "messages" in body:
        messages = _field(body, "messages", list)
        if not messages:
            raise bad_request("messages must be a non-empty list", "messages")
        text = render_messages(tokenizer, [_message(m, i) for i, m in enumerate(messages)],
                               _field(body, "add_generation_prompt", bool, True))
    else:
        text = _field(body, "prompt", str)
    return TokenizeRequest(text, _field(body, "add_special_tokens", bool, True),
                           _field(body, "return_token_strs", bool, False))


def parse_detokenize(body: Body, vocab_size: int) -> list[int]:
    tokens = _field(body, "tokens", list)
    if not _all_ints(tokens) or not all(0 <= t < vocab_size for t in tokens):
        raise bad_request(f"tokens must be a list of token ids in [0, {vocab_size})", "tokens")
    return tokens


def render_messages(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt)
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None
    except Exception as exc:  # noqa: BLE001 - a template's raise_exception() is the client's mistake
        raise bad_request(f"the chat template rejected these messages: {exc}", "messages") from None


# Recognised fields this server cannot honour yet: refusing them beats silently ignoring them
# (a client asking for JSON output must not get free text). Values that ask for nothing pass.
_NOT_YET = {
    "tools": lambda v: v in (None, []), "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: v in (None, []), "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v in (None, ""),
}


def _reject_unsupported(body: Body) -> None:
    for name, harmless in _NOT_YET.items():
        if name in body and not harmless(body[name]):
            raise bad_request(f"{name} is not supported by this server yet", name, "unsupported_parameter")


def _request(body: Body, prompt: str | list[int], params: SamplingParams, echo: bool = False,
             score_only: bool = False) -> GenerationRequest:
    _reject_unsupported(body)
    model = _field(body, "model", str)
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, None) or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("stream_options.include_usage must be a boolean", "stream_options")
    if options and not stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    return GenerationRequest(model, prompt, params, stream, include_usage, constraint_field(body), echo, score_only)


def _sampling(body: Body, vocab_size: int, max_tokens: int | None, logprobs: int | None,
              prompt_logprobs: int | None = None) -> SamplingParams:
    stop = _field(body, "stop", (str, list), None)
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise bad_request("stop must be a string or a list of strings", "stop")
    n = _field(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be in [1, {MAX_N}], got {n}", "n")
    try:
        return SamplingParams(
            n=n,
            temperature=_field(body, "temperature", float, 1.0),
            top_p=_field(body, "top_p", float, 1.0),
            top_k=_field(body, "top_k", int, 0),
            min_p=_field(body, "min_p", float, 0.0),
            repetition_penalty=_field(body, "repetition_penalty", float, 1.0),
            presence_penalty=_field(body, "presence_penalty", float, 0.0),
            frequency_penalty=_field(body, "frequency_penalty", float, 0.0),
            logit_bias=_logit_bias(_field(body, "logit_bias", dict, None), vocab_size),
            seed=_field(body, "seed", int, None),
            max_tokens=max_tokens,
            min_tokens=_field(body, "min_tokens", int, 0),
            stop=stop if isinstance(stop, list) else ([stop] if stop else []),
            ignore_eos=_field(body, "ignore_eos", bool, False),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured_output=parse_structured_output(body),
        )
    except ValueError as exc:
        raise bad_request(str(exc), _param_of(str(exc))) from None


def _param_of(message: str) -> str | None:
    # SamplingParams messages start with the field name ("temperature must be ...").
    name = message.split(" ", 1)[0]
    return name if name.isidentifier() else None


def _logit_bias(bias: dict | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        # int() alone would also take " 5", "1_0" and other scripts' digits, each some other token's id
        if not _TOKEN_ID.fullmatch(key):
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        token = int(key)
        if not 0 <= token < vocab_size:
            raise bad_request(f"logit_bias token id {token} is out of range [0, {vocab_size})", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad_request(f"logit_bias values must be numbers in [-100, 100], got {value!r}", "logit_bias")
        out[token] = float(value)
    return out


def _prompts(prompt: str | list, vocab_size: int) -> list[str | list[int]]:
    """A prompt (a string, or a list of token ids) or a batch of them (a list of those)."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise bad_request(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}", "prompt")
        return [_prompt(p, vocab_size) for p in prompt]
    return [_prompt(prompt, vocab_size)]


def _prompt(prompt: str | list, vocab_size: int) -> str | list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        return prompt
    if not prompt or not _all_ints(prompt):
        raise bad_request("prompt must be a string, a list of token ids, or a list of those", "prompt")
    if not all(0 <= t < vocab_size for t in prompt):
        raise bad_request(f"prompt token ids must be in [0, {vocab_size})", "prompt")
    return list(prompt)


def _all_ints(values: list) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)  # JSON true is a Python int


def _message(m: Any, i: int) -> dict[str, str]:
    param = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise bad_request("each message must be an object with a string role", param)
    content = m.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):  # content parts: only text ones are meaningful to a text model
        content = "\n".join(_part_text(p, param) for p in content)  # vLLM's separator, so words stay apart
    elif not isinstance(content, str):
        raise bad_request("message content must be a string or a list of text parts", param)
    return {"role": m["role"], "content": content}


def _part_text(part: Any, param: str) -> str:
    # An assistant turn may hold refusal parts (OpenAI's SDK sends back what the model said); images,
    # audio and files mean nothing to a text model, so they are refused rather than dropped.
    kind = part.get("type") if isinstance(part, dict) else None
    text = part.get(kind) if kind in ("text", "refusal") else None
    if not isinstance(text, str):
        raise bad_request(f"only text content parts are supported, got {kind!r}", param)
    return text


def _field(body: Body, key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    value = body.get(key, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise bad_request(f"missing required field {key!r}", key)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON booleans are Python ints; a number field must not take them, and a bool field only them.
    ok = any(_is(value, k) for k in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise APIError(400, f"{key} must be of type {names}, got {type(value).__name__}", key, "invalid_type")
    if isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
        raise bad_request(f"{key} is out of range", key)
    if isinstance(value, float) and not math.isfinite(value):  # Python's json reads NaN, Infinity and 1e999
        raise bad_request(f"{key} must be a finite number, got {value}", key)
    return float(value) if kinds == (float,) else value


def _is(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:  # an int is a number too; _field bounds both
        return isinstance(value, (int, float))
    return isinstance(value, kind)
