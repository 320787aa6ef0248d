"""Linear layers of a few rows computed straight from a GGUF checkpoint's quantized blocks, in C.

A weight row is a run of 32-weight blocks: Q4_1 holds an fp16 scale d, an fp16 offset m and 32 4-bit
codes q (w = d * q + m), Q8_0 an fp16 scale and 32 int8 codes (w = d * q), as ggml's block_q4_1 and
block_q8_0. The default model ships this way (Q4_1 projections, a Q8_0 embedding that is also its LM
head), and Sluice's fp32 weights are exactly those values, so a product over the blocks is the fp32
product up to summation order, while it reads 5 (Q4_1) or 8.5 (Q8_0) bits per weight instead of fp16's
16. A batch-1 decode step is bound by weight reads.

The 32 codes of a block are widened to fp32 once and serve up to eight input rows: for one or two rows as
y += d * (q . x_block) + m * sum(x_block), for more as the block's weights w = d * q + m made in registers
(shared by the rows) and y += w . x_block; more rows go eight at a time over a weight row read once.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from kernels import cpu_build

BLOCK = 32  # weights per block
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}  # fp16 d (and m), then the codes
# Input rows per call: past these, fbgemm's fp16 GEMM was faster here (all the default model's Q4_1
# projections: 1 row 5.0 vs 15.9 ms, 8 rows 14.2 vs 23.3, 16 rows 28.9 vs 36.3, 24 rows 44.7 vs 40.0; its
# Q8_0 LM head from memory: 1 row 1.2 vs 2.8 ms, 8 rows 3.3 vs 4.3, 12 rows 5.5 vs 5.2).
MAX_ROWS = {"q4_1": 16, "q8_0": 8}

C_BODY = r"""
/* Weights stream from memory once per step, and the hardware prefetcher alone left the kernels waiting:
   fetching 2 KB ahead of the block being read took a Q4_1 layer from DRAM at 1 row from 4.6 to 12 GB/s
   here (1.5 KB and more were all as good). Rows are contiguous, so "ahead" is the next blocks of the row
   and then of the rows after it, which the same thread reads next. */
#define PREFETCH_AHEAD(block) __builtin_prefetch((const char *)(block) + 2048)

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* sum over the block's 32 lanes of q * x: q0..q3 its codes widened to fp32, xb the input's 32 values */
static inline __m256 dot_block(__m256 q0, __m256 q1, __m256 q2, __m256 q3, const float *xb) {
    __m256 t = _mm256_mul_ps(q0, _mm256_loadu_ps(xb));
    t = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xb + 8), t);
    t = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xb + 16), t);
    return _mm256_fmadd_ps(q3, _mm256_loadu_ps(xb + 24), t);
}

/* acc[r] += w . x_r over one block for each of M rows of x (at stride K); w0..w3: the block's 32 weights */
static inline __attribute__((always_inline)) void add_block_rows(__m256 *acc, __m256 w0, __m256 w1, __m256 w2,
                                                                 __m256 w3, const float *x, int64_t K, const int M) {
    for (int r = 0; r < M; ++r) {
        const float *xb = x + r * K;
        acc[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[r]);
        acc[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), acc[r]);
        acc[r] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), acc[r]);
        acc[r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), acc[r]);
    }
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
#endif

typedef struct { _Float16 d, m; uint8_t qs[16]; } block_q4_1;  /* codes 0-15 low nibbles, 16-31 high */

#define MAX_M 8

/* call(R) with R the literal value of rows (1 .. MAX_M), so each row count gets its own unrolled loop */
#define FOR_ROWS(call, rows) switch (rows) { \
    case 1: call(1); break; case 2: call(2); break; case 3: call(3); break; case 4: call(4); break; \
    case 5: call(5); break; case 6: call(6); break; case 7: call(7); break; default: call(8); break; }

/* y[0..M) of one output row n: sum over its blocks of w . x_r, each block's 32 weights w = d * q + m
   made in registers (d * q is exact in fp32: 11 bits times 4, so w is the dequantized fp32 weight). M is
   a compile-time constant at every call, so the row loops unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void q4_1_row(const float *x, const block_q4_1 *row, float *y,
                                                           int64_t nb, int64_t K, int64_t N, const int M) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[MAX_M];
    for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi32(15);
    for (int64_t b = 0; b < nb; ++b) {
        PREFETCH_AHEAD(row + b);
        /* widened from memory: lane j holds byte j (codes j and 16 + j), then byte 8 + j */
        const __m256i c0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)row[b].qs));
        const __m256i c1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row[b].qs + 8)));
        const __m256 d = _mm256_set1_ps((float)row[b].d), m = _mm256_set1_ps((float)row[b].m);
        const __m256 w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c0, low)), d, m);  /* codes 0-7 */
        const __m256 w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c1, low)), d, m);  /* 8-15 */
        const __m256 w2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c0, 4)), d, m);  /* 16-23 */
        const __m256 w3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c1, 4)), d, m);  /* 24-31 */
        add_block_rows(acc, w0, w1, w2, w3, x + b * 32, K, M);
    }
    for (int r = 0; r < M; ++r) y[r * N] = hsum8(acc[r]);
#else
    float out[MAX_M] = {0.f};
    for (int64_t b = 0; b < nb; ++b) {
        PREFETCH_AHEAD(row + b);
        const float d = (float)row[b].d, m = (float)row[b].m;
        for (int j = 0; j < 16; ++j) {
            const float lo = (float)(row[b].qs[j] & 15) * d + m, hi = (float)(row[b].qs[j] >> 4) * d + m;
            for (int r = 0; r < M; ++r) out[r] += lo * x[r * K + b * 32 + j] + hi * x[r * K + b * 32 + 16 + j];
        }
    }
    for (int r = 0; r < M; ++r) y[r * N] = out[r];
#endif
}

/* As q4_1_row for one or two input rows, with d and m factored out of the block: d * (q . x) + m * sum(x),
   sx holding the block sums of x. Fewer multiplies per weight than making w where there is no row to share it. */
static inline __attribute__((always_inline)) void q4_1_row_factored(const float *x, const block_q4_1 *row,
                                                                    const float *sx, float *y, int64_t nb,
                                                                    int64_t K, int64_t N, const int M) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    float mo[2] = {0.f, 0.f};
    const __m256i low = _mm256_set1_epi32(15);
    for (int64_t b = 0; b < nb; ++b) {
        PREFETCH_AHEAD(row + b);
        const __m256i c0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)row[b].qs));
        const __m256i c1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row[b].qs + 8)));
        const __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(c0, low));
        const __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(c1, low));
        const __m256 q2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(c0, 4));
        const __m256 q3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(c1, 4));
        const __m256 d = _mm256_set1_ps((float)row[b].d);
        const float m = (float)row[b].m;
        for (int r = 0; r < M; ++r) {
            acc[r] = _mm256_fmadd_ps(dot_block(q0, q1, q2, q3, x + r * K + b * 32), d, acc[r]);
            mo[r] += m * sx[r * nb + b];
        }
    }
    for (int r = 0; r < M; ++r) y[r * N] = hsum8(acc[r]) + mo[r];
#else
    (void)sx;
    q4_1_row(x, row, y, nb, K, N, M);
#endif
}

/* y[M, N] = x[M, K] @ W^T for W given as N rows of K / 32 blocks; K % 32 == 0, all contiguous. */
void q4_1_linear_f32(const float *x, const block_q4_1 *w, float *y, int64_t M, int64_t N, int64_t K,
                     int threads) {
    const int64_t nb = K / 32;
    float *sx = M <= 2 ? malloc(sizeof(float) * (size_t)(M * nb)) : NULL;  /* sum of x over each block, per row */
    for (int64_t i = 0; sx != NULL && i < M * nb; ++i) {
        float s = 0.f;
        for (int j = 0; j < 32; ++j) s += x[i * 32 + j];
        sx[i] = s;
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const block_q4_1 *row = w + n * nb;
        if (M <= 2) {
            if (M == 1) q4_1_row_factored(x, row, sx, y + n, nb, K, N, 1);
            else q4_1_row_factored(x, row, sx, y + n, nb, K, N, 2);
            continue;
        }
        /* groups of 8 input rows; the weight row is read from memory once, then from L1 */
        for (int64_t g = 0; g < M; g += MAX_M) {
            const float *xg = x + g * K;
            float *yg = y + g * N + n;
            #define Q4_1_ROWS(R) q4_1_row(xg, row, yg, nb, K, N, R)
            FOR_ROWS(Q4_1_ROWS, M - g < MAX_M ? M - g : MAX_M);
        }
    }
    free(sx);
}

typedef struct { _Float16 d; int8_t qs[32]; } __attribute__((packed)) block_q8_0;

/* As q4_1_row for Q8_0 blocks (w = d * q, exact in fp32: 11 bits times 8); one or two rows as d * (q . x). */
static inline __attribute__((always_inline)) void q8_0_row(const float *x, const block_q8_0 *row, float *y,
                                                           int64_t nb, int64_t K, int64_t N, const int M) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[MAX_M];
    for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        PREFETCH_AHEAD(row + b);
        const int8_t *qs = row[b].qs;
        const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)qs)));
        const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8))));
        const __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 16))));
        const __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 24))));
        const __m256 d = _mm256_set1_ps((float)row[b].d);
        if (M <= 2) {
            for (int r = 0; r < M; ++r)
                acc[r] = _mm256_fmadd_ps(dot_block(q0, q1, q2, q3, x + r * K + b * 32), d, acc[r]);
            continue;
        }
        const __m256 w0 = _mm256_mul_ps(q0, d), w1 = _mm256_mul_ps(q1, d);
        const __m256 w2 = _mm256_mul_ps(q2, d), w3 = _mm256_mul_ps(q3, d);
        add_block_rows(acc, w0, w1, w2, w3, x + b * 32, K, M);
    }
    for (int r = 0; r < M; ++r) y[r * N] = hsum8(acc[r]);
#else
    float out[MAX_M] = {0.f};
    for (int64_t b = 0; b < nb; ++b) {
        PREFETCH_AHEAD(row + b);
        const float d = (float)row[b].d;
        for (int j = 0; j < 32; ++j)
            for (int r = 0; r < M; ++r) out[r] += (float)row[b].qs[j] * d * x[r * K + b * 32 + j];
    }
    for (int r = 0; r < M; ++r) y[r * N] = out[r];
#endif
}

/* As q4_1_linear_f32 for Q8_0 blocks. */
void q8_0_linear_f32(const float *x, const block_q8_0 *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t nb = K / 32;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const block_q8_0 *row = w + n * nb;
        for (int64_t g = 0; g < M; g += MAX_M) {
            const float *xg = x + g * K;
            float *yg = y + g * N + n;
            #define Q8_0_ROWS(R) q8_0_row(xg, row, yg, nb, K, N, R)
            FOR_ROWS(Q8_0_ROWS, M - g < MAX_M ? M - g : MAX_M);
        }
    }
}
"""

_SOURCE = cpu_build.PRELUDE + C_BODY

# Below this many weights a call runs on one thread: a parallel region costs more than the work.
_PARALLEL_MIN = 1 << 16


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load("quant_ops", _SOURCE)
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.q4_1_linear_f32, lib.q8_0_linear_f32):
        fn.argtypes, fn.restype = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int], None
    return lib


def available() -> bool:
    return _library() is not None


def supports(x: torch.Tensor, kind: str) -> bool:
    """Whether `block_linear` takes x for `kind`: CPU fp32 [M, K], M <= MAX_ROWS[kind], contiguous, no autograd."""
    return (x.dim() == 2 and x.shape[0] <= MAX_ROWS[kind] and x.is_cpu and x.dtype == torch.float32
            and x.is_contiguous() and not (torch.is_grad_enabled() and x.requires_grad) and available())


def block_linear(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N], W given as `blocks` [N, K / 32 * BLOCK_BYTES[kind]] uint8 (ggml block
    rows of `kind`, "q4_1" or "q8_0"). Callers check `supports(x, kind)` first."""
    m, k = x.shape
    n = blocks.shape[0]
    assert blocks.dtype == torch.uint8 and blocks.is_contiguous() and blocks.shape[1] * BLOCK == k * BLOCK_BYTES[kind]
    assert m <= MAX_ROWS[kind]  # the kernels' register blocking
    y = torch.empty(m, n)
    threads = torch.get_num_threads() if n * k >= _PARALLEL_MIN else 1
    kernel = _library().q4_1_linear_f32 if kind == "q4_1" else _library().q8_0_linear_f32
    kernel(x.data_ptr(), blocks.data_ptr(), y.data_ptr(), m, n, k, threads)
    return y


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """Q8_0 block rows [N, K / 32 * 34] of weight [N, K] (K % 32 == 0), rounded as ggml's quantize_row_q8_0:
    per 32 weights d = max |w| / 127 (kept in fp16) and q = round(w / d)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    d = w.abs().amax(dim=-1, keepdim=True) / 127  # [N, nb, 1]
    q = torch.where(d > 0, w / d.clamp(min=1e-30), torch.zeros_like(w)).round().clamp(-127, 127)
    parts = [d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)]  # [N, nb, 2], [N, nb, 32]
    return torch.cat(parts, dim=-1).reshape(n, -1).contiguous()


def dequantize(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The fp32 weights [N, K] that `blocks` of `kind` hold (the reference for the kernels)."""
    n = blocks.shape[0]
    b = blocks.view(n, -1, BLOCK_BYTES[kind])
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [N, nb, 1]
    if kind == "q8_0":
        return (d * b[..., 2:].contiguous().view(torch.int8).float()).reshape(n, -1)
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    qs = b[..., 4:]
    q = torch.cat([qs & 15, qs >> 4], dim=-1).float()  # [N, nb, 32]: codes 0-15, then 16-31
    return (d * q + m).reshape(n, -1)
