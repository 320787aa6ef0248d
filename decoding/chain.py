"""Chain drafting, shared by the proposers that run their own network (an EAGLE head, a draft model):
from each request's last state, draft a token, feed it back, draft the next, up to k per request.

As in EAGLE-2, a request stops drafting once the drafter's own probability that all its drafts so far
are accepted (the product of its softmax confidences) falls below `min_draft_prob`: each draft costs a
drafter step and a verification row, and an unlikely one costs more time than it is expected to save.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from decoding.proposers import Proposal
from kernels import AttentionMetadata
from kernels.cpu_ops import argmax

# advance(drafts [P'], states [P', ...], active) -> the drafter's next states [P', ...]; `active` indexes
# the requests still drafting (positions into the caller's list), in the rows' order
Advance = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]


@dataclass
class Drafter:
    """How one proposer's network turns a state into draft logits, and a draft into its next state."""

    logits: Callable[[torch.Tensor], torch.Tensor]  # states [P, ...] -> logits [P, N] over draft_vocab
    advance: Advance
    draft_vocab: torch.Tensor  # [N] target ids of the logits' columns
    vocab_size: int  # the target's, for q


def draft_from_logits(logits: torch.Tensor, draft_vocab: torch.Tensor, temperatures: list[float], vocab_size: int,
                      generator: torch.Generator | None
                      ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
    """One draft token per row: argmax where the temperature is 0, else d ~ q = softmax(logits / T).

    logits: [R, N] over the draft vocabulary. Returns the drafts as target ids [R]; per row, q scattered
    into the full vocabulary [V] (zero outside the draft vocabulary), or None when greedy; and the drafter's
    confidence in each draft, softmax(logits)[d] [R] (EAGLE-2 found it tracks the chance of acceptance).
    """
    picks = argmax(logits)  # [R]
    probs: list[torch.Tensor | None] = [None] * len(temperatures)
    sampled = [r for r, t in enumerate(temperatures) if t > 0]
    if sampled:
        temps = torch.tensor([temperatures[r] for r in sampled], device=logits.device)[:, None]
        q_small = torch.softmax(logits[sampled] / temps, dim=-1)  # [S, N]
        picks[sampled] = torch.multinomial(q_small, 1, generator=generator).squeeze(1)
        if q_small.shape[1] == vocab_size:
            q = q_small  # the draft vocabulary is the whole vocabulary, in order
        else:
            q = torch.zeros(len(sampled), vocab_size, dtype=torch.float32, device=logits.device)
            q.index_copy_(1, draft_vocab, q_small)
        for i, r in enumerate(sampled):
            probs[r] = q[i]
    confidence = torch.softmax(logits, dim=-1).gather(1, picks[:, None]).squeeze(1)  # [R]
    return draft_vocab[picks], probs, confidence


def draft_chain(drafter: Drafter, states: torch.Tensor, request_ids: list[str], ks: list[int],
                temperatures: list[float], min_draft_prob: float,
                generator: torch.Generator | None) -> dict[str, Proposal]:
    """Up to ks[i] drafts for request i from states [P, ...], its drafter state at its last position;
    one batched `advance` per draft after the first, over the requests still drafting."""
    tokens: list[list[int]] = [[] for _ in ks]
    qs: list[list[torch.Tensor | None]] = [[] for _ in ks]
    active = list(range(len(ks)))  # states, drafts and value are aligned with it
    value = torch.ones(len(ks), device=states.device)  # [P] the drafter's P(every draft so far is accepted)
    for step in range(max(ks, default=0)):
        drafts, probs, confidence = draft_from_logits(drafter.logits(states), drafter.draft_vocab,
                                                      [temperatures[a] for a in active], drafter.vocab_size, generator)
        value = value * confidence
        worth = (value >= min_draft_prob).tolist()
        for a, d, q, ok in zip(active, drafts.tolist(), probs, worth):
            if ok:
                tokens[a].append(d)
                qs[a].append(q)
        keep = [i for i, a in enumerate(active) if worth[i] and ks[a] > step + 1]
        if not keep:
            break
        active = [active[i] for i in keep]
        idx = torch.tensor(keep, device=states.device)
        states = drafter.advance(drafts[idx], states[idx], active)
        value = value[idx]
    return {request_ids[a]: Proposal(tokens[a], None if temperatures[a] <= 0 else torch.stack(qs[a]))  # q: [k, V]
            for a in range(len(ks)) if tokens[a]}


# --- the drafter's own paged KV cache, which shares the target's block tables ---------------------------


def slots(block_tables: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    # rows index block_tables; positions: [T] -> cache slots [T]
    blocks = positions // block_size
    assert int(blocks.max()) < block_tables.shape[1], (
        "the block table has no slot for a draft position: the scheduler must reserve k lookahead slots")
    return block_tables[rows, blocks] * block_size + positions % block_size


def rows_metadata(block_tables: torch.Tensor, starts: list[int], positions: torch.Tensor, seq_lens: list[int],
                  block_size: int) -> AttentionMetadata:
    """Request r's rows starts[r]:starts[r+1] at `positions` [T], the last of them at seq_lens[r] - 1."""
    counts = torch.tensor([b - a for a, b in zip(starts, starts[1:])], device=positions.device)
    rows = torch.repeat_interleave(torch.arange(len(counts), device=positions.device), counts)  # [T]
    return AttentionMetadata(slot_mapping=slots(block_tables, rows, positions, block_size), block_tables=block_tables,
                             seq_lens=torch.tensor(seq_lens, device=positions.device), query_start_loc=list(starts),
                             seq_lens_list=list(seq_lens), block_size=block_size)


def decode_metadata(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> AttentionMetadata:
    """One query row per block-table row, at `positions` [P]."""
    n = len(positions)
    return rows_metadata(block_tables, list(range(n + 1)), positions, [p + 1 for p in positions.tolist()], block_size)
