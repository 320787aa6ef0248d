"""Speculative decoding on the real default model: every proposer gives exactly the plain greedy tokens."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
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
def llms():
    def make(method: str, max_batch: int = 32, **kw) -> LLM:
        return LLM("smollm2", quantization="none", kv_cache_memory=256 << 20, speculative=method,
                   speculative_max_batch=max_batch, **kw)

    return make("none"), {"ngram": make("ngram"), "eagle": make("eagle"),
                          "eagle, drafting up to batch 4": make("eagle", max_batch=4),
                          # a draft model that often agrees with the target, and sometimes not
                          "draft model (the target in int8)": make("draft", speculative_model="smollm2",
                                                                   speculative_quantization="int8")}


@pytest.mark.parametrize("schema", [None, PERSON], ids=["chat", "json-schema"])
def test_greedy_output_is_identical_with_every_proposer(llms, schema):
    base, proposers = llms
    if schema is None:
        chats = [[{"role": "user", "content": c}] for c in CHATS]
        params = SamplingParams(temperature=0, max_tokens=40)
    else:
        chats = [[{"role": "user", "content": f"{c} Answer as a person in JSON."}] for c in CHATS]
        params = SamplingParams(temperature=0, max_tokens=40, structured_output=GrammarSpec.json_schema(PERSON))
    want = [o.outputs[0].token_ids for o in base.chat(chats, params)]
    for name, llm in proposers.items():
        before = llm.engine.stats()
        assert [o.outputs[0].token_ids for o in llm.chat(chats, params)] == want, name
        after = llm.engine.stats()
        if schema is None and name != "eagle, drafting up to batch 4":
            assert after.spec_draft_tokens > before.spec_draft_tokens, name  # drafts were really verified
        assert after.kv_blocks_used == 0, name
