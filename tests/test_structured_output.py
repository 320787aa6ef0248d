"""Structured output through the engine on a tiny model: valid outputs, batch independence, jump-forward,
speculative drafts and preemption with grammars, and the gateway's request fields and errors."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from engine import LLM, SamplingParams
from grammar import GrammarError, GrammarSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["fox", "dog", "cat"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["The quick brown fox", "Paged attention stores", "def add(a, b):", "Continuous"]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), num_kv_blocks=256, block_size=4, quantization="none")


def _json(schema=SCHEMA, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 200)
    return SamplingParams(structured_output=GrammarSpec.json_schema(schema), **kw)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_follow_the_schema(llm, temperature):
    outs = llm.generate(PROMPTS, _json(temperature=temperature, seed=1))
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert llm.engine.stats().kv_blocks_used == 0


def test_regex_choice_and_n(llm):
    out = llm.generate(["Call me at"], SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=30,
                                                      structured_output=GrammarSpec.regex(r"[0-9]{3}-[0-9]{4}")))[0]
    assert len(out.outputs) == 3 and all(re.fullmatch(r"[0-9]{3}-[0-9]{4}", c.text) for c in out.outputs)
    choices = ["alpha", "beta", "gamma delta"]
    out = llm.generate(["Pick:"], SamplingParams(temperature=1.0, seed=4, n=4, max_tokens=30,
                                                 structured_output=GrammarSpec.choice(choices)))[0]
    assert all(c.text in choices for c in out.outputs)


def test_unconstrained_neighbours_are_untouched(llm):
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain)]
    mixed = llm.generate(PROMPTS * 2, [plain] * 4 + [_json(temperature=0)] * 4)
    assert [o.outputs[0].token_ids for o in mixed[:4]] == alone
    for o in mixed[4:]:
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)


def test_jump_forward_gives_the_same_greedy_output(llm):
    on = llm.generate(PROMPTS, _json(temperature=0))
    off = llm.generate(PROMPTS, _json(temperature=0, jump_forward=False))
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]


def test_grammar_with_speculative_drafts_and_preemption(tiny_llama_dir, llm):
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _json(temperature=0, max_tokens=60))]
    spec = LLM(str(tiny_llama_dir), num_kv_blocks=256, block_size=4, quantization="none", speculative="ngram",
               num_speculative_tokens=3, speculative_max_batch=8)
    assert [o.outputs[0].token_ids for o in spec.generate(PROMPTS, _json(temperature=0, max_tokens=60))] == want
    # a pool too small for all four at once: requests are preempted and recomputed, matchers keep their state
    small = LLM(str(tiny_llama_dir), num_kv_blocks=40, block_size=4, quantization="none")
    assert [o.outputs[0].token_ids for o in small.generate(PROMPTS, _json(temperature=0, max_tokens=60))] == want
    assert small.engine.stats().num_preempted_total > 0


def test_bad_specs_are_refused_before_queueing(llm):
    for spec in (GrammarSpec.regex("(unclosed"), GrammarSpec.lark("start: nothing_defined")):
        with pytest.raises(GrammarError):
            llm.generate(["x"], SamplingParams(structured_output=spec))
    with pytest.raises(GrammarError):
        GrammarSpec.json_schema("{not json")
    assert not llm.engine.has_unfinished_requests()


# ---- gateway ----

@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig
    from tests.server import Server

    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=512, block_size=4,
                                                  quantization="none", grammar_timeout_s=2.0))
    with Server(engine) as srv:
        yield srv


def _chat(server, **body) -> httpx.Response:
    from tests.server import AUTH, MODEL

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, **body}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
    {"guided_json": SCHEMA},
    {"structured_outputs": {"json": SCHEMA}},
], ids=["response_format", "guided_json", "structured_outputs"])
def test_gateway_json_schema_fields(server, fields):
    r = _chat(server, temperature=1.0, seed=5, **fields)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SCHEMA)


def test_gateway_choice_regex_json_object(server):
    r = _chat(server, guided_choice=["red", "green"], temperature=1.0)
    assert r.json()["choices"][0]["message"]["content"] in ("red", "green")
    r = _chat(server, guided_regex="[a-c]{2,4}", temperature=1.0)
    assert re.fullmatch("[a-c]{2,4}", r.json()["choices"][0]["message"]["content"])
    r = _chat(server, response_format={"type": "json_object"}, temperature=0, max_tokens=400)
    assert r.status_code == 200
    body = r.json()["choices"][0]
    if body["finish_reason"] == "stop":
        assert isinstance(json.loads(body["message"]["content"]), dict)


@pytest.mark.parametrize("fields,param", [
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "guided_json"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),
])
def test_gateway_bad_constraints_are_400(server, fields, param):
    r = _chat(server, **fields)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
