"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`), taken from the prompt rows a step already runs.

The model runner keeps one `_Pending` per request that asked, from `add` until every entry is in: each
step, the scheduled prompt chunk of such a request gives the rows it covers. Row p (position p) holds the
distribution that predicts prompt token p + 1, so a prompt of L tokens needs rows 0..L-2; row L-1 predicts
the first output token, which the sampler handles. Entries are stored by position: a prefill recomputed
after preemption overwrites them with the same values instead of adding more. Requests that did not ask
cost nothing: the runner looks here only while `pending` is non-empty. The engine adds a request when it
arrives and discards it when it ends early (abort, error); a complete one leaves by itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from decoding.sampler import gather_logprobs
from engine.outputs import TokenLogprob
from engine.scheduler import ScheduledRequest

# Rows per LM-head call: a long prompt chunk would otherwise materialise [chunk, V] fp32 logits at once.
_MAX_ROWS = 256


@dataclass
class _Pending:
    num_top: int
    prompt_token_ids: list[int]
    entries: list[TokenLogprob | None]  # by prompt position; entries[0] stays None
    filled: int = 0

    @property
    def complete(self) -> bool:
        return self.filled == len(self.prompt_token_ids) - 1


@dataclass
class _Span:
    """Prompt positions [start, end) of one request whose rows this step computed, from batch row `first_row`."""

    pending: _Pending
    first_row: int
    start: int
    end: int


class PromptLogprobs:
    def __init__(self) -> None:
        self.pending: dict[str, _Pending] = {}  # request id -> entries so far

    def add(self, request_id: str, num_top: int, prompt_token_ids: list[int]) -> None:
        self.pending[request_id] = _Pending(num_top, prompt_token_ids, [None] * len(prompt_token_ids))

    def discard(self, request_id: str) -> None:
        self.pending.pop(request_id, None)

    def collect(self, scheduled: list[ScheduledRequest], query_start_loc: list[int], hidden: torch.Tensor,
                compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, list[TokenLogprob | None]]:
        """Fill the entries of this step's rows; returns (and forgets) the requests whose entries are complete.

        hidden: [T, H], the step's final hidden states; compute_logits: [M, H] -> [M, V]."""
        spans, seen = [], []
        for i, s in enumerate(scheduled):
            p = self.pending.get(s.request_id)
            if p is None:
                continue
            end = min(s.start_pos + len(s.token_ids) - s.num_draft_tokens, len(p.prompt_token_ids) - 1)
            if end > s.start_pos:
                spans.append(_Span(p, query_start_loc[i], s.start_pos, end))
            seen.append(s.request_id)
        if spans:
            self._fill(spans, hidden, compute_logits)
        return {rid: self.pending.pop(rid).entries for rid in seen if self.pending[rid].complete}

    @staticmethod
    def _fill(spans: list[_Span], hidden: torch.Tensor, compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        rows = torch.tensor([r.first_row + j for r in spans for j in range(r.end - r.start)], device=hidden.device)
        targets = torch.tensor([t for r in spans for t in r.pending.prompt_token_ids[r.start + 1:r.end + 1]],
                               device=hidden.device)  # [M]: the prompt token each row predicts
        num_top = max(r.pending.num_top for r in spans)
        values, ids = [], []
        for lo in range(0, len(rows), _MAX_ROWS):
            # the raw model distribution, as for sampled tokens: no penalties, temperature or grammar mask
            raw = compute_logits(hidden[rows[lo:lo + _MAX_ROWS]]).to(torch.float32).log_softmax(dim=-1)  # [m, V]
            v, i = gather_logprobs(raw, targets[lo:lo + _MAX_ROWS], num_top)  # [m, 1 + K] each
            values += v.tolist()
            ids += i.tolist()
        m = 0
        for r in spans:
            p = r.pending
            for pos in range(r.start + 1, r.end + 1):
                p.filled += p.entries[pos] is None
                p.entries[pos] = TokenLogprob.from_row(ids[m], values[m], p.num_top)
                m += 1
