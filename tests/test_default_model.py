"""The real default model (SmolLM2-135M-Instruct): Sluice matches transformers token for token."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.default_model import SMOLLM2, ensure_default_model, gguf_path
from engine.loader import load_model
from tests.helpers import prompt_logits

pytestmark = pytest.mark.slow

CHATS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a linked list is in one paragraph.",
    "List three tips for better sleep.",
    "Translate 'good morning' into Spanish and German.",
]


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2", kv_cache_memory=256 << 20, block_size=16, quantization="none")


def test_greedy_chat_matches_transformers_generate(llm):
    from transformers import AutoModelForCausalLM

    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
               for c in CHATS]
    # all five in one continuous batch
    ours = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32))
    hf = AutoModelForCausalLM.from_pretrained(str(ensure_default_model()), dtype=torch.float32).eval()
    for prompt, out in zip(prompts, ours):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        assert out.prompt_token_ids == ids["input_ids"][0].tolist()
        with torch.inference_mode():
            ref = hf.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
        assert out.outputs[0].token_ids == ref[0, ids["input_ids"].shape[1]:].tolist()


def test_chat_answers_sensibly(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_gguf_file_and_converted_folder_give_the_same_logits():
    folder = ensure_default_model()
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182]
    from_folder = prompt_logits(load_model(str(folder)).model, ids)
    from_gguf = prompt_logits(load_model(str(gguf_path(SMOLLM2))).model, ids)
    torch.testing.assert_close(from_gguf, from_folder, atol=1e-5, rtol=0)
