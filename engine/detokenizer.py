"""Incremental detokenization and stop strings.

Byte-level BPE splits one UTF-8 character over several tokens; decoding a lone piece yields U+FFFD.
So text is only released once the window decodes cleanly, and, when stop strings are set,
the last `max(len(stop)) - 1` characters are held back until they cannot begin a stop string.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from engine.sampling_params import SamplingParams

_CONTEXT_TOKENS = 5  # prompt tokens decoded alongside, so a first token's leading space survives


@dataclass
class DetokenizerUpdate:
    delta_text: str
    stop_string: str | None  # set when a stop string ended the request this update
    num_tokens: int = 0  # new tokens up to the one that completed the stop string (all of them otherwise)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # decoded output text (cut at a stop string once one is found)
        self.emitted = 0  # characters of `text` already handed out
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # a stop string may start this far back
        # Streamed text that may be the start of a stop string waits until it is known not to be one, unless
        # stop strings stay in the output (what follows one in its token is cut when it completes).
        self.hold_back = 0 if params.include_stop_str_in_output else self.hold
        self.num_output = 0  # output tokens seen
        self.check_from = 0  # stop strings are searched from here: text of the first min_tokens tokens cannot stop
        self._decode = _decoder(tokenizer, params.skip_special_tokens)

    def update(self, new_token_ids: list[int], finished: bool, stop_token: bool = False) -> DetokenizerUpdate:
        """`stop_token`: the last new token is the EOS / stop id that ended the request; as in vLLM its text
        is left out unless include_stop_str_in_output."""
        stop, num_tokens = None, len(new_token_ids)
        if stop_token and not self.params.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        for i, token in enumerate(new_token_ids):
            self.ids.append(token)
            self.num_output += 1
            before = len(self.text)
            self.text += self._decode_step(flush=False)
            if self.num_output <= self.params.min_tokens:  # vLLM: no stop string below min_tokens
                self.check_from = len(self.text)
                continue
            stop = self._find_stop(before)
            if stop is not None:
                num_tokens = i + 1
                break
        if finished or stop is not None:
            if stop is None:
                self.text += self._decode_step(flush=True)
            end = len(self.text)
        else:
            end = max(self.emitted, len(self.text) - self.hold_back)
        delta, self.emitted = self.text[self.emitted:end], end
        return DetokenizerUpdate(delta, stop, num_tokens)

    def _decode_step(self, flush: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not flush):
            return ""  # an incomplete character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def _find_stop(self, before: int) -> str | None:
        if not self.params.stop:
            return None
        window_start = max(self.check_from, before - self.hold)
        hits = [(idx, stop) for stop in self.params.stop if (idx := self.text.find(stop, window_start)) != -1]
        if not hits:
            return None
        idx, stop = min(hits)  # the earliest stop string wins
        self.text = self.text[:idx + len(stop) if self.params.include_stop_str_in_output else idx]
        return stop


def _decoder(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """The Rust tokenizer's own decode where transformers' wrapper would add nothing but ~15 us a call
    (two calls per token per request: at 128 streams that was most of the engine's per-step overhead)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
