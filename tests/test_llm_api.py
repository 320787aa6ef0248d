"""The offline LLM API on a tiny model: batching, stops, seeds, n > 1, chat, validation."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), num_kv_blocks=128, block_size=4, quantization="none")


PROMPTS = ["The quick brown fox", "Paged attention stores", "def add(a, b):", "Continuous"]


def test_batched_greedy_equals_one_at_a_time(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, together):
        alone = llm.generate([prompt], params)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert len(out.outputs[0].token_ids) == 12
        assert out.outputs[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_seeds_differ(llm):
    a = llm.generate(PROMPTS[:2], SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True))
    b = llm.generate(PROMPTS[:2], SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True))
    c = llm.generate(PROMPTS[:2], SamplingParams(temperature=1.0, seed=8, max_tokens=16, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert [o.outputs[0].token_ids for o in a] != [o.outputs[0].token_ids for o in c]


def test_stop_string_is_cut_from_the_text(llm):
    base = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    stop = base.text[5:8]
    assert stop and stop in base.text
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=16, stop=[stop], ignore_eos=True))[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == base.text[:base.text.index(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    base = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    stop_id = base.token_ids[3]
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id],
                                                    ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == base.token_ids[:base.token_ids.index(stop_id) + 1]
    late = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id],
                                                     min_tokens=8, ignore_eos=True))[0].outputs[0]
    assert len(late.token_ids) >= 8
    assert stop_id not in late.token_ids[:8]


def test_n_samples_share_a_prompt(llm):
    out = llm.generate([PROMPTS[2]], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_chat_applies_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4))[0]
    tok = llm.get_tokenizer()
    assert tok.decode(out.prompt_token_ids).endswith("<|im_start|>assistant\n")


def test_developer_messages_render_as_system_unless_the_template_knows_them(llm):
    from engine.tokenizer import render_chat

    tok = llm.get_tokenizer()
    chat = [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    as_system = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    assert render_chat(tok, chat) == render_chat(tok, as_system)
    assert "developer" not in render_chat(tok, chat)
    template = tok.chat_template
    try:  # a template that handles the role itself gets it as sent
        tok.chat_template = "{# developer #}" + template
        assert "<|im_start|>developer" in render_chat(tok, chat)
    finally:
        tok.chat_template = template


def test_logprobs_come_with_alternatives(llm):
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3, logprobs=2, ignore_eos=True))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 3
    for token, lp in zip(out.outputs[0].token_ids, lps):
        assert lp.token_id == token and len(lp.top) == 2
        assert lp.top[0][0] == token  # greedy: the sampled token is the most likely one
        assert lp.logprob <= 0


def test_bad_requests_raise_clear_errors(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        llm.generate(["hello"], SamplingParams(max_tokens=10_000))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
