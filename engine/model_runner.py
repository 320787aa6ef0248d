"""Model runner: SchedulerOutput in, sampled tokens out. It owns the KV cache and never sees a Request."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from decoding.logits_processors import apply_logits_processors
from decoding.proposers import FeatureBatch, FeatureProposer, Proposal, ProposalRequest, Proposer
from decoding.sampler import Sampler, SamplingMetadata, gather_logprobs, logits_to_probs, make_generator
from decoding.speculative import DraftBatch, verify, verify_greedy
from grammar import apply_bitmask
from engine.kv_cache import allocate_kv_caches
from engine.model import LlamaForCausalLM
from engine.outputs import TokenLogprob
from engine.platform import tune_cpu_allocator
from engine.prompt_logprobs import PromptLogprobs
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest, SchedulerOutput
from kernels import AttentionMetadata
from kernels.cpu_ops import argmax


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, list[int]]  # request id -> new token ids
    logprobs: dict[str, list[TokenLogprob]]
    drafts: dict[str, list[int]] = field(default_factory=dict)  # request id -> tokens to verify next step
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why it failed (its tokens are void)
    prompt_logprobs: dict[str, list[TokenLogprob | None]] = field(default_factory=dict)  # completed this step


@dataclass
class BatchInputs:
    """One step's flattened, unpadded batch."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows whose hidden state is sampled (a verifying request has k + 1)
    sample_rows: list[ScheduledRequest]  # the requests that sample, in row order


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 proposer: Proposer | None = None, speculative_max_batch: int = 4,
                 kv_cache_dtype: torch.dtype | None = None):
        self.model = model
        self.config = model.config
        self.block_size = block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.kv_caches = allocate_kv_caches(self.config, num_blocks, block_size, kv_cache_dtype or self.dtype,
                                            self.device)
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator | None] = {}
        self.proposer, self.speculative_max_batch = proposer, speculative_max_batch
        self.draft_probs: dict[str, torch.Tensor] = {}  # q of drafts proposed last step, until verified
        # requests that ran a step while the batch was too large to draft: a feature proposer skipped them,
        # so its KV has holes at their positions; they never get drafts, and it no longer runs over their rows
        self.undraftable: set[str] = set()
        self.step_seconds = self.draft_seconds = 0.0  # for the drafting share in the stats
        self.prompt_logprobs = PromptLogprobs()  # the engine registers (and drops) the requests that ask
        if isinstance(proposer, FeatureProposer):
            proposer.allocate_cache(num_blocks, block_size, self.device, self.dtype)

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        start = time.perf_counter()
        try:
            return self._execute(out)
        finally:
            self.step_seconds += time.perf_counter() - start

    @torch.inference_mode()
    def _execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in out.finished_request_ids:
            self.generators.pop(request_id, None)
            self.draft_probs.pop(request_id, None)
            self.undraftable.discard(request_id)
        if not out.scheduled:
            return ModelRunnerOutput({}, {})
        batch = self.prepare(out.scheduled)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn)  # [T, hidden]
        result = self._sample_or_verify(out, batch, hidden) if batch.sample_rows else ModelRunnerOutput({}, {})
        if self.prompt_logprobs.pending:  # empty unless some request asked: then the step looks at its rows
            result.prompt_logprobs = self.prompt_logprobs.collect(out.scheduled, batch.attn.query_start_loc, hidden,
                                                                  self.model.compute_logits)
        start = time.perf_counter()
        for request_id in result.sampled:
            self.draft_probs.pop(request_id, None)  # unverified guesses from an earlier step
        if isinstance(self.proposer, FeatureProposer):  # also without sampling: it extends its KV by the chunks
            result.drafts = self._propose_from_features(out.scheduled, batch, hidden, result.sampled)
        else:
            result.drafts = self._propose(batch.sample_rows, result.sampled)
        self.draft_seconds += time.perf_counter() - start
        return result

    def _sample_or_verify(self, out: SchedulerOutput, batch: BatchInputs, hidden: torch.Tensor) -> ModelRunnerOutput:
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [N, V]
        if out.grammar is not None:
            apply_bitmask(logits, out.grammar.bitmask, out.grammar.rows)
        rows = batch.sample_rows
        if any(s.num_draft_tokens for s in rows):
            return self._verify(logits, rows)
        errors = self._apply_logits_processors(logits, rows)
        result = self._sample(logits, rows)
        result.errors = errors
        return result

    def prepare(self, scheduled: list[ScheduledRequest]) -> BatchInputs:
        bs = self.block_size
        q_lens = [len(s.token_ids) for s in scheduled]
        seq_lens = [s.start_pos + n for s, n in zip(scheduled, q_lens)]
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        max_blocks = max(len(s.block_ids) for s in scheduled)
        block_tables = torch.tensor([s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in scheduled])
        input_ids = torch.tensor([t for s in scheduled for t in s.token_ids])
        if starts[-1] == len(scheduled):  # decode only: one row per request
            positions = torch.tensor([s.start_pos for s in scheduled])
            rows = torch.arange(len(scheduled))
        else:
            positions = torch.tensor([p for s, n in zip(scheduled, q_lens) for p in range(s.start_pos, s.start_pos + n)])
            rows = torch.repeat_interleave(torch.arange(len(scheduled)), torch.tensor(q_lens))
        slot_mapping = block_tables[rows, positions // bs] * bs + positions % bs  # [T]
        sample_rows = [s for s in scheduled if s.sample]
        logits_indices = torch.tensor([row for i, s in enumerate(scheduled) if s.sample
                                       for row in range(starts[i + 1] - 1 - s.num_draft_tokens, starts[i + 1])])
        dev = self.device
        attn = AttentionMetadata(slot_mapping=slot_mapping.to(dev), block_tables=block_tables.to(dev),
                                 seq_lens=torch.tensor(seq_lens, device=dev), query_start_loc=starts,
                                 seq_lens_list=seq_lens, block_size=bs)
        return BatchInputs(input_ids.to(dev), positions.to(dev), attn, logits_indices.to(dev), sample_rows)

    @staticmethod
    def _apply_logits_processors(logits: torch.Tensor, rows: list[ScheduledRequest],
                                 outputs: list[list[int]] | None = None) -> dict[str, str]:
        """In place; returns the requests whose processors raised (request id -> error)."""
        fns = [s.sampling_params.logits_processors for s in rows]
        if not any(fns):
            return {}
        return apply_logits_processors(logits, [s.request_id for s in rows], fns,
                                       outputs if outputs is not None else [s.output_token_ids for s in rows])

    def _sample(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> ModelRunnerOutput:
        meta = self._metadata(rows, [s.output_token_ids for s in rows], [s.banned_token_ids for s in rows])
        result = self.sampler(logits, meta)
        token_ids = result.token_ids.tolist()
        sampled = {s.request_id: [t] for s, t in zip(rows, token_ids)}
        logprobs: dict[str, list[TokenLogprob]] = {}
        if result.logprobs is not None:
            values, ids = result.logprobs.tolist(), result.logprob_token_ids.tolist()
            for i, s in enumerate(rows):
                if s.sampling_params.logprobs is not None:
                    logprobs[s.request_id] = [TokenLogprob.from_row(ids[i], values[i], s.sampling_params.logprobs)]
        return ModelRunnerOutput(sampled, logprobs)

    def _verify(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> ModelRunnerOutput:
        """Requests with drafts have k + 1 logits rows: the target's distribution at each draft position."""
        # Row i of a request sees its drafts before i as output (penalties, min_tokens), as plain decoding would.
        expanded = [(s, i) for s in rows for i in range(s.num_draft_tokens + 1)]
        outputs = [s.output_token_ids + s.draft_token_ids[:i] for s, i in expanded]
        banned = [s.banned_token_ids if len(s.output_token_ids) + i < s.sampling_params.min_tokens else []
                  for s, i in expanded]
        meta = self._metadata([s for s, _ in expanded], outputs, banned)
        errors = self._apply_logits_processors(logits, [s for s, _ in expanded], outputs)
        drafts = DraftBatch([s.draft_token_ids for s in rows], [self._draft_probs(s) for s in rows])
        if meta.all_greedy and meta.no_adjustments:
            emitted = verify_greedy(argmax(logits).tolist(), drafts)
        else:
            emitted = verify(logits_to_probs(logits, meta), drafts, [self._generator(s) for s in rows])
        sampled = {s.request_id: tokens for s, tokens in zip(rows, emitted)}
        return ModelRunnerOutput(sampled, self._verified_logprobs(logits, rows, drafts.starts, emitted), errors=errors)

    def _verified_logprobs(self, logits: torch.Tensor, rows: list[ScheduledRequest], starts: list[int],
                           emitted: list[list[int]]) -> dict[str, list[TokenLogprob]]:
        want = [(r, s) for r, s in enumerate(rows) if s.sampling_params.logprobs is not None]
        if not want:
            return {}
        index = [starts[r] + j for r, _ in want for j in range(len(emitted[r]))]
        tokens = torch.tensor([t for r, _ in want for t in emitted[r]])
        k = max(s.sampling_params.logprobs for _, s in want)
        raw = logits[index].to(torch.float32).log_softmax(dim=-1)  # [M, V], the raw distribution as in `Sampler`
        values, ids = (x.tolist() for x in gather_logprobs(raw, tokens.to(raw.device), k))
        out, m = {}, 0
        for r, s in want:
            n = len(emitted[r])
            out[s.request_id] = [TokenLogprob.from_row(ids[m + j], values[m + j], s.sampling_params.logprobs)
                                 for j in range(n)]
            m += n
        return out

    def _draft_probs(self, s: ScheduledRequest) -> torch.Tensor | None:
        q = self.draft_probs.pop(s.request_id, None)  # [k, V]; the scheduler may have cut the drafts short
        return None if q is None else q[:s.num_draft_tokens]

    def _propose(self, rows: list[ScheduledRequest], sampled: dict[str, list[int]]) -> dict[str, list[int]]:
        # Verifying k drafts costs k more rows per request; once the batch alone fills the matmuls, it stops paying.
        if self.proposer is None or len(rows) > self.speculative_max_batch:
            return {}
        reqs = [ProposalRequest(s.request_id, s.prompt_token_ids + s.output_token_ids + sampled[s.request_id],
                                _draft_room(s, sampled))
                for s in rows if s.request_id in sampled and s.propose_drafts]
        return self._keep(self.proposer.propose(reqs))

    def _propose_from_features(self, scheduled: list[ScheduledRequest], batch: BatchInputs, hidden: torch.Tensor,
                               sampled: dict[str, list[int]]) -> dict[str, list[int]]:
        """Hand the feature proposer (EAGLE head, draft model) every position this step made valid, with its
        token and the token that follows it: all but the undraftable requests', whose drafter KV is of no use."""
        if len(sampled) > self.speculative_max_batch:
            # Too many to draft for: skip the drafter's forward (the EAGLE head's cost ~10% of such a step
            # at batch 16).
            self.undraftable.update(s.request_id for s in scheduled)
            return {}
        keep = [i for i, s in enumerate(scheduled) if s.request_id not in self.undraftable]
        if not keep:
            return {}
        return self._keep(self.proposer.propose_from_features(self._feature_batch(scheduled, keep, batch, hidden,
                                                                                  sampled)))

    def _feature_batch(self, scheduled: list[ScheduledRequest], keep: list[int], batch: BatchInputs,
                       hidden: torch.Tensor, sampled: dict[str, list[int]]) -> FeatureBatch:
        """The rows of the requests scheduled[i] for i in keep, flattened."""
        rows, token_ids, next_ids, seq_lens, starts = [], [], [], [], [0]
        q_start = batch.attn.query_start_loc
        kept = [scheduled[i] for i in keep]
        for i, s in zip(keep, kept):
            n_real = len(s.token_ids) - s.num_draft_tokens
            if s.request_id in sampled:
                known = s.token_ids[:n_real] + sampled[s.request_id]  # accepted drafts, then the new token
            else:  # a prompt chunk: the next token is the prompt's (or, after preemption, an earlier output's)
                nxt = s.start_pos + n_real
                tail = s.prompt_token_ids[nxt:nxt + 1] or s.output_token_ids[nxt - len(s.prompt_token_ids):][:1]
                known = s.token_ids[:n_real] + tail
            valid = len(known) - 1
            rows.extend(range(q_start[i], q_start[i] + valid))
            token_ids.extend(known[:-1])
            next_ids.extend(known[1:])
            seq_lens.append(s.start_pos + valid)
            starts.append(starts[-1] + valid)
        tables = batch.attn.block_tables
        if len(keep) < len(scheduled):
            tables = tables[torch.tensor(keep, device=tables.device)]
        return FeatureBatch(
            request_ids=[s.request_id for s in kept],
            hidden=hidden[torch.tensor(rows, device=hidden.device)],
            token_ids=torch.tensor(token_ids, device=self.device),
            next_token_ids=torch.tensor(next_ids, device=self.device),
            positions=batch.positions[torch.tensor(rows, device=self.device)],
            starts=starts, seq_lens=seq_lens, block_tables=tables, block_size=self.block_size,
            propose=[s.propose_drafts and s.request_id in sampled for s in kept],
            temperatures=[0.0 if s.sampling_params.greedy else s.sampling_params.temperature for s in kept],
            max_drafts=[_draft_room(s, sampled) for s in kept])

    def _keep(self, proposals: dict[str, Proposal]) -> dict[str, list[int]]:
        """Hold each proposal's draft distributions until the next step verifies it; the drafts go out."""
        for request_id, p in proposals.items():
            if p.probs is not None:
                self.draft_probs[request_id] = p.probs
        return {request_id: p.token_ids for request_id, p in proposals.items()}

    def _metadata(self, rows: list[ScheduledRequest], outputs: list[list[int]],
                  banned: list[list[int]]) -> SamplingMetadata:
        return SamplingMetadata.from_params(
            [s.sampling_params for s in rows], [s.prompt_token_ids for s in rows], outputs,
            [self._generator(s) for s in rows], banned, device=self.device)

    def _generator(self, s: ScheduledRequest) -> torch.Generator | None:
        if s.request_id not in self.generators:
            self.generators[s.request_id] = make_generator(s.sampling_params.seed, self.device)
        return self.generators[s.request_id]


def _draft_room(s: ScheduledRequest, sampled: dict[str, list[int]]) -> int:
    """Drafts worth proposing after this step: verifying d of them yields up to d + 1 tokens."""
    return max(0, s.tokens_left - len(sampled.get(s.request_id, ())) - 1)


def prompt_hidden(model: LlamaForCausalLM, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Final hidden states at every position of one prompt, run whole through a fresh paged cache
    (calibration and tests). [len(token_ids), hidden]"""
    num_blocks = -(-len(token_ids) // block_size)
    runner = ModelRunner(model, num_blocks=num_blocks, block_size=block_size)
    row = ScheduledRequest("prompt", token_ids, 0, list(range(num_blocks)), True, SamplingParams(temperature=0),
                           [], [])
    batch = runner.prepare([row])
    with torch.inference_mode():
        return model(batch.input_ids, batch.positions, runner.kv_caches, batch.attn)
