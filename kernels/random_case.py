"""A random paged-attention problem, for the kernel tests and benchmarks: the cache, its metadata, inputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.paged_attention import AttentionMetadata


@dataclass
class PagedCase:
    q: torch.Tensor  # [T, H, D]
    kv: torch.Tensor  # [T, KVH, D]: new keys / values to write
    k_cache: torch.Tensor  # [NB, BS, KVH, D]
    v_cache: torch.Tensor
    meta: AttentionMetadata


def random_paged_case(seq_lens: list[int], q_lens: list[int], heads: int = 4, kv_heads: int = 2,
                      head_dim: int = 16, block_size: int = 4, device: str = "cpu",
                      dtype: torch.dtype = torch.float32, seed: int = 0, spare_blocks: int = 3) -> PagedCase:
    """Request i has seq_lens[i] tokens in context, of which the last q_lens[i] are this step's rows.
    Its blocks are distinct and shuffled (neither contiguous nor sorted), as after frees."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + spare_blocks
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(need), dtype=torch.int64)
    first = 0
    for i, n in enumerate(need):
        tables[i, :n] = ids[first:first + n]
        first += n
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    slots = torch.cat([tables[i, torch.arange(s - n, s) // block_size] * block_size
                       + torch.arange(s - n, s) % block_size for i, (s, n) in enumerate(zip(seq_lens, q_lens))])
    meta = AttentionMetadata(slots.to(device), tables.to(device), torch.tensor(seq_lens, device=device),
                             starts, list(seq_lens), block_size)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))
    q = torch.randn(starts[-1], heads, head_dim, generator=gen).to(device, dtype)
    kv = torch.randn(starts[-1], kv_heads, head_dim, generator=gen).to(device, dtype)
    return PagedCase(q, kv, k_cache, v_cache, meta)
