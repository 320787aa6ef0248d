"""The Triton paged-attention kernels compute what the torch reference computes.

Without a GPU they run under the Triton interpreter. TRITON_INTERPRET is read when a kernel is
defined, i.e. when kernels.triton_attention is imported, and another test module may already have
imported it in this process; so every check runs in one child process with the variable set
(`python -m tests.test_triton_kernels`), and each is reported here as its own test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton): its kernels can't be tested")

from kernels.paged_attention import AttentionMetadata, paged_attention, write_kv  # noqa: E402
from kernels.random_case import random_paged_case  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 0.3


def _attention(seq_lens: list[int], q_lens: list[int], block_size: int = 4, head_dim: int = 16,
               heads: int = 4, kv_heads: int = 2, dtype: torch.dtype = torch.float32,
               strided_q: bool = False, cache_dtype: torch.dtype | None = None) -> None:
    from kernels.triton_attention import triton_paged_attention

    case = random_paged_case(seq_lens, q_lens, heads, kv_heads, head_dim, block_size, DEVICE, dtype,
                             seed=sum(seq_lens) + block_size + head_dim)
    q, k_cache, v_cache, meta = case.q, case.k_cache, case.v_cache, case.meta
    if cache_dtype is not None:  # a narrower cache than the queries (--kv-cache-dtype)
        k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    if strided_q:  # as when q is a slice of a fused qkv projection
        q = torch.cat([q, torch.zeros_like(q)], dim=1)[:, :heads]
    got = triton_paged_attention(q, k_cache, v_cache, meta, SCALE)
    # the reference runs in fp32 so low-precision runs are compared with the exact answer
    want = paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, SCALE)
    assert got.dtype == dtype and got.shape == q.shape
    atol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=atol)


def _decode(seq_lens: list[int], **kw) -> Callable[[], None]:
    return lambda: _attention(seq_lens, [1] * len(seq_lens), **kw)


def _prefill(seq_lens: list[int], q_lens: list[int], **kw) -> Callable[[], None]:
    return lambda: _attention(seq_lens, q_lens, **kw)


def _write_kv(slots: list[int], dtype: torch.dtype = torch.float32) -> None:
    from kernels.triton_attention import triton_write_kv

    gen = torch.Generator().manual_seed(len(slots))
    num_blocks, block_size, kv_heads, head_dim = 6, 4, 2, 16
    key = torch.randn(len(slots), kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    value = torch.randn(len(slots), kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    slot_t = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    keep = slot_t >= 0  # the torch version has no padding: give it only the real rows
    write_kv(key[keep], value[keep], k_want, v_want, slot_t[keep])
    triton_write_kv(key, value, k_cache, v_cache, slot_t)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


def _write_then_attend() -> None:
    """A prompt written through triton_write_kv is read back by the decode kernel (end to end)."""
    from kernels.triton_attention import triton_paged_attention, triton_write_kv

    gen = torch.Generator().manual_seed(7)
    block_size, seq_len, heads, kv_heads, head_dim = 4, 11, 4, 2, 16
    table = torch.tensor([[5, 0, 3]], dtype=torch.int64)
    slots = table[0, torch.arange(seq_len) // block_size] * block_size + torch.arange(seq_len) % block_size
    key, value = (torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(DEVICE) for _ in range(2))
    k_cache, v_cache = (torch.zeros(6, block_size, kv_heads, head_dim, device=DEVICE) for _ in range(2))
    triton_write_kv(key, value, k_cache, v_cache, slots.to(DEVICE))
    q = torch.randn(1, heads, head_dim, generator=gen).to(DEVICE)
    meta = AttentionMetadata(slots.to(DEVICE), table.to(DEVICE), torch.tensor([seq_len], device=DEVICE),
                             [0, 1], [seq_len], block_size)
    got = triton_paged_attention(q, k_cache, v_cache, meta, SCALE)
    k, v = (x.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1) for x in (key, value))
    want = torch.softmax(q.transpose(0, 1) @ k.transpose(1, 2) * SCALE, dim=-1) @ v  # [H, 1, D]
    torch.testing.assert_close(got, want.transpose(0, 1), atol=1e-4, rtol=1e-4)


CASES: dict[str, Callable[[], None]] = {
    "write_kv": lambda: _write_kv([5, 0, 23, 12, 13, 7]),
    "write_kv-skips-padding": lambda: _write_kv([3, -1, 9, -1, -1, 20]),
    "write_kv-fp16": lambda: _write_kv([1, 2, 17, -1], torch.float16),
    "write_then_attend": _write_then_attend,
    "decode-bs4-d16-gqa": _decode([5, 17, 1, 8, 12]),
    "decode-bs16-d32-gqa": _decode([33, 1, 16, 70], block_size=16, head_dim=32),
    "decode-long-multi-tile": _decode([130, 64, 65], block_size=16, head_dim=32),
    "decode-mha": _decode([9, 4], heads=4, kv_heads=4),
    "decode-mqa-d24": _decode([9, 21], heads=8, kv_heads=1, head_dim=24),
    "decode-block-size-3": _decode([7, 3, 10], block_size=3),
    "decode-strided-q": _decode([6, 13], strided_q=True),
    "decode-fp16": _decode([20, 3, 41], block_size=16, dtype=torch.float16),
    "decode-fp32-over-fp16-cache": _decode([20, 3, 41], block_size=16, cache_dtype=torch.float16),
    "prefill-full-prompts": _prefill([5, 17, 9], [5, 17, 9]),
    "prefill-cached-prefix": _prefill([12, 30, 9], [3, 7, 9], block_size=16, head_dim=32),
    "prefill-mixed-with-decode": _prefill([8, 21, 5, 13], [1, 6, 1, 13]),
    "prefill-multi-row-tile": _prefill([150, 80], [100, 80], block_size=16, head_dim=32),
    "prefill-mqa-block-size-3": _prefill([10, 14], [4, 14], block_size=3, heads=8, kv_heads=1),
    "prefill-strided-q": _prefill([11, 6], [5, 6], strided_q=True),
    "prefill-fp16": _prefill([40, 19], [12, 19], block_size=16, dtype=torch.float16),
    "prefill-fp32-over-fp16-cache": _prefill([40, 19], [12, 19], block_size=16, cache_dtype=torch.float16),
}


def _selected(session: pytest.Session) -> list[str]:
    # honour -k: only the selected cases are run in the child
    names = [item.callspec.params["name"] for item in session.items
             if item.path == Path(__file__).resolve() and hasattr(item, "callspec")]
    return names or list(CASES)


@pytest.fixture(scope="module")
def child_results(request, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("triton") / "results.json"
    env = dict(os.environ)
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "tests.test_triton_kernels", str(out), *_selected(request.session)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"kernel check process failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_kernel(name: str, child_results: dict[str, str]) -> None:
    if child_results.get(name) != "ok":
        pytest.fail(child_results.get(name, "not run"), pytrace=False)


def test_imports_without_triton() -> None:
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kernels, kernels.triton_attention as t\n"
            "assert not t.TRITON_AVAILABLE\n"
            "try:\n    t.triton_paged_decode(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1),"
            " None, None, 1.0)\n"
            "except RuntimeError as e:\n    assert 'triton' in str(e)\n"
            "else:\n    raise AssertionError('no error without triton')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _run_child(out: str, names: list[str]) -> None:
    assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 without a GPU"
    results = {}
    for name in names:
        try:
            CASES[name]()
            results[name] = "ok"
        except Exception:  # report every case, not just the first failure
            results[name] = traceback.format_exc()
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    _run_child(sys.argv[1], sys.argv[2:])
