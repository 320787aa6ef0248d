"""Tests for decoding.sampler: each one targets a single feature and fails if it breaks."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from decoding.sampler import (
    Sampler,
    SamplingMetadata,
    apply_logit_bias,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    logits_to_probs,
    make_generator,
    sample,
)
from engine.sampling_params import SamplingParams


def make_meta(
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    banned: list[list[int]] | None = None,
) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.from_params(
        params,
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(n)],
        output_token_ids=outputs if outputs is not None else [[] for _ in range(n)],
        generators=generators if generators is not None else [make_generator(p.seed) for p in params],
        banned_token_ids=banned,
    )


def logits_for(probs: list[float], rows: int) -> torch.Tensor:
    """[rows, V] logits whose softmax is `probs` in every row (for many draws in one call)."""
    return torch.tensor(probs).log().expand(rows, -1).clone()


def drawn_tokens(logits: torch.Tensor, params: SamplingParams, seed: int = 0, **meta_kwargs) -> set[int]:
    torch.manual_seed(seed)
    meta = make_meta([params] * logits.shape[0], **meta_kwargs)
    return set(Sampler()(logits, meta).token_ids.tolist())


# ---------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_leaves_logits_untouched():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    out = Sampler()(logits, make_meta([SamplingParams(temperature=0)] * 8))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None and out.logprob_token_ids is None
    assert torch.equal(logits, before)


def test_greedy_rows_in_mixed_batch_ignore_temperature_and_filters():
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(1))
    # greedy rows' filters are loose enough that sampling them would rarely give the argmax
    params = [SamplingParams(temperature=0, top_k=400, min_p=0.001) if i % 2 == 0
              else SamplingParams(temperature=1.5, top_p=0.9) for i in range(6)]
    torch.manual_seed(0)
    out = Sampler()(logits, make_meta(params))
    assert torch.equal(out.token_ids[0::2], logits[0::2].argmax(-1))
    assert not torch.equal(out.token_ids[1::2], logits[1::2].argmax(-1))


def test_greedy_rows_still_get_penalties_bias_and_bans():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0]]).expand(3, -1).clone()
    params = [
        SamplingParams(temperature=0, repetition_penalty=2.0),  # 5 -> 2.5 drops below 4
        SamplingParams(temperature=0, logit_bias={3: 10.0}),
        SamplingParams(temperature=0),
    ]
    meta = make_meta(params, outputs=[[0], [], []], banned=[[], [], [0, 1]])
    assert Sampler()(logits, meta).token_ids.tolist() == [1, 3, 2]


# ---------------------------------------------------------------- seeds


def seeded_run(seed: int, steps: int = 5, vocab: int = 300) -> list[int]:
    """A fresh generator from `seed`, then `steps` sampling steps on fixed logits."""
    generators = [make_generator(seed)]
    data = torch.Generator().manual_seed(123)
    tokens = []
    for step in range(steps):
        torch.manual_seed(1000 + seed + step)  # the global RNG must not matter for a seeded row
        logits = torch.randn(1, vocab, generator=data)
        out = Sampler()(logits, make_meta([SamplingParams(temperature=1.0, seed=seed)], generators=generators))
        tokens.append(out.token_ids.item())
    return tokens


def test_same_seed_same_tokens_over_steps():
    first = seeded_run(7)
    assert seeded_run(7) == first
    assert seeded_run(8) != first  # the seed actually drives the draw
    assert len(set(first)) > 1  # the generator advances between steps


def test_seeded_row_independent_of_batch_composition_and_position():
    """The seeded row sees the same logits in both runs; the rest of the batch differs."""
    vocab, steps = 300, 6
    row_logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(5))

    def run(batch: int, pos: int, others_seeded: bool) -> list[int]:
        generators = [make_generator(100 + i) if others_seeded else None for i in range(batch)]
        generators[pos] = make_generator(42)
        params = [SamplingParams(temperature=0.8 + 0.1 * i, top_k=50 + i) for i in range(batch)]
        params[pos] = SamplingParams(temperature=1.0, seed=42)
        tokens = []
        for step in range(steps):
            logits = torch.randn(batch, vocab)
            logits[pos] = row_logits[step]
            tokens.append(Sampler()(logits, make_meta(params, generators=generators)).token_ids[pos].item())
        return tokens

    torch.manual_seed(0)
    alone = run(batch=1, pos=0, others_seeded=False)
    assert run(batch=4, pos=2, others_seeded=False) == alone
    assert run(batch=5, pos=4, others_seeded=True) == alone


# ---------------------------------------------------------------- filters

PROBS = [0.05, 0.4, 0.1, 0.3, 0.15]  # sorted: 1 (.4), 3 (.3), 4 (.15), 2 (.1), 0 (.05)


@pytest.mark.parametrize(
    "params, kept",
    [
        (SamplingParams(top_k=2), {1, 3}),
        (SamplingParams(top_k=3), {1, 3, 4}),
        (SamplingParams(top_p=0.5), {1, 3}),  # 0.4 < 0.5, so token 3 (crossing p) is kept
        (SamplingParams(top_p=0.75), {1, 3, 4}),  # 0.7 < 0.75 -> needs token 4 to reach
        (SamplingParams(top_p=0.3), {1}),  # first token alone already reaches p
        (SamplingParams(top_p=1.0), {0, 1, 2, 3, 4}),
        (SamplingParams(top_k=3, top_p=0.5), {1, 3}),  # renormalised top-3: .47, .35, .18
        (SamplingParams(top_k=4, top_p=0.8), {1, 3, 4}),  # top-4 renorm: .42, .74 (<.8), .89
        (SamplingParams(min_p=0.3), {1, 3, 4}),  # threshold 0.12
        (SamplingParams(min_p=0.8), {1}),
    ],
)
def test_filters_never_emit_outside_kept_set(params, kept):
    logits = logits_for(PROBS, rows=4000)
    assert drawn_tokens(logits, params) == kept  # nothing outside, and every kept token shows up
    probs = logits_to_probs(logits[:1], make_meta([params]))[0]
    assert set(probs.nonzero().flatten().tolist()) == kept
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.tensor(PROBS).log()[None]
    top_k = torch.zeros(1, dtype=torch.long)
    for p, expected in [(0.39, {1}), (0.41, {1, 3}), (0.69, {1, 3}), (0.71, {1, 3, 4}), (0.86, {1, 3, 4, 2})]:
        kept = apply_top_k_top_p(logits.clone(), top_k, torch.tensor([p])).isfinite()[0]
        assert set(kept.nonzero().flatten().tolist()) == expected, p


def test_top_k_fast_path_matches_sort_path():
    logits = torch.randn(16, 2000, generator=torch.Generator().manual_seed(3))
    top_k = torch.tensor([0, 1, 5, 50, 1999, 2000, 5000, 7] * 2)
    fast = apply_top_k_top_p(logits.clone(), top_k, None)
    sort = apply_top_k_top_p(logits.clone(), top_k, torch.ones(16))
    assert torch.equal(fast, sort)
    assert fast.isfinite().sum(-1).tolist() == [2000, 1, 5, 50, 1999, 2000, 2000, 7] * 2


def test_top_k_top_p_candidate_path_matches_full_sort():
    """All rows with top-k on takes the topk-candidates path; one row with it off forces the full sort."""
    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(8)) * 2
    top_k = torch.tensor([5, 60, 7, 0])
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.8])
    candidates = apply_top_k_top_p(logits[:3].clone(), top_k[:3], top_p[:3])
    full = apply_top_k_top_p(logits.clone(), top_k, top_p)
    assert torch.equal(candidates, full[:3])
    assert candidates.isfinite().sum(-1)[2] == 7


def test_min_p_is_relative_to_max_prob():
    logits = torch.tensor(PROBS).log()[None].expand(2, -1).clone()
    out = apply_min_p(logits, torch.tensor([0.0, 0.26]))  # 0.26 * 0.4 = 0.104: drops 0 and 2
    assert out[0].isfinite().all()
    assert out[1].isfinite().tolist() == [False, True, False, True, True]


# ---------------------------------------------------------------- penalties / bias / bans


def test_repetition_penalty_lowers_repeated_tokens_of_both_signs():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 1.0]])
    meta = make_meta([SamplingParams(repetition_penalty=2.0)], prompts=[[0]], outputs=[[1]])
    out = apply_penalties(logits.clone(), meta)
    # 0 (prompt, positive) divided, 1 (output, negative) multiplied; unseen 2, 3, 4 untouched
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, 3.0, -1.0, 1.0]]))


def test_presence_and_frequency_touch_only_output_tokens():
    logits = torch.zeros(2, 10)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), SamplingParams()]
    meta = make_meta(params, prompts=[[7, 7], [3]], outputs=[[3, 3, 5], [3, 3]])
    out = apply_penalties(logits.clone(), meta)
    expected = torch.zeros(2, 10)
    expected[0, 3] = -(0.5 + 2 * 0.25)
    expected[0, 5] = -(0.5 + 1 * 0.25)  # token 7 only in the prompt: unchanged
    assert torch.allclose(out, expected)  # row 1 has neutral penalties: unchanged


def test_logit_bias_shifts_exactly_the_biased_tokens():
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(4))
    bias = {4: 3.0, 9: -1.5, 10**6: 5.0}  # the out-of-vocab id is ignored, not an IndexError
    expected = logits.clone()
    expected[0, 4] += 3.0
    expected[0, 9] -= 1.5
    assert torch.allclose(apply_logit_bias(logits.clone(), [bias]), expected)
    probs = logits_to_probs(logits, make_meta([SamplingParams(logit_bias=bias)]))
    assert torch.allclose(probs, expected.softmax(-1), atol=1e-6)


def test_logit_bias_is_per_row():
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=0, logit_bias={4: 100.0}), SamplingParams(temperature=0)]
    assert Sampler()(logits, make_meta(params)).token_ids.tolist() == [4, logits[1].argmax().item()]


def test_banned_tokens_never_sampled():
    logits = logits_for([0.9, 0.05, 0.03, 0.02], rows=3000)
    banned = [[0, 2]] * 3000
    assert drawn_tokens(logits, SamplingParams(temperature=1.0), banned=banned) == {1, 3}
    assert drawn_tokens(logits, SamplingParams(temperature=0), banned=banned) == {1}


# ---------------------------------------------------------------- logprobs


def test_logprobs_come_from_raw_logits_with_right_shapes():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(6))
    params = [
        SamplingParams(temperature=0.7, top_k=5, logprobs=3, presence_penalty=1.0),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=1.0, repetition_penalty=1.5),
        SamplingParams(temperature=0, logprobs=5, logit_bias={1: 4.0}),
    ]
    out = Sampler()(logits, make_meta(params, outputs=[[1, 2], [], [3], []]))
    assert out.logprobs.shape == (4, 6) and out.logprob_token_ids.shape == (4, 6)
    assert out.logprobs.dtype == torch.float32 and out.logprob_token_ids.dtype == torch.int64
    raw = logits.log_softmax(-1)
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    assert torch.allclose(out.logprobs, raw.gather(1, out.logprob_token_ids))
    assert torch.equal(out.logprob_token_ids[:, 1:], raw.topk(5, -1).indices)


def test_logprobs_zero_alternatives_gives_one_column():
    logits = torch.randn(2, 50)
    out = Sampler()(logits, make_meta([SamplingParams(temperature=0, logprobs=0)] * 2))
    assert out.logprobs.shape == (2, 1)
    assert torch.allclose(out.logprobs[:, 0], logits.log_softmax(-1).max(-1).values)


# ---------------------------------------------------------------- distribution


def test_temperature_sampling_matches_softmax_frequencies():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    n, temperature = 40_000, 0.7
    torch.manual_seed(1234)
    meta = make_meta([SamplingParams(temperature=temperature)] * n)
    tokens = Sampler()(logits.expand(n, -1), meta).token_ids
    freq = torch.bincount(tokens, minlength=5).float() / n
    expected = (logits / temperature).softmax(-1)
    # 4 sigma of a binomial proportion at n = 40k is under 0.01
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


def test_sample_follows_probs_with_seeded_generator():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0]]).expand(20_000, -1).contiguous()
    generators = [make_generator(9)] + [None] * 19_999
    torch.manual_seed(0)
    freq = torch.bincount(sample(probs, generators), minlength=4).float() / 20_000
    assert freq[3] == 0 and torch.allclose(freq, probs[0], atol=0.015)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.0]),
    top_k=st.integers(0, 12),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.9),
    rep=st.floats(0.5, 2.0),
    banned=st.lists(st.integers(0, 15), max_size=5),
)
def test_sampled_token_always_in_support(seed, temperature, top_k, top_p, min_p, rep, banned):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 16, generator=gen) * 3
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=rep, seed=seed)
    kwargs = dict(outputs=[[1, 2]] * 3, banned=[banned] * 3)
    if len(set(banned)) == 16:
        return
    probs = logits_to_probs(logits, make_meta([params] * 3, **kwargs))
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    out = Sampler()(logits, make_meta([params] * 3, **kwargs))
    support = probs.gather(1, out.token_ids[:, None])
    assert (support > 0).all()
    assert not set(out.token_ids.tolist()) & set(banned)
    if top_k:
        assert ((probs > 0).sum(-1) <= top_k).all()
