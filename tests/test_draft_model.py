"""Draft-model speculation: a second model with the target's tokenizer drafts; the target verifies."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.tiny_models import save_tiny_model

PROMPTS = ["The quick brown fox jumps over the lazy dog. The quick brown fox", "def add(a, b):\n    return a + b\n",
           "Paged attention stores keys and values in fixed-size blocks.", "Héllo wörld, ça va?"]
# a random tiny model is never confident: draft whatever its chance (min prob 0)
KW = dict(num_kv_blocks=256, block_size=4, quantization="none", num_speculative_tokens=3, speculative_max_batch=8,
          speculative_min_draft_prob=0.0)


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), **{k: v for k, v in KW.items() if "specul" not in k})


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory, tiny_llama_dir):
    """Another tiny Llama (its own random weights) sharing the target's tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-draft"), "llama", seed=7)


def _spec(target, draft, **kw) -> LLM:
    return LLM(str(target), speculative="draft", speculative_model=str(draft), **{**KW, **kw})


def test_a_draft_identical_to_the_target_has_every_draft_accepted(tiny_llama_dir, base):
    """Draft = target: greedy drafts are the target's own argmax, and sampled drafts come from q = p, so
    verification accepts them all (rejection needs u > p/q = 1): this checks the draft's KV is level with
    the target's at every position, through prompt chunks, verify steps and the lookahead slots."""
    spec = _spec(tiny_llama_dir, tiny_llama_dir, max_num_batched_tokens=8)
    # some prompts come in several chunks, one of them in steps that sample nothing
    assert max(len(spec.get_tokenizer().encode(p)) for p in PROMPTS) > 16
    for params in (SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                   SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True, seed=5)):
        before = spec.engine.stats()
        got = spec.generate(PROMPTS, params)
        after = spec.engine.stats()
        drafted = after.spec_draft_tokens - before.spec_draft_tokens
        assert drafted > 0 and after.spec_accepted_tokens - before.spec_accepted_tokens == drafted
        if params.temperature == 0:
            want = base.generate(PROMPTS, params)
            assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        assert all(len(o.outputs[0].token_ids) == 30 for o in got)
    assert spec.engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=30, stop=["e"], n=2, repetition_penalty=1.2, ignore_eos=True),
], ids=["plain", "stop-n-penalty"])
def test_greedy_output_is_identical_with_another_draft_model(tiny_llama_dir, other_draft, base, params):
    spec = _spec(tiny_llama_dir, other_draft)
    want = base.generate(PROMPTS, params)
    got = spec.generate(PROMPTS, params)
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    assert [[c.finish_reason for c in o.outputs] for o in got] == [[c.finish_reason for c in o.outputs] for o in want]
    stats = spec.engine.stats()
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens < stats.spec_draft_tokens  # some rejected
    assert stats.kv_blocks_used == 0


def test_draft_model_kv_cache_counts_in_the_memory_budget(tiny_llama_dir):
    budget = 1 << 20
    plain = LLM(str(tiny_llama_dir), kv_cache_memory=budget, block_size=4, quantization="none")
    spec = LLM(str(tiny_llama_dir), kv_cache_memory=budget, block_size=4, quantization="none",
               speculative="draft", speculative_model=str(tiny_llama_dir))
    # the draft is the target's twin: its cache is as large, so the budget holds half the blocks
    assert spec.engine.block_manager.num_blocks == plain.engine.block_manager.num_blocks // 2


def test_draft_model_must_be_named_and_share_the_vocabulary(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="--speculative-model"):
        LLM(str(tiny_llama_dir), speculative="draft", num_kv_blocks=16, quantization="none")
    wider = save_tiny_model(tmp_path / "wider", "llama", vocab_size=512)  # ids the target has no row for
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(str(tiny_llama_dir), speculative="draft", speculative_model=str(wider), num_kv_blocks=16,
            quantization="none")


def test_the_twin_draft_stays_level_through_preemption(tiny_llama_dir, base):
    """A pool too small for all four at once: preempted requests are recomputed from position 0, and the
    draft's cache must be rebuilt with them (every draft of the target's twin is still accepted)."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    spec = _spec(tiny_llama_dir, tiny_llama_dir, num_kv_blocks=40)
    got = spec.generate(PROMPTS, params)
    stats = spec.engine.stats()
    assert stats.num_preempted_total > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in base.generate(PROMPTS, params)]
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens == stats.spec_draft_tokens
    assert stats.kv_blocks_used == 0
