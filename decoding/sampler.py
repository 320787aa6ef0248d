"""Batched sampler: one step's logits [N, V] -> one token per row, plus optional logprobs.

Pipeline (a stage is skipped when no row in the batch uses it):
    penalties -> logit_bias -> banned ids            every row, greedy rows included
    temperature -> top-k/top-p -> min-p -> softmax   sampling rows only
    exponential race: argmax(probs / q), q ~ Exp(1)  seeded rows draw q from their own generator

The apply_* functions edit `logits` in place and return it (they run on a private copy);
`logits_to_probs` and `Sampler` copy first, so the caller's tensor is never modified.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from decoding.penalties import apply_banned, apply_logit_bias, apply_penalties
from engine.sampling_params import SamplingParams
from kernels.cpu_ops import argmax

GREEDY_EPS = 1e-5  # same threshold as SamplingParams.greedy


@dataclass
class SamplingMetadata:
    """Per-row sampling data for one step, built by the model runner (see `from_params`)."""

    temperature: torch.Tensor  # [N] float32; rows below GREEDY_EPS are greedy
    top_k: torch.Tensor  # [N] int64; 0 = off
    top_p: torch.Tensor  # [N] float32; 1 = off
    min_p: torch.Tensor  # [N] float32; 0 = off
    repetition_penalty: torch.Tensor  # [N] float32; 1 = off
    presence_penalty: torch.Tensor  # [N] float32
    frequency_penalty: torch.Tensor  # [N] float32
    logit_bias: list[dict[int, float] | None]
    banned_token_ids: list[list[int]]  # set to -inf (min_tokens: EOS/stop ids until reached)
    generators: list[torch.Generator | None]  # a seeded request's own generator, kept across steps
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    num_logprobs: list[int | None]  # top alternatives wanted per row; None = no logprobs

    # Derived in __post_init__ so they can never disagree with the tensors above.
    is_greedy: torch.Tensor = field(init=False)  # [N] bool
    all_greedy: bool = field(init=False)
    all_random: bool = field(init=False)
    no_top_k: bool = field(init=False)
    no_top_p: bool = field(init=False)
    no_min_p: bool = field(init=False)
    no_repetition_penalty: bool = field(init=False)
    no_presence_frequency: bool = field(init=False)
    no_logit_bias: bool = field(init=False)
    no_banned: bool = field(init=False)
    max_num_logprobs: int | None = field(init=False)  # K of the logprobs output; None = nobody asked

    def __post_init__(self) -> None:
        self.is_greedy = self.temperature < GREEDY_EPS
        # one stack + tolist = a single device sync for all tensor-derived flags
        any_greedy, all_greedy, any_top_k, any_top_p, any_min_p, any_rep, any_pf = torch.stack([
            self.is_greedy.any(),
            self.is_greedy.all(),
            (self.top_k > 0).any(),
            (self.top_p < 1).any(),
            (self.min_p > 0).any(),
            (self.repetition_penalty != 1).any(),
            ((self.presence_penalty != 0) | (self.frequency_penalty != 0)).any(),
        ]).tolist()
        self.all_greedy, self.all_random = all_greedy, not any_greedy
        self.no_top_k, self.no_top_p, self.no_min_p = not any_top_k, not any_top_p, not any_min_p
        self.no_repetition_penalty, self.no_presence_frequency = not any_rep, not any_pf
        self.no_logit_bias = not any(self.logit_bias)
        self.no_banned = not any(self.banned_token_ids)
        requested = [k for k in self.num_logprobs if k is not None]
        self.max_num_logprobs = max(requested) if requested else None

    @property
    def no_penalties(self) -> bool:
        return self.no_repetition_penalty and self.no_presence_frequency

    @property
    def no_adjustments(self) -> bool:
        """True when the processed logits equal the raw ones (penalties, bias, bans all off)."""
        return self.no_penalties and self.no_logit_bias and self.no_banned

    @classmethod
    def from_params(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        banned_token_ids: list[list[int]] | None = None,
        device: torch.device | str = "cpu",
    ) -> "SamplingMetadata":
        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=column([0.0 if p.greedy else p.temperature for p in params], torch.float32),
            top_k=column([p.top_k for p in params], torch.int64),
            top_p=column([p.top_p for p in params], torch.float32),
            min_p=column([p.min_p for p in params], torch.float32),
            repetition_penalty=column([p.repetition_penalty for p in params], torch.float32),
            presence_penalty=column([p.presence_penalty for p in params], torch.float32),
            frequency_penalty=column([p.frequency_penalty for p in params], torch.float32),
            logit_bias=[p.logit_bias for p in params],
            banned_token_ids=banned_token_ids if banned_token_ids is not None else [[] for _ in params],
            generators=list(generators),
            prompt_token_ids=prompt_token_ids,
            output_token_ids=output_token_ids,
            num_logprobs=[p.logprobs for p in params],
        )


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request generator a seeded request keeps for its whole life; None when unseeded."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    # torch wraps a negative seed to 64 bits but raises past them, failing the whole batch's step: wrap those too
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None  # [N, 1 + K] float32: sampled token, then top-K alternatives
    logprob_token_ids: torch.Tensor | None  # [N, 1 + K] int64


def adjust_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The stages every row gets, greedy included: penalties, bias, bans. In place; logits: [N, V]."""
    logits = apply_penalties(logits, meta)
    if not meta.no_logit_bias:
        logits = apply_logit_bias(logits, meta.logit_bias)
    if not meta.no_banned:
        logits = apply_banned(logits, meta.banned_token_ids)
    return logits


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / T per row, in place. logits: [N, V]; temperature: [N]. Greedy rows divide by 1."""
    temperature = torch.where(temperature < GREEDY_EPS, 1.0, temperature).to(logits.dtype)  # [N]
    return logits.div_(temperature[:, None])


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    # topk(max k) is far cheaper than a full sort over V when top-p is not needed
    vocab_size = logits.shape[-1]
    k = top_k.clamp(max=vocab_size)  # [N]
    k_max = int(k.max())
    if k_max == 0:
        return logits
    top_values = logits.topk(k_max, dim=-1).values  # [N, k_max], descending
    kth = top_values.gather(1, (k.clamp(min=1) - 1)[:, None])  # [N, 1]
    kth.masked_fill_((k == 0)[:, None], float("-inf"))  # rows with top-k off keep everything
    return logits.masked_fill_(logits < kth, float("-inf"))


def _filter_sorted(sorted_logits: torch.Tensor, k: torch.Tensor | None, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p on logits already sorted descending, in place.

    sorted_logits: [N, S]; k: [N] in 1..S, or None; top_p: [N], 1 = off.
    """
    if k is not None:
        kth = sorted_logits.gather(1, (k - 1)[:, None])  # [N, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # [N, S], renormalised over the top-k survivors
    mass_above = probs.cumsum(dim=-1) - probs  # [N, S]: mass of the strictly more likely tokens
    # p = 1 must keep everything, but float cumsum can reach 1 before the tail ends
    p = torch.where(top_p < 1, top_p.to(probs.dtype), float("inf"))  # [N]
    return sorted_logits.masked_fill_(mass_above >= p[:, None], float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering, in place, with one sort shared by both.

    logits: [N, V]; top_k: [N] int64, 0 = off; top_p: [N], 1 = off. None = off for every row.
    Top-k keeps the tokens scoring at least the k-th best (which of several tokens tied
    exactly at the k-th score survive is unspecified). Top-p then keeps, over the top-k
    renormalised distribution, the smallest set of most likely tokens whose mass reaches p,
    including the token that crosses p.
    """
    if top_p is None:
        return logits if top_k is None else _apply_top_k_only(logits, top_k)
    vocab_size = logits.shape[-1]
    if top_k is not None:
        k = top_k.clamp(max=vocab_size)  # [N]
        k_min, k_max = torch.stack([k.min(), k.max()]).tolist()
        if 0 < k_min and k_max < vocab_size:
            # every row keeps at most k_max tokens, so only those candidates need sorting:
            # topk over a few dozen beats a full sort over V by orders of magnitude
            candidates, order = logits.topk(k_max, dim=-1)  # [N, k_max] each, descending
            _filter_sorted(candidates, k, top_p)
            return logits.fill_(float("-inf")).scatter_(1, order, candidates)
        top_k = torch.where(k > 0, k, vocab_size)  # [N]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V] each
    _filter_sorted(sorted_logits, top_k, top_p)
    return logits.scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with p < min_p * p_max, in place. logits: [N, V]; min_p: [N], 0 = off.

    In log space p_i >= min_p * p_max is logit_i >= logit_max + log(min_p): no softmax needed,
    and min_p = 0 gives a threshold of -inf, which keeps everything.
    """
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.to(logits.dtype).log()[:, None]  # [N, 1]
    return logits.masked_fill_(logits < threshold, float("-inf"))


def _sampling_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Temperature, top-k/top-p, min-p, softmax on adjusted logits (in place). Returns probs [N, V]."""
    logits = apply_temperature(logits, meta.temperature)
    logits = apply_top_k_top_p(
        logits, None if meta.no_top_k else meta.top_k, None if meta.no_top_p else meta.top_p
    )
    if not meta.no_min_p:
        logits = apply_min_p(logits, meta.min_p)
    return logits.softmax(dim=-1)


def logits_to_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The full pipeline as a distribution: logits [N, V] -> probs [N, V] float32.

    Greedy rows get a one-hot on the argmax of their adjusted logits, so `sample` returns
    exactly the greedy token for them. The caller's logits are not modified.
    """
    adjusted = adjust_logits(logits.to(torch.float32, copy=True), meta)  # [N, V]
    if meta.all_random:
        return _sampling_probs(adjusted, meta)
    one_hot = F.one_hot(argmax(adjusted), adjusted.shape[-1]).to(torch.float32)  # [N, V]
    if meta.all_greedy:
        return one_hot
    return torch.where(meta.is_greedy[:, None], one_hot, _sampling_probs(adjusted, meta))


def sample(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row from probs [N, V] by the exponential race. Returns [N] int64.

    argmax_i p_i / q_i with q_i ~ Exp(1) is distributed as Categorical(p), and each row needs
    only its own V draws, so a seeded row reads its generator exactly the same way whatever
    else is in the batch. Unseeded rows share one batched draw from the global RNG.
    """
    q = torch.empty_like(probs)  # [N, V]
    seeded = [row for row, generator in enumerate(generators) if generator is not None]
    if len(seeded) < probs.shape[0]:
        q.exponential_()
    for row in seeded:
        q[row].exponential_(generator=generators[row])
    # a zero draw would turn 0 / 0 into NaN, which argmax treats as the maximum
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return argmax(probs.div(q))


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs: [N, V]; token_ids: [N] -> values [N, 1 + K], ids [N, 1 + K] (sampled first, K = num_top)."""
    sampled_ids = token_ids[:, None]  # [N, 1]
    sampled = logprobs.gather(1, sampled_ids)  # [N, 1]
    if num_top == 0:
        return sampled, sampled_ids
    top = logprobs.topk(num_top, dim=-1)  # [N, K] each
    return torch.cat([sampled, top.values], dim=1), torch.cat([sampled_ids, top.indices], dim=1)


class Sampler:
    """logits [N, V] + SamplingMetadata -> SamplerOutput. Never modifies the caller's logits."""

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if meta.all_greedy and meta.no_adjustments:
            token_ids = argmax(logits)  # the common case: no copy, no softmax
        else:
            adjusted = adjust_logits(logits.to(torch.float32, copy=True), meta)  # [N, V]
            greedy_ids = None if meta.all_random else argmax(adjusted)  # [N]
            if meta.all_greedy:
                token_ids = greedy_ids
            else:
                # _sampling_probs consumes `adjusted`, hence the greedy argmax above comes first
                sampled_ids = sample(_sampling_probs(adjusted, meta), meta.generators)  # [N]
                token_ids = sampled_ids if greedy_ids is None else torch.where(meta.is_greedy, greedy_ids, sampled_ids)

        if meta.max_num_logprobs is None:
            return SamplerOutput(token_ids=token_ids, logprobs=None, logprob_token_ids=None)
        # vLLM's default (raw logprobs): before penalties, bias, bans, temperature and filters; the grammar mask
        # and user logits processors come before the sampler, as in vLLM, so they are in them
        raw_logprobs = logits.to(torch.float32).log_softmax(dim=-1)  # [N, V]
        values, ids = gather_logprobs(raw_logprobs, token_ids, meta.max_num_logprobs)
        return SamplerOutput(token_ids=token_ids, logprobs=values, logprob_token_ids=ids)
