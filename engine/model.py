"""A Llama-family decoder (Llama, Qwen2, SmolLM) whose attention reads and writes a paged KV cache.

Projections are fused (q/k/v as one matmul, gate/up as one) so a decode step runs few, larger ops.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig
from engine.linear import PACKERS, GGUFWeights, Int8Weights, Linear, onednn_fp32_weight
from engine.rope import RotaryEmbedding, apply_rope
from kernels import TORCH_BACKEND, AttentionBackend, AttentionMetadata, cpu_library_gemm, cpu_ops
from kernels.cpu_decode import (DecodeStack, Fp32Projection, GGUFProjection, Int8Projection, StackLayer,
                                StackShape)
from kernels.cpu_library_gemm import Fp32Gemm, Int8Gemm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, the norm of it): the residual add and the next norm in one pass."""
        return cpu_ops.add_rms_norm(x, delta, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim ** -0.5
        self.backend: AttentionBackend = TORCH_BACKEND

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, hidden]
        qkv = self.qkv_proj(x)  # [T, (H + 2 KVH) * D]
        if cpu_ops.rope_write_kv_supported(qkv, kv_cache[0], rope[0], meta.slot_mapping):
            cpu_ops.rope_write_kv(qkv, *rope, *kv_cache, meta.slot_mapping, self.num_heads, self.num_kv_heads)
            q = qkv[:, :self.q_size].view(-1, self.num_heads, self.head_dim)  # rotated in place
        else:
            qk_size = self.q_size + self.kv_size
            # q and k sit side by side in qkv: rotate them with one call
            qk = apply_rope(qkv[:, :qk_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim), *rope)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, H, D], [T, KVH, D]
            v = qkv[:, qk_size:].view(-1, self.num_kv_heads, self.head_dim)
            self.backend.write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        out = self.backend.paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale)  # [T, H, D]
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(cpu_ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, kv_cache, meta):
        # x: [T, hidden], the residual stream
        h = self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        x, h = self.post_attention_layernorm.add_and_norm(x, h)
        return x + self.mlp(h)


def decode_stack(layers: list[DecoderLayer], cfg: ModelConfig) -> DecodeStack | None:
    """`layers` as one C call (kernels/cpu_decode.py), where every projection reads GGUF blocks, or every one
    runs a oneDNN GEMM that C can call: int8 with oneDNN weights, or oneDNN-packed fp32. oneDNN's int8 then
    takes the stack's calls of every row count: from C it beat fbgemm's Python path even at one row (12.0 vs
    14.9 ms a step)."""
    projections = [(layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
                   for layer in layers]
    linears = [lin for ls in projections for lin in ls]
    if not DecodeStack.available() or any(lin.bias is not None for ls in projections for lin in ls[1:]):
        return None
    if all(isinstance(lin.packed, GGUFWeights) for lin in linears):
        convert = _gguf_projection
    elif all(isinstance(lin.packed, Int8Weights) and lin.packed.onednn is not None for lin in linears):
        convert = _int8_projection
    elif all(onednn_fp32_weight(lin) is not None for lin in linears):
        convert = _fp32_projection
    else:
        return None
    if convert is not _gguf_projection and not cpu_library_gemm.available():
        return None
    stack = [StackLayer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                        *(convert(lin) for lin in ls), qkv_bias=None if ls[0].bias is None else ls[0].bias.detach())
             for layer, ls in zip(layers, projections)]
    attn = layers[0].self_attn
    return DecodeStack(stack, StackShape(cfg.hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                         cfg.intermediate_size, cfg.rms_norm_eps, attn.scale))


def _gguf_projection(lin: Linear) -> GGUFProjection:
    return GGUFProjection(lin.packed.kind, lin.packed.blocks, lin.packed.tiles)


def _int8_projection(lin: Linear) -> Int8Projection:
    w: Int8Weights = lin.packed
    gemm = Int8Gemm(w.onednn.packed, w.onednn.scales, w.onednn.zero_points, w.outlier_weight_t.shape[1])
    return Int8Projection(gemm, w.inlier_mask, w.outliers, w.outlier_weight_t)


def _fp32_projection(lin: Linear) -> Fp32Projection:
    weight = onednn_fp32_weight(lin)  # [out, in]
    return Fp32Projection(Fp32Gemm(weight, weight.shape[0]))


class LlamaForCausalLM(nn.Module):
    """`forward` returns hidden states of every row; `compute_logits` runs the LM head on the rows that sample."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decode_stack: DecodeStack | None = None  # gguf's, int8's or fp32's layers in one C call

    def pack_linears(self, quantization: str, progress: bool = False,
                     outliers: dict[Linear, torch.Tensor] | None = None,
                     blocks: dict[Linear, tuple[str, torch.Tensor]] | None = None) -> None:
        """Move every projection and the LM head into a CPU library format (see engine/linear.py).

        "none" keeps fp32 (oneDNN-packed where available); embeddings, norms and the KV cache
        always stay in the model dtype. `outliers`: int8's fp32 input channels per layer;
        `blocks`: gguf's (kind, checkpoint blocks) per layer.
        """
        from tqdm import tqdm

        weight = self.embed_tokens.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            if quantization != "none":
                raise ValueError(f"{quantization} weights are a CPU fp32 feature")
            return
        if quantization == "none" and not torch.backends.mkldnn.is_available():
            return
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        desc = f"Packing weights ({quantization})"
        for module in tqdm(linears, desc=desc, unit="layer", disable=not progress, leave=False):
            if quantization == "int8":
                module.pack_int8((outliers or {}).get(module))
            elif quantization == "gguf" and module in (blocks or {}):
                module.pack_gguf(*blocks[module])
            else:
                PACKERS[quantization](module)
        self.decode_stack = decode_stack(self.layers, self.config)

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        for layer in self.layers:
            layer.self_attn.backend = backend
        if backend is not TORCH_BACKEND:
            self.decode_stack = None  # it runs the torch backend's CPU kernels

    def tie_weights(self) -> None:
        """After loading: a tied head gets its own transposed copy of the embedding (see Linear)."""
        if self.config.tie_word_embeddings:
            with torch.no_grad():
                self.lm_head.weight_t.copy_(self.embed_tokens.weight.t())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden: [T, hidden]
        x = self.embed_tokens(input_ids)
        rope = self.rope.lookup(positions, x.dtype)  # once per step, shared by every layer
        stack = self.decode_stack
        if stack is not None and stack.supports(x, rope[0], kv_caches, meta):
            return self.norm(stack(x, *rope, kv_caches, meta))  # the loop below, in C
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, rope, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> logits: [N, V], always fp32 for sampling
        return self.lm_head(hidden).float()
