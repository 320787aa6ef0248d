"""The paged KV cache's memory: bytes per block, and the pool of (K, V) tensors per layer."""
from __future__ import annotations

import torch

from engine.config import DTYPE_NAMES, ModelConfig
from engine.platform import advise_huge_pages


# Weight formats that pass the quality gate with an fp16 cache (tests/test_quantization.py runs each format
# with the cache it gets here). int8 fails the gate either way, and an fp16 cache cut its greedy agreement
# with fp32 from 5 to 1 of 20 prompts, for +10% throughput: it keeps fp32 unless asked.
_FP16_CACHE_FORMATS = ("fp16", "gguf")


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, quantization: str, device: torch.device) -> torch.dtype:
    """`auto`: on CPU, fp16 for the fp16 and gguf weight formats, as llama.cpp keeps its cache (half the bytes
    make a 32-stream step's attention, which reads the whole cache, about 2x faster); else the model's dtype,
    so exact fp32 (quantization none) stays exact."""
    if name != "auto":
        return DTYPE_NAMES[name]
    return torch.float16 if quantization in _FP16_CACHE_FORMATS and device.type == "cpu" else model_dtype


def kv_cache_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


def allocate_kv_caches(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) per layer, each [num_blocks, block_size, KVH, D], views of one pool."""
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    # Written now, not left to calloc: a fresh allocation faults each page on first write, and prefix
    # caching hands out never-touched blocks first, so serving would pay those faults. Zeros, too:
    # padded decode rows read (masked) slots, and 0 * NaN would poison them.
    pool = torch.empty((cfg.num_layers, 2, *shape), dtype=dtype, device=device)
    advise_huge_pages(pool)
    pool.zero_()
    return [(pool[i, 0], pool[i, 1]) for i in range(cfg.num_layers)]
