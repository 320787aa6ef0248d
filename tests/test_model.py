"""Sluice's model, loaded by Sluice's loader, computes what transformers computes, through the paged cache."""
from __future__ import annotations

import pytest
import torch

from engine.loader import load_model
from engine.model_runner import ModelRunner
from kernels import cpu_attention, cpu_ops
from tests.helpers import scheduled, step_logits

BLOCK_SIZE = 4  # smaller than the prompts, so every request spans several blocks


def _hf_logits(folder, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("kernels", ["c", "torch"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_and_decode_match_transformers(arch, kernels, tiny_llama_dir, tiny_qwen2_dir, monkeypatch):
    if kernels == "torch":  # the paths GPUs and machines without a C compiler take
        monkeypatch.setattr(cpu_ops, "_library", lambda: None)
        monkeypatch.setattr(cpu_attention, "_library", lambda: None)
    folder = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    loaded = load_model(str(folder))
    assert loaded.config.attention_bias == (arch == "qwen2")
    ids = torch.randint(3, loaded.config.vocab_size, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = _hf_logits(folder, ids)

    # whole prompt at once, blocks deliberately out of order
    runner = ModelRunner(loaded.model, num_blocks=32, block_size=BLOCK_SIZE)
    blocks = [7, 3, 20, 1, 9, 14, 2, 30, 5, 11]
    whole = step_logits(runner, [scheduled("a", ids, 0, blocks)])
    torch.testing.assert_close(whole, ref, atol=1e-4, rtol=0)

    # token by token through a fresh cache
    runner = ModelRunner(loaded.model, num_blocks=32, block_size=BLOCK_SIZE)
    steps = [step_logits(runner, [scheduled("b", [t], pos, blocks)]) for pos, t in enumerate(ids)]
    torch.testing.assert_close(torch.cat(steps), ref, atol=1e-4, rtol=0)


def test_mixed_batch_prefill_chunk_and_decodes(tiny_llama_dir):
    """One step holding a prompt chunk over a cached prefix and two decodes of different lengths."""
    loaded = load_model(str(tiny_llama_dir))
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, loaded.config.vocab_size, (n,), generator=gen).tolist() for n in (23, 9, 14)]
    refs = [_hf_logits(tiny_llama_dir, s) for s in seqs]
    runner = ModelRunner(loaded.model, num_blocks=64, block_size=BLOCK_SIZE)
    tables = [list(range(0, 8)), list(range(20, 24)), list(range(40, 45))]
    # fill: first 10 tokens of seq 0, all but the last token of seqs 1 and 2
    step_logits(runner, [scheduled("0", seqs[0][:10], 0, tables[0]), scheduled("1", seqs[1][:-1], 0, tables[1]),
                     scheduled("2", seqs[2][:-1], 0, tables[2])])
    out = step_logits(runner, [scheduled("0", seqs[0][10:], 10, tables[0]), scheduled("1", seqs[1][-1:], 8, tables[1]),
                           scheduled("2", seqs[2][-1:], 13, tables[2])])
    torch.testing.assert_close(out[:13], refs[0][10:], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[13], refs[1][-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[14], refs[2][-1], atol=1e-4, rtol=0)


def test_batched_decode_matches_transformers(tiny_qwen2_dir):
    loaded = load_model(str(tiny_qwen2_dir))
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, loaded.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 17, 30)]
    runner = ModelRunner(loaded.model, num_blocks=64, block_size=BLOCK_SIZE)
    tables = [[60, 61], [10, 2, 33, 4, 50], [20, 21, 22, 23, 24, 25, 26, 27]]
    step_logits(runner, [scheduled(str(i), s[:-1], 0, t) for i, (s, t) in enumerate(zip(seqs, tables))])
    out = step_logits(runner, [scheduled(str(i), s[-1:], len(s) - 1, t) for i, (s, t) in enumerate(zip(seqs, tables))])
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[i], _hf_logits(tiny_qwen2_dir, s)[-1], atol=1e-4, rtol=0)
