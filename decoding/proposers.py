"""Draft proposers for speculative decoding, behind one small interface.

A proposer sees each decoding request's token history (prompt + output, the newest token last) and
returns up to k draft tokens per request; an empty list means "no guess, decode normally". Drafts
from a distribution also return it (q, for lossless verification); n-gram drafts are deterministic.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Proposal:
    token_ids: list[int]
    probs: torch.Tensor | None = None  # [k, V] draft distributions; None = deterministic drafts


@dataclass
class ProposalRequest:
    request_id: str
    history: list[int]  # every token so far, prompt first
    max_drafts: int  # room left before max_tokens / the context limit


class Proposer(Protocol):
    name: str
    num_speculative_tokens: int

    def propose(self, requests: list[ProposalRequest]) -> dict[str, Proposal]: ...


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the history's last n tokens (n from max_n
    down to min_n) and propose the k tokens that followed it. Pays on outputs that copy from the
    prompt or repeat themselves (code edits, JSON keys, summaries); needs no weights."""

    name = "ngram"

    def __init__(self, num_speculative_tokens: int = 4, min_n: int = 2, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.num_speculative_tokens = num_speculative_tokens
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: list[ProposalRequest]) -> dict[str, Proposal]:
        out = {}
        for req in requests:
            k = min(self.num_speculative_tokens, req.max_drafts)
            drafts = self.lookup(req.history, k) if k > 0 else []
            if drafts:
                out[req.request_id] = Proposal(drafts)
        return out

    def lookup(self, history: list[int], k: int) -> list[int]:
        # bytes.rfind is a C substring search: the token ids as fixed-width bytes, matches kept aligned
        hay = array("i", history).tobytes()
        width = array("i").itemsize
        for n in range(min(self.max_n, len(history) - 1), self.min_n - 1, -1):
            needle = hay[-n * width:]
            end = len(hay) - width  # the suffix itself does not count as an earlier occurrence
            while (at := hay.rfind(needle, 0, end)) >= 0:
                if at % width == 0:
                    start = at // width + n
                    return history[start:start + k]
                end = at + len(needle) - 1
        return []


@dataclass
class FeatureBatch:
    """What a proposer reading the target's hidden states (EAGLE) gets from one step, flattened by request.

    Request r's rows starts[r]:starts[r+1] are the positions this step made valid (prompt chunk, decoded
    token, accepted drafts), in order, ending at position seq_lens[r] - 1. token_ids holds each row's own
    token (the target's input there) and next_token_ids the token at the following position (known now: a prompt token, an accepted draft, or the token
    sampled this step). Only requests with propose[r] want drafts; the others just extend the draft's KV.
    """

    request_ids: list[str]
    hidden: torch.Tensor  # [T, hidden] the target's final (normed) hidden states at those positions
    token_ids: torch.Tensor  # [T] int64
    next_token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    starts: list[int]  # R + 1 offsets into the rows
    seq_lens: list[int]  # [R] valid positions after this step
    block_tables: torch.Tensor  # [R, max_blocks] int64: the request's KV blocks (the draft's cache uses the same)
    block_size: int
    propose: list[bool]  # [R]
    temperatures: list[float]  # [R] 0 = greedy: draft argmax and return no q; else sample d ~ q and return q
    max_drafts: list[int]  # [R]


@runtime_checkable
class FeatureProposer(Protocol):
    """A proposer with its own layers and KV cache (EAGLE head, draft model): runs after the target forward
    of every step. Its cache has a block wherever the target's has one, with the same ids."""

    name: str
    num_speculative_tokens: int

    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int: ...

    def allocate_cache(self, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype) -> None: ...

    def propose_from_features(self, batch: FeatureBatch) -> dict[str, Proposal]: ...
