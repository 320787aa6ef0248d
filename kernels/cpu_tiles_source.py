"""The C source of kernels/cpu_amx.py's few-row kernels, which read the compact tiles without AMX.

Kept apart from cpu_amx.py only for length; its C body (and so kernels/cpu_decode.py's stack) includes it.
"""

C_BODY = r"""
/* 16 weight rows x one Q4_1 block, compact: the codes in AMX's B tile order (element i = k pair * 32
   + column * 2 + k parity) as nibbles, elements 0-255 low and 256-511 high; fp16 d and m */
typedef struct { uint8_t codes[256]; uint16_t d[16], m[16]; } amx_q4tile;

/* 16 weight rows x one Q8_0 block, compact: int8 codes in B tile order, fp16 d */
typedef struct { int8_t codes[512]; uint16_t d[16]; } amx_q8tile;

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* Calls of up to this many rows take these kernels where the CPU has AMX too, whose expansion of each column
   tile's codes into bf16 costs more than its products at few rows (Q4_1 x 120 projections here, ms: 1 row
   3.1 vs 5.6, 5 rows 5.3 vs 7.1, 8 rows 8.0 vs 7.7; Q8_0 LM head: 1 row 0.63 vs 1.25, 5 rows 1.11 vs 1.16,
   8 rows 1.9 vs 1.3). Without AMX, the blocks' kernels take the rest (1 row 4.4 ms, 5 rows 7.9). */
#define SMALL_ROWS_Q4_1 7
#define SMALL_ROWS_Q8_0 5
#define SMALL_GROUP 8

/* x [M, K] per 32-value block as two int16 codes each, x ~= (c1 + c2 / 65534) * xs with xs = the block's
   max |x| / 32767 (c2 codes what c1 missed: ~31 bits in all, as good as fp32 next to the block's largest
   value); [M][K / 32][c1 then c2][32]. sx: the blocks' fp32 sums, xs their scales, both [M][K / 32].
   (Plain C took ~1 ms more of a 5-row step's 120 projections.) */
static void tile_pack_x(const float *x, int64_t M, int64_t K, int16_t *xq, float *xs, float *sx) {
    for (int64_t i = 0; i < M * (K / 32); ++i) {
        const __m512 x0 = _mm512_loadu_ps(x + i * 32), x1 = _mm512_loadu_ps(x + i * 32 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        const float scale = amax / 32767.f, inv = amax > 0.f ? 32767.f / amax : 0.f;
        const __m512 r = _mm512_set1_ps(inv), s = _mm512_set1_ps(scale), fine = _mm512_set1_ps(65534.f);
        const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, r)), c1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, r));
        /* what c missed, in 1 / 65534 steps; past half a step where c * xs rounds: the narrowing saturates */
        const __m512 e0 = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(c0), s, x0);
        const __m512 e1 = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(c1), s, x1);
        int16_t *q = xq + i * 64;
        _mm256_storeu_si256((__m256i *)q, _mm512_cvtsepi32_epi16(c0));
        _mm256_storeu_si256((__m256i *)(q + 16), _mm512_cvtsepi32_epi16(c1));
        const __m512 rf = _mm512_mul_ps(r, fine);
        _mm256_storeu_si256((__m256i *)(q + 32), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(e0, rf))));
        _mm256_storeu_si256((__m256i *)(q + 48), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(e1, rf))));
        xs[i] = scale;
        sx[i] = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
    }
}


/* y[R rows, one column tile's 16 columns] from the compact tiles w (nb of them): a block's codes, widened to
   int16 in registers, times x's two int16 codes with VNNI's pairwise dot product (exact in int32), then
   scaled by d * xs (and + m * sum(x) for Q4_1). The tiles' B order is already VNNI's: a 32-bit lane holds
   one column's two consecutive k. */
static inline __attribute__((always_inline)) void small_tile(const int16_t *xq, const float *xs, const float *sx,
                                                             const void *w, float *y, int64_t nb, int64_t N,
                                                             int rows, const int R, const int q4) {
    __m512 acc[SMALL_GROUP];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi16(15);
    const __m512 fine = _mm512_set1_ps(1.f / 65534.f);
    for (int64_t b = 0; b < nb; ++b) {
        __m512i s1[SMALL_GROUP], s2[SMALL_GROUP];
        for (int r = 0; r < R; ++r) s1[r] = s2[r] = _mm512_setzero_si512();
        __m512 d, m = _mm512_setzero_ps();
        #define SMALL_DOT(v, p) for (int r = 0; r < R; ++r) { \
            const int32_t *xp = (const int32_t *)(xq + (r * nb + b) * 64); \
            s1[r] = _mm512_dpwssd_epi32(s1[r], v, _mm512_set1_epi32(xp[p])); \
            s2[r] = _mm512_dpwssd_epi32(s2[r], v, _mm512_set1_epi32(xp[16 + (p)])); }
        if (q4) {
            const amx_q4tile *t = (const amx_q4tile *)w + b;
            for (int l = 0; l < (int)sizeof(amx_q4tile); l += 64)  /* ~2 KB ahead, as the blocks' kernels */
                _mm_prefetch((const char *)(t + 6) + l, _MM_HINT_T0);
            for (int p = 0; p < 8; ++p) {
                const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(t->codes + 32 * p)));
                const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_srli_epi16(v, 4);
                SMALL_DOT(lo, p)
                SMALL_DOT(hi, p + 8)
            }
            d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)t->d));
            m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)t->m));
        } else {
            const amx_q8tile *t = (const amx_q8tile *)w + b;
            for (int l = 0; l < (int)sizeof(amx_q8tile); l += 64)
                _mm_prefetch((const char *)(t + 4) + l, _MM_HINT_T0);
            for (int p = 0; p < 16; ++p) {
                const __m512i v = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(t->codes + 32 * p)));
                SMALL_DOT(v, p)
            }
            d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)t->d));
        }
        #undef SMALL_DOT
        for (int r = 0; r < R; ++r) {
            const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s2[r]), fine, _mm512_cvtepi32_ps(s1[r]));
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(xs[r * nb + b])), dot, acc[r]);
            if (q4) acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[r * nb + b]), acc[r]);
        }
    }
    for (int r = 0; r < rows; ++r) _mm512_storeu_ps(y + r * N, acc[r]);
}
#else
/* AVX2 has 16 vector registers: two rows at a time, 8 columns per register, `vpmaddwd` for the pairs.
   Q4_1 x 120 projections here, built for AVX2: 1 row 3.7 ms vs the blocks' 4.7, 2 rows 5.1 vs 6.0,
   3 rows 7.9 vs 7.5. */
#define SMALL_ROWS_Q4_1 2
#define SMALL_ROWS_Q8_0 2
#define SMALL_GROUP 2

/* As the AVX-512 tile_pack_x above, 8 lanes at a time (plain C, clamping c2 by hand, took ~15% more of a
   1-row step's projections): x [M, K] per 32-value block as two int16 codes, [M][K / 32][c1 then c2][32];
   xs the blocks' scales, sx their sums */
static inline float tile_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline __m256i narrow16(__m256i a, __m256i b) {  /* 8 + 8 int32 -> 16 int16, saturating, in order */
    return _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
}

static void tile_pack_x(const float *x, int64_t M, int64_t K, int16_t *xq, float *xs, float *sx) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t i = 0; i < M * (K / 32); ++i) {
        __m256 v[4], mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        for (int k = 0; k < 4; ++k) {
            v[k] = _mm256_loadu_ps(x + i * 32 + 8 * k);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[k]));
            sum = _mm256_add_ps(sum, v[k]);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const float scale = amax / 32767.f, inv = amax > 0.f ? 32767.f / amax : 0.f;
        const __m256 r = _mm256_set1_ps(inv), st = _mm256_set1_ps(scale), fine = _mm256_set1_ps(65534.f);
        __m256i c[4], c2[4];
        for (int k = 0; k < 4; ++k) {
            c[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], r));
            const __m256 e = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(c[k]), st, v[k]);
            c2[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(e, r), fine));
        }
        int16_t *q = xq + i * 64;
        _mm256_storeu_si256((__m256i *)q, narrow16(c[0], c[1]));
        _mm256_storeu_si256((__m256i *)(q + 16), narrow16(c[2], c[3]));
        _mm256_storeu_si256((__m256i *)(q + 32), narrow16(c2[0], c2[1]));
        _mm256_storeu_si256((__m256i *)(q + 48), narrow16(c2[2], c2[3]));
        xs[i] = scale;
        sx[i] = tile_hsum8(sum);
    }
}

static inline __attribute__((always_inline)) void small_tile(const int16_t *xq, const float *xs, const float *sx,
                                                             const void *w, float *y, int64_t nb, int64_t N,
                                                             int rows, const int R, const int q4) {
    __m256 acc[SMALL_GROUP][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi16(15);
    const __m256 fine = _mm256_set1_ps(1.f / 65534.f);
    for (int64_t b = 0; b < nb; ++b) {
        __m256i s1[SMALL_GROUP][2], s2[SMALL_GROUP][2];
        for (int r = 0; r < R; ++r) s1[r][0] = s1[r][1] = s2[r][0] = s2[r][1] = _mm256_setzero_si256();
        const uint16_t *dp, *mp = NULL;
        #define SMALL_DOT(v, p, h) for (int r = 0; r < R; ++r) { \
            const int32_t *xp = (const int32_t *)(xq + (r * nb + b) * 64); \
            s1[r][h] = _mm256_add_epi32(s1[r][h], _mm256_madd_epi16(v, _mm256_set1_epi32(xp[p]))); \
            s2[r][h] = _mm256_add_epi32(s2[r][h], _mm256_madd_epi16(v, _mm256_set1_epi32(xp[16 + (p)]))); }
        if (q4) {
            const amx_q4tile *t = (const amx_q4tile *)w + b;
            for (int l = 0; l < (int)sizeof(amx_q4tile); l += 64)
                _mm_prefetch((const char *)(t + 6) + l, _MM_HINT_T0);
            for (int p = 0; p < 8; ++p)
                for (int h = 0; h < 2; ++h) {
                    const __m128i *src = (const __m128i *)(t->codes + 32 * p + 16 * h);
                    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(src));
                    const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_srli_epi16(v, 4);
                    SMALL_DOT(lo, p, h)
                    SMALL_DOT(hi, p + 8, h)
                }
            dp = t->d;
            mp = t->m;
        } else {
            const amx_q8tile *t = (const amx_q8tile *)w + b;
            for (int l = 0; l < (int)sizeof(amx_q8tile); l += 64)
                _mm_prefetch((const char *)(t + 4) + l, _MM_HINT_T0);
            for (int p = 0; p < 16; ++p)
                for (int h = 0; h < 2; ++h) {
                    const __m128i *src = (const __m128i *)(t->codes + 32 * p + 16 * h);
                    const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128(src));
                    SMALL_DOT(v, p, h)
                }
            dp = t->d;
        }
        #undef SMALL_DOT
        for (int h = 0; h < 2; ++h) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dp + 8 * h)));
            const __m256 m = q4 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mp + 8 * h))) : _mm256_setzero_ps();
            for (int r = 0; r < R; ++r) {
                const __m256 dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s2[r][h]), fine, _mm256_cvtepi32_ps(s1[r][h]));
                acc[r][h] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xs[r * nb + b])), dot, acc[r][h]);
                if (q4) acc[r][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(sx[r * nb + b]), acc[r][h]);
            }
        }
    }
    for (int r = 0; r < rows; ++r) {
        _mm256_storeu_ps(y + r * N, acc[r][0]);
        _mm256_storeu_ps(y + r * N + 8, acc[r][1]);
    }
}
#endif

/* y[M, N] = x[M, K] @ W^T for M <= SMALL_ROWS of the kind, from compact tiles (N / 16 column tiles of
   K / 32 blocks each) */
static void small_linear_f32(const float *x, const void *w, float *y, int64_t M, int64_t N, int64_t K, int q4,
                             int threads) {
    const int64_t nb = K / 32, NT = N / 16;
    const size_t tile = q4 ? sizeof(amx_q4tile) : sizeof(amx_q8tile);
    int16_t *xq = aligned_alloc(64, sizeof(int16_t) * (size_t)(2 * M * K));
    float *xs = malloc(sizeof(float) * (size_t)(M * nb)), *sx = malloc(sizeof(float) * (size_t)(M * nb));
    tile_pack_x(x, M, K, xq, xs, sx);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nt = 0; nt < NT; ++nt) {
        const void *wt = (const char *)w + (size_t)(nt * nb) * tile;
        for (int64_t r0 = 0; r0 < M; r0 += SMALL_GROUP) {
            const int rows = M - r0 < SMALL_GROUP ? (int)(M - r0) : SMALL_GROUP;
            const int16_t *xr = xq + r0 * nb * 64;
            float *yt = y + r0 * N + nt * 16;
            #define SMALL_TILE(R_) do { \
                if (q4) small_tile(xr, xs + r0 * nb, sx + r0 * nb, wt, yt, nb, N, rows, R_, 1); \
                else small_tile(xr, xs + r0 * nb, sx + r0 * nb, wt, yt, nb, N, rows, R_, 0); } while (0)
            switch (rows) {
                case 1: SMALL_TILE(1); break;
#if SMALL_GROUP > 2
                case 2: SMALL_TILE(2); break; case 3: SMALL_TILE(3); break; case 4: SMALL_TILE(4); break;
                case 5: SMALL_TILE(5); break; case 6: SMALL_TILE(6); break; case 7: SMALL_TILE(7); break;
#endif
                default: SMALL_TILE(SMALL_GROUP); break;
            }
            #undef SMALL_TILE
        }
    }
    free(xq);
    free(xs);
    free(sx);
}
#else
#define SMALL_ROWS_Q4_1 0
#define SMALL_ROWS_Q8_0 0
static void small_linear_f32(const float *x, const void *w, float *y, int64_t M, int64_t N, int64_t K, int q4,
                             int threads) {
    (void)x; (void)w; (void)y; (void)M; (void)N; (void)K; (void)q4; (void)threads;
}
#endif

/* the most rows of a call small_linear_f32 takes: 0 where it was built without AVX2 */
int tiles_small_rows(int q4) { return q4 ? SMALL_ROWS_Q4_1 : SMALL_ROWS_Q8_0; }
"""
