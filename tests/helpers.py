"""Running a model through Sluice's own runner path in tests: logits of every new row."""
from __future__ import annotations

import torch

from engine.model import LlamaForCausalLM
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest


def scheduled(request_id: str, token_ids: list[int], start: int, block_ids: list[int]) -> ScheduledRequest:
    return ScheduledRequest(request_id, token_ids, start, block_ids, True, SamplingParams(temperature=0), [], [])


def step_logits(runner: ModelRunner, rows: list[ScheduledRequest]) -> torch.Tensor:
    """Logits of every new row, through the runner's batch preparation and its paged cache."""
    batch = runner.prepare(rows)
    with torch.inference_mode():
        hidden = runner.model(batch.input_ids, batch.positions, runner.kv_caches, batch.attn)
        return runner.model.compute_logits(hidden)


def prompt_logits(model: LlamaForCausalLM, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits at every position of one prompt, run whole through a fresh cache. [len(ids), V]"""
    num_blocks = -(-len(ids) // block_size)
    runner = ModelRunner(model, num_blocks=num_blocks, block_size=block_size)
    return step_logits(runner, [scheduled("x", ids, 0, list(range(num_blocks)))])
