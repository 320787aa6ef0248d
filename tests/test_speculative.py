"""Speculative decoding: the proposers, lossless verification (exact and statistical), and the engine path."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from decoding.proposers import NgramProposer, Proposal, ProposalRequest
from decoding.speculative import DraftBatch, verify, verify_greedy
from engine import LLM, SamplingParams

V = 6


def test_ngram_lookup_proposes_what_followed_the_latest_match():
    prop = NgramProposer(num_speculative_tokens=3, min_n=1, max_n=3)
    assert prop.lookup([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]  # "2 3" matched, 3 tokens follow
    assert prop.lookup([7, 8, 1, 2, 9, 1, 2], 2) == [9, 1]
    assert prop.lookup([1, 2, 3], 3) == []  # the suffix itself is no earlier occurrence
    assert prop.lookup([5, 5, 5, 5], 2) == [5]  # overlapping repeats: one token follows the latest match
    # a byte-level match straddling two ids must not count: 256 = 00 01 00 00, 1 = 01 00 00 00
    assert prop.lookup([256, 0, 7, 1], 2) == []
    out = prop.propose([ProposalRequest("a", [1, 2, 3, 1, 2], 2), ProposalRequest("b", [1, 2, 3], 5)])
    assert out["a"].token_ids == [3, 1] and "b" not in out


def _target(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(3, V, generator=gen) * 1.5, dim=-1)  # p_1, p_2, p_3


@pytest.mark.parametrize("draft", ["ngram", "distribution"])
def test_speculative_sampling_reproduces_the_target_distribution(draft):
    """The first and second emitted tokens follow p_1 and p_2 (conditioned on the first), whatever q is."""
    p = _target(0)  # [3, V]: two draft positions + bonus
    gen = torch.Generator().manual_seed(1)
    n = 20000
    firsts, seconds_after_0 = torch.zeros(V), torch.zeros(V)
    for _ in range(n):
        if draft == "ngram":
            ids, q = [0, 1], None  # fixed guesses: accepted with prob p_i(d_i)
        else:
            q = torch.softmax(torch.randn(2, V, generator=gen), dim=-1)
            ids = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
        # p_2 only describes the token after a first token of d_1; rows built so it is exact: row 2 is p_2
        # when d_1 was accepted, which is all this test conditions on.
        out = verify(p, DraftBatch([ids], [q]), [gen])[0]
        firsts[out[0]] += 1
        if out[0] == ids[0] and len(out) > 1:
            seconds_after_0[out[1]] += 1
    assert chisquare(firsts, p[0] * n).pvalue > 1e-3
    m = seconds_after_0.sum()
    assert chisquare(seconds_after_0, p[1] * m).pvalue > 1e-3


def test_greedy_rows_accept_exactly_while_the_argmax_matches():
    p = torch.nn.functional.one_hot(torch.tensor([3, 1, 4, 2]), V).float()  # greedy: one-hot rows
    assert verify(p, DraftBatch([[3, 1, 5]], [None]), [None]) == [[3, 1, 4]]  # 3rd draft wrong -> argmax
    assert verify(p, DraftBatch([[3, 1, 4]], [None]), [None]) == [[3, 1, 4, 2]]  # all accepted + bonus
    two = torch.cat([p[:2], p[2:]])
    assert verify(two, DraftBatch([[0], [4]], [None, None]), [None, None]) == [[3], [4, 2]]
    # the greedy shortcut gives the same from the argmaxes alone, for these and for random drafts
    assert verify_greedy([3, 1, 4, 2], DraftBatch([[3, 1, 5]], [None])) == [[3, 1, 4]]
    assert verify_greedy([3, 1, 4, 2], DraftBatch([[3, 1, 4]], [None])) == [[3, 1, 4, 2]]
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        ks = torch.randint(0, 4, (3,), generator=gen).tolist()
        target = torch.randint(0, 3, (sum(ks) + 3,), generator=gen)
        drafts = DraftBatch([torch.randint(0, 3, (k,), generator=gen).tolist() for k in ks], [None] * 3)
        want = verify(torch.nn.functional.one_hot(target, V).float(), drafts, [None] * 3)
        assert verify_greedy(target.tolist(), drafts) == want


@pytest.fixture(scope="module")
def llms(tiny_llama_dir):
    kw = dict(num_kv_blocks=256, block_size=4, quantization="none")
    return (LLM(str(tiny_llama_dir), **kw),
            LLM(str(tiny_llama_dir), speculative="ngram", num_speculative_tokens=3, speculative_max_batch=8, **kw))


PROMPTS = ["The quick brown fox jumps over the lazy dog. The quick brown fox", "def add(a, b):\n    return a + b\n",
           "Paged attention stores keys and values in fixed-size blocks. Paged attention", "Héllo wörld, ça va?"]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=33, repetition_penalty=1.3, presence_penalty=0.5, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=30, min_tokens=10, logprobs=2),
], ids=["plain", "penalties", "min-tokens-logprobs"])
def test_greedy_output_is_identical_with_ngram_drafts(llms, params):
    base, spec = llms
    want = base.generate(PROMPTS, params)
    got = spec.generate(PROMPTS, params)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
        if params.logprobs is not None:
            for a, b in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
                assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    stats = spec.engine.stats()
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens > 0  # drafts were really verified
    rates = stats.spec_acceptance_by_position
    assert 0 < rates[0] <= 1 and rates == sorted(rates, reverse=True)  # draft i needs drafts before it accepted
    assert 1 < stats.spec_mean_accepted_length <= 4 and 0 < stats.spec_draft_time_share < 1
    assert stats.kv_blocks_used == 0  # rejected drafts' slots and finished requests' blocks all went back


def test_proposers_are_asked_only_for_drafts_that_fit_before_max_tokens(llms, monkeypatch):
    _, spec = llms
    proposer = spec.engine.runner.proposer
    asked: list[tuple[int, int]] = []  # (tokens of history, drafts allowed)

    def recording(requests):
        asked.extend((len(r.history), r.max_drafts) for r in requests)
        return NgramProposer.propose(proposer, requests)

    monkeypatch.setattr(proposer, "propose", recording)
    prompt_len = len(spec.get_tokenizer().encode(PROMPTS[0]))
    out = spec.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 6 and asked
    for history, allowed in asked:
        produced = history - prompt_len
        assert allowed == max(0, 6 - produced - 1)  # d drafts verify into d + 1 tokens


def test_draft_backoff_pauses_longer_after_each_miss_in_a_row():
    from engine.request import DraftBackoff

    b = DraftBackoff(patience=2, max_pause=4)
    b.record(0)
    assert b.allow()  # one miss: keep drafting
    pauses = []
    for _ in range(4):
        b.record(0)
        steps = [b.allow() for _ in range(6)]
        pauses.append(steps.index(True))
    assert pauses == [1, 2, 4, 4]
    b.record(3)  # an accepted draft forgives everything
    b.record(0)
    assert b.allow()


def test_drafting_pauses_for_a_request_whose_drafts_keep_missing(llms, monkeypatch):
    base, spec = llms
    proposer = spec.engine.runner.proposer
    asked = []

    def always_wrong(requests):  # drafts token 7, which the logit bias below keeps the target from choosing
        asked.extend(r.request_id for r in requests)
        return {r.request_id: Proposal([7] * min(2, r.max_drafts)) for r in requests if r.max_drafts}

    monkeypatch.setattr(proposer, "propose", always_wrong)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logit_bias={7: -100.0})
    want = base.generate([PROMPTS[1]], params)[0].outputs[0].token_ids
    before = spec.engine.stats()
    got = spec.generate([PROMPTS[1]], params)[0].outputs[0].token_ids
    misses = spec.engine.stats().spec_verify_steps - before.spec_verify_steps
    assert got == want and spec.engine.stats().kv_blocks_used == 0
    # 40 steps: drafts every step until the third miss in a row, then pauses of 1, 2, 4, 8, 16 steps
    assert 5 <= misses == len(asked) - 1 <= 12


def test_stop_strings_and_n_with_drafts(llms):
    base, spec = llms
    text = base.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0].text
    stop = text[10:14]
    params = SamplingParams(temperature=0, max_tokens=30, stop=[stop], n=2, ignore_eos=True)
    want, got = base.generate([PROMPTS[0]], params)[0], spec.generate([PROMPTS[0]], params)[0]
    assert [c.text for c in got.outputs] == [c.text for c in want.outputs]
    assert all(c.finish_reason == "stop" for c in got.outputs)
    assert spec.engine.stats().kv_blocks_used == 0


def test_sampled_outputs_are_valid_and_seeded_runs_repeat(llms):
    _, spec = llms
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, seed=3, ignore_eos=True)
    a = spec.generate(PROMPTS, params)
    b = spec.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert all(len(o.outputs[0].token_ids) == 24 for o in a)


def test_speculation_defaults_to_batch_one_on_cpu():
    from engine import EngineConfig
    from engine.llm_engine import speculative_max_batch

    assert speculative_max_batch(EngineConfig(model="x")) == 1  # drafts stopped paying above it here
    assert speculative_max_batch(EngineConfig(model="x", device="cuda")) == 4
    assert speculative_max_batch(EngineConfig(model="x", speculative_max_batch=8)) == 8
