"""What the engine hands back: vLLM-shaped RequestOutput / CompletionOutput."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first

    @classmethod
    def from_row(cls, ids: list[int], values: list[float], num_top: int) -> TokenLogprob:
        """One row of `gather_logprobs` (the token first, then the top alternatives) with `num_top` of them."""
        return cls(ids[0], values[0], list(zip(ids[1:1 + num_top], values[1:1 + num_top])))


@dataclass
class CompletionOutput:
    index: int
    text: str  # everything so far
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = None
    delta_text: str = ""  # new since the previous RequestOutput of this request
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None
    # With SamplingParams.prompt_logprobs: one entry per prompt token (the first None: nothing predicts it),
    # the raw model distribution at the position before. Complete on every output from the first one that
    # carries an output token (the prefill is done by then) to the last, as vLLM's cumulative outputs (a vLLM
    # delta stream sends them once, in that same first output); None before that, and always None when not
    # asked for (or when the request ended before its prompt was computed).
    prompt_logprobs: list[TokenLogprob | None] | None = None
