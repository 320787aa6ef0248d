"""A Llama decoder stack for steps of short queries in one C call, where every projection is GGUF blocks (the C
kernels of cpu_quant / cpu_amx) or every one runs a oneDNN GEMM that C can call (kernels/cpu_library_gemm.py):
int8 with oneDNN weights, or oneDNN-packed fp32.

At batch 1 the layers' C kernels (cpu_ops, cpu_attention, cpu_quant) do about 5.5 ms of work per step
here, and calling them one by one from Python, through the modules (30 layers x nine calls with their
checks and allocations, the OpenMP threads going idle in between), made the step ~7 ms longer: 60 vs
~110 tok/s end to end. At 32 rows the same held for int8 (a step 37-46 ms from C against 51-58 layer by
layer: four calls and two torch ops per projection) and fp32 (74-86 against 84-103 ms). Here the same
kernels run back to back from C, in the same order on the same data, so the hidden states are bit for bit
those of the Python path; the Python path stays the reference and takes every step this one does not
(`DecodeStack.supports`).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from kernels import cpu_amx, cpu_attention, cpu_build, cpu_ops, cpu_quant
from kernels.cpu_library_gemm import Fp32Gemm, Int8Gemm
from kernels.paged_attention import AttentionMetadata

_KINDS = {"q4_1": 0, "q8_0": 1}
# Rows per stack call where every projection has AMX tiles or a library GEMM: a bound on the call's scratch
# (~40 KB a row here)
_TILED_MAX_ROWS = 256

_STACK = r"""
/* A library's GEMM (kernels/cpu_library_gemm.py) of x [M, K]: int8 codes, y [M, N] += ...; fp32, y = ...
   Nonzero on failure. */
typedef int (*library_gemm)(void *ctx, const void *x, int64_t M, int64_t K, float *y);

typedef struct {
    int32_t kind;  /* 0: Q4_1, 1: Q8_0 (GGUF), 2: int8 and 3: fp32 through a library's GEMM */
    const void *blocks, *tiles;  /* GGUF: ggml block rows, NULL where there are tiles; the same as AMX tiles, or NULL */
    library_gemm gemm;  /* int8 and fp32: the GEMM and its weights */
    void *ctx;
    const float *inlier_mask;  /* int8: [K], 0 at the outlier input channels, which skip quantization */
    const int64_t *outliers;  /* [n_outliers] */
    int64_t n_outliers;
    const float *outlier_weight_t;  /* [n_outliers, N] fp32 */
} projection;

typedef struct {
    const float *input_norm, *post_norm;  /* [H] */
    projection qkv, o, gate_up, down;
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

typedef struct { int8_t *q; float *outliers, *scale; } int8_scratch;  /* an int8 projection's coded input */

/* the thread counts the Python wrappers pick for the same calls */
static inline int ops_threads(const stack_step *s, int64_t elements) { return elements >= OPS_MIN ? s->threads : 1; }

/* engine/linear.py's int8 call: per-row codes of the inlier channels, the GEMM, then each row's scale and
   the outlier channels' fp32 product */
static int int8_linear(const stack_step *s, const projection *p, const float *x, float *y, int64_t N, int64_t K,
                       const int8_scratch *w) {
    const int64_t M = s->M, k = p->n_outliers;
    int8_quantize_f32(x, K, p->inlier_mask, p->outliers, k, w->q, w->outliers, w->scale, M, K, ops_threads(s, M * K));
    #pragma omp parallel for num_threads(ops_threads(s, M * N))  /* ~20 MB a 32-row step: one thread took ~1 ms */
    for (int64_t t = 0; t < M; ++t) memset(y + t * N, 0, sizeof(float) * (size_t)N);
    if (p->gemm(p->ctx, w->q, M, K, y)) return 1;
    int8_finish_f32(y, w->scale, w->outliers, p->outlier_weight_t, M, N, k, ops_threads(s, M * N * (k + 1)));
    return 0;
}

static inline int linear(const stack_step *s, const projection *p, const float *x, float *y, int64_t N, int64_t K,
                         const int8_scratch *w) {
    if (p->kind == 2) return int8_linear(s, p, x, y, N, K, w);
    if (p->kind == 3) return p->gemm(p->ctx, x, s->M, K, y);
    const int t = N * K >= QUANT_MIN ? s->threads : 1;
    if (p->tiles != NULL && (s->amx || s->M <= tiles_small_rows(p->kind == 0)))
        tile_linear_f32(x, p->tiles, y, s->M, N, K, p->kind == 0, t);
    else if (p->kind == 0) q4_1_linear_f32(x, p->blocks, y, s->M, N, K, t);
    else q8_0_linear_f32(x, p->blocks, y, s->M, N, K, t);
    return 0;
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

/* x [M, H], the residual stream, is run through layers[0 .. L) in place. Nonzero where a library GEMM failed. */
int decode_stack_f32(float *x, const stack_layer *layers, int64_t L, const stack_step *s) {
    const int64_t M = s->M, H = s->H, I = s->I, A = s->NH * s->D, QKV = A + 2 * s->NKV * s->D;
    const int64_t widest = H > I ? (H > A ? H : A) : (I > A ? I : A);
    float *buf = malloc(sizeof(float) * (size_t)(M * (3 * H + QKV + A + 3 * I + widest + 1)) + (size_t)(M * widest));
    float *h = buf, *qkv = h + M * H, *attn = qkv + M * QKV, *o = attn + M * A, *gu = o + M * H;
    float *act = gu + 2 * M * I, *down = act + M * I;
    /* then int8's scratch: outlier channels [M, <= widest] and row scales [M] as floats, codes [M, widest] */
    const int8_scratch w = {(int8_t *)(down + M * (H + widest + 1)), down + M * H, down + M * (H + widest)};
    const int attn_threads = s->NKV * s->work >= ATTN_MIN ? s->threads : 1;
    int failed = 0;
    for (int64_t l = 0; l < L; ++l) {
        const stack_layer *ly = layers + l;
        rms_norm_f32(x, H, ly->input_norm, h, M, H, s->eps, ops_threads(s, M * H));
        if ((failed = linear(s, &ly->qkv, h, qkv, QKV, H, &w))) break;
        if (ly->qkv_bias != NULL)
            for (int64_t i = 0; i < M * QKV; ++i) qkv[i] += ly->qkv_bias[i % QKV];
        write_and_attend(s, ly, qkv, attn, QKV, attn_threads);
        if ((failed = linear(s, &ly->o, attn, o, H, A, &w))) break;
        add_rms_norm_f32(x, o, ly->post_norm, x, h, M, H, s->eps, ops_threads(s, M * H));
        if ((failed = linear(s, &ly->gate_up, h, gu, 2 * I, H, &w))) break;
        silu_and_mul_f32(gu, act, M, I, ops_threads(s, 2 * M * I));
        if ((failed = linear(s, &ly->down, act, down, H, I, &w))) break;
        for (int64_t i = 0; i < M * H; ++i) x[i] += down[i];
    }
    free(buf);
    return failed;
}
"""


class _Projection(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("blocks", ctypes.c_void_p), ("tiles", ctypes.c_void_p),
                ("gemm", ctypes.c_void_p), ("ctx", ctypes.c_void_p), ("inlier_mask", ctypes.c_void_p),
                ("outliers", ctypes.c_void_p), ("n_outliers", ctypes.c_int64), ("outlier_weight_t", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("input_norm", "post_norm")] + \
               [(name, _Projection) for name in ("qkv", "o", "gate_up", "down")] + \
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
        lib.decode_stack_f32.restype = ctypes.c_int
    return lib


@dataclass
class GGUFProjection:
    """A projection's GGUF weights: ggml block rows and the same as AMX tiles, one of the two None."""
    kind: str  # "q4_1" or "q8_0"
    blocks: torch.Tensor | None
    tiles: torch.Tensor | None

    def fill(self, entry: _Projection) -> None:
        entry.kind = _KINDS[self.kind]
        entry.blocks = None if self.blocks is None else self.blocks.data_ptr()
        entry.tiles = None if self.tiles is None else self.tiles.data_ptr()


@dataclass
class Int8Projection:
    """engine/linear.py's int8 weights where oneDNN runs them: the GEMM C calls, and the input channels
    kept in fp32 (their weights [k, out])."""
    gemm: Int8Gemm
    inlier_mask: torch.Tensor  # [in] 0 at the outliers
    outliers: torch.Tensor  # [k] int64
    outlier_weight_t: torch.Tensor  # [k, out]

    def fill(self, entry: _Projection) -> None:
        entry.kind, entry.gemm, entry.ctx = 2, self.gemm.run, self.gemm.ctx
        entry.inlier_mask, entry.outliers = self.inlier_mask.data_ptr(), self.outliers.data_ptr()
        entry.n_outliers, entry.outlier_weight_t = len(self.outliers), self.outlier_weight_t.data_ptr()


@dataclass
class Fp32Projection:
    """engine/linear.py's oneDNN-packed fp32 weights: the GEMM C calls."""
    gemm: Fp32Gemm

    def fill(self, entry: _Projection) -> None:
        entry.kind, entry.gemm, entry.ctx = 3, self.gemm.run, self.gemm.ctx


Projection = GGUFProjection | Int8Projection | Fp32Projection


@dataclass
class StackLayer:
    """One decoder layer's weights: RMSNorm weights [H] and its four projections."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
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
        gguf = [p for p in projections if isinstance(p, GGUFProjection)]
        # the calls the Python path sends to the blocks, or to the tiles or a library GEMM, which take any rows
        tiled = cpu_amx.available() and all(p.tiles is not None for p in gguf)
        self.max_rows = _TILED_MAX_ROWS if tiled else min((cpu_quant.max_rows(p.kind) for p in gguf),
                                                          default=_TILED_MAX_ROWS)
        self._table = (_Layer * len(layers))()
        for entry, layer in zip(self._table, layers):
            entry.input_norm, entry.post_norm = layer.input_norm.data_ptr(), layer.post_norm.data_ptr()
            for name in ("qkv", "o", "gate_up", "down"):
                getattr(layer, name).fill(getattr(entry, name))
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
        if _library().decode_stack_f32(x.data_ptr(), ctypes.addressof(self._table), len(self.layers),
                                       ctypes.addressof(step)):
            raise RuntimeError("a library GEMM of the decode stack failed (see stderr)")
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
