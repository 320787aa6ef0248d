"""vLLM-v1-style scheduler: each step spends a token budget on running requests, then on waiting ones.

There is no prefill/decode split: a request has `num_tokens` and `num_computed_tokens`, and a step
computes some of the difference (a prompt chunk, one decode token, or a token plus speculative ones).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.stats import SchedulerStats, SpecCounters

if TYPE_CHECKING:
    from engine.structured_output import GrammarBitmask


@dataclass
class ScheduledRequest:
    """What the model runner needs of one request for one step (never the Request itself)."""

    request_id: str
    token_ids: list[int]  # tokens whose KV this step computes
    start_pos: int  # position of token_ids[0] = tokens already in the cache
    block_ids: list[int]  # the request's whole block table
    sample: bool  # the chunk reaches the end of the known tokens: sample the next one
    sampling_params: SamplingParams
    prompt_token_ids: list[int]  # read-only views, for penalties
    output_token_ids: list[int]
    banned_token_ids: list[int] = field(default_factory=list)  # stop ids while under min_tokens
    num_draft_tokens: int = 0  # the last ones of token_ids are drafts to verify (speculative decoding)
    tokens_left: int = 1 << 30  # output tokens the request may still produce, counted before this step
    propose_drafts: bool = True  # False while the request's drafting is paused (DraftBackoff)

    @property
    def draft_token_ids(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_draft_tokens:]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    finished_request_ids: set[str]  # the runner drops per-request state (e.g. seeded generators)
    grammar: GrammarBitmask | None = None  # masks of the constrained sampled rows, set before execute

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)


@dataclass
class RequestUpdate:
    """What one step did to one request, for the output side (detokenizer, streams)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None
    new_logprobs: list | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    stop_reason: int | str | None = None  # a stop_token_ids id that ended it (None for EOS, as in vLLM)
    stopped_on_token: bool = False  # the last new token is an EOS / stop id: its text is not output
    error: str | None = None  # why it ended with "error"


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 stop_token_ids: set[int], num_lookahead_tokens: int = 0):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.stop_token_ids = stop_token_ids  # the model's EOS ids
        # slots past the last token that a drafter writes its own KV into while drafting (EAGLE, draft model)
        self.num_lookahead_tokens = num_lookahead_tokens
        self.waiting: list[Request] = []  # sorted by (priority, arrival)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()
        self.num_preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.tokens_last_step = 0
        self.spec = SpecCounters()

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=Request.sort_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted = False
        # Highest priority first, so a victim (the lowest) is never one already scheduled this step.
        for req in sorted(self.running, key=Request.sort_key):
            if budget <= 0:
                break
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if req.status is not RequestStatus.RUNNING or n <= 0:  # preempted earlier in this loop
                continue
            drafts = self._drafts(req, n, budget)
            while not self.blocks.allocate(req.request_id, self._slots(req, req.num_computed_tokens, n, drafts)):
                # the last of the sorted order: never one scheduled above, even when sort keys tie
                victim = max(reversed(self.running), key=Request.sort_key)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                scheduled.append(self._scheduled(req, n, drafts))
                budget -= n + len(drafts)
        # New work only when nothing was preempted, so a request is never re-admitted in the step that evicted it.
        for req in list(self.waiting):
            if budget <= 0 or preempted or len(self.running) >= self.max_num_seqs:
                break
            if self._leader_prefilling(req):
                continue
            n_computed, cached = self._prefix_hit(req)
            n = min(req.num_tokens - n_computed, budget)
            if not self.blocks.allocate(req.request_id, self._slots(req, n_computed, n), cached):
                break
            self.waiting.remove(req)
            self._count_prefix(req, n_computed)
            req.num_computed_tokens = n_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._scheduled(req, n))
            budget -= n
        finished, self._finished_ids = self._finished_ids, set()
        self.tokens_last_step = self.max_num_batched_tokens - budget
        return SchedulerOutput(scheduled, finished)

    def _leader_prefilling(self, req: Request) -> bool:
        """n > 1 siblings wait for the first one's prompt, then share its blocks through the prefix cache."""
        leader = self.requests.get(req.prefix_leader) if req.prefix_leader else None
        return (leader is not None and self.blocks.enable_prefix_caching
                and leader.num_computed_tokens < leader.num_prompt_tokens)

    def _prefix_hit(self, req: Request) -> tuple[int, list[int]]:
        cached = self.blocks.find_cached_prefix(req.token_slice(0, req.num_tokens)) if req.reads_prefix_cache else []
        return len(cached) * self.blocks.block_size, cached

    def _count_prefix(self, req: Request, n_hit: int) -> None:
        if req.num_preemptions == 0:  # a resumed request's own blocks are not a cache hit
            self.prefix_queries += req.num_prompt_tokens
            self.prefix_hits += n_hit
            req.num_cached_tokens = n_hit

    def _slots(self, req: Request, n_computed: int, n: int, drafts: list[int] = ()) -> int:
        """KV slots the request needs this step: its tokens, the drafts', and the drafter's lookahead (it
        writes up to k positions past the accepted drafts). Drafts never pass the request's last token, so
        neither does the lookahead that serves them: capped there, a request at max_model_len still fits a
        pool of max_model_len tokens instead of preempting itself forever."""
        ahead = self.num_lookahead_tokens if n_computed + n == req.num_tokens else 0
        return min(n_computed + n + len(drafts) + ahead, req.num_prompt_tokens + req.max_output_tokens)

    def _drafts(self, req: Request, n: int, budget: int) -> list[int]:
        """The request's drafts that fit: only when decoding (one pending token), within the token
        budget, and never past max_tokens (drafts plus the target's own token are all emitted)."""
        if not req.draft_token_ids or n != req.num_tokens - req.num_computed_tokens or n != 1:
            return []
        room = req.max_output_tokens - len(req.output_token_ids) - 1
        return req.draft_token_ids[:max(0, min(room, budget - n))]

    def _scheduled(self, req: Request, n: int, drafts: list[int] = ()) -> ScheduledRequest:
        start = req.num_computed_tokens
        params = req.sampling_params
        under_min = len(req.output_token_ids) < params.min_tokens
        return ScheduledRequest(
            request_id=req.request_id,
            token_ids=req.token_slice(start, start + n) + list(drafts),
            start_pos=start,
            block_ids=self.blocks.tables[req.request_id],
            sample=start + n == req.num_tokens,
            sampling_params=params,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids,
            banned_token_ids=sorted(self._stop_ids(params)) if under_min else [],
            num_draft_tokens=len(drafts),
            tokens_left=req.max_output_tokens - len(req.output_token_ids),
            propose_drafts=req.draft_backoff.allow(),
        )

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        return ids if params.ignore_eos else ids | self.stop_token_ids

    def _preempt(self, req: Request) -> None:
        # Recompute later: drop the KV, keep every token, go back to the front of the queue.
        self.running.remove(req)
        self.blocks.free(req.request_id)
        req.num_computed_tokens = 0
        req.draft_token_ids = []
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        bisect.insort(self.waiting, req, key=Request.sort_key)

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]],
               logprobs: dict[str, list] | None = None,
               drafts: dict[str, list[int]] | None = None) -> list[RequestUpdate]:
        """Advance computed counts, append sampled tokens, check stops, free finished requests.

        `drafts` are the proposer's guesses for each request's next tokens, verified next step."""
        updates = []
        for s in out.scheduled:
            req = self.requests.get(s.request_id)
            if req is None or req.status.finished:  # aborted while the step ran
                continue
            new_tokens = sampled.get(s.request_id, [])
            req.num_computed_tokens += len(s.token_ids) - s.num_draft_tokens
            new_ids = self._append(req, new_tokens)
            if s.num_draft_tokens:
                self._settle_drafts(req, s.num_draft_tokens, len(new_tokens) - 1)
            if req.draft_token_ids:  # last step's proposals: verified now, or all cut (grammar, budget)
                req.draft_backoff.record(len(new_tokens) - 1 if s.num_draft_tokens else 0)
            req.draft_token_ids = (drafts or {}).get(s.request_id, [])
            if self.blocks.enable_prefix_caching:
                self.blocks.cache_blocks(req.request_id, req.num_computed_tokens, req.token_slice)
            if new_ids or req.status.finished:
                lp = (logprobs or {}).get(s.request_id)
                on_token = req.status is RequestStatus.FINISHED_STOPPED and bool(new_ids) and new_ids[-1] in \
                    self._stop_ids(req.sampling_params)
                updates.append(RequestUpdate(req.request_id, new_ids, req.finish_reason,
                                             lp[:len(new_ids)] if lp else None, req.num_cached_tokens,
                                             req.stop_reason, on_token, req.error))
                if req.status.finished:
                    self._release(req)
        return updates

    def _settle_drafts(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        # Accepted drafts' KV was written by this step and is valid; rejected ones' slots go back.
        self.spec.record(num_drafts, num_accepted)
        req.num_computed_tokens += num_accepted
        if not req.status.finished:
            self.blocks.trim(req.request_id, req.num_computed_tokens)

    def _append(self, req: Request, token_ids: list[int]) -> list[int]:
        params = req.sampling_params
        stop_ids = self._stop_ids(params)
        appended = []
        for token in token_ids:
            req.output_token_ids.append(token)
            appended.append(token)
            n_out = len(req.output_token_ids)
            grammar_error, grammar_done = req.matcher.feed(token) if req.matcher is not None else (None, False)
            if grammar_error is not None:
                req.status, req.error = RequestStatus.FINISHED_ERROR, grammar_error
            elif token in stop_ids and n_out > params.min_tokens:
                eos = token in self.stop_token_ids and not params.ignore_eos
                req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, None if eos else token
            elif grammar_done:
                # the grammar is complete, only EOS could follow: "stop", even on the last token max_tokens allows
                req.status = RequestStatus.FINISHED_STOPPED
            elif n_out >= req.max_output_tokens:
                req.status = RequestStatus.FINISHED_LENGTH
            if req.status.finished:
                break
        if self._can_jump_forward(req, appended):
            # Tokens the grammar forces are what sampling would pick with probability 1: append them now,
            # and the next step computes their KV as one chunk instead of a step per token.
            appended += self._append(req, req.matcher.forced_tokens())
        return appended

    @staticmethod
    def _can_jump_forward(req: Request, appended: list[int]) -> bool:
        params = req.sampling_params
        # logprobs would need a model row per token, so those requests take every step
        return (bool(appended) and req.matcher is not None and not req.status.finished and params.jump_forward
                and params.logprobs is None)

    def finish(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """End a request from outside the step (abort, stop string, error); its blocks go back now."""
        req = self.requests.get(request_id)
        if req is None or req.status.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        req.status, req.stop_reason = status, stop_reason
        self._release(req)

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        self.blocks.free(req.request_id)
        self.requests.pop(req.request_id, None)
        self._finished_ids.add(req.request_id)

    def stats(self) -> SchedulerStats:
        spec = self.spec
        return SchedulerStats(len(self.running), len(self.waiting), self.num_preemptions,
                              self.blocks.num_used_blocks, self.blocks.num_free_blocks,
                              self.prefix_queries, self.prefix_hits, self.tokens_last_step,
                              spec.drafts, spec.accepted, list(spec.accepted_by_position), spec.steps)
