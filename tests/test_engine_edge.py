"""Engine edge cases against vLLM / OpenAI semantics on a tiny model: stop strings under min_tokens, the text
of stop tokens, tokens past a stop string with speculation, one request's failure (logits processor,
grammar, seed) not failing its batch, request id clashes, the context limit with a drafter's lookahead,
preemption ties, and offline validation."""
from __future__ import annotations

import asyncio

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.async_engine import AsyncEngine
from engine.block_manager import BlockManager
from engine.llm_engine import LLMEngine, PreparedRequest
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler
from grammar import GrammarSpec

CYCLE = [50, 60, 70, 80, 90]  # tokens of single, clean characters in the tiny tokenizer
EOS = 2  # the tiny model's eos_token_id
PROMPT = CYCLE * 2 + CYCLE[:1]  # repeats itself: n-gram drafts find the cycle


def forcing(seq: list[int]):
    """A logits processor that makes seq[i] (cyclically) the overwhelming choice for output token i."""
    def fn(output_ids: list[int], logits):
        logits[seq[len(output_ids) % len(seq)]] += 100.0
        return logits
    return fn


def failing_after(n: int):
    def fn(output_ids: list[int], logits):
        if len(output_ids) >= n:
            raise RuntimeError("processor broke")
        return forcing(CYCLE)(output_ids, logits)
    return fn


def forced(max_tokens: int, **kw) -> SamplingParams:
    kw.setdefault("temperature", 0)
    return SamplingParams(max_tokens=max_tokens, ignore_eos=kw.pop("ignore_eos", True),
                          logits_processors=[forcing(CYCLE)], **kw)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), num_kv_blocks=128, block_size=4, quantization="none")


@pytest.fixture(scope="module")
def spec_llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), num_kv_blocks=128, block_size=4, quantization="none", speculative="ngram",
               speculative_max_batch=4)


def _text(llm: LLM, ids: list[int]) -> str:
    return llm.get_tokenizer().decode(ids)


def _idle(llm: LLM) -> None:
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_used_blocks == 0


def test_stop_strings_do_not_fire_below_min_tokens(llm):
    stop = _text(llm, CYCLE[1:2])
    early = llm.generate([PROMPT], forced(12, stop=[stop]))[0].outputs[0]
    assert early.token_ids == CYCLE[:2] and early.finish_reason == "stop"  # the pattern is as forced
    out = llm.generate([PROMPT], forced(12, stop=[stop], min_tokens=4))[0].outputs[0]
    # vLLM: the first min_tokens tokens cannot end the request; the next occurrence does
    assert out.token_ids == (CYCLE * 2)[:7]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == _text(llm, (CYCLE * 2)[:6])
    _idle(llm)


def test_stop_token_text_is_left_out_unless_asked_for(llm):
    out = llm.generate([PROMPT], forced(12, stop_token_ids=[CYCLE[2]]))[0].outputs[0]
    assert out.token_ids == CYCLE[:3] and out.finish_reason == "stop" and out.stop_reason == CYCLE[2]
    assert out.text == _text(llm, CYCLE[:2])
    kept = llm.generate([PROMPT], forced(12, stop_token_ids=[CYCLE[2]], include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == _text(llm, CYCLE[:3])
    _idle(llm)


def test_eos_stops_with_no_stop_reason(llm):
    params = SamplingParams(temperature=0, max_tokens=12, skip_special_tokens=False,
                            logits_processors=[forcing(CYCLE[:2] + [EOS])])
    out = llm.generate([PROMPT], params)[0].outputs[0]
    assert out.token_ids == CYCLE[:2] + [EOS] and out.finish_reason == "stop"
    assert out.stop_reason is None  # vLLM: stop_reason is only a stop string or a stop_token_ids id
    assert out.text == _text(llm, CYCLE[:2])  # the EOS token's text is not output either


def test_no_tokens_past_a_stop_string_with_speculation(llm, spec_llm):
    params = forced(16, stop=[_text(llm, CYCLE[3:4])], logprobs=1)
    plain = llm.generate([PROMPT], params)[0].outputs[0]
    before = spec_llm.engine.stats().spec_accepted_tokens
    spec = spec_llm.generate([PROMPT], params)[0].outputs[0]
    assert spec_llm.engine.stats().spec_accepted_tokens > before  # a step did emit several tokens
    assert plain.token_ids == CYCLE[:4]
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert len(spec.logprobs) == len(spec.token_ids)
    _idle(spec_llm)


@pytest.mark.parametrize("which", ["plain", "spec"])
def test_a_failing_logits_processor_fails_only_its_request(llm, spec_llm, which):
    engine = llm if which == "plain" else spec_llm
    good = forced(10)
    bad = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logits_processors=[failing_after(4)])
    outs = engine.generate([PROMPT, PROMPT, PROMPT], [good, bad, good])
    assert outs[1].outputs[0].finish_reason == "error" and "processor broke" in outs[1].error
    for o in (outs[0], outs[2]):
        assert o.error is None and o.outputs[0].finish_reason == "length"
        assert o.outputs[0].token_ids == (CYCLE * 2)[:10]
    _idle(engine)


def test_async_engine_serves_on_after_a_request_fails(tiny_llama_dir):
    async def main():
        engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=4,
                                                    quantization="none")))
        async with engine:
            async def last(params):
                return [o async for o in engine.generate(PROMPT, params)][-1]

            bad = SamplingParams(max_tokens=8, logits_processors=[failing_after(0)])
            outs = await asyncio.gather(last(forced(8)), last(bad), last(forced(8)))
            after = await last(forced(3))
            return outs, after, engine.engine.block_manager.num_used_blocks

    outs, after, used = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert outs[1].outputs[0].finish_reason == "error" and "processor broke" in outs[1].error
    assert [o.outputs[0].token_ids for o in (outs[0], outs[2])] == [(CYCLE * 2)[:8]] * 2
    assert after.outputs[0].token_ids == CYCLE[:3] and used == 0


class _BrokenGrammar:
    """Stands in for a CompiledGrammar whose matchers fail the way a backend bug or limit would."""

    def __init__(self, real, how: str):
        self.real, self.how = real, how

    def matcher(self):
        m = self.real.matcher()
        if self.how == "raise":
            def fill_bitmask(bitmask, row):
                raise RuntimeError("backend crashed")
            m.fill_bitmask = fill_bitmask
        elif self.how == "raise_on_accept":  # the mask was fine; taking the sampled token raises
            def advance(token):
                raise RuntimeError("backend crashed")
            m._advance = advance
        else:  # gives up (Matcher.error) after three tokens, as a backend at a resource limit does
            class GivesUp(type(m)):
                @property
                def error(self):
                    return "too complex" if self.num_accepted >= 3 else None
            m.__class__ = GivesUp
        return m


@pytest.mark.parametrize("how", ["raise", "raise_on_accept", "give_up"])
def test_a_grammar_failure_fails_only_its_request_and_says_why(llm, how):
    engine = llm.engine
    real = engine.structured.compile(GrammarSpec.regex("[a-z]+"))
    params = SamplingParams(temperature=0, max_tokens=10, structured_output=GrammarSpec.regex("[a-z]+"))
    engine.add_prepared(PreparedRequest("broken", None, PROMPT, params, grammar=_BrokenGrammar(real, how)))
    engine.add_request("fine", PROMPT, forced(10))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done["broken"].outputs[0].finish_reason == "error"
    assert ("too complex" if how == "give_up" else "backend crashed") in done["broken"].error
    assert done["fine"].error is None and done["fine"].outputs[0].token_ids == (CYCLE * 2)[:10]
    _idle(llm)


def test_sample_ids_of_n_requests_cannot_clash_with_other_ids(llm):
    engine = llm.engine
    engine.add_request("a", PROMPT, forced(4, n=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a#1", PROMPT, forced(4))
    engine.add_request("b#0", PROMPT, forced(4))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("b", PROMPT, forced(4, n=2))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == ["a", "b#0"]
    assert [c.token_ids for c in done["a"].outputs] == [CYCLE[:4]] * 2
    _idle(llm)


def test_a_request_filling_the_context_finishes_with_a_drafter_lookahead(tiny_llama_dir):
    # The pool holds exactly max_model_len tokens; the drafter's lookahead must not need more.
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=8, block_size=4, quantization="none",
                                    speculative="draft", speculative_model=str(tiny_llama_dir),
                                    speculative_max_batch=4))
    assert engine.max_model_len == 32
    engine.add_request("r", PROMPT, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    final = None
    for _ in range(100):  # bounded: the bug was a request preempting itself forever
        final = next((o for o in engine.step() if o.finished), final)
        if not engine.has_unfinished_requests():
            break
    assert final is not None and final.outputs[0].finish_reason == "length"
    assert len(PROMPT) + len(final.outputs[0].token_ids) == 32
    assert engine.block_manager.num_used_blocks == 0


def test_preemption_never_evicts_a_request_already_scheduled_when_keys_tie():
    # Equal (priority, arrival) keys happen with a coarse clock; the victim must still come last in order.
    blocks = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64, stop_token_ids=set())
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for rid, n in (("a", 7), ("b", 8)):  # a has a free slot in its second block, b has none
        sched.add_request(Request(rid, list(range(10, 10 + n)), params, max_model_len=64, arrival_time=1.0))
    sched.update(sched.schedule(), {"a": [5], "b": [5]})
    out = sched.schedule()
    for s in out.scheduled:
        assert sched.requests[s.request_id].status is RequestStatus.RUNNING
        assert blocks.tables.get(s.request_id) == s.block_ids
    assert [s.request_id for s in out.scheduled] == ["a"]


def test_a_seed_past_64_bits_does_not_fail_the_batch(llm):
    huge = SamplingParams(temperature=1.0, seed=2**64 + 7, max_tokens=6, ignore_eos=True)
    outs = llm.generate([PROMPT, PROMPT], [huge, forced(6)])
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "length"]
    again = llm.generate([PROMPT], huge)[0]
    assert again.outputs[0].token_ids == outs[0].outputs[0].token_ids
    _idle(llm)


def test_generate_queues_nothing_when_one_prompt_is_invalid(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([PROMPT, []], SamplingParams(max_tokens=4))
    _idle(llm)
    assert llm.generate([PROMPT], forced(3))[0].outputs[0].token_ids == CYCLE[:3]


def test_offline_logit_bias_outside_the_vocabulary_is_refused(llm):
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([PROMPT], SamplingParams(max_tokens=2, logit_bias={vocab: 5.0}))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("jump_forward", [True, False])
def test_a_grammar_completed_on_the_last_allowed_token_is_a_stop(llm, jump_forward):
    spec = GrammarSpec.choice(["abc def"])
    free = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, structured_output=spec,
                                                 jump_forward=jump_forward))[0].outputs[0]
    assert free.finish_reason == "stop"
    exact = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=len(free.token_ids), structured_output=spec,
                                                  jump_forward=jump_forward))[0].outputs[0]
    assert exact.text == "abc def" and exact.finish_reason == "stop"  # complete, not cut by max_tokens


def test_a_max_model_len_the_model_or_the_cache_cannot_hold_is_refused(tiny_llama_dir):
    # it was cut down silently: a caller counting on that context got requests refused later instead
    with pytest.raises(ValueError, match="more than the model's context"):
        LLM(str(tiny_llama_dir), num_kv_blocks=16, block_size=4, quantization="none", max_model_len=10**6)
    with pytest.raises(ValueError, match="the KV cache holds 64 tokens"):
        LLM(str(tiny_llama_dir), num_kv_blocks=16, block_size=4, quantization="none", max_model_len=100)
    assert LLM(str(tiny_llama_dir), num_kv_blocks=16, block_size=4, quantization="none").engine.max_model_len == 64
