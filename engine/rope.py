"""Rotary position embeddings (rotate-half layout, as Hugging Face checkpoints store q/k)."""
from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling).float()
    raise ValueError(f"unsupported rope scaling {kind!r}: supported are default, linear and llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def llama3_scaling_from_divisors(divisors: torch.Tensor, head_dim: int, theta: float) -> dict[str, Any]:
    """HF's llama3 rope_scaling from the divisor of each inverse frequency, which llama.cpp stores instead
    (a GGUF's rope_freqs).

    Between the two cut-offs 1/divisor is linear in old_ctx/wavelength; a line fit gives the cut-offs
    relative to low_freq_factor, which every Llama 3.x release sets to 1. The result is checked by
    recomputing the divisors, so a model that breaks the assumption fails loudly instead of drifting.
    """
    d = divisors.double()
    factor = float(d.max())
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    band = (d > 1 + 1e-4) & (d < factor - 1e-4)
    if int(band.sum()) < 2:
        raise ValueError("cannot recover llama3 rope scaling: rope_freqs has fewer than two interpolated entries")
    smooth = (1 / d[band] - 1 / factor) / (1 - 1 / factor)  # [n]
    x = inv_freq[band] / (2 * math.pi)
    slope, intercept = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), smooth[:, None]).solution[:, 0].tolist()
    high = 1 - 1 / intercept
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": round(high, 4),
               "original_max_position_embeddings": int(round(slope * (high - 1)))}
    if not torch.allclose(inv_freq / _llama3_inv_freq(inv_freq, scaling), d, rtol=1e-4):
        raise ValueError(f"rope_freqs does not match llama3 rope scaling (best fit {scaling})")
    return scaling


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables over all positions; `lookup` once per step, `apply_rope` per layer."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None):
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build()

    def build(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the tables in fp32, e.g. after the model was created on the meta device."""
        device = device or self.cos.device
        if torch.device(device).type == "meta":
            return
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=device), inv_freq)  # [P, D/2]
        self.cos, self.sin = freqs.cos(), freqs.sin()

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, 1, D/2], broadcast over heads
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D] in rotate-half layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
