"""Paged attention kernels: a torch implementation (CPU, and the test oracle) and Triton kernels (GPU)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels.paged_attention import AttentionMetadata, paged_attention, write_kv


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    write_kv: Callable
    paged_attention: Callable


TORCH_BACKEND = AttentionBackend("torch", write_kv, paged_attention)


def attention_backend(device: torch.device | str) -> AttentionBackend:
    """Triton on CUDA when it is installed; the torch implementation everywhere else."""
    if torch.device(device).type == "cuda":
        from kernels.triton_attention import TRITON_AVAILABLE, triton_paged_attention, triton_write_kv

        if TRITON_AVAILABLE:
            return AttentionBackend("triton", triton_write_kv, triton_paged_attention)
    return TORCH_BACKEND


__all__ = ["AttentionBackend", "AttentionMetadata", "TORCH_BACKEND", "attention_backend", "paged_attention",
           "write_kv"]
