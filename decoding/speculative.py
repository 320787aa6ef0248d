"""Lossless verification of drafted tokens (speculative sampling, Leviathan et al. 2023 / Chen et al. 2023).

A request drafted d_1..d_k from a draft distribution q_i; the target scored all of them in one forward,
giving p_1..p_{k+1} (p_i is the target's distribution for the token at draft position i, after the
sampler's whole pipeline: penalties, bias, bans, grammar mask, temperature, top-k/p, min-p).

    for i in 1..k:  accept d_i with probability min(1, p_i(d_i) / q_i(d_i))
                    on rejection emit a sample of norm(max(0, p_i - q_i)) and stop
    all accepted:   emit a bonus sample of p_{k+1}

Every emitted token is then distributed exactly as the target alone would sample it. A greedy row's p_i
is a one-hot on its argmax, which makes this "accept while argmax == d_i, then emit the argmax": greedy
output is identical to plain decoding. Drafts with no distribution (n-gram lookup) have q_i = one-hot(d_i).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.sampler import sample


@dataclass
class DraftBatch:
    """One step's drafts, laid out like the verification rows: request r owns rows starts[r]:starts[r+1]."""

    draft_ids: list[list[int]]  # [R][k_r]
    draft_probs: list[torch.Tensor | None]  # [R] of [k_r, V], or None where the draft is deterministic

    @property
    def starts(self) -> list[int]:
        starts = [0]
        for ids in self.draft_ids:
            starts.append(starts[-1] + len(ids) + 1)
        return starts


def verify(probs: torch.Tensor, drafts: DraftBatch, generators: list[torch.Generator | None]) -> list[list[int]]:
    """Accepted drafts plus one corrected or bonus token, per request.

    probs: [sum(k_r + 1), V] target distributions, request r's k_r + 1 rows consecutive.
    generators: one per request (seeded requests keep their own), None = the global RNG.
    """
    starts = drafts.starts
    flat_rows = [starts[r] + i for r, ids in enumerate(drafts.draft_ids) for i in range(len(ids))]
    flat_ids = [t for ids in drafts.draft_ids for t in ids]
    p_draft = probs[flat_rows, flat_ids].tolist() if flat_ids else []  # p_i(d_i), one per draft
    emitted, final_rows, residual_q = [], [], []
    pos = 0
    for r, ids in enumerate(drafts.draft_ids):
        k = len(ids)
        q = drafts.draft_probs[r]
        q_draft = [1.0] * k if q is None else q[torch.arange(k), ids].tolist()
        u = _uniform(k, generators[r])
        n_ok = 0
        while n_ok < k and u[n_ok] * q_draft[n_ok] < p_draft[pos + n_ok]:  # u < p / q without dividing by 0
            n_ok += 1
        pos += k
        emitted.append(ids[:n_ok])
        final_rows.append(starts[r] + n_ok)
        # on rejection the next token comes from the residual; after k acceptances from p_{k+1} itself
        residual_q.append(None if n_ok == k else (q[n_ok] if q is not None else ids[n_ok]))
    target = probs[final_rows]  # [R, V]
    last = sample(_residuals(target, residual_q), generators).tolist()
    return [ok + [t] for ok, t in zip(emitted, last)]


def verify_greedy(target_ids: list[int], drafts: DraftBatch) -> list[list[int]]:
    """`verify` where every row is greedy: p is one-hot on the row's argmax (target_ids, one per row), so a
    draft is accepted exactly when it is that argmax, and the next token is the first row's argmax that
    no draft matched (after k acceptances, the bonus row's). No [N, V] distribution is built."""
    starts, out = drafts.starts, []
    for r, ids in enumerate(drafts.draft_ids):
        row = target_ids[starts[r]:starts[r + 1]]  # k + 1 argmaxes
        n_ok = 0
        while n_ok < len(ids) and ids[n_ok] == row[n_ok]:
            n_ok += 1
        out.append(ids[:n_ok] + [row[n_ok]])
    return out


def _residuals(p: torch.Tensor, q: list[torch.Tensor | int | None]) -> torch.Tensor:
    """norm(max(0, p - q)) per row where a draft was rejected; p itself elsewhere. p: [R, V]."""
    out = p.clone()
    for r, qr in enumerate(q):
        if qr is None:
            continue
        if isinstance(qr, int):
            out[r, qr] = 0.0  # q is one-hot on the rejected draft
        else:
            out[r] = (p[r] - qr).clamp_(min=0.0)
        if float(out[r].sum()) <= 0.0:  # only when p == q, where rejection has probability 0
            out[r] = p[r]
    return out  # `sample` renormalises implicitly: argmax(p / Exp) is scale-free


def _uniform(k: int, generator: torch.Generator | None) -> list[float]:
    if k == 0:
        return []
    device = generator.device if generator is not None else "cpu"
    return torch.rand(k, generator=generator, device=device).tolist()
