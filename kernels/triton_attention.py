"""Paged attention in Triton: a drop-in for `kernels.paged_attention` on GPU.

Same cache layout and metadata as the torch version. Keys are fetched token by token through
the block table (`block_table[p // block_size]`, then `p % block_size`), so a KV tile may span
several blocks, the block size needn't be a power of two, and blocks may sit in any order.

Kernels (all accumulate in fp32 with an online, base-2 softmax):
- decode: one program per (request, kv head). It loads the whole GQA group of query heads as one
  [GROUP_PAD, D] tile, so every K/V tile is read from memory once for the group. There is no
  split over the context (flash-decoding's second pass); long contexts with few requests would
  want one.
- prefill: one program per (request, query head, tile of BLOCK_M query rows), causal over the
  request's cached prefix: its rows are the last q_len of seq_len positions. Also serves mixed
  batches (decode rows are rows with q_len = 1).
- write_kv: one program per new token, all kv heads at once; slots < 0 are padding, skipped.

Triton is optional: without it this module still imports, TRITON_AVAILABLE is False and the
entry points raise. Kernels are built at import, so TRITON_INTERPRET=1 (CPU) must be set before.
"""
from __future__ import annotations

import torch

from kernels.paged_attention import AttentionMetadata

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # the stub lets the kernel definitions below be parsed; they are never launched
    TRITON_AVAILABLE = False

    class _Stub:
        constexpr = object

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _Stub()

_LOG2E = 1.4426950408889634
# tl.dot needs every dimension >= 16 on GPU, so small head groups and head dims are padded
_MIN_DOT = 16
_DECODE_TILE_N = 64
_PREFILL_BLOCK_M = 64
_PREFILL_TILE_N = 64


@triton.jit
def _attend_tile(q, m, l, acc, k_ptr, v_ptr, table_ptr, start, q_pos, seq_len, block_size,
                 sk_b, sk_s, sv_b, sv_s, scale_log2,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, TILE_N: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step of query tile q [M, D_PAD] over context positions start..start+TILE_N."""
    n = start + tl.arange(0, TILE_N)
    d = tl.arange(0, D_PAD)
    n_ok = n < seq_len
    blk = tl.load(table_ptr + n // block_size, mask=n_ok, other=0).to(tl.int64)  # block id * stride can pass 2**31
    off = n % block_size
    kv_mask = n_ok[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + blk[:, None] * sk_b + off[:, None] * sk_s + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # a cache may be narrower (fp16) than the queries
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    # a row with nothing visible yet keeps m = -inf; subtract 0 there to avoid inf - inf = nan
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    v = tl.load(v_ptr + blk[:, None] * sv_b + off[:, None] * sv_s + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, seq_lens_ptr, scale_log2,
                   sq_b, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_h, st_b, block_size,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   TILE_N: tl.constexpr, PREC: tl.constexpr):
    req = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + g
    mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + req * sq_b + heads[:, None] * sq_h + d[None, :], mask=mask, other=0.0)
    q_pos = tl.zeros([GROUP_PAD], tl.int32) + seq_len - 1  # the single new row is the last position
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    table = tables_ptr + req * st_b
    for start in range(0, seq_len, TILE_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_ptr + kvh * sk_h, v_ptr + kvh * sv_h, table, start, q_pos,
                                 seq_len, block_size, sk_b, sk_s, sv_b, sv_s, scale_log2,
                                 HEAD_DIM, D_PAD, TILE_N, PREC)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + req * so_b + heads[:, None] * so_h + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, seq_lens_ptr, q_starts_ptr, scale_log2,
                    sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_t, so_h, st_b, block_size,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, PREC: tl.constexpr):
    req = tl.program_id(0)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    # positions fit int32; only cache addresses (block id * stride) need int64
    q_start = tl.load(q_starts_ptr + req).to(tl.int32)
    q_len = tl.load(q_starts_ptr + req + 1).to(tl.int32) - q_start
    if tile * BLOCK_M >= q_len:  # the grid is sized for the longest request
        return
    seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    mask = (rows < q_len)[:, None] & (d < HEAD_DIM)[None, :]
    q_rows = q_start + rows
    q = tl.load(q_ptr + q_rows[:, None] * sq_t + head * sq_h + d[None, :], mask=mask, other=0.0)
    q_pos = seq_len - q_len + rows
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    kvh = head // GROUP
    table = tables_ptr + req * st_b
    # causal: nothing past this tile's last row is visible
    end = tl.minimum(seq_len, seq_len - q_len + (tile + 1) * BLOCK_M)
    for start in range(0, end, TILE_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_ptr + kvh * sk_h, v_ptr + kvh * sv_h, table, start, q_pos,
                                 seq_len, block_size, sk_b, sk_s, sv_b, sv_s, scale_log2,
                                 HEAD_DIM, D_PAD, TILE_N, PREC)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * so_t + head * so_h + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, kc_ptr, vc_ptr, slots_ptr, sk_t, sk_h, sv_t, sv_h,
                     kc_b, kc_s, kc_h, vc_b, vc_s, vc_h, block_size,
                     KVH: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot < 0:  # padding row
        return
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D_PAD)
    mask = (h < KVH)[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(key_ptr + t * sk_t + h[:, None] * sk_h + d[None, :], mask=mask)
    v = tl.load(value_ptr + t * sv_t + h[:, None] * sv_h + d[None, :], mask=mask)
    tl.store(kc_ptr + blk * kc_b + off * kc_s + h[:, None] * kc_h + d[None, :], k.to(kc_ptr.dtype.element_ty),
             mask=mask)
    tl.store(vc_ptr + blk * vc_b + off * vc_s + h[:, None] * vc_h + d[None, :], v.to(vc_ptr.dtype.element_ty),
             mask=mask)


def _pad(n: int) -> int:
    return max(_MIN_DOT, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    # fp32 caches are the exact/testing path, so no tf32 there; other dtypes ignore the setting
    return "ieee" if dtype == torch.float32 else "tf32"


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    # the kernels index the last dim (and 1-D tensors) with stride 1
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("kernels.triton_attention needs the `triton` package")
    if q.device.type == "cpu" and type(_decode_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before import")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV cache must have a contiguous head_dim")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads is not a multiple of {k_cache.shape[2]} kv heads")


def triton_write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Store key/value [T, KVH, D] into caches [NB, BS, KVH, D] at slot_mapping [T]; slots < 0 are skipped."""
    _check(key, k_cache, v_cache)
    if key.shape[0] == 0:
        return
    key, value, slot_mapping = _unit_last(key), _unit_last(value), _unit_last(slot_mapping)
    kvh, d = key.shape[1], key.shape[2]
    _write_kv_kernel[(key.shape[0],)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), k_cache.shape[1],
        KVH=kvh, HEAD_DIM=d, H_PAD=triton.next_power_of_2(kvh), D_PAD=triton.next_power_of_2(d))


def triton_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One new row per request, the last of its seq_lens[i] positions. q: [B, H, D] -> [B, H, D]."""
    _check(q, k_cache, v_cache)
    q, block_tables, seq_lens = _unit_last(q), _unit_last(block_tables), _unit_last(seq_lens)
    out = torch.empty_like(q)
    b, h, d = q.shape
    if b == 0:
        return out
    kvh = k_cache.shape[2]
    group = h // kvh
    _decode_kernel[(b, kvh)](
        q, k_cache, v_cache, out, block_tables, seq_lens, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0), k_cache.shape[1],
        GROUP=group, GROUP_PAD=_pad(group), HEAD_DIM=d, D_PAD=_pad(d), TILE_N=_DECODE_TILE_N,
        PREC=_precision(q.dtype))
    return out


def triton_paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                         scale: float) -> torch.Tensor:
    """Varlen causal attention: request i's rows query_start_loc[i]:[i+1] are the last of its seq_lens[i]
    positions. q: [T, H, D] -> [T, H, D]. max_query_len is a Python int so the grid needs no device sync."""
    _check(q, k_cache, v_cache)
    q, block_tables, seq_lens = _unit_last(q), _unit_last(block_tables), _unit_last(seq_lens)
    out = torch.empty_like(q)
    t, h, d = q.shape
    b = seq_lens.shape[0]
    if t == 0 or b == 0:
        return out
    query_start_loc = _unit_last(query_start_loc)
    grid = (b, h, triton.cdiv(max_query_len, _PREFILL_BLOCK_M))
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0), k_cache.shape[1],
        GROUP=h // k_cache.shape[2], HEAD_DIM=d, D_PAD=_pad(d), BLOCK_M=_PREFILL_BLOCK_M,
        TILE_N=_PREFILL_TILE_N, PREC=_precision(q.dtype))
    return out


def triton_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Drop-in for kernels.paged_attention.paged_attention. q: [T, H, D] -> [T, H, D]."""
    if meta.is_decode_only:
        return triton_paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
    return triton_paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                meta.query_start_loc_tensor, meta.max_query_len, scale)
