"""Running a model through Sluice's own runner path in tests: logits of every new row."""
from __future__ import annotations

import torch

from engine.model import LlamaForCausalLM
from engine.model_runner import ModelRunner, prompt_hidden
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
    hidden = prompt_hidden(model, ids, block_size)
    with torch.inference_mode():
        return model.compute_logits(hidden)


class CountingStack:
    """A kernels.cpu_decode.DecodeStack that counts the steps it runs."""

    def __init__(self, stack):
        self.stack, self.calls = stack, 0

    def supports(self, *args) -> bool:
        return self.stack.supports(*args)

    def __call__(self, *args) -> torch.Tensor:
        self.calls += 1
        return self.stack(*args)
