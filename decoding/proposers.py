"""Draft proposers for speculative decoding, behind one small interface.

A proposer sees each decoding request's token history (prompt + output, the newest token last) and
returns up to k draft tokens per request; an empty list means "no guess, decode normally". Drafts
from a distribution also return it (q, for lossless verification); n-gram drafts are deterministic.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Protocol

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
