"""Speculative decoding: decode tokens/s with each proposer and without, chat and JSON-schema prompts, one run.

    python benchmarks/spec.py [--tokens 128] [--quantization auto] [--batches 1 8 16] [--rounds 3]
                              [--draft-model smollm2 --draft-quantization int8]   # adds a draft-model column

Greedy, so every proposer must give exactly the plain engine's tokens (checked). Batch B runs B prompts
at once; tokens/s counts output tokens over the whole batch's wall time after a warm-up, best of
--rounds runs taken in turns (plain, then each proposer), as this machine's speed drifts by 20% over
minutes. Speculation switches itself off above --speculative-max-batch requests, which the batch-16 row shows.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import CHAT_PROMPTS, chat_prompt, print_table  # noqa: E402
from engine import EngineConfig, SamplingParams  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from grammar import GrammarSpec  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                   "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                   "employed": {"type": "boolean"}},
    "required": ["name", "age", "city", "hobbies", "employed"], "additionalProperties": False,
}
JSON_PROMPTS = [f"Invent a person who lives in {c} and describe them as JSON." for c in
                ("Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Seoul", "Quito")]


def run(engine: LLMEngine, prompts: list[str], params: SamplingParams) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    seconds = time.perf_counter() - start
    ids = [tokens[str(i)] for i in range(len(prompts))]
    return sum(len(t) for t in ids) / seconds, ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--proposers", nargs="+", default=["ngram", "eagle"])
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--speculative-max-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draft-model", default=None, help="a draft model for --speculative draft (adds it)")
    ap.add_argument("--draft-quantization", default=None, help="the draft model's weight format")
    args = ap.parse_args()
    if args.draft_model and "draft" not in args.proposers:
        args.proposers.append("draft")

    def engine(method: str, loaded=None) -> LLMEngine:
        return LLMEngine(EngineConfig(model=args.model, quantization=args.quantization, kv_cache_memory=512 << 20,
                                      enable_prefix_caching=False, speculative=method,
                                      num_speculative_tokens=args.num_speculative_tokens,
                                      speculative_max_batch=args.speculative_max_batch,
                                      speculative_model=args.draft_model if method == "draft" else None,
                                      speculative_quantization=args.draft_quantization), loaded)

    base = engine("none")
    engines = {"none": base}
    for method in args.proposers:
        try:
            engines[method] = engine(method, base.loaded)
        except (FileNotFoundError, ImportError, ValueError) as exc:
            print(f"skipping {method}: {exc}")
    tok = base.tokenizer
    chat = [chat_prompt(tok, p) for p in CHAT_PROMPTS]
    js = [chat_prompt(tok, p) for p in JSON_PROMPTS]
    workloads = {
        "chat": (chat, SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)),
        "json": (js, SamplingParams(temperature=0, max_tokens=args.tokens,
                                    structured_output=GrammarSpec.json_schema(PERSON))),
    }
    for eng in engines.values():  # warm-up: first-use costs (grammar vocabulary, allocator) off the clock
        run(eng, chat[:1], SamplingParams(temperature=0, max_tokens=8))
        run(eng, js[:1], workloads["json"][1])
    rows = []
    for name, (prompts, params) in workloads.items():
        for batch in args.batches:
            batch_prompts = (prompts * batch)[:batch]
            before = {m: e.stats() for m, e in engines.items()}
            best = dict.fromkeys(engines, 0.0)
            want = None
            for _ in range(args.rounds):
                for method, eng in engines.items():
                    rate, got = run(eng, batch_prompts, params)
                    want = want or got
                    assert got == want, f"{method} changed the greedy output"
                    best[method] = max(best[method], rate)
            row = [name, batch, best["none"]]
            for method, eng in engines.items():
                if method == "none":
                    continue
                after = eng.stats()
                steps = after.spec_verify_steps - before[method].spec_verify_steps
                accepted = after.spec_accepted_tokens - before[method].spec_accepted_tokens
                # "-": no drafts were verified (batch above the drafting limit, or no draft confident enough)
                row += [best[method], best[method] / best["none"], 1 + accepted / steps if steps else "-"]
            rows.append(row)
    header = ["prompts", "batch", "plain tok/s"]
    for method in engines:
        if method != "none":
            header += [f"{method} tok/s", f"{method} speed-up", f"{method} accepted len"]
    stats = {m: e.stats() for m, e in engines.items() if m != "none"}
    print_table(f"greedy decode, {args.tokens} max tokens, linears {base.loaded.quantization}, "
                f"k={args.num_speculative_tokens}, drafting up to batch {args.speculative_max_batch}, "
                f"{torch.get_num_threads()} threads", header, rows)
    for method, s in stats.items():
        by_pos = ", ".join(f"{r:.2f}" for r in s.spec_acceptance_by_position)
        print(f"{method}: acceptance by draft position [{by_pos}], drafting {100 * s.spec_draft_time_share:.1f}% "
              f"of step time, mean accepted length {s.spec_mean_accepted_length:.2f}")


if __name__ == "__main__":
    main()
