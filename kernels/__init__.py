"""Paged attention kernels: a torch implementation (CPU, and the test oracle) and Triton kernels (GPU)."""
from kernels.paged_attention import AttentionMetadata, paged_attention, write_kv

__all__ = ["AttentionMetadata", "paged_attention", "write_kv"]
