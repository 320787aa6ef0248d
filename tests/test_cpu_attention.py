"""The compiled CPU decode kernel computes what the torch path computes, and Sluice runs without it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import cpu_attention
from kernels.paged_attention import AttentionMetadata, _decode, _prefill_one, paged_attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler: the torch path is used")


def _case(seq_lens, q_lens, heads=4, kv_heads=2, head_dim=16, block_size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + 3
    ids = torch.randperm(num_blocks, generator=gen)  # blocks out of order, as after frees
    tables = torch.zeros(len(seq_lens), max(need), dtype=torch.int64)
    first = 0
    for i, n in enumerate(need):
        tables[i, :n] = ids[first:first + n]
        first += n
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(torch.zeros(starts[-1], dtype=torch.int64), tables, torch.tensor(seq_lens), starts,
                             list(seq_lens), block_size)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    q = torch.randn(starts[-1], heads, head_dim, generator=gen)
    return q, k, v, meta


@pytest.mark.parametrize("seq_lens,kw", [
    ([5, 17, 1, 8, 12], {}),
    ([33, 1, 16, 70], dict(block_size=16, head_dim=64, heads=9, kv_heads=3)),  # the default model's heads
    ([9, 4], dict(heads=4, kv_heads=4)),
    ([9, 21], dict(heads=8, kv_heads=1, head_dim=24)),
    ([7, 3, 10], dict(block_size=3)),
    ([300], dict(block_size=16, head_dim=64, heads=9, kv_heads=3)),
])
def test_decode_matches_the_torch_path(seq_lens, kw):
    q, k, v, meta = _case(seq_lens, [1] * len(seq_lens), **kw)
    got = cpu_attention.cpu_paged_decode(q, k, v, meta.block_tables, meta.seq_lens, 0.3)
    torch.testing.assert_close(got, _decode(q, k, v, meta, 0.3), atol=1e-5, rtol=1e-5)


def test_strided_query_as_from_a_fused_projection():
    q, k, v, meta = _case([6, 13], [1, 1])
    wide = torch.cat([q, torch.zeros_like(q)], dim=1)[:, :4]  # a view with a row stride of 2 * H * D
    got = cpu_attention.cpu_paged_decode(wide, k, v, meta.block_tables, meta.seq_lens, 0.3)
    torch.testing.assert_close(got, _decode(q, k, v, meta, 0.3), atol=1e-5, rtol=1e-5)


def test_mixed_batch_sends_decode_rows_to_the_kernel_and_prompts_to_sdpa():
    q, k, v, meta = _case([8, 21, 5, 13, 9], [1, 6, 1, 13, 1])
    got = paged_attention(q, k, v, meta, 0.3)
    want = torch.empty_like(q)
    for i, s in enumerate(meta.seq_lens_list):
        rows = slice(meta.query_start_loc[i], meta.query_start_loc[i + 1])
        want[rows] = _prefill_one(q[rows], k, v, meta.block_tables[i], s, meta.block_size, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_disabled_kernel_falls_back_to_torch():
    code = ("import torch; from kernels import cpu_attention\n"
            "assert not cpu_attention.available()\n"
            "assert not cpu_attention.supports(torch.zeros(1, 1, 4), torch.zeros(1, 1, 1, 4))\n")
    env = {"SLUICE_CPU_KERNELS": "0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
