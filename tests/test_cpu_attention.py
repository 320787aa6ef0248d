"""The compiled CPU attention kernel computes what the torch path computes, and Sluice runs without it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import cpu_attention
from kernels.paged_attention import _decode, _prefill_one, paged_attention
from kernels.random_case import random_paged_case

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler: the torch path is used")


def _case(seq_lens, q_lens, **kw):
    c = random_paged_case(seq_lens, q_lens, **kw)
    return c.q, c.k_cache, c.v_cache, c.meta


def _kernel(q, k, v, meta) -> torch.Tensor:
    """The kernel over every request of the case (whatever their query lengths)."""
    starts = meta.query_start_loc
    q_lens = [b - a for a, b in zip(starts, starts[1:])]
    out = torch.full(q.shape, float("nan"))
    cpu_attention.cpu_paged_attention(q, k, v, meta.block_tables, meta.seq_lens, torch.tensor(starts[:-1]),
                                      torch.tensor(q_lens), out, 0.3,
                                      sum(s * n for s, n in zip(meta.seq_lens_list, q_lens)))
    return out


def _reference(q, k, v, meta) -> torch.Tensor:
    want = torch.empty_like(q)
    for i, s in enumerate(meta.seq_lens_list):
        rows = slice(meta.query_start_loc[i], meta.query_start_loc[i + 1])
        want[rows] = _prefill_one(q[rows], k, v, meta.block_tables[i], s, meta.block_size, 0.3)
    return want


@pytest.mark.parametrize("seq_lens,kw", [
    ([5, 17, 1, 8, 12], {}),
    ([33, 1, 16, 70], dict(block_size=16, head_dim=64, heads=9, kv_heads=3)),  # the default model's heads
    ([9, 4], dict(heads=4, kv_heads=4)),
    ([9, 21], dict(heads=8, kv_heads=1, head_dim=24)),
    ([7, 3, 10], dict(block_size=3)),
    ([300], dict(block_size=16, head_dim=64, heads=9, kv_heads=3)),
    ([19, 8, 41], dict(block_size=8, head_dim=32)),  # 8-position dots and register-held outputs
    ([29, 16], dict(block_size=16, head_dim=24, heads=6, kv_heads=3)),  # 8-position dots, plain outputs
])
def test_decode_matches_the_torch_path(seq_lens, kw):
    q, k, v, meta = _case(seq_lens, [1] * len(seq_lens), **kw)
    torch.testing.assert_close(_kernel(q, k, v, meta), _decode(q, k, v, meta, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not cpu_attention.available(torch.float16), reason="the compiler has no _Float16")
@pytest.mark.parametrize("seq_lens,q_lens,kw", [
    ([5, 17, 1, 8, 12], [1] * 5, {}),
    ([33, 1, 16, 70], [3, 1, 8, 1], dict(block_size=16, head_dim=64, heads=9, kv_heads=3)),  # the default model's
    ([9, 21], [1, 2], dict(heads=8, kv_heads=1, head_dim=24)),  # plain dots and outputs
])
def test_fp16_caches_give_what_the_torch_path_gives_on_them(seq_lens, q_lens, kw):
    q, k, v, meta = _case(seq_lens, q_lens, **kw)
    k16, v16 = k.half(), v.half()
    got = _kernel(q, k16, v16, meta)
    torch.testing.assert_close(got, _reference(q, k16, v16, meta), atol=1e-5, rtol=1e-5)  # same fp16 values
    assert (got - _reference(q, k, v, meta)).abs().max() > 0  # which are not the fp32 ones


@pytest.mark.parametrize("seq_lens,q_lens,kw", [
    ([9, 17, 6], [5, 2, 6], {}),  # drafts to verify; the last one's whole context is new
    ([40, 23], [8, 3], dict(block_size=16, head_dim=64, heads=9, kv_heads=3)),
    ([7, 12], [4, 1], dict(block_size=3, heads=8, kv_heads=1, head_dim=24)),
    ([37, 20, 9], [8, 3, 9], dict(block_size=8, head_dim=32)),
])
def test_short_multi_row_queries_are_causal_and_match_sdpa(seq_lens, q_lens, kw):
    q, k, v, meta = _case(seq_lens, q_lens, **kw)
    torch.testing.assert_close(_kernel(q, k, v, meta), _reference(q, k, v, meta), atol=1e-5, rtol=1e-5)


def test_strided_query_as_from_a_fused_projection():
    q, k, v, meta = _case([6, 13], [1, 1])
    wide = torch.cat([q, torch.zeros_like(q)], dim=1)[:, :4]  # a view with a row stride of 2 * H * D
    torch.testing.assert_close(_kernel(wide, k, v, meta), _decode(q, k, v, meta, 0.3), atol=1e-5, rtol=1e-5)


def test_mixed_batch_sends_short_queries_to_the_kernel_and_prompts_to_sdpa(monkeypatch):
    q, k, v, meta = _case([8, 21, 5, 30, 9], [1, 6, 1, 13, 1])
    calls = []
    kernel = cpu_attention.cpu_paged_attention
    monkeypatch.setattr(cpu_attention, "cpu_paged_attention", lambda *a: calls.append(a[6].tolist()) or kernel(*a))
    got = paged_attention(q, k, v, meta, 0.3)
    assert calls == [[1, 6, 1, 1]]  # one call; the 13-row prompt chunk went to SDPA
    torch.testing.assert_close(got, _reference(q, k, v, meta), atol=1e-5, rtol=1e-5)


def test_disabled_kernel_falls_back_to_torch():
    code = ("import torch; from kernels import cpu_attention\n"
            "assert not cpu_attention.available()\n"
            "assert not cpu_attention.supports(torch.zeros(1, 1, 4), torch.zeros(1, 1, 1, 4))\n")
    env = {"SLUICE_CPU_KERNELS": "0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
