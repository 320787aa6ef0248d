"""The C source of kernels/cpu_quant.py's block kernels (ggml's Q4_1 and Q8_0 block rows times fp32 rows).

Kept apart from the Python side only for length; kernels/cpu_decode.py compiles it into its stack too.
"""

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

/* y[0..M) of one output row n: sum over its nb blocks of w . x_r, each block's 32 weights w = d * q + m
   made in registers (d * q is exact in fp32: 11 bits times 4, so w is the dequantized fp32 weight); with
   `add`, added to y (a later slice of K). M is a compile-time constant at every call, so the row loops
   unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void q4_1_row(const float *x, const block_q4_1 *row, float *y,
                                                           int64_t nb, int64_t K, int64_t N, const int M, int add) {
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
    for (int r = 0; r < M; ++r) y[r * N] = (add ? y[r * N] : 0.f) + hsum8(acc[r]);
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
    for (int r = 0; r < M; ++r) y[r * N] = (add ? y[r * N] : 0.f) + out[r];
#endif
}


#if defined(__AVX512F__)
#define MAX_M512 16
#define FOR_ROWS16(call, rows) if ((rows) <= 8) { FOR_ROWS(call, rows) } else switch (rows) { \
    case 9: call(9); break; case 10: call(10); break; case 11: call(11); break; case 12: call(12); break; \
    case 13: call(13); break; case 14: call(14); break; case 15: call(15); break; default: call(16); break; }

/* add_block_rows with 16-lane vectors: the block's 32 weights are w0, w1 */
static inline __attribute__((always_inline)) void add_block_rows_512(__m512 *acc, __m512 w0, __m512 w1,
                                                                     const float *x, int64_t K, const int M) {
    for (int r = 0; r < M; ++r) {
        acc[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K), acc[r]);
        acc[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * K + 16), acc[r]);
    }
}

/* As q4_1_row with 16-lane vectors: one block's 32 weights are two registers, and 32 registers hold 16 rows. */
static inline __attribute__((always_inline)) void q4_1_row_512(const float *x, const block_q4_1 *row, float *y,
                                                               int64_t nb, int64_t K, int64_t N, const int M,
                                                               int add) {
    __m512 acc[MAX_M512];
    for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi32(15);
    for (int64_t b = 0; b < nb; ++b) {
        PREFETCH_AHEAD(row + b);
        const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)row[b].qs));
        const __m512 d = _mm512_set1_ps((float)row[b].d), m = _mm512_set1_ps((float)row[b].m);
        const __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(c, low)), d, m);  /* codes 0-15 */
        const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4)), d, m);  /* 16-31 */
        add_block_rows_512(acc, w0, w1, x + b * 32, K, M);
    }
    for (int r = 0; r < M; ++r) y[r * N] = (add ? y[r * N] : 0.f) + _mm512_reduce_add_ps(acc[r]);
}
#endif

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
    q4_1_row(x, row, y, nb, K, N, M, 0);
#endif
}

#define TILE_ROWS 32  /* weight rows that share a slice of x */

#if defined(__AVX512F__)  /* CPUs with AVX-512 have had 48 KB of L1 data cache; AVX2 ones 32 KB */
#define X_SLICE_BYTES 40960
#define GROUP MAX_M512
#define Q4_1_GROUP q4_1_row_512
#define FOR_GROUP_ROWS FOR_ROWS16
#else
#define X_SLICE_BYTES 24576
#define GROUP MAX_M
#define Q4_1_GROUP q4_1_row
#define FOR_GROUP_ROWS FOR_ROWS
#endif

/* y[M, N] = x[M, K] @ W^T for W given as N rows of K / 32 blocks, M <= GROUP; K % 32 == 0, all contiguous. */
static void q4_1_linear_group(const float *x, const void *blocks, float *y, int64_t M, int64_t N, int64_t K,
                              int threads) {
    const block_q4_1 *w = blocks;
    const int64_t nb = K / 32;
    if (M <= 2) {
        float *sx = malloc(sizeof(float) * (size_t)(M * nb));  /* sum of x over each block, per row */
        for (int64_t i = 0; i < M * nb; ++i) {
            float s = 0.f;
            for (int j = 0; j < 32; ++j) s += x[i * 32 + j];
            sx[i] = s;
        }
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            if (M == 1) q4_1_row_factored(x, w + n * nb, sx, y + n, nb, K, N, 1);
            else q4_1_row_factored(x, w + n * nb, sx, y + n, nb, K, N, 2);
        }
        free(sx);
        return;
    }
    /* K in even slices whose M rows of x fit in L1 beside the weights, each slice over a tile of weight rows
       at a time: the tile's rows all read the slice of x from L1 (the default model's down projection, K =
       1536, had each weight row sweep 96 KB of x through L1 at 16 rows). One slice where x fits anyway. */
    const int64_t fit = X_SLICE_BYTES / (M * 32 * (int64_t)sizeof(float)), most = fit > 0 ? fit : 1;
    const int64_t slices = (nb + most - 1) / most;
    const int64_t per = (nb + slices - 1) / slices;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += TILE_ROWS) {
        const int64_t n1 = n0 + TILE_ROWS < N ? n0 + TILE_ROWS : N;
        for (int64_t b0 = 0; b0 < nb; b0 += per) {
            const int64_t cb = nb - b0 < per ? nb - b0 : per;
            for (int64_t n = n0; n < n1; ++n) {
                #define Q4_1_ROWS(R) Q4_1_GROUP(x + b0 * 32, w + n * nb + b0, y + n, cb, K, N, R, b0 > 0)
                FOR_GROUP_ROWS(Q4_1_ROWS, M);
            }
        }
    }
}

typedef void (*linear_group_fn)(const float *x, const void *blocks, float *y, int64_t M, int64_t N, int64_t K,
                                int threads);

/* Any number of rows, in even groups of at most GROUP (24 rows: 12 + 12), each a pass over the weights: a
   pass keeps its group of x in L1, where one pass over all the rows had each weight row sweep all of x. */
static void in_row_groups(linear_group_fn group, const float *x, const void *w, float *y, int64_t M, int64_t N,
                          int64_t K, int threads) {
    const int64_t parts = (M + GROUP - 1) / GROUP, per = (M + parts - 1) / parts;
    for (int64_t r = 0; r < M; r += per)
        group(x + r * K, w, y + r * N, M - r < per ? M - r : per, N, K, threads);
}

void q4_1_linear_f32(const float *x, const block_q4_1 *w, float *y, int64_t M, int64_t N, int64_t K,
                     int threads) {
    in_row_groups(q4_1_linear_group, x, w, y, M, N, K, threads);
}

/* The widest vectors the multi-row kernels use here: 512 (AVX-512), 256 (AVX2) or 0 (portable C). */
int quant_vector_bits(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__) && defined(__FMA__)
    return 256;
#else
    return 0;
#endif
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

#if defined(__AVX512F__)
/* As q8_0_row with 16-lane vectors, for three rows or more */
static inline __attribute__((always_inline)) void q8_0_row_512(const float *x, const block_q8_0 *row, float *y,
                                                               int64_t nb, int64_t K, int64_t N, const int M) {
    __m512 acc[MAX_M512];
    for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        PREFETCH_AHEAD(row + b);
        const __m512 d = _mm512_set1_ps((float)row[b].d);
        const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128((const __m128i *)row[b].qs))), d);  /* codes 0-15 */
        const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128((const __m128i *)(row[b].qs + 16)))), d);  /* 16-31 */
        add_block_rows_512(acc, w0, w1, x + b * 32, K, M);
    }
    for (int r = 0; r < M; ++r) y[r * N] = _mm512_reduce_add_ps(acc[r]);
}
#define Q8_0_GROUP_ROWS(x, row, y, nb, K, N, R) ((R) <= 2 ? q8_0_row(x, row, y, nb, K, N, (R) <= 2 ? (R) : 2) \
                                                          : q8_0_row_512(x, row, y, nb, K, N, R))
#else
#define Q8_0_GROUP_ROWS q8_0_row
#endif

/* y[M, N] = x[M, K] @ W^T for Q8_0 block rows, M <= GROUP; K % 32 == 0, all contiguous. */
static void q8_0_linear_group(const float *x, const void *blocks, float *y, int64_t M, int64_t N, int64_t K,
                              int threads) {
    const block_q8_0 *w = blocks;
    const int64_t nb = K / 32;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const block_q8_0 *row = w + n * nb;
        #define Q8_0_ROWS(R) Q8_0_GROUP_ROWS(x, row, y + n, nb, K, N, R)
        FOR_GROUP_ROWS(Q8_0_ROWS, M);
    }
}

/* As q4_1_linear_f32 for Q8_0 blocks. */
void q8_0_linear_f32(const float *x, const block_q8_0 *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    in_row_groups(q8_0_linear_group, x, w, y, M, N, K, threads);
}
"""
