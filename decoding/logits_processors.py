"""User logits processors (SamplingParams.logits_processors), run on each sampled row before the sampler.

They are arbitrary user code: one that raises must fail only its own request, not the batch it shares
a step with, so each row runs under its own guard and the failures come back by request id.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


def apply_logits_processors(logits: torch.Tensor, request_ids: Sequence[str],
                            processors: Sequence[Sequence[LogitsProcessor]],
                            outputs: Sequence[list[int]]) -> dict[str, str]:
    """logits[i] = fn_k(outputs[i], ... fn_1(outputs[i], logits[i])), in place. logits: [N, V].

    Returns request id -> error for the rows whose processors raised (their logits are then unspecified);
    a request with several rows (speculative verification) stops at its first failure.
    """
    errors: dict[str, str] = {}
    for i, fns in enumerate(processors):
        if not fns or request_ids[i] in errors:
            continue
        try:
            for fn in fns:
                logits[i] = fn(outputs[i], logits[i])
        except Exception as exc:  # noqa: BLE001 - user code; the request fails with the reason
            errors[request_ids[i]] = f"logits processor failed: {type(exc).__name__}: {exc}"
    return errors
