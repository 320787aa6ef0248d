"""`sluice` command line: generate, chat, serve."""
from __future__ import annotations

import argparse
import sys
from typing import Iterator

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2", help="HF folder, .gguf file, or 'smollm2' (default)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="auto", help="auto (fp32 on CPU), fp32, bf16, fp16")
    g.add_argument("--quantization", default="auto", choices=["auto", "none", "fp16", "int8"],
                   help="CPU weight format of the linear layers. auto: the fastest that passes the "
                        "quality gate (fp16 today); none: exact fp32; on GPU auto is the model dtype")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", type=_size, default=None, help="KV cache budget, e.g. 2G or 512M")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=1024)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--speculative", default="none", choices=["none", "ngram", "eagle", "draft"],
                   help="speculative decoding: draft proposer (ngram = prompt lookup, eagle = draft head, "
                        "draft = a smaller model with the same tokenizer)")
    g.add_argument("--speculative-model", default=None,
                   help="eagle: the head's safetensors (default: the shipped one); draft: the draft model")
    g.add_argument("--speculative-quantization", default=None, choices=["auto", "none", "fp16", "int8"],
                   help="the draft model's CPU weight format (default: the target's)")
    g.add_argument("--num-speculative-tokens", type=int, default=4, help="drafts per request per step")
    g.add_argument("--speculative-min-draft-prob", type=float, default=0.5,
                   help="eagle, draft: stop drafting when the drafter's chance that its drafts get accepted "
                        "falls below this")
    g.add_argument("--speculative-max-batch", type=int, default=None,
                   help="no drafting when more requests than this decode in one step (default: 1 on CPU, 4 on GPU)")
    g.add_argument("--grammar-backend", default="llguidance", choices=["llguidance", "outlines"],
                   help="structured output backend")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
                        block_size=args.block_size,
                        kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                        enable_prefix_caching=not args.no_prefix_caching,
                        speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                        speculative_min_draft_prob=args.speculative_min_draft_prob,
                        speculative_max_batch=args.speculative_max_batch,
                        speculative_model=args.speculative_model,
                        speculative_quantization=args.speculative_quantization, grammar_backend=args.grammar_backend)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def stream(engine, request_id: str, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Text deltas of one request, stepping the engine until it finishes."""
    engine.add_request(request_id, prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != request_id:
                continue
            if out.error:
                raise RuntimeError(out.error)
            yield out.outputs[0].delta_text
            if out.finished:
                return


def _load_engine(args: argparse.Namespace):
    from engine.llm_engine import LLMEngine

    return LLMEngine(engine_config(args))


def cmd_generate(args: argparse.Namespace) -> int:
    engine = _load_engine(args)
    prompt = args.prompt
    if not args.raw and getattr(engine.tokenizer, "chat_template", None):
        from engine.tokenizer import render_chat

        prompt = render_chat(engine.tokenizer, [{"role": "user", "content": prompt}])
    for delta in stream(engine, "cli", prompt, sampling_params(args)):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from engine.tokenizer import render_chat

    engine = _load_engine(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model; an empty line or Ctrl-D ends, /reset clears the history.", file=sys.stderr)
    for turn in range(1 << 30):
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        reply = []
        for delta in stream(engine, f"chat-{turn}", render_chat(engine.tokenizer, history), sampling_params(args)):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from engine.async_engine import AsyncEngine
    from gateway.serve import ServeOptions, serve

    # The key can come from the environment so it stays out of `ps` output.
    api_key = args.api_key or os.environ.get("SLUICE_API_KEY") or None
    serve(AsyncEngine(_load_engine(args)), args.model,
          ServeOptions(host=args.host, port=args.port, api_key=api_key, log_level=args.log_level,
                       max_in_flight=args.max_concurrent_requests))
    return 0


def cmd_train_eagle(args: argparse.Namespace) -> int:
    from pathlib import Path

    from decoding.eagle_train import TrainConfig, train_eagle

    cfg = TrainConfig(model=args.model, out=Path(args.out), device=args.device, num_prompts=args.prompts,
                      heldout_prompts=args.heldout, samples_per_prompt=args.samples_per_prompt,
                      max_tokens=args.max_tokens, epochs=args.epochs, draft_vocab_size=args.draft_vocab,
                      num_speculative_tokens=args.num_speculative_tokens, depth=args.depth, lr=args.lr,
                      batch_tokens=args.batch_tokens, max_num_seqs=args.max_num_seqs,
                      generate_seconds=args.generate_seconds, greedy_fraction=args.greedy_fraction,
                      noise=args.noise, feature_weight=args.feature_weight, seed=args.seed,
                      self_written_prompts=args.self_written_prompts, init=Path(args.init) if args.init else None)
    result = train_eagle(cfg)
    acc = result.acceptance
    print(f"saved {result.path}")
    print(f"held-out greedy chain drafting, k={cfg.num_speculative_tokens}: mean accepted length "
          f"{acc.mean_accepted_length:.3f} over {acc.steps} steps; per-draft acceptance "
          + ", ".join(f"{r:.2f}" for r in acc.rates))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()))
    return 0


def add_train_eagle_parser(sub) -> None:
    p = sub.add_parser("train-eagle", help="train an EAGLE draft head for speculative decoding")
    p.add_argument("--model", default="smollm2", help="HF folder, .gguf file, or 'smollm2' (default)")
    p.add_argument("--out", required=True, help="where to write the head (.safetensors)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--prompts", type=int, default=300, help="training prompts (of decoding/eagle_prompts.py)")
    p.add_argument("--heldout", type=int, default=40, help="held-out prompts, answered greedily and scored")
    p.add_argument("--self-written-prompts", type=int, default=0,
                   help="more training prompts, written by the model itself (plus --heldout held out)")
    p.add_argument("--init", default=None, help="fine-tune this head (.safetensors) instead of training a fresh one")
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=200, help="answer length")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary: the most frequent tokens")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="k of the held-out acceptance report")
    p.add_argument("--depth", type=int, default=3, help="drafting steps unrolled in training")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--noise", type=float, default=0.02, help="input feature noise, relative to the features' RMS")
    p.add_argument("--feature-weight", type=float, default=1.0, help="weight of the SmoothL1 feature loss")
    p.add_argument("--greedy-fraction", type=float, default=1.0,
                   help="share of prompts whose first answer is greedy (the rest sampled at 0.7)")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=64, help="answers generated at once")
    p.add_argument("--generate-seconds", type=float, default=None, help="start no training answers after this")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_eagle)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice: serve and run LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion and stream it to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    chat.add_argument("--system", default=None, help="system prompt")
    for p, fn in ((gen, cmd_generate), (chat, cmd_chat)):
        add_engine_args(p)
        add_sampling_args(p)
        p.set_defaults(func=fn)
    srv = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require this Bearer key (or set SLUICE_API_KEY)")
    srv.add_argument("--max-concurrent-requests", type=int, default=256,
                     help="generation requests open at once; more get HTTP 429")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(srv)
    srv.set_defaults(func=cmd_serve)
    add_train_eagle_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"sluice: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
