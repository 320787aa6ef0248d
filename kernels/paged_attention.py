"""Paged attention in plain torch.

The KV cache of one layer is two tensors `[num_blocks, block_size, kv_heads, head_dim]`.
A token at position p of a request lives in slot `block_table[p // block_size] * block_size
+ p % block_size`. The batch is flattened: request i owns query rows
`query_start_loc[i]:query_start_loc[i+1]`, which are the last rows of its `seq_lens[i]` tokens.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import cpu_attention


@dataclass
class ShortQueries:
    block_tables: torch.Tensor  # [R, max_blocks] int64
    seq_lens: torch.Tensor  # [R] int64
    query_start: torch.Tensor  # [R] int64: first row of each request's queries
    query_len: torch.Tensor  # [R] int64
    requests: set[int]  # their indices in the batch
    work: int  # sum of seq_len * query_len


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    seq_lens: torch.Tensor  # [B] int64: tokens in context after this step
    query_start_loc: list[int]  # B + 1 offsets into the flattened rows
    seq_lens_list: list[int]  # seq_lens as Python ints, for the per-request prefill path
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def is_decode_only(self) -> bool:
        return self.query_start_loc[-1] == self.num_seqs

    @functools.cached_property
    def query_start_loc_tensor(self) -> torch.Tensor:
        """query_start_loc on the batch's device, built once per step for kernels that read it."""
        return torch.tensor(self.query_start_loc, dtype=torch.int64, device=self.seq_lens.device)

    @functools.cached_property
    def max_query_len(self) -> int:
        starts = self.query_start_loc
        return max(b - a for a, b in zip(starts, starts[1:]))

    @functools.cached_property
    def short_queries(self) -> ShortQueries | None:
        """The requests with at most cpu_attention.SHORT_QUERY new rows (decoding, verifying drafts,
        jump-forward tokens), for the CPU kernel; built once per step for every layer."""
        starts, n = self.query_start_loc, self.num_seqs
        index = [i for i in range(n) if starts[i + 1] - starts[i] <= cpu_attention.SHORT_QUERY]
        if not index:
            return None
        dev = self.seq_lens.device
        lens = [starts[i + 1] - starts[i] for i in index]
        everyone = len(index) == n
        return ShortQueries(
            block_tables=self.block_tables if everyone else self.block_tables[torch.tensor(index, device=dev)],
            seq_lens=self.seq_lens if everyone else self.seq_lens[torch.tensor(index, device=dev)],
            query_start=torch.tensor([starts[i] for i in index], device=dev),
            query_len=torch.tensor(lens, device=dev),
            requests=set(index),
            work=sum(self.seq_lens_list[i] * q for i, q in zip(index, lens)))

    @functools.cached_property
    def decode_blocks_and_mask(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block ids covering the longest context, and the padding mask [B, 1, 1, S] (None if no padding).

        Computed once per step and shared by every layer.
        """
        max_len = max(self.seq_lens_list)
        nb = -(-max_len // self.block_size)
        s = nb * self.block_size
        if min(self.seq_lens_list) == s:
            return self.block_tables[:, :nb], None
        mask = torch.arange(s, device=self.seq_lens.device) < self.seq_lens[:, None]
        return self.block_tables[:, :nb], mask[:, None, None, :]


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # key, value: [T, KVH, D]; caches: [NB, BS, KVH, D]
    kvh, d = key.shape[1], key.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of the new rows over each request's cached context. q: [T, H, D] -> [T, H, D]."""
    fast = cpu_attention.supports(q, k_cache)  # reads the blocks in place instead of gathering them
    if meta.is_decode_only and not fast:
        return _decode(q, k_cache, v_cache, meta, scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous even when q is a strided view
    short = meta.short_queries if fast else None
    if short is not None:  # decoding, drafts and jump-forward tokens: one kernel call for all of them
        cpu_attention.cpu_paged_attention(q, k_cache, v_cache, short.block_tables, short.seq_lens,
                                          short.query_start, short.query_len, out, scale, short.work)
    done = short.requests if short is not None else set()
    starts = meta.query_start_loc
    for i, seq_len in enumerate(meta.seq_lens_list):
        if i not in done:
            rows = slice(starts[i], starts[i + 1])
            out[rows] = _prefill_one(q[rows], k_cache, v_cache, meta.block_tables[i], seq_len, meta.block_size,
                                     scale)
    return out


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # cache: [NB, BS, KVH, D], block_ids: [..., nb] -> [..., nb * BS, KVH, D] in dtype (the queries')
    # index_select, not cache[block_ids]: about 6x faster on CPU for this copy
    _, bs, kvh, d = cache.shape
    x = cache.index_select(0, block_ids.reshape(-1)).to(dtype)
    return x.view(*block_ids.shape[:-1], block_ids.shape[-1] * bs, kvh, d)


def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    # One query row per request: pad every context to the longest and mask the tail.
    # The G query heads sharing a KV head become G query rows of it: no K/V repeat, no GQA path.
    block_ids, mask = meta.decode_blocks_and_mask
    k = _gather(k_cache, block_ids, q.dtype).transpose(1, 2)  # [B, KVH, S, D]
    v = _gather(v_cache, block_ids, q.dtype).transpose(1, 2)
    b, h, d = q.shape
    qg = q.view(b, k.shape[1], h // k.shape[1], d)  # [B, KVH, G, D]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, d)


def _prefill_one(q, k_cache, v_cache, block_table, seq_len: int, block_size: int, scale: float) -> torch.Tensor:
    # q: [L, H, D], the last L of seq_len positions; earlier ones are a cached prefix.
    n_q = q.shape[0]
    nb = -(-seq_len // block_size)
    # 4-D inputs: with 3-D ones torch's CPU SDPA leaves its flash kernel for the math path (2.5-4x slower)
    k = _gather(k_cache, block_table[:nb], q.dtype)[None, :seq_len].transpose(1, 2)  # [1, KVH, S, D]
    v = _gather(v_cache, block_table[:nb], q.dtype)[None, :seq_len].transpose(1, 2)
    qh = q[None].transpose(1, 2)  # [1, H, L, D]
    if n_q == seq_len:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        q_pos = torch.arange(seq_len - n_q, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [L, S]
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
