"""Model runner: SchedulerOutput in, sampled tokens out. It owns the KV cache and never sees a Request."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.sampler import Sampler, SamplingMetadata, make_generator
from engine.config import ModelConfig
from engine.model import LlamaForCausalLM
from engine.outputs import TokenLogprob
from engine.platform import tune_cpu_allocator
from engine.scheduler import ScheduledRequest, SchedulerOutput
from kernels import AttentionMetadata


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, list[int]]  # request id -> new token ids
    logprobs: dict[str, list[TokenLogprob]]


@dataclass
class BatchInputs:
    """One step's flattened, unpadded batch."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows whose hidden state is sampled
    sample_rows: list[ScheduledRequest]  # the N requests that sample, in row order


def kv_cache_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int):
        self.model = model
        self.config = model.config
        self.block_size = block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.device.type == "cpu":
            tune_cpu_allocator()
        cfg = self.config
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # zeros, not empty: padded decode rows read (masked) slots, and 0 * NaN would poison them
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(cfg.num_layers)]
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator | None] = {}

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in out.finished_request_ids:
            self.generators.pop(request_id, None)
        if not out.scheduled:
            return ModelRunnerOutput({}, {})
        batch = self.prepare(out.scheduled)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn)  # [T, hidden]
        if not batch.sample_rows:
            return ModelRunnerOutput({}, {})
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [N, V]
        logits = self._apply_logits_processors(logits, batch.sample_rows)
        return self._sample(logits, batch.sample_rows)

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
        logits_indices = torch.tensor([starts[i + 1] - 1 for i, s in enumerate(scheduled) if s.sample])
        dev = self.device
        attn = AttentionMetadata(slot_mapping=slot_mapping.to(dev), block_tables=block_tables.to(dev),
                                 seq_lens=torch.tensor(seq_lens, device=dev), query_start_loc=starts,
                                 seq_lens_list=seq_lens, block_size=bs)
        return BatchInputs(input_ids.to(dev), positions.to(dev), attn, logits_indices.to(dev), sample_rows)

    def _apply_logits_processors(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> torch.Tensor:
        # Per-request hooks (e.g. grammar masks): fn(output_token_ids, logits_row [V]) -> logits_row
        for i, s in enumerate(rows):
            for fn in s.sampling_params.logits_processors:
                logits[i] = fn(s.output_token_ids, logits[i])
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> ModelRunnerOutput:
        generators = [self._generator(s) for s in rows]
        meta = SamplingMetadata.from_params(
            [s.sampling_params for s in rows], [s.prompt_token_ids for s in rows],
            [s.output_token_ids for s in rows], generators, [s.banned_token_ids for s in rows], device=self.device)
        result = self.sampler(logits, meta)
        token_ids = result.token_ids.tolist()
        sampled = {s.request_id: [t] for s, t in zip(rows, token_ids)}
        logprobs: dict[str, list[TokenLogprob]] = {}
        if result.logprobs is not None:
            values, ids = result.logprobs.tolist(), result.logprob_token_ids.tolist()
            for i, s in enumerate(rows):
                k = s.sampling_params.logprobs
                if k is not None:
                    logprobs[s.request_id] = [TokenLogprob(ids[i][0], values[i][0], list(zip(ids[i][1:1 + k], values[i][1:1 + k])))]
        return ModelRunnerOutput(sampled, logprobs)

    def _generator(self, s: ScheduledRequest) -> torch.Generator | None:
        if s.request_id not in self.generators:
            self.generators[s.request_id] = make_generator(s.sampling_params.seed, self.device)
        return self.generators[s.request_id]
