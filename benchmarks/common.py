"""Shared bits of the benchmarks: prompts, a table printer, the HF baseline loader."""
from __future__ import annotations

import time
from functools import cache
from pathlib import Path

import torch

from engine.tokenizer import render_chat

CHAT_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works, with an example in Python.",
    "What are the main causes of the French Revolution?",
    "Give me a recipe for a vegetarian lasagna.",
    "Describe the water cycle to a ten-year-old.",
]


def chat_prompt(tokenizer, text: str) -> str:
    """One user turn in the model's chat template, as the gateway renders it."""
    return render_chat(tokenizer, [{"role": "user", "content": text}])


@cache
def machine() -> str:
    """The CPU the figures came from. Library kernels pick their path by vector width (throughput.py's fp32
    row read 241 tok/s on an AVX-512 box against ~130 on the AVX2 ones), so only ratios measured in one run
    compare across machines."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    name = names[0] if names else "unknown CPU"
    return f"{name}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}\nmachine: {machine()}")
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
