"""Batch-1 decode speed: Sluice vs Hugging Face `generate`, same model, prompts and machine, one run.

    python benchmarks/decode.py [--model smollm2] [--tokens 128] [--prompts 3] [--rounds 3]

The gguf row needs a model stored as a Q4_1 / Q8_0 GGUF (the default model is).

Decode tokens/s excludes the prompt: (new tokens - 1) / (time to all tokens - time to the first).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import CHAT_PROMPTS, Timer, chat_prompt, print_table  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402


def bench_sluice(llm: LLM, prompts: list[str], n_tokens: int) -> float:
    first = SamplingParams(temperature=0, max_tokens=1)
    full = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
    llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    rates = []
    for p in prompts:
        with Timer() as t1:
            llm.generate([p], first)
        with Timer() as tn:
            out = llm.generate([p], full)[0]
        assert len(out.outputs[0].token_ids) == n_tokens
        rates.append((n_tokens - 1) / (tn.seconds - t1.seconds))
    return sum(rates) / len(rates)


def bench_hf(folder: str, tokenizer, prompts: list[str], n_tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    def run(p: str, n: int) -> None:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        assert out.shape[1] - ids["input_ids"].shape[1] == n
    run(prompts[0], 8)  # warm-up
    rates = []
    for p in prompts:
        with Timer() as t1:
            run(p, 1)
        with Timer() as tn:
            run(p, n_tokens)
        rates.append((n_tokens - 1) / (tn.seconds - t1.seconds))
    return sum(rates) / len(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per format (best kept)")
    args = ap.parse_args()
    # All formats loaded at once and timed in interleaved rounds, best kept: the machine is shared
    # and noisy, and a slow minute must not land on one format only.
    llms = {}
    for quantization in ("none", "fp16", "gguf", "int8"):
        # no prefix caching: the timed runs repeat prompts, and both must pay the same prefill
        llms[quantization] = LLM(args.model, max_num_seqs=8, kv_cache_memory=256 << 20,
                                 enable_prefix_caching=False, quantization=quantization)
    tokenizer = llms["none"].get_tokenizer()
    prompts = [chat_prompt(tokenizer, p) for p in CHAT_PROMPTS[:args.prompts]]
    results = {q: 0.0 for q in llms}
    for _ in range(args.rounds):
        for quantization, llm in llms.items():
            results[quantization] = max(results[quantization], bench_sluice(llm, prompts, args.tokens))
    folder = str(llms["none"].engine.loaded.source.path)
    del llms
    hf = bench_hf(folder, tokenizer, prompts, args.tokens)
    fp32, fp16, gguf, int8 = results["none"], results["fp16"], results["gguf"], results["int8"]
    print_table(f"batch-1 greedy decode, {args.tokens} tokens x {len(prompts)} prompts, "
                f"{torch.get_num_threads()} threads",
                ["engine", "decode tok/s", "vs transformers", "vs sluice fp32"],
                [["transformers generate (fp32)", hf, 1.0, hf / fp32],
                 ["sluice fp32 (exact)", fp32, fp32 / hf, 1.0],
                 ["sluice fp16 weights", fp16, fp16 / hf, fp16 / fp32],
                 ["sluice gguf (CPU default for GGUFs)", gguf, gguf / hf, gguf / fp32],
                 ["sluice int8 (fails quality gate)", int8, int8 / hf, int8 / fp32]])


if __name__ == "__main__":
    main()
