"""Repetition, presence and frequency penalties, logit bias and banned ids, batched over the rows of one step."""
from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from decoding.sampler import SamplingMetadata


def token_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """How often each vocab id occurs in each row's list.

    Returns counts: [N, V] float32 (float so it multiplies logits without a cast).
    Ids outside [0, V) are ignored: a bad id from one request must not crash the batch.
    """
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long, device=device)  # [N]
    rows = torch.repeat_interleave(torch.arange(len(token_ids), device=device), lengths)  # [T]
    cols = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.long, device=device)  # [T]
    valid = (cols >= 0) & (cols < vocab_size)
    rows, cols = rows[valid], cols[valid]
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.float32, device=device)  # [N, V]
    # one scatter for the whole batch instead of a tensor per row
    counts.index_put_((rows, cols), torch.ones_like(cols, dtype=counts.dtype), accumulate=True)
    return counts


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """HF-style repetition penalty, in place.

    logits: [N, V]; seen: [N, V] bool (token occurs in prompt or output); penalty: [N].
    Positive scores are divided and negative ones multiplied, so a penalty > 1 always
    makes a repeated token less likely whatever the sign of its logit.
    """
    penalty = torch.where(seen, penalty.to(logits.dtype)[:, None], 1.0)  # [N, V]
    scale = torch.where(logits > 0, penalty.reciprocal(), penalty)  # [N, V]
    return logits.mul_(scale)


def apply_presence_frequency_penalty(
    logits: torch.Tensor, output_counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI-style penalties over generated tokens only, in place.

    logits: [N, V]; output_counts: [N, V]; presence, frequency: [N].
    logit -= presence * (count > 0) + frequency * count
    """
    presence = presence.to(logits.dtype)[:, None]  # [N, 1]
    frequency = frequency.to(logits.dtype)[:, None]  # [N, 1]
    return logits.sub_(frequency * output_counts + presence * (output_counts > 0))


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """All three penalties, in place; skipped entirely when no row uses one.

    logits: [N, V] float. Rows whose penalties are neutral (1, 0, 0) come out unchanged.
    """
    if meta.no_penalties:
        return logits
    vocab_size, device = logits.shape[-1], logits.device
    output_counts = token_counts(meta.output_token_ids, vocab_size, device)  # [N, V]
    if not meta.no_repetition_penalty:
        prompt_counts = token_counts(meta.prompt_token_ids, vocab_size, device)  # [N, V]
        seen = (prompt_counts > 0) | (output_counts > 0)  # [N, V]
        apply_repetition_penalty(logits, seen, meta.repetition_penalty)
    if not meta.no_presence_frequency:
        apply_presence_frequency_penalty(logits, output_counts, meta.presence_penalty, meta.frequency_penalty)
    return logits


def apply_logit_bias(logits: torch.Tensor, logit_bias: list[dict[int, float] | None]) -> torch.Tensor:
    """logits[i, t] += bias[i][t], in place. logits: [N, V]. Out-of-vocab ids are ignored."""
    vocab_size = logits.shape[-1]
    entries = [
        (row, int(token), float(bias))
        for row, row_bias in enumerate(logit_bias) if row_bias
        for token, bias in row_bias.items() if 0 <= int(token) < vocab_size
    ]
    if not entries:
        return logits
    rows, cols, values = zip(*entries)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    return logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)


def apply_banned(logits: torch.Tensor, banned_token_ids: list[list[int]]) -> torch.Tensor:
    """logits[i, t] = -inf for every banned t of row i, in place. logits: [N, V]."""
    device, vocab_size = logits.device, logits.shape[-1]
    lengths = torch.tensor([len(ids) for ids in banned_token_ids], dtype=torch.long, device=device)  # [N]
    rows = torch.repeat_interleave(torch.arange(len(banned_token_ids), device=device), lengths)  # [B]
    cols = torch.tensor(list(chain.from_iterable(banned_token_ids)), dtype=torch.long, device=device)  # [B]
    valid = (cols >= 0) & (cols < vocab_size)
    logits[rows[valid], cols[valid]] = float("-inf")
    return logits
