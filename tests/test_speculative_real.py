"""Speculative decoding on the real default model: every proposer gives exactly the plain greedy tokens."""
from __future__ import annotations

import pytest

from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from engine.tokenizer import render_chat
from grammar import GrammarSpec

pytestmark = pytest.mark.slow

CHATS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain recursion to a child.",
    "List three uses of a paperclip.", "What is 17 times 3?", "Describe a sunset in two sentences.",
    "Give me a short motivational quote.", "What does HTTP stand for?", "Name four kinds of trees.",
    "Write a Python function that adds two numbers.", "Why do cats purr?", "Suggest a name for a robot dog.",
    "What is the largest planet?", "How do I boil an egg?", "Tell me a fun fact about octopuses.",
    "What is a noun?", "Summarize the story of Cinderella.", "Count from one to ten in French.",
    "What is the opposite of 'ancient'?", "Describe the color blue to someone who cannot see.",
]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engines():
    def make(method: str, loaded=None, max_batch: int = 32) -> LLMEngine:
        return LLMEngine(EngineConfig(model="smollm2", quantization="none", kv_cache_memory=256 << 20,
                                      speculative=method, speculative_max_batch=max_batch), loaded)

    base = make("none")
    return base, {"ngram": make("ngram", base.loaded), "eagle": make("eagle", base.loaded),
                  "eagle, drafting up to batch 4": make("eagle", base.loaded, max_batch=4)}


def _run(engine: LLMEngine, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    return [tokens[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("schema", [None, PERSON], ids=["chat", "json-schema"])
def test_greedy_output_is_identical_with_every_proposer(engines, schema):
    base, proposers = engines
    if schema is None:
        prompts = [render_chat(base.tokenizer, [{"role": "user", "content": c}]) for c in CHATS]
        params = SamplingParams(temperature=0, max_tokens=40)
    else:
        prompts = [render_chat(base.tokenizer, [{"role": "user", "content": f"{c} Answer as a person in JSON."}])
                   for c in CHATS]
        params = SamplingParams(temperature=0, max_tokens=40, structured_output=GrammarSpec.json_schema(PERSON))
    want = _run(base, prompts, params)
    for name, engine in proposers.items():
        before = engine.stats()
        assert _run(engine, prompts, params) == want, name
        after = engine.stats()
        if schema is None and name != "eagle, drafting up to batch 4":
            assert after.spec_draft_tokens > before.spec_draft_tokens, name  # drafts were really verified
        assert after.kv_blocks_used == 0, name
