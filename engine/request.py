"""A request's state as the scheduler sees it: tokens so far, how many are computed, how it ends."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams
from grammar import Matcher


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")


@dataclass
class DraftBackoff:
    """Speculation that stops paying for one request turns itself down: after `patience` verify steps in
    a row that accepted no draft (say a JSON answer the draft head never learned), the request goes
    1, 2, 4, ... up to `max_pause` steps without drafting, each a plain decode step; one accepted
    draft resets it."""

    patience: int = 3
    max_pause: int = 16
    misses: int = 0  # verify steps in a row that accepted no draft
    pause: int = 0  # steps left without drafting

    def record(self, accepted: int) -> None:
        if accepted:
            self.misses = 0
            return
        self.misses += 1
        if self.misses >= self.patience:
            self.pause = min(1 << (self.misses - self.patience), self.max_pause)

    def allow(self) -> bool:
        """Whether the request may have drafts proposed in the step being scheduled."""
        if self.pause:
            self.pause -= 1
            return False
        return True


@dataclass(eq=False)  # identity, not field equality: requests live in lists
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_model_len: int
    priority: int = 0  # lower runs first, as in vLLM
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first schedule
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    error: str | None = None
    prefix_leader: str | None = None  # an n > 1 sibling whose prompt blocks this one will share
    draft_token_ids: list[int] = field(default_factory=list)  # proposed next tokens, verified next step
    draft_backoff: DraftBackoff = field(default_factory=DraftBackoff)
    matcher: Matcher | None = None  # the grammar state of a structured-output request, advanced per token

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def reads_prefix_cache(self) -> bool:
        """Cached blocks skip their rows, and prompt logprobs need every prompt row: such a request computes
        its whole prompt (as in vLLM v1) until it has them, i.e. until it has an output token."""
        return self.sampling_params.prompt_logprobs is None or bool(self.output_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    @property
    def max_output_tokens(self) -> int:
        room = self.max_model_len - self.num_prompt_tokens
        limit = self.sampling_params.max_tokens
        return room if limit is None else min(limit, room)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) across prompt and output without building the whole list."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt:end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n_prompt]

    def sort_key(self) -> tuple[int, float]:
        return (self.priority, self.arrival_time)
