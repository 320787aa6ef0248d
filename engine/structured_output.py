"""Structured output in the engine: compile each request's grammar once, and each step build the token
bitmask of every constrained logits row (the model runner only applies it).

The matchers live on the Requests; the scheduler advances them as tokens are appended (and stops a
request whose grammar has ended). Here, before the step runs, drafts the grammar forbids are cut, and
a request verifying k drafts gets k + 1 mask rows: the matcher walks through its drafts filling one
row per position, then rolls back, so the state is again the one its accepted tokens gave.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from engine.request import Request
from engine.scheduler import SchedulerOutput
from grammar import CompiledGrammar, GrammarCompiler, GrammarSpec


@dataclass
class GrammarBitmask:
    """One step's masks: bitmask[r] masks the runner's logits row r, for the constrained rows r in `rows`."""

    bitmask: torch.Tensor  # [N, W] int32, CPU; N = the step's sampled rows
    rows: list[int]


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int], backend: str,
                 timeout_s: float):
        self._args = (tokenizer, vocab_size, list(eos_token_ids), backend, timeout_s)
        self._compiler: GrammarCompiler | None = None
        self._bitmask: torch.Tensor | None = None

    @property
    def compiler(self) -> GrammarCompiler:
        # built on first use: the vocabulary scan costs a moment that unconstrained serving never pays
        if self._compiler is None:
            tokenizer, vocab_size, eos, backend, timeout = self._args
            self._compiler = GrammarCompiler(tokenizer, backend=backend, vocab_size=vocab_size,
                                             eos_token_ids=eos, timeout_s=timeout)
        return self._compiler

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Raises GrammarError (a ValueError) for a bad spec or a compile past the time limit."""
        return self.compiler.compile(spec)

    def bitmask(self, out: SchedulerOutput, requests: dict[str, Request]
                ) -> tuple[GrammarBitmask | None, dict[str, str]]:
        """Cut forbidden drafts from `out`, then fill the mask rows of every constrained sampled row.

        Also returns the requests whose matcher raised (request id -> error): they fail alone, while the
        rest of the batch runs (their rows stay in it, unmasked, and their tokens are dropped)."""
        row, fills, errors = 0, [], {}
        for s in out.scheduled:
            if not s.sample:
                continue
            req = requests.get(s.request_id)
            matcher = req.matcher if req is not None else None
            if matcher is not None:
                try:
                    self._cut_drafts(s, matcher)
                    fills.append((row, matcher, s.draft_token_ids, s.request_id))
                except Exception as exc:  # noqa: BLE001 - a grammar backend failure is one request's
                    errors[s.request_id] = f"grammar error: {type(exc).__name__}: {exc}"
            row += s.num_draft_tokens + 1
        if not fills:
            return None, errors
        bitmask = self._buffer(row)  # row r masks the runner's logits row r; unconstrained rows stay unread
        rows = []
        for first, matcher, drafts, request_id in fills:
            try:
                rows.extend(self._fill(bitmask, first, matcher, drafts))
            except Exception as exc:  # noqa: BLE001
                errors[request_id] = f"grammar error: {type(exc).__name__}: {exc}"
        return GrammarBitmask(bitmask[:row], rows), errors

    @staticmethod
    def _fill(bitmask: torch.Tensor, first: int, matcher, drafts: list[int]) -> list[int]:
        """Rows first .. first + len(drafts): the mask at each draft position; the matcher ends where it began."""
        for i in range(len(drafts) + 1):
            matcher.fill_bitmask(bitmask, first + i)
            if i < len(drafts):
                matcher.accept_token(drafts[i])
        matcher.rollback(len(drafts))
        return list(range(first, first + len(drafts) + 1))

    @staticmethod
    def _cut_drafts(s, matcher) -> None:
        """Keep the drafts up to the first one the grammar refuses (they would be rejected anyway)."""
        drafts = s.draft_token_ids
        ok = 0
        while ok < len(drafts) and not matcher.is_finished() and matcher.accept_token(drafts[ok]):
            ok += 1
        matcher.rollback(ok)
        if ok < len(drafts):
            del s.token_ids[len(s.token_ids) - (len(drafts) - ok):]
            s.num_draft_tokens = ok

    def _buffer(self, n: int) -> torch.Tensor:
        if self._bitmask is None or self._bitmask.shape[0] < n:
            self._bitmask = self.compiler.allocate_bitmask(max(n, 64))
        return self._bitmask
