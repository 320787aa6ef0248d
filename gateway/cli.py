"""`sluice` command line: generate, chat, serve, train-eagle."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Iterable, Iterator, NoReturn

from engine.config import DTYPES, GRAMMAR_BACKENDS, QUANTIZATIONS, SPECULATIVE_METHODS, EngineConfig
from engine.sampling_params import SamplingParams

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the usage of `generate` alone is 20 lines, burying the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except the uninformative None and a flag's False."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _size(text: str) -> int:
    """A positive byte count: 2G, 512M, 1.5GiB, 100T or plain bytes."""
    digits = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = _UNITS.get(digits[-1:], 1)
    try:
        value = float(digits[:-1] if scale > 1 else digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 2G, 512M or 1073741824") from None
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be at least one byte")
    return int(value)


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2", help="HF folder, .gguf file, or 'smollm2'")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights and activations; auto: fp32 on CPU, the checkpoint's dtype on GPU")
    g.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="CPU weight format of the linear layers. auto: the fastest that passes the "
                        "quality gate (gguf for GGUF checkpoints, else fp16); none: exact fp32; on GPU auto is "
                        "the model dtype")
    g.add_argument("--kv-cache-dtype", default="auto", choices=DTYPES,
                   help="KV cache element type; auto: fp16 on CPU with fp16 or gguf weights (as llama.cpp), "
                        "else the model's dtype")
    g.add_argument("--block-size", type=_positive, default=16, help="tokens per KV cache block")
    g.add_argument("--kv-cache-memory", type=_size, default=None,
                   help="KV cache budget, e.g. 2G or 512M (default: a quarter of free memory, at most 2G on CPU)")
    g.add_argument("--max-num-seqs", type=_positive, default=64, help="requests decoded at once")
    g.add_argument("--max-num-batched-tokens", type=_positive, default=1024, help="tokens per engine step")
    g.add_argument("--max-model-len", type=_positive, default=None,
                   help="context length, prompt + output (default: the model's)")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse the KV of shared prompt prefixes")
    g.add_argument("--speculative", default="none", choices=SPECULATIVE_METHODS,
                   help="speculative decoding: draft proposer (ngram = prompt lookup, eagle = draft head, "
                        "draft = a smaller model with the same tokenizer)")
    g.add_argument("--speculative-model", default=None,
                   help="eagle: the head's safetensors (default: the shipped one); draft: the draft model")
    g.add_argument("--speculative-quantization", default=None, choices=QUANTIZATIONS,
                   help="the draft model's CPU weight format (default: the target's)")
    g.add_argument("--num-speculative-tokens", type=_positive, default=4, help="drafts per request per step")
    g.add_argument("--speculative-min-draft-prob", type=float, default=0.5,
                   help="eagle, draft: stop drafting when the drafter's chance that its drafts get accepted "
                        "falls below this")
    g.add_argument("--speculative-max-batch", type=_positive, default=None,
                   help="no drafting when more requests than this decode in one step (default: 1 on CPU, 4 on GPU)")
    g.add_argument("--grammar-backend", default="llguidance", choices=GRAMMAR_BACKENDS,
                   help="structured output backend")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine options of a command's arguments (their dests are EngineConfig's field names); checks them."""
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    options = {name: value for name, value in vars(args).items() if name in fields}
    return EngineConfig(**options, enable_prefix_caching=not args.no_prefix_caching)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: 1 = off")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=None, help="make sampled output reproducible")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


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
    """The engine, with every mistake the machine or model can reveal named before the slow part, or right after."""
    from engine.llm_engine import LLMEngine
    from engine.loader import check_device, load_model

    config = engine_config(args)  # checks the values
    check_device(config.device, config.kv_cache_memory)
    return LLMEngine(config, load_model(config.model, config.device, config.dtype, config.quantization))


def _print_stream(deltas: Iterable[str]) -> str:
    """Write the deltas as they come (flushed: a pipe would buffer them), then a newline; the whole text."""
    text = []
    for delta in deltas:
        text.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # checked before the model loads
    engine = _load_engine(args)
    prompt = args.prompt
    if not args.raw and getattr(engine.tokenizer, "chat_template", None):
        from engine.tokenizer import render_chat

        prompt = render_chat(engine.tokenizer, [{"role": "user", "content": prompt}])
    _print_stream(stream(engine, "cli", prompt, params))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from engine.tokenizer import render_chat

    params = sampling_params(args)
    engine = _load_engine(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model; an empty line or Ctrl-D ends, /reset clears the history.", file=sys.stderr)
    for turn in range(1 << 30):
        try:
            line = input("> " if sys.stdout.isatty() else "").strip()  # piped, stdout carries the replies alone
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = _print_stream(stream(engine, f"chat-{turn}", render_chat(engine.tokenizer, history), params))
        except ValueError as exc:  # the history outgrew the context, say: that turn fails, not the session
            history.pop()
            print(f"sluice: error: {exc} (/reset clears the history)", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.async_engine import AsyncEngine
    from gateway.serve import ServeOptions, check_can_listen, serve

    if args.api_key is not None and not args.api_key.strip():  # or it would serve with no key at all
        raise ValueError("--api-key must not be empty (leave it out to serve without a key)")
    check_can_listen(args.host, args.port)  # a port in use fails now, not after the model has loaded
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
    p = sub.add_parser("train-eagle", help="train an EAGLE draft head for speculative decoding",
                       formatter_class=_HelpFormatter)
    p.add_argument("--model", default="smollm2", help="HF folder, .gguf file, or 'smollm2'")
    p.add_argument("--out", required=True, help="where to write the head (.safetensors)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--prompts", type=_positive, default=300, help="training prompts (of decoding/eagle_prompts.py)")
    p.add_argument("--heldout", type=_positive, default=40, help="held-out prompts, answered greedily and scored")
    p.add_argument("--self-written-prompts", type=int, default=0,
                   help="more training prompts, written by the model itself (plus --heldout held out)")
    p.add_argument("--init", default=None, help="fine-tune this head (.safetensors) instead of training a fresh one")
    p.add_argument("--samples-per-prompt", type=_positive, default=1, help="answers per training prompt")
    p.add_argument("--max-tokens", type=_positive, default=200, help="answer length")
    p.add_argument("--epochs", type=_positive, default=10, help="passes over the training answers")
    p.add_argument("--draft-vocab", type=_positive, default=8192, help="draft vocabulary: the most frequent tokens")
    p.add_argument("--num-speculative-tokens", type=_positive, default=4, help="k of the held-out acceptance report")
    p.add_argument("--depth", type=_positive, default=3, help="drafting steps unrolled in training")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    p.add_argument("--noise", type=float, default=0.02, help="input feature noise, relative to the features' RMS")
    p.add_argument("--feature-weight", type=float, default=1.0, help="weight of the SmoothL1 feature loss")
    p.add_argument("--greedy-fraction", type=float, default=1.0,
                   help="share of prompts whose first answer is greedy (the rest sampled at 0.7)")
    p.add_argument("--batch-tokens", type=_positive, default=8192, help="tokens per training batch")
    p.add_argument("--max-num-seqs", type=_positive, default=64, help="answers generated at once")
    p.add_argument("--generate-seconds", type=float, default=None, help="start no training answers after this")
    p.add_argument("--seed", type=int, default=0, help="random seed of sampling and training")
    p.set_defaults(func=cmd_train_eagle)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sluice", description="Sluice: serve and run LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)

    gen = command("generate", "generate a completion and stream it to the terminal")
    gen.add_argument("prompt", help="the user message (with --raw: the text to continue)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    chat = command("chat", "interactive chat in the terminal")
    chat.add_argument("--system", default=None, help="system prompt")
    for p, fn in ((gen, cmd_generate), (chat, cmd_chat)):
        add_engine_args(p)
        add_sampling_args(p)
        p.set_defaults(func=fn)
    srv = command("serve", "serve an OpenAI-compatible HTTP API")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on")
    srv.add_argument("--api-key", default=None, help="require this Bearer key (or set SLUICE_API_KEY)")
    srv.add_argument("--max-concurrent-requests", type=_positive, default=256,
                     help="generation requests open at once; more get HTTP 429")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                     help="server log detail")
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
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the exit's flush fails again
        return 141
    except (ValueError, RuntimeError, OSError) as exc:
        # One line however the message came: some libraries' errors span several.
        print(f"sluice: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
