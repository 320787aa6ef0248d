"""Scheduler behaviour on a tiny model: prefix caching, chunked prefill, preemption, priorities."""
from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def _engine(folder, **kw) -> LLMEngine:
    opts = dict(num_kv_blocks=256, block_size=4, max_num_batched_tokens=256, quantization="none")
    opts.update(kw)
    return LLMEngine(EngineConfig(model=str(folder), **opts))


def _run(engine: LLMEngine, prompts: dict[str, list[int]], params=GREEDY) -> dict[str, list[int]]:
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def _prompts(n: int, length: int, shared: int = 0, seed: int = 0) -> dict[str, list[int]]:
    import random

    rng = random.Random(seed)
    system = [rng.randrange(3, 300) for _ in range(shared)]
    return {f"p{i}": system + [rng.randrange(3, 300) for _ in range(length + 3 * i)] for i in range(n)}


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """Each prompt alone, no caching, roomy pool: what every other configuration must reproduce."""
    engine = _engine(tiny_llama_dir, enable_prefix_caching=False)
    prompts = _prompts(6, 30, shared=24)
    return prompts, {rid: _run(engine, {rid: ids})[rid] for rid, ids in prompts.items()}


def test_shared_system_prompt_hits_the_prefix_cache(tiny_llama_dir, reference):
    prompts, expected = reference
    engine = _engine(tiny_llama_dir)
    first = dict(list(prompts.items())[:1])
    assert _run(engine, first) == {k: expected[k] for k in first}
    assert engine.stats().prefix_cache_hits == 0
    rest = dict(list(prompts.items())[1:])
    engine.add_request("p1", rest.pop("p1"), GREEDY)
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o if o.finished else out
    assert out.num_cached_tokens == 24  # the six full blocks of the shared system prompt
    assert out.outputs[0].token_ids == expected["p1"]
    assert _run(engine, rest) == {k: expected[k] for k in rest}
    assert engine.stats().prefix_cache_hit_rate > 0.3


def test_outputs_identical_with_caching_on_and_off_in_one_batch(tiny_llama_dir, reference):
    prompts, expected = reference
    assert _run(_engine(tiny_llama_dir), prompts) == expected
    assert _run(_engine(tiny_llama_dir, enable_prefix_caching=False), prompts) == expected


def test_chunked_prefill_never_stalls_running_streams(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, max_num_batched_tokens=16, num_kv_blocks=512)
    engine.add_request("short", [5, 6, 7], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.step()  # prefill of the short one
    engine.add_request("long", list(range(10, 210)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    steps_with_long_prefill = 0
    while engine.scheduler.requests.get("long") and engine.scheduler.requests["long"].num_computed_tokens < 200:
        outs = {o.request_id: o for o in engine.step()}
        # the running stream gets its token every step, while the long prompt goes in 15-token chunks
        assert len(outs["short"].outputs[0].delta_token_ids) == 1
        assert engine.scheduler.tokens_last_step <= 16
        steps_with_long_prefill += 1
    assert steps_with_long_prefill >= 200 // 16


def test_tiny_pool_preempts_and_outputs_stay_identical(tiny_llama_dir, reference):
    prompts, expected = reference
    engine = _engine(tiny_llama_dir, num_kv_blocks=40)  # ~160 token slots for 6 x ~60 tokens
    assert _run(engine, prompts) == expected
    assert engine.stats().num_preempted_total > 0
    assert engine.block_manager.num_used_blocks == 0


def test_priority_runs_first(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_prepared(engine.prepare_request("late", [5, 6, 7], params, priority=5))
    engine.add_prepared(engine.prepare_request("urgent", [8, 9], params, priority=-1))
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["urgent", "late"]


def test_n_samples_share_prompt_blocks(tiny_llama_dir):
    engine = _engine(tiny_llama_dir)
    engine.add_request("n", list(range(20, 60)), SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().prefix_cache_hits == 3 * 36  # siblings reuse the first's 9 full blocks
    assert engine.block_manager.num_used_blocks == 0


def test_abort_frees_blocks(tiny_llama_dir):
    engine = _engine(tiny_llama_dir)
    engine.add_request("a", list(range(5, 40)), GREEDY)
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    out = engine.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
