"""The legacy completions API's batches of prompts and `echo` (with the prompt's logprobs, and
max_tokens 0 to score a prompt), as OpenAI and vLLM serve them."""
from __future__ import annotations

import json
import math

import httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from tests.server import MODEL, Server, idle

PROMPTS = ["The quick brown", "Paged attention"]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=256, block_size=4,
                                                  quantization="none"))
    with Server(engine, max_in_flight=4) as srv:
        yield srv


def _greedy(client, prompt, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, temperature=0, **kw)


def test_a_batch_of_prompts_answers_each_as_alone(client, server):
    alone = [_greedy(client, p, max_tokens=5, n=2, extra_body={"ignore_eos": True})
             for p in PROMPTS]
    batch = _greedy(client, PROMPTS, max_tokens=5, n=2, extra_body={"ignore_eos": True})
    # choices numbered prompt by prompt: prompt i's n choices are i * n .. i * n + n - 1
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [c.text for a in alone for c in a.choices]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == 20
    ids = _greedy(client, [[5, 6, 7], [8, 9]], max_tokens=2)  # token id prompts too
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5
    assert idle(server.engine)


def test_a_streamed_batch_interleaves_under_one_id_with_one_usage_chunk(client, server):
    chunks = list(_greedy(client, PROMPTS, max_tokens=4, stream=True, stream_options={"include_usage": True},
                          extra_body={"ignore_eos": True}))
    assert len({c.id for c in chunks}) == 1
    text = {0: "", 1: ""}
    for c in chunks[:-1]:
        for choice in c.choices:
            text[choice.index] += choice.text
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0] is chunks[-1] and usage[0].usage.completion_tokens == 8
    whole = _greedy(client, PROMPTS, max_tokens=4, extra_body={"ignore_eos": True})
    assert [text[0], text[1]] == [c.text for c in whole.choices]
    assert idle(server.engine)


def test_batches_over_the_in_flight_limit_are_refused_whole(http):
    body = {"model": MODEL, "prompt": ["a"] * 5, "max_tokens": 2}  # the server takes 4 at once
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    too_many = http.post("/v1/completions", json={**body, "prompt": ["a"] * 65})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt"


def test_a_bad_prompt_in_a_batch_fails_the_request_before_any_runs(http, server):
    body = {"model": MODEL, "prompt": ["fine", "The quick brown fox " * 400], "max_tokens": 2}
    assert http.post("/v1/completions", json=body).status_code == 400
    assert idle(server.engine)


def test_disconnecting_from_a_streamed_batch_aborts_every_prompt(http, server):
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert next(r.iter_lines()).startswith("data: ")
    assert idle(server.engine)
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the server notices the client left, and aborts
        http.post("/v1/completions", json={**body, "stream": False}, timeout=0.3)
    assert idle(server.engine)


def test_echo_leads_with_the_prompt(client):
    plain = _greedy(client, PROMPTS[0], max_tokens=3)
    echoed = _greedy(client, PROMPTS[0], max_tokens=3, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + plain.choices[0].text
    streamed = list(_greedy(client, PROMPTS[0], max_tokens=3, echo=True, stream=True))
    assert streamed[0].choices[0].text.startswith(PROMPTS[0])
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_echo_with_logprobs_scores_the_prompt(client, server):
    tokenizer = server.engine.engine.tokenizer
    ids = server.engine.engine.prepare_request("probe", PROMPTS[0], SamplingParams()).token_ids
    full = _greedy(client, PROMPTS[0], max_tokens=2, echo=True, logprobs=2)
    lp = full.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 2
    assert lp.tokens[:len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert all(x <= 0 and math.isfinite(x) for x in lp.token_logprobs[1:])
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])] and lp.text_offset[len(ids)] == len(PROMPTS[0])
    # max_tokens 0: the prompt scored, nothing generated
    scored = _greedy(client, PROMPTS[0], max_tokens=0, echo=True, logprobs=2)
    assert scored.choices[0].text == PROMPTS[0] and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]
    assert scored.choices[0].finish_reason == "length"


def test_max_tokens_zero_without_echo_is_refused(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert json.loads(r.text)["error"]["type"] == "invalid_request_error"
