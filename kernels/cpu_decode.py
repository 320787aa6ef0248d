"""A Llama decoder stack for steps of a few rows in one C call, for layers stored as GGUF blocks.

At batch 1 the layers' C kernels (cpu_ops, cpu_attention, cpu_quant) do about 5.5 ms of work per step
here, and calling them one by one from Python, through the modules (30 layers x nine calls with their
checks and allocations, the OpenMP threads going idle in between), made the step ~7 ms longer: 60 vs
~110 tok/s end to end. Here the same kernels run back to back from C, in the same order on the same
data, so the hidden states are bit for bit those of the Python path; the Python path stays the
reference and takes every step this one does not (`DecodeStack.supports`).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from kernels import cpu_amx, cpu_attention, cpu_build, cpu_ops, cpu_quant
from kernels.paged_attention import AttentionMetadata

_KINDS = {"q4_1": 0, "q8_0": 1}
# Rows per stack call where every projection has AMX tiles: a bound on the call's scratch (~30 KB a row here)
_TILED_MAX_ROWS = 256

_STACK = r"""
typedef struct {
    const float *input_norm, *post_norm;  /* [H] */
    const void *qkv, *o, *gate_up, *down;  /* ggml block rows, NULL where there are tiles */
    int32_t qkv_kind, o_kind, gate_up_kind, down_kind;  /* 0: Q4_1, 1: Q8_0 */
    const void *qkv_tiles, *o_tiles, *gate_up_tiles, *down_tiles;  /* the same as AMX tiles, or NULL */
    const float *qkv_bias;  /* [(NH + 2 NKV) D], or NULL */
    void *k_cache, *v_cache;  /* [NB, BS, NKV, D] */
    int32_t kv_f16;  /* the caches hold fp16, else fp32 */
} stack_layer;

typedef struct {
    int64_t M, H, NH, NKV, D, I, BS;  /* rows, hidden, heads, KV heads, head dim, intermediate, block size */
    float eps, scale;
    const float *cos, *sin;  /* [M, D / 2] */
    const int64_t *slots;  /* [M] */
    const int64_t *tables, *lens, *qstart, *qlen;  /* attention's requests, as paged_attention_f32 takes them */
    int64_t table_stride, R, work;
    int threads;
    int amx;  /* whether AMX takes the tiles' calls of many rows */
} stack_step;

/* the thread counts the Python wrappers pick for the same calls */
static inline int ops_threads(const stack_step *s, int64_t elements) { return elements >= OPS_MIN ? s->threads : 1; }

static inline void linear(const stack_step *s, int kind, const float *x, const void *w, const void *tiles,
                          float *y, int64_t N, int64_t K) {
    const int t = N * K >= QUANT_MIN ? s->threads : 1;
    if (tiles != NULL && (s->amx || s->M <= tiles_small_rows(kind == 0)))
        tile_linear_f32(x, tiles, y, s->M, N, K, kind == 0, t);
    else if (kind == 0) q4_1_linear_f32(x, w, y, s->M, N, K, t);
    else q8_0_linear_f32(x, w, y, s->M, N, K, t);
}

/* rope_write_kv, then paged_attention, each for the layer's cache dtype */
static inline void write_and_attend(const stack_step *s, const stack_layer *ly, float *qkv, float *attn,
                                    int64_t QKV, int attn_threads) {
    const int64_t M = s->M;
#if defined(__FLT16_MAX__)
    if (ly->kv_f16) {
        rope_write_kv_f16(qkv, s->cos, s->sin, s->slots, ly->k_cache, ly->v_cache, M, s->NH, s->NKV, s->D,
                          ops_threads(s, M * QKV));
        paged_attention_f16(qkv, QKV, s->D, ly->k_cache, ly->v_cache, s->tables, s->table_stride, s->lens,
                            s->qstart, s->qlen, attn, s->R, s->NH, s->NKV, s->D, s->BS, s->scale, attn_threads);
        return;
    }
#endif
    rope_write_kv_f32(qkv, s->cos, s->sin, s->slots, ly->k_cache, ly->v_cache, M, s->NH, s->NKV, s->D,
                      ops_threads(s, M * QKV));
    paged_attention_f32(qkv, QKV, s->D, ly->k_cache, ly->v_cache, s->tables, s->table_stride, s->lens,
                        s->qstart, s->qlen, attn, s->R, s->NH, s->NKV, s->D, s->BS, s->scale, attn_threads);
}

/* x [M, H], the residual stream, is run through layers[0 .. L) in place. */
void decode_stack_f32(float *x, const stack_layer *layers, int64_t L, const stack_step *s) {
    const int64_t M = s->M, H = s->H, I = s->I, A = s->NH * s->D, QKV = A + 2 * s->NKV * s->D;
    float *buf = malloc(sizeof(float) * (size_t)(M * (3 * H + QKV + A + 3 * I)));
    float *h = buf, *qkv = h + M * H, *attn = qkv + M * QKV, *o = attn + M * A, *gu = o + M * H;
    float *act = gu + 2 * M * I, *down = act + M * I;
    const int attn_threads = s->NKV * s->work >= ATTN_MIN ? s->threads : 1;
    for (int64_t l = 0; l < L; ++l) {
        const stack_layer *ly = layers + l;
        rms_norm_f32(x, H, ly->input_norm, h, M, H, s->eps, ops_threads(s, M * H));
        linear(s, ly->qkv_kind, h, ly->qkv, ly->qkv_tiles, qkv, QKV, H);
        if (ly->qkv_bias != NULL)
            for (int64_t i = 0; i < M * QKV; ++i) qkv[i] += ly->qkv_bias[i % QKV];
        write_and_attend(s, ly, qkv, attn, QKV, attn_threads);
        linear(s, ly->o_kind, attn, ly->o, ly->o_tiles, o, H, A);
        add_rms_norm_f32(x, o, ly->post_norm, x, h, M, H, s->eps, ops_threads(s, M * H));
        linear(s, ly->gate_up_kind, h, ly->gate_up, ly->gate_up_tiles, gu, 2 * I, H);
        silu_and_mul_f32(gu, act, M, I, ops_threads(s, 2 * M * I));
        linear(s, ly->down_kind, act, ly->down, ly->down_tiles, down, H, I);
        for (int64_t i = 0; i < M * H; ++i) x[i] += down[i];
    }
    free(buf);
}
"""


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("input_norm", "post_norm", "qkv", "o", "gate_up", "down")] + \
               [(name, ctypes.c_int32) for name in ("qkv_kind", "o_kind", "gate_up_kind", "down_kind")] + \
               [(name, ctypes.c_void_p) for name in ("qkv_tiles", "o_tiles", "gate_up_tiles", "down_tiles")] + \
               [(name, ctypes.c_void_p) for name in ("qkv_bias", "k_cache", "v_cache")] + [("kv_f16", ctypes.c_int32)]


class _Step(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("M", "H", "NH", "NKV", "D", "I", "BS")] + \
               [("eps", ctypes.c_float), ("scale", ctypes.c_float)] + \
               [(name, ctypes.c_void_p) for name in ("cos", "sin", "slots", "tables", "lens", "qstart", "qlen")] + \
               [(name, ctypes.c_int64) for name in ("table_stride", "R", "work")] + \
               [("threads", ctypes.c_int), ("amx", ctypes.c_int)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    defines = (f"#define OPS_MIN {cpu_ops._PARALLEL_MIN}\n#define QUANT_MIN {cpu_quant._PARALLEL_MIN}\n"
               f"#define ATTN_MIN {cpu_attention._PARALLEL_MIN_ROWS}\n")
    source = (cpu_build.PRELUDE + cpu_ops.C_BODY + cpu_attention.C_BODY + cpu_quant.C_BODY + cpu_amx.C_BODY + defines
              + _STACK)
    lib = cpu_build.load("decode_stack", source)
    if lib is not None:
        lib.decode_stack_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        lib.decode_stack_f32.restype = None
    return lib


@dataclass
class StackLayer:
    """One decoder layer's weights: RMSNorm weights [H], and per projection (kind, ggml block rows, the same
    as AMX tiles), one of the two None."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: tuple[str, torch.Tensor | None, torch.Tensor | None]
    o: tuple[str, torch.Tensor | None, torch.Tensor | None]
    gate_up: tuple[str, torch.Tensor | None, torch.Tensor | None]
    down: tuple[str, torch.Tensor | None, torch.Tensor | None]
    qkv_bias: torch.Tensor | None


@dataclass(frozen=True)
class StackShape:
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    scale: float


class DecodeStack:
    """The decoder layers of one model as `decode_stack_f32` runs them; holds its layers' tensors."""

    def __init__(self, layers: list[StackLayer], shape: StackShape):
        self.layers, self.shape = layers, shape
        projections = [p for layer in layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        # the calls the Python path sends to the blocks, or to the tiles, which take any number of rows
        tiled = cpu_amx.available() and all(tiles is not None for _, _, tiles in projections)
        self.max_rows = _TILED_MAX_ROWS if tiled else min(cpu_quant.max_rows(kind) for kind, _, _ in projections)
        self._table = (_Layer * len(layers))()
        for entry, layer in zip(self._table, layers):
            entry.input_norm, entry.post_norm = layer.input_norm.data_ptr(), layer.post_norm.data_ptr()
            for name in ("qkv", "o", "gate_up", "down"):
                kind, blocks, tiles = getattr(layer, name)
                setattr(entry, name, None if blocks is None else blocks.data_ptr())
                setattr(entry, f"{name}_kind", _KINDS[kind])
                setattr(entry, f"{name}_tiles", None if tiles is None else tiles.data_ptr())
            entry.qkv_bias = None if layer.qkv_bias is None else layer.qkv_bias.data_ptr()
        self._caches: list[int] = []

    @staticmethod
    def available() -> bool:
        return _library() is not None

    def supports(self, x: torch.Tensor, cos: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 meta: AttentionMetadata) -> bool:
        """Whether the Python path would run this step on the same kernels: few rows, each request's
        queries short enough for the attention kernel, CPU fp32 contiguous data, no autograd."""
        cache = kv_caches[0][0]
        if x.shape[0] > self.max_rows or torch.is_grad_enabled() or not cpu_ops.rope_write_kv_supported(
                x, cache, cos, meta.slot_mapping) or not cpu_attention.available(cache.dtype):
            return False
        short = meta.short_queries
        return (short is not None and len(short.requests) == meta.num_seqs and short.block_tables.is_contiguous()
                and short.block_tables.dtype == torch.int64 and _library() is not None)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """x [M, H] (overwritten) through every layer; callers check `supports` first."""
        self._bind(kv_caches)
        s, short = self.shape, meta.short_queries
        bs = kv_caches[0][0].shape[1]
        step = _Step(x.shape[0], s.hidden, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate, bs, s.eps,
                     s.scale, cos.data_ptr(), sin.data_ptr(), meta.slot_mapping.data_ptr(),
                     short.block_tables.data_ptr(), short.seq_lens.data_ptr(), short.query_start.data_ptr(),
                     short.query_len.data_ptr(), short.block_tables.stride(0), meta.num_seqs, short.work,
                     torch.get_num_threads(), int(cpu_amx.available()))
        _library().decode_stack_f32(x.data_ptr(), ctypes.addressof(self._table), len(self.layers),
                                    ctypes.addressof(step))
        return x

    def _bind(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        # the runner allocates its caches once; look again only when they move
        ptrs = [t.data_ptr() for kv in kv_caches for t in kv]
        if ptrs != self._caches:
            assert all(t.is_contiguous() and t.dtype in (torch.float32, torch.float16) for kv in kv_caches for t in kv)
            for entry, (k, v) in zip(self._table, kv_caches):
                entry.k_cache, entry.v_cache = k.data_ptr(), v.data_ptr()
                entry.kv_f16 = int(k.dtype == torch.float16)
            self._caches = ptrs
