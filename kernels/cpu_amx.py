"""GGUF block linears from compact tiles: on CPUs with AMX every call of kernels/cpu_quant.py's blocks.

Weights are repacked once at load into AMX's B tile order, as compact as the checkpoint (5 bits a weight
for Q4_1, 8.5 for Q8_0). Both paths below keep fp32's precision where fbgemm's fp16 weights, which took
the calls of more rows before, were off by ~2e-4.

- Up to 7 rows (5 for Q8_0): AVX-512 VNNI (AVX2's `vpmaddwd`, up to 2 rows, where there is none). A block's
  codes (Q4_1's 0..15, Q8_0's -127..127) widen to int16 in registers, and each input block of 32 values
  becomes two int16 codes per value against the block's largest (~31 bits between them), so `vpdpwssd`
  gives q . x exactly in int32 and fp32 code applies the block's fp16 scale and offset:
  y += d * (q . x) + m * sum(x); ~2e-7 relative. The tile order is already VNNI's (a 32-bit lane holds one
  column's two consecutive k). Bound by reading the weights at 1-2 rows: the default model's 120
  projections took 2.6-3.1 ms at 1 row against the blocks' 4.4, and 5.3-5.9 at 5 rows (speculative
  verification) against 7.9.
- More rows: AMX multiplies bf16 tiles into fp32. The codes are exact in bf16 and each input value is split
  into two bf16 parts, x = hi + lo (16 significant bits), so per block the tile unit computes q . x to
  ~3e-6 relative. A call expands a column tile's codes into bf16 B tiles once, in L1, and every 16 rows of x
  reuse them: 16 rows in 8.5 ms against the blocks' 19.1, 512 rows ~2x faster than fbgemm's fp16 GEMM, and
  the LM head at 32 rows in 2.3 ms against 7.6.

Where the CPU, the compiler or the OS has no AMX, `available()` is False: the few-row kernels still read
tiles (AVX-512 VNNI up to 7 rows, AVX2 up to 2; kernels/cpu_tiles_source.py), and the blocks and fbgemm
take the calls of more rows.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from kernels import cpu_build, cpu_quant, cpu_tiles_source

TILE = 16  # output columns (weight rows) and input rows per tile
# 16 weight rows x one block: 4-bit (Q4_1) or 8-bit (Q8_0) codes, fp16 scales (and Q4_1's offsets)
TILE_BYTES = {"q4_1": 256 + 2 * 32, "q8_0": 512 + 32}

C_BODY = cpu_tiles_source.C_BODY + r"""
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

/* the kernel gives a process tile state only on request */
int amx_request(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0; }

/* 16 weight rows x one 32-weight block, expanded: codes as a B tile (16 k pairs x 16 columns x 2 bf16), fp32 d, m */
typedef struct { uint16_t codes[512]; float d[16], m[16]; } amx_wtile;

/* tiles 0 and 4: C (R rows of 16 fp32); 1, 2 and 5, 6: A (x's hi and lo parts, R rows of 32 bf16); 3 and 7: B */
static void amx_config(int R) {
    struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; ++t) { c.colsb[t] = 64; c.rows[t] = (t & 3) == 3 ? 16 : R; }
    _tile_loadconfig(&c);
}

static inline __m512 bf16_to_f32(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* x [M, K] as A tiles [M / 16][K / 32][hi, lo][16 rows][32 bf16] (rows past M zero), and its block sums */
static void amx_pack_x(const float *x, int64_t M, int64_t K, uint16_t *a, float *sx) {
    const int64_t nb = K / 32, MT = (M + 15) / 16;
    for (int64_t t = 0; t < MT * nb; ++t) {
        const int64_t mt = t / nb, b = t % nb;
        uint16_t *hi = a + t * 1024, *lo = hi + 512;
        for (int r = 0; r < 16; ++r) {
            const int64_t m = mt * 16 + r;
            if (m >= M) {
                memset(hi + r * 32, 0, 64);
                memset(lo + r * 32, 0, 64);
                sx[m * nb + b] = 0.f;
                continue;
            }
            const __m512 x0 = _mm512_loadu_ps(x + m * K + b * 32), x1 = _mm512_loadu_ps(x + m * K + b * 32 + 16);
            const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);  /* round to nearest */
            const __m512 h0 = bf16_to_f32(_mm512_castsi512_si256(h)), h1 = bf16_to_f32(_mm512_extracti64x4_epi64(h, 1));
            _mm512_storeu_si512(hi + r * 32, h);
            const __m512bh l = _mm512_cvtne2ps_pbh(_mm512_sub_ps(x1, h1), _mm512_sub_ps(x0, h0));
            _mm512_storeu_si512(lo + r * 32, (__m512i)l);
            sx[m * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
        }
    }
}

/* nb compact tiles into B tiles and fp32 scales: a code's bf16 is a table lookup of its nibble */
static void amx_expand_q4(const amx_q4tile *src, amx_wtile *dst, int64_t nb) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i bf16_of = (__m512i)_mm512_cvtne2ps_pbh(iota, iota), low = _mm512_set1_epi16(15);
    for (int64_t b = 0; b < nb; ++b) {
        /* four tiles ahead, from memory (past the last: the thread's next column tile, or nothing; a
           prefetch does not fault) */
        for (int l = 0; l < (int)sizeof(amx_q4tile); l += 64)
            _mm_prefetch((const char *)(src + b + 4) + l, _MM_HINT_T0);
        for (int t = 0; t < 8; ++t) {
            const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(src[b].codes + 32 * t)));
            _mm512_store_si512(dst[b].codes + 32 * t, _mm512_permutexvar_epi16(_mm512_and_si512(v, low), bf16_of));
            _mm512_store_si512(dst[b].codes + 32 * (t + 8), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), bf16_of));
        }
        _mm512_store_ps(dst[b].d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)src[b].d)));
        _mm512_store_ps(dst[b].m, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)src[b].m)));
    }
}

/* nb compact tiles into B tiles and fp32 scales: int8 -> fp32 -> bf16, exact */
static void amx_expand_q8(const amx_q8tile *src, amx_wtile *dst, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b) {
        for (int l = 0; l < (int)sizeof(amx_q8tile); l += 64)  /* four tiles ahead, as amx_expand_q4 */
            _mm_prefetch((const char *)(src + b + 4) + l, _MM_HINT_T0);
        for (int t = 0; t < 16; ++t) {
            const __m128i *codes = (const __m128i *)(src[b].codes + 32 * t);
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(codes)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(codes + 1)));
            _mm512_store_si512(dst[b].codes + 32 * t, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
        _mm512_store_ps(dst[b].d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)src[b].d)));
    }
}

/* y[mt's R (8 or 16) rows, nt's 16 columns] over all blocks. Two C tiles in turn, so the tile unit
   multiplies one block while the vector units scale the other's sums. */
static inline __attribute__((always_inline)) void amx_tile(const uint16_t *a, const float *sx, const amx_wtile *w,
                                                           float *y, int64_t nb, int64_t N, int rows, const int R,
                                                           const int has_m) {
    float c[512] __attribute__((aligned(64)));
    __m512 acc[16];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 2) {
        const int two = b + 1 < nb;
        _tile_zero(0);
        _tile_loadd(1, a + b * 1024, 64);
        _tile_loadd(2, a + b * 1024 + 512, 64);
        _tile_loadd(3, w[b].codes, 64);
        _tile_dpbf16ps(0, 1, 3);
        _tile_dpbf16ps(0, 2, 3);
        if (two) {
            _tile_zero(4);
            _tile_loadd(5, a + (b + 1) * 1024, 64);
            _tile_loadd(6, a + (b + 1) * 1024 + 512, 64);
            _tile_loadd(7, w[b + 1].codes, 64);
            _tile_dpbf16ps(4, 5, 7);
            _tile_dpbf16ps(4, 6, 7);
        }
        _tile_stored(0, c, 64);
        if (two) _tile_stored(4, c + 256, 64);
        for (int h = 0; h <= two; ++h) {
            const __m512 d = _mm512_load_ps(w[b + h].d), m = _mm512_load_ps(w[b + h].m);
            for (int r = 0; r < R; ++r) {
                acc[r] = _mm512_fmadd_ps(d, _mm512_load_ps(c + h * 256 + r * 16), acc[r]);
                if (has_m) acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[r * nb + b + h]), acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; ++r) _mm512_storeu_ps(y + r * N, acc[r]);
}

#define AMX_X_CHUNK_BYTES (1 << 20)

/* y[M, N] = x[M, K] @ W^T, N % 16 == 0, K % 32 == 0. W as [N / 16][K / 32] compact tiles, amx_q4tile (q4)
   or amx_q8tile, each column tile's expanded once per call (per chunk of x) into a thread's scratch. */
void amx_linear_f32(const float *x, const void *w, float *y, int64_t M, int64_t N, int64_t K, int q4, int threads) {
    const int64_t nb = K / 32, MT = (M + 15) / 16, NT = N / 16;
    const int R = M <= 8 ? 8 : 16;  /* the tiles' rows: fewer rows, less tile and vector work */
    uint16_t *a = aligned_alloc(64, (size_t)(MT * nb) * 2048);
    float *sx = malloc(sizeof(float) * (size_t)(MT * 16 * nb));
    amx_pack_x(x, M, K, a, sx);
    /* x's tiles in chunks that stay in L2 (each column tile reads all of a chunk): at 512 rows all of them
       were 3 MB for K = 1536, and the down projection took 2.4 ms, as long as gate/up with twice its outputs */
    const int64_t chunk = AMX_X_CHUNK_BYTES / (nb * 2048) > 0 ? AMX_X_CHUNK_BYTES / (nb * 2048) : 1;
    #pragma omp parallel num_threads(threads)
    {
        amx_config(R);  /* per thread: tile configuration is thread state */
        amx_wtile *scratch = aligned_alloc(64, sizeof(amx_wtile) * (size_t)nb);
        for (int64_t m0 = 0; m0 < MT; m0 += chunk) {
            const int64_t m1 = m0 + chunk < MT ? m0 + chunk : MT;
            #pragma omp for schedule(static) nowait
            for (int64_t nt = 0; nt < NT; ++nt) {
                if (q4) amx_expand_q4((const amx_q4tile *)w + nt * nb, scratch, nb);
                else amx_expand_q8((const amx_q8tile *)w + nt * nb, scratch, nb);
                const amx_wtile *wt = scratch;
                for (int64_t mt = m0; mt < m1; ++mt) {
                    const int rows = M - mt * 16 < 16 ? (int)(M - mt * 16) : 16;
                    const uint16_t *at = a + mt * nb * 1024;
                    const float *st = sx + mt * 16 * nb;
                    float *yt = y + mt * 16 * N + nt * 16;
                    #define AMX_TILE(R_, M_) amx_tile(at, st, wt, yt, nb, N, rows, R_, M_)
                    if (R == 8) { if (q4) AMX_TILE(8, 1); else AMX_TILE(8, 0); }
                    else if (q4) AMX_TILE(16, 1);
                    else AMX_TILE(16, 0);
                    #undef AMX_TILE
                }
            }
        }
        free(scratch);
        _tile_release();
    }
    free(a);
    free(sx);
}
#define AMX_BUILT 1
#else
int amx_request(void) { return 0; }
void amx_linear_f32(const float *x, const void *w, float *y, int64_t M, int64_t N, int64_t K, int q4, int threads) {
    (void)x; (void)w; (void)y; (void)M; (void)N; (void)K; (void)q4; (void)threads;
}
#define AMX_BUILT 0
#endif
int amx_built(void) { return AMX_BUILT; }

/* y[M, N] = x[M, K] @ W^T from compact tiles: few rows on AVX-512 VNNI or AVX2, more on AMX (where callers
   found it available) */
void tile_linear_f32(const float *x, const void *w, float *y, int64_t M, int64_t N, int64_t K, int q4, int threads) {
    if (M <= tiles_small_rows(q4)) small_linear_f32(x, w, y, M, N, K, q4, threads);
    else amx_linear_f32(x, w, y, M, N, K, q4, threads);
}
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load("amx_ops", cpu_build.PRELUDE + C_BODY)
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.tile_linear_f32.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.tile_linear_f32.restype = None
    lib.tiles_small_rows.argtypes, lib.tiles_small_rows.restype = [ctypes.c_int], ctypes.c_int
    lib.amx_built.restype = lib.amx_request.restype = ctypes.c_int
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernel was built with AMX and the OS gave this process tile state: then tiles take every call."""
    lib = _library()
    return lib is not None and lib.amx_built() == 1 and lib.amx_request() == 1


@functools.cache
def small_rows(kind: str) -> int:
    """The most rows of a call the few-row kernels take (AVX-512 VNNI or AVX2), 0 where there are none."""
    lib = _library()
    return 0 if lib is None else lib.tiles_small_rows(int(kind == "q4_1"))


def takes(rows: int, kind: str) -> bool:
    """Whether a call of `rows` rows can run from tiles here."""
    return rows <= small_rows(kind) or available()


def packable(blocks: torch.Tensor, kind: str) -> bool:
    """Whether `blocks` make tiles and some call here would read them."""
    return blocks.shape[0] % TILE == 0 and (available() or small_rows(kind) > 0)


def pack(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """`blocks` [N, K / 32 * block bytes] of `kind` as tiles [N / 16, K / 32, TILE_BYTES[kind]] uint8: the codes
    in B tile order, Q4_1's as nibbles (320 bytes with fp16 d and m), Q8_0's as int8 (544 bytes with fp16 d)."""
    n = blocks.shape[0]
    b = blocks.view(n, -1, cpu_quant.BLOCK_BYTES[kind])
    nb, nt = b.shape[1], n // TILE

    def tile_order(q: torch.Tensor) -> torch.Tensor:  # [N, nb, 32] -> [nt, nb, 512]: AMX's B layout,
        return q.view(nt, TILE, nb, TILE, 2).permute(0, 2, 3, 1, 4).reshape(nt, nb, 512)  # [k pair][column][2]

    def per_tile(v: torch.Tensor) -> torch.Tensor:  # [N, nb, bytes] -> [nt, nb, 16 * bytes]
        return v.reshape(nt, TILE, nb, -1).transpose(1, 2).reshape(nt, nb, -1)

    if kind == "q4_1":
        q = tile_order(torch.cat([b[..., 4:] & 15, b[..., 4:] >> 4], dim=-1))  # codes 0-15, then 16-31
        parts = [q[..., :256] | (q[..., 256:] << 4), per_tile(b[..., 0:2]), per_tile(b[..., 2:4])]  # fp16 d, m
    else:
        parts = [tile_order(b[..., 2:]), per_tile(b[..., 0:2])]  # int8 codes, fp16 d
    return torch.cat(parts, dim=-1).contiguous()


def unpack(tiles: torch.Tensor, kind: str) -> torch.Tensor:
    """The blocks [N, K / 32 * block bytes] that `pack` made `tiles` of, for the calls no kernel takes."""
    nt, nb, _ = tiles.shape
    n = nt * TILE

    def row_order(t: torch.Tensor) -> torch.Tensor:  # pack's tile_order, undone: [nt, nb, 512] -> [N, nb, 32]
        return t.reshape(nt, nb, TILE, TILE, 2).permute(0, 3, 1, 2, 4).reshape(n, nb, 32)

    def per_row(t: torch.Tensor) -> torch.Tensor:  # pack's per_tile, undone: [nt, nb, 16 * w] -> [N, nb, w]
        return t.reshape(nt, nb, TILE, -1).transpose(1, 2).reshape(n, nb, -1)

    if kind == "q4_1":
        codes = row_order(torch.cat([tiles[..., :256] & 15, tiles[..., :256] >> 4], dim=-1))  # [N, nb, 32]
        parts = [per_row(tiles[..., 256:288]), per_row(tiles[..., 288:320]), codes[..., :16] | (codes[..., 16:] << 4)]
    else:
        parts = [per_row(tiles[..., 512:]), row_order(tiles[..., :512])]
    return torch.cat(parts, dim=-1).reshape(n, -1).contiguous()


def linear(x: torch.Tensor, tiles: torch.Tensor, kind: str) -> torch.Tensor:
    """x [M, K] (`cpu_quant.readable`) @ W^T -> [M, N], W as `pack` made `tiles` of it, where `takes(M, kind)`."""
    if not takes(x.shape[0], kind):  # without the process's tile state the first tile instruction is SIGILL
        raise RuntimeError(f"no kernel here takes {x.shape[0]} rows from tiles (AMX is not available)")
    m, k = x.shape
    nt, nb, size = tiles.shape
    assert size == TILE_BYTES[kind] and k == nb * 32 and tiles.is_contiguous()
    assert x.dtype == torch.float32 and x.is_contiguous()
    n = nt * TILE
    y = torch.empty(m, n)
    _library().tile_linear_f32(x.data_ptr(), tiles.data_ptr(), y.data_ptr(), m, n, k, int(kind == "q4_1"),
                               cpu_quant.threads(n, k))
    return y
