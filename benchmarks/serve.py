"""Load generator for any OpenAI-compatible server (Sluice, llama.cpp's server, vLLM).

    python benchmarks/serve.py --url http://127.0.0.1:8000 --concurrency 32 --requests 64 --max-tokens 128
    python benchmarks/serve.py --url ... --rate 2.0 --requests 64       # open loop, Poisson arrivals
    python benchmarks/serve.py --gateway-cost [--quantization auto]    # Sluice: gateway vs offline engine

--gateway-cost starts `sluice serve` on a free port and an offline AsyncEngine in this process, runs the load
through HTTP and the same requests (same prompts, chat template, max_tokens, concurrency) through the offline
engine, alternating for --rounds rounds, and prints both with the gateway's cost in output tokens/s (the median
over the paired rounds).

Streams chat completions and times every chunk: TTFT, time per output token (after the first),
inter-token latency, request and output-token throughput. Output tokens come from the server's
usage (stream_options.include_usage) when it reports them, otherwise one per content chunk.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import aiohttp
import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import CHAT_PROMPTS, chat_prompt, print_table  # noqa: E402


@dataclass
class Result:
    start: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def tpot(self) -> float:
        return (self.chunk_times[-1] - self.chunk_times[0]) / max(1, self.tokens - 1)


async def one_request(session: aiohttp.ClientSession, args, prompt: str) -> Result:
    body = {"model": args.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True  # vLLM / Sluice / llama.cpp extension: fixed-length outputs
    res = Result(time.perf_counter())
    chunks = 0
    try:
        async with session.post("/v1/chat/completions", json=body) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return res
            async for raw in r.content:  # one line per iteration
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    res.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        res.chunk_times.append(time.perf_counter())
                        chunks += 1
    except aiohttp.ClientError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.tokens = res.tokens or chunks
    return res


async def run(args) -> tuple[list[Result], float]:
    # aiohttp, as vLLM's benchmark uses: on a 2-core box the load generator shares the CPU with the server,
    # and httpx spent ~3x the server's event-loop time per streamed token (its per-chunk Python layers).
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # A connection per request: llama.cpp's server closes idle keep-alive connections after a few seconds,
    # and a request written to one it has just closed fails ("Can not write request body").
    connector = aiohttp.TCPConnector(limit=max(args.concurrency, 1) + 8, force_close=True)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(args.url, headers=headers, connector=connector, timeout=timeout) as session:
        return await drive(args, lambda p: one_request(session, args, p))


async def drive(args, send) -> tuple[list[Result], float]:
    """The load: `send(prompt)` per request, closed loop with C workers or open loop at a Poisson rate."""
    rng = random.Random(0)
    prompts = [rng.choice(CHAT_PROMPTS) for _ in range(args.requests)]
    await send(prompts[0])  # warm-up, off the clock
    start = time.perf_counter()
    if args.rate:  # open loop: arrivals do not wait for completions
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(send(p)))
            await asyncio.sleep(rng.expovariate(args.rate))
        results = await asyncio.gather(*tasks)
    else:  # closed loop: C workers, each sends its next request when the last one ends
        queue = list(prompts)
        results = []

        async def worker():
            while queue:
                results.append(await send(queue.pop()))
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return results, time.perf_counter() - start


async def one_offline(engine, args, prompt: str) -> Result:
    from engine import SamplingParams

    text = chat_prompt(engine.engine.tokenizer, prompt)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    res = Result(time.perf_counter())
    async for out in engine.generate(text, params):
        if out.outputs[0].delta_text:  # as the gateway sends a content chunk
            res.chunk_times.append(time.perf_counter())
        res.tokens = len(out.outputs[0].token_ids)
    return res


async def gateway_rounds(args) -> list[tuple[float, float]]:
    """(served, offline) output tokens/s per round: the same load through `sluice serve` at args.url and through
    an AsyncEngine in this process, both loaded for the whole run, in alternating order. This box swings
    between fast and slow phases (a 32-stream step takes ~60 or ~80 ms for minutes at a time), so one
    served run against one offline run read anywhere from +2% to +15%; paired rounds cancel most of that."""
    from engine import EngineConfig
    from engine.async_engine import AsyncEngine

    config = EngineConfig(model=args.model, quantization=args.quantization, max_num_seqs=max(args.concurrency, 1))
    pairs = []
    async with AsyncEngine.from_config(config) as engine:
        for r in range(args.rounds):
            runs = {}
            for how in (("served", "offline") if r % 2 == 0 else ("offline", "served")):
                results = await (run(args) if how == "served" else
                                 drive(args, lambda p: one_offline(engine, args, p)))
                runs[how] = report(f"round {r + 1}, {'sluice serve' if how == 'served' else 'offline AsyncEngine'}",
                                   args, *results)
            pairs.append((runs["served"], runs["offline"]))
    return pairs


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s (Poisson); 0 = closed loop")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    ap.add_argument("--gateway-cost", action="store_true",
                    help="start `sluice serve`, then run the same load offline, and compare")
    ap.add_argument("--quantization", default="auto", help="with --gateway-cost: Sluice's weight format")
    ap.add_argument("--rounds", type=int, default=3, help="with --gateway-cost: paired served / offline rounds")
    args = ap.parse_args()
    if not args.gateway_cost:
        report(args.url, args, *asyncio.run(run(args)))
        return
    with sluice_server(args) as url:
        args.url = url
        pairs = asyncio.run(gateway_rounds(args))
    costs = [1 - served / offline for served, offline in pairs]
    print("\n" + "\n".join(f"round {r + 1}: served {served:.1f}, offline {offline:.1f} output tokens/s, gateway cost "
                            f"{100 * c:+.1f}%" for r, ((served, offline), c) in enumerate(zip(pairs, costs))))
    print(f"gateway cost: {100 * statistics.median(costs):+.1f}% output tokens/s (median of {len(pairs)} paired "
          f"rounds; served {statistics.median(p[0] for p in pairs):.1f}, offline "
          f"{statistics.median(p[1] for p in pairs):.1f})")


def report(where: str, args, results: list[Result], seconds: float) -> float:
    """Print the latency table; return output tokens/s."""
    ok = [r for r in results if r.error is None and r.chunk_times]
    for r in results:
        if r.error:
            print("error:", r.error, file=sys.stderr)
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tokens = sum(r.tokens for r in ok)
    mode = f"Poisson {args.rate}/s" if args.rate else f"closed loop, {args.concurrency} streams"
    print_table(f"{where}: {len(ok)}/{len(results)} ok, {mode}, max_tokens {args.max_tokens}",
                ["metric", "p50", "p90", "p99"],
                [["TTFT s", pct([r.ttft for r in ok], .5), pct([r.ttft for r in ok], .9), pct([r.ttft for r in ok], .99)],
                 ["TPOT ms", *(1e3 * pct([r.tpot for r in ok], q) for q in (.5, .9, .99))],
                 ["ITL ms", *(1e3 * pct(itl, q) for q in (.5, .9, .99))]])
    print(f"\nrequests/s {len(ok) / seconds:.2f}   output tokens/s {tokens / seconds:.1f}   ({seconds:.1f} s)")
    return tokens / seconds


@contextlib.contextmanager
def sluice_server(args) -> Iterator[str]:
    """`sluice serve` on a free loopback port, until the block ends (SIGTERM, as a user would stop it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--model", args.model, "--port", str(port),
           "--quantization", args.quantization, "--max-num-seqs", str(max(args.concurrency, 1))]
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sluice serve exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("sluice serve did not come up in 300 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
