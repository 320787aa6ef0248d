"""Linear layers of a few rows computed straight from a GGUF checkpoint's quantized blocks, in C.

A weight row is a run of 32-weight blocks: Q4_1 holds an fp16 scale d, an fp16 offset m and 32 4-bit
codes q (w = d * q + m), Q8_0 an fp16 scale and 32 int8 codes (w = d * q), as ggml's block_q4_1 and
block_q8_0. The default model ships this way (Q4_1 projections, a Q8_0 embedding that is also its LM
head), and Sluice's fp32 weights are exactly those values, so a product over the blocks is the fp32
product up to summation order, while it reads 5 (Q4_1) or 8.5 (Q8_0) bits per weight instead of fp16's
16. A batch-1 decode step is bound by weight reads.

The 32 codes of a block are widened to fp32 once and serve a group of input rows (8 with AVX2, 16 with
AVX-512): for one or two rows as y += d * (q . x_block) + m * sum(x_block), for more as the block's weights
w = d * q + m made in registers (shared by the rows) and y += w . x_block. Larger calls take a pass over
the weights per group. The C source is kernels/cpu_quant_source.py. Where the CPU has AMX, kernels/cpu_amx.py
takes every call instead, from the same codes repacked.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from kernels import cpu_build
from kernels.cpu_quant_source import C_BODY

BLOCK = 32  # weights per block
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}  # fp16 d (and m), then the codes
# Input rows per call up to which the blocks beat fbgemm's fp16 GEMM here, by the widest vectors the kernels
# were built with. All the default model's Q4_1 projections, blocks vs fbgemm: AVX2 code 1 row 5.0 vs 15.9 ms,
# 16 rows 28.9 vs 36.3, 24 rows 44.7 vs 40.0; AVX-512 code 16 rows 18.1 vs 29.3, 32 rows 34.1 vs 39.9, 48
# rows 51.2 vs 50.4. Its Q8_0 LM head from memory: AVX2 code 1 row 1.2 vs 2.8 ms, 8 rows 3.3 vs 4.3, 12 rows
# 5.5 vs 5.2; AVX-512 code 32 rows 8.2 vs 11.5, 64 rows 16.4 vs 18.9, 128 rows 33.2 vs 31.6.
# The portable C code (no AVX2) is not tuned: one row, where reading 5 bits a weight still pays.
_MAX_ROWS = {0: {"q4_1": 1, "q8_0": 1}, 256: {"q4_1": 16, "q8_0": 8}, 512: {"q4_1": 32, "q8_0": 64}}

_SOURCE = cpu_build.PRELUDE + C_BODY

# Below this many weights a call runs on one thread: a parallel region costs more than the work.
_PARALLEL_MIN = 1 << 16


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load("quant_ops", _SOURCE)
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.q4_1_linear_f32, lib.q8_0_linear_f32):
        fn.argtypes, fn.restype = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int], None
    lib.quant_vector_bits.argtypes, lib.quant_vector_bits.restype = [], ctypes.c_int
    return lib


def available() -> bool:
    return _library() is not None


@functools.cache
def max_rows(kind: str) -> int:
    """The most input rows per call that `supports` sends to the blocks; 0 where the kernels cannot be built."""
    lib = _library()
    return 0 if lib is None else _MAX_ROWS[lib.quant_vector_bits()][kind]


def readable(x: torch.Tensor) -> bool:
    """Whether the C linears (these, kernels/cpu_amx.py's) can read x: CPU fp32 [M, K], contiguous, no autograd."""
    return (x.dim() == 2 and x.is_cpu and x.dtype == torch.float32 and x.is_contiguous()
            and not (torch.is_grad_enabled() and x.requires_grad))


def supports(x: torch.Tensor, kind: str) -> bool:
    """Whether `block_linear` should take x for `kind`: `readable`, and M <= max_rows(kind)."""
    return readable(x) and x.shape[0] <= max_rows(kind)


def threads(n: int, k: int) -> int:
    """Threads for a linear of an [n, k] weight (the decode stack picks the same in C)."""
    return torch.get_num_threads() if n * k >= _PARALLEL_MIN else 1


def block_linear(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N], W given as `blocks` [N, K / 32 * BLOCK_BYTES[kind]] uint8 (ggml block
    rows of `kind`, "q4_1" or "q8_0"), any number of rows. Callers check `supports(x, kind)` first."""
    m, k = x.shape
    n = blocks.shape[0]
    assert blocks.dtype == torch.uint8 and blocks.is_contiguous() and blocks.shape[1] * BLOCK == k * BLOCK_BYTES[kind]
    y = torch.empty(m, n)
    kernel = _library().q4_1_linear_f32 if kind == "q4_1" else _library().q8_0_linear_f32
    kernel(x.data_ptr(), blocks.data_ptr(), y.data_ptr(), m, n, k, threads(n, k))
    return y


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """Q8_0 block rows [N, K / 32 * 34] of weight [N, K] (K % 32 == 0), rounded as ggml's quantize_row_q8_0:
    per 32 weights d = max |w| / 127 (kept in fp16) and q = round(w / d)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    d = w.abs().amax(dim=-1, keepdim=True) / 127  # [N, nb, 1]
    q = torch.where(d > 0, w / d.clamp(min=1e-30), torch.zeros_like(w)).round().clamp(-127, 127)
    parts = [d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)]  # [N, nb, 2], [N, nb, 32]
    return torch.cat(parts, dim=-1).reshape(n, -1).contiguous()


def dequantize(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The fp32 weights [N, K] that `blocks` of `kind` hold (the reference for the kernels)."""
    n = blocks.shape[0]
    b = blocks.view(n, -1, BLOCK_BYTES[kind])
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [N, nb, 1]
    if kind == "q8_0":
        return (d * b[..., 2:].contiguous().view(torch.int8).float()).reshape(n, -1)
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    qs = b[..., 4:]
    q = torch.cat([qs & 15, qs >> 4], dim=-1).float()  # [N, nb, 32]: codes 0-15, then 16-31
    return (d * q + m).reshape(n, -1)
