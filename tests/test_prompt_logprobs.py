"""SamplingParams.prompt_logprobs (vLLM semantics) on a tiny model, against the model's own logits run through a
fresh cache: values and top-k, chunked prefill, preemption, n > 1, prefix caching, speculation, grammars, and
requests that do not ask being untouched."""
from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.prompt_logprobs import PromptLogprobs
from grammar import GrammarSpec
from tests.helpers import prompt_logits

TOL = 1e-4


def _prompt(seed: int, n: int) -> list[int]:
    return random.Random(seed).sample(range(3, 390), n)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), num_kv_blocks=128, block_size=4, quantization="none")


@pytest.fixture(scope="module")
def chunked_llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), num_kv_blocks=128, block_size=4, quantization="none", max_num_batched_tokens=5)


def _check(llm: LLM, ids: list[int], entries, k: int) -> None:
    """entries are vLLM's prompt logprobs of `ids`: None, then log_softmax(logits[i - 1])[ids[i]] and its top k."""
    logprobs = torch.log_softmax(prompt_logits(llm.engine.loaded.model, ids).float(), dim=-1)  # [L, V]
    assert entries is not None and len(entries) == len(ids)
    assert entries[0] is None
    for i in range(1, len(ids)):
        e, row = entries[i], logprobs[i - 1]
        assert e.token_id == ids[i]
        assert e.logprob == pytest.approx(row[ids[i]].item(), abs=TOL)
        assert len(e.top) == k
        assert [v for _, v in e.top] == pytest.approx(row.topk(k).values.tolist(), abs=TOL)  # best first
        assert all(v == pytest.approx(row[t].item(), abs=TOL) for t, v in e.top)


def _collected(llm: LLM, monkeypatch) -> list[str]:
    """Request ids whose prompt logprobs the runner completes from now on, in order."""
    seen: list[str] = []
    tracker = llm.engine.runner.prompt_logprobs
    collect = tracker.collect

    def spy(*args, **kwargs):
        done = collect(*args, **kwargs)
        seen.extend(done)
        return done
    monkeypatch.setattr(tracker, "collect", spy)
    return seen


def test_validation():
    for bad in (-1, 21):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
    assert SamplingParams().prompt_logprobs is None


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_values_and_top_match_the_model(llm, k):
    ids = _prompt(k, 17)
    out = llm.generate(ids, SamplingParams(prompt_logprobs=k, max_tokens=1))[0]
    _check(llm, ids, out.prompt_logprobs, k)
    assert len(out.outputs[0].token_ids) == 1


def test_one_token_prompt(llm):
    out = llm.generate([[42]], SamplingParams(prompt_logprobs=3, max_tokens=2))[0]
    assert out.prompt_logprobs == [None]


@pytest.mark.parametrize("length", [21, 23])  # 21: the last chunk is the sampling position alone
def test_chunked_prefill(chunked_llm, length, monkeypatch):
    ids = _prompt(100 + length, length)
    steps = []
    step = chunked_llm.engine.step
    monkeypatch.setattr(chunked_llm.engine, "step", lambda: steps.append(1) or step())
    out = chunked_llm.generate(ids, SamplingParams(prompt_logprobs=4, max_tokens=3, ignore_eos=True))[0]
    assert len(steps) >= length // 5  # the prompt did run in chunks
    _check(chunked_llm, ids, out.prompt_logprobs, 4)


def test_complete_in_the_first_output_with_a_token_and_every_later_one(chunked_llm):
    engine, ids = chunked_llm.engine, _prompt(7, 19)
    engine.add_request("stream", ids, SamplingParams(prompt_logprobs=2, max_tokens=4, ignore_eos=True))
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == "stream"]
    assert len(outs) == 4 and outs[0].outputs[0].token_ids  # no output before the first token
    for o in outs:
        _check(chunked_llm, ids, o.prompt_logprobs, 2)


def test_preemption_neither_duplicates_nor_loses_entries(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=8, block_size=4, quantization="none", max_num_batched_tokens=8)
    scheduler, pending = llm.engine.scheduler, llm.engine.runner.prompt_logprobs.pending
    preempted = []  # (had its prompt logprobs still to compute, had output tokens)
    preempt = scheduler._preempt

    def spy(req):
        preempted.append((req.request_id in pending, bool(req.output_token_ids)))
        preempt(req)
    scheduler._preempt = spy
    prompts = [_prompt(200 + i, 13) for i in range(3)]
    outs = llm.generate(prompts, SamplingParams(prompt_logprobs=2, max_tokens=12, ignore_eos=True, temperature=0))
    assert (True, False) in preempted  # mid-prefill: its prefill runs again
    assert (False, True) in preempted  # after: its prompt (and outputs) are recomputed
    for ids, out in zip(prompts, outs):
        _check(llm, ids, out.prompt_logprobs, 2)
        assert len(out.outputs[0].token_ids) == 12
    assert not pending


def test_n2_the_parent_gets_them_computed_once(llm, monkeypatch):
    ids = _prompt(300, 14)
    collected = _collected(llm, monkeypatch)
    out = llm.generate(ids, SamplingParams(n=2, prompt_logprobs=3, max_tokens=5, temperature=1.0, seed=3,
                                           ignore_eos=True))[0]
    assert collected == [f"{out.request_id}#0"]
    assert [c.index for c in out.outputs] == [0, 1] and all(len(c.token_ids) == 5 for c in out.outputs)
    _check(llm, ids, out.prompt_logprobs, 3)
    assert out.num_cached_tokens > 0  # the second sample still shares the first's prompt blocks


def test_prefix_caching_is_not_read_but_is_filled(llm):
    shared = _prompt(400, 16)
    assert llm.generate(shared + [5, 6], SamplingParams(max_tokens=2))[0].prompt_logprobs is None
    assert llm.engine.block_manager.find_cached_prefix(shared + [7, 8])  # the prefix is cached now
    ids = shared + [7, 8, 9]
    out = llm.generate(ids, SamplingParams(prompt_logprobs=1, max_tokens=2))[0]
    assert out.num_cached_tokens == 0
    _check(llm, ids, out.prompt_logprobs, 1)
    # both in one batch: the one that asks computes its whole prompt while the other reads the cache
    both = llm.generate([shared + [10], shared + [11, 12]], [SamplingParams(max_tokens=2),
                                                             SamplingParams(prompt_logprobs=2, max_tokens=2)])
    assert both[0].num_cached_tokens == 16 and both[1].num_cached_tokens == 0
    _check(llm, shared + [11, 12], both[1].prompt_logprobs, 2)
    # a request with prompt logprobs fills the cache for later ones
    fresh = _prompt(401, 16)
    llm.generate(fresh + [5], SamplingParams(prompt_logprobs=0, max_tokens=2))
    assert llm.generate(fresh + [6], SamplingParams(max_tokens=2))[0].num_cached_tokens == 16


def test_requests_without_them_are_unchanged(llm, monkeypatch):
    ids = _prompt(500, 15)
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    asked = llm.generate(ids, SamplingParams(prompt_logprobs=2, **greedy))[0]

    def never(*args, **kwargs):
        raise AssertionError("prompt logprobs computed for a batch where nobody asked")
    monkeypatch.setattr(llm.engine.runner.prompt_logprobs, "collect", never)
    plain = llm.generate(ids, SamplingParams(**greedy))[0]
    assert plain.prompt_logprobs is None
    assert plain.num_cached_tokens == 12  # a request that does not ask still reads the prefix cache
    assert plain.outputs[0].token_ids == asked.outputs[0].token_ids
    assert [e.token_id for e in plain.outputs[0].logprobs] == [e.token_id for e in asked.outputs[0].logprobs]
    assert not llm.engine.runner.prompt_logprobs.pending
    assert isinstance(llm.engine.runner.prompt_logprobs, PromptLogprobs)


def test_with_speculative_decoding(tiny_llama_dir):
    spec = LLM(str(tiny_llama_dir), num_kv_blocks=128, block_size=4, quantization="none", speculative="ngram",
               speculative_max_batch=4)
    cycle = [50, 60, 70, 80, 90]
    ids = cycle * 3 + cycle[:2]

    def continue_the_cycle(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits[cycle[(len(output_ids) + 2) % 5]] += 100.0  # so that n-gram drafts get accepted
        return logits
    params = SamplingParams(prompt_logprobs=3, max_tokens=10, temperature=0, ignore_eos=True,
                            logits_processors=[continue_the_cycle])
    before = spec.engine.stats().spec_accepted_tokens
    out = spec.generate(ids, params)[0]
    assert spec.engine.stats().spec_accepted_tokens > before  # drafts were verified and accepted
    _check(spec, ids, out.prompt_logprobs, 3)
    again = spec.generate(ids, params)[0]  # a request with outputs later: nothing left over
    _check(spec, ids, again.prompt_logprobs, 3)
    assert not spec.engine.runner.prompt_logprobs.pending


def test_grammar_masks_do_not_touch_them(llm):
    ids = _prompt(600, 12)
    out = llm.generate(ids, SamplingParams(prompt_logprobs=4, max_tokens=8, temperature=0,
                                           structured_output=GrammarSpec.regex("[a-z]+")))[0]
    assert out.outputs[0].text.isalpha()
    _check(llm, ids, out.prompt_logprobs, 4)


def test_aborted_mid_prefill_leaves_nothing_behind(chunked_llm):
    engine = chunked_llm.engine
    engine.add_request("gone", _prompt(700, 20), SamplingParams(prompt_logprobs=2, max_tokens=4))
    engine.step()  # the first chunk only
    assert "gone" in engine.runner.prompt_logprobs.pending
    final = engine.abort_request("gone")
    assert final.finished and final.prompt_logprobs is None  # its prompt never completed
    assert not engine.runner.prompt_logprobs.pending


def test_a_request_id_used_again_right_after_it_finished(llm):
    engine, ids = llm.engine, _prompt(800, 9)
    for _ in range(2):  # the second is added before the step that tells the runner the first one finished
        engine.add_request("again", ids, SamplingParams(prompt_logprobs=1, max_tokens=2))
        outs = []
        while not outs or not outs[-1].finished:
            outs += [o for o in engine.step() if o.request_id == "again"]
        _check(llm, ids, outs[-1].prompt_logprobs, 1)
