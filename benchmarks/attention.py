"""Paged-attention kernels on one device: the torch implementation against the Triton kernels.

    python benchmarks/attention.py [--device cuda] [--dtype bfloat16]

Shapes are the default model's (9 query heads, 3 KV heads, head_dim 64, 16-token blocks), one layer.
Decode: B requests with one new row each over contexts of L tokens (lengths jittered, so padding and
masking are exercised). Prefill: B prompts of L tokens, and L/4 new rows over a cached 3L/4 prefix.
On CPU only the torch implementation runs (Triton needs a GPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_table  # noqa: E402
from kernels import paged_attention, write_kv  # noqa: E402
from kernels.random_case import random_paged_case  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def bench(fn: Callable[[], object], device: str, iters: int = 20) -> float:
    """Median milliseconds per call."""
    fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    args = ap.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    backends = {"torch": (write_kv, paged_attention)}
    if device == "cuda":
        from kernels.triton_attention import triton_paged_attention, triton_write_kv

        backends["triton"] = (triton_write_kv, triton_paged_attention)
    cases = []
    for b, ctx in ((1, 512), (32, 512), (32, 2048), (128, 1024)):
        lens = [max(1, ctx - (i * 37) % (ctx // 2)) for i in range(b)]
        cases.append((f"decode B={b} ctx~{ctx}", lens, [1] * b))
    for b, n in ((1, 512), (4, 1024)):
        cases.append((f"prefill B={b} L={n}", [n] * b, [n] * b))
        cases.append((f"prefill B={b} L={n}, 3/4 cached", [n] * b, [n // 4] * b))
    rows = []
    for name, seq_lens, q_lens in cases:
        case = random_paged_case(seq_lens, q_lens, HEADS, KV_HEADS, HEAD_DIM, BLOCK, device, dtype, spare_blocks=8)
        q, kv, k_cache, v_cache, meta = case.q, case.kv, case.k_cache, case.v_cache, case.meta
        timings = {}
        for label, (write, attend) in backends.items():
            timings[label] = (bench(lambda: write(kv, kv, k_cache, v_cache, meta.slot_mapping), device),
                              bench(lambda: attend(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5), device))
        row = [name, timings["torch"][0], timings["torch"][1]]
        if "triton" in timings:
            row += [timings["triton"][0], timings["triton"][1], timings["torch"][1] / timings["triton"][1]]
        rows.append(row)
    header = ["case", "torch write ms", "torch attn ms"]
    if "triton" in backends:
        header += ["triton write ms", "triton attn ms", "attn speed-up"]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print_table(f"paged attention, one layer, {HEADS}/{KV_HEADS} heads x {HEAD_DIM}, block {BLOCK}, "
                f"{str(dtype).removeprefix('torch.')}, {name}", header, rows)


if __name__ == "__main__":
    main()
