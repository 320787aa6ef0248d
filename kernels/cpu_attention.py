"""Paged attention for short queries on CPU (decode, drafts to verify, jump-forward tokens), as a small
C kernel compiled on first use.

Torch has no paged attention on CPU: the torch path gathers every request's blocks into a padded
copy, then runs SDPA over it, so each layer moves the whole batch's KV twice and pads every request to
the longest. This kernel reads keys and values straight from the block table, once, in place; it is
what llama.cpp and vLLM's CPU backend do in C++. kernels/cpu_build.py compiles it on first use; without
a compiler the torch path runs instead. Long queries (prompt chunks) go to torch's flash SDPA, which
tiles them better.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from kernels import cpu_build

_COMMON = r"""
#ifdef __clang__
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* The lane sums of eight vectors as one vector, by one transposing reduction instead of eight horizontal
   sums: pairwise sums of neighbouring lanes, then of lane pairs, then of the two 128-bit halves. */
static inline v8f reduce8(v8f a0, v8f a1, v8f a2, v8f a3, v8f a4, v8f a5, v8f a6, v8f a7) {
    const v8f t01 = SHUFFLE(a0, a1, 0, 8, 2, 10, 4, 12, 6, 14) + SHUFFLE(a0, a1, 1, 9, 3, 11, 5, 13, 7, 15);
    const v8f t23 = SHUFFLE(a2, a3, 0, 8, 2, 10, 4, 12, 6, 14) + SHUFFLE(a2, a3, 1, 9, 3, 11, 5, 13, 7, 15);
    const v8f t45 = SHUFFLE(a4, a5, 0, 8, 2, 10, 4, 12, 6, 14) + SHUFFLE(a4, a5, 1, 9, 3, 11, 5, 13, 7, 15);
    const v8f t67 = SHUFFLE(a6, a7, 0, 8, 2, 10, 4, 12, 6, 14) + SHUFFLE(a6, a7, 1, 9, 3, 11, 5, 13, 7, 15);
    const v8f u0 = SHUFFLE(t01, t23, 0, 1, 8, 9, 4, 5, 12, 13) + SHUFFLE(t01, t23, 2, 3, 10, 11, 6, 7, 14, 15);
    const v8f u1 = SHUFFLE(t45, t67, 0, 1, 8, 9, 4, 5, 12, 13) + SHUFFLE(t45, t67, 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUFFLE(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}

/* max of row[0:n], n >= 1, eight lanes at a time: a scalar loop waited on each max's latency, a tenth of the kernel */
static inline float row_max(const float *row, int64_t n) {
    const v8f lowest = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    v8f m = lowest;
    int64_t s = 0;
    for (; s + 8 <= n; s += 8) {
        const v8f x = load8(row + s);
        m = (v8f)(((v8i)x & (x > m)) | ((v8i)m & ~(x > m)));
    }
    float mx = m[0];
    for (int l = 1; l < 8; ++l) mx = m[l] > mx ? m[l] : mx;
    for (; s < n; ++s) mx = row[s] > mx ? row[s] : mx;
    return mx;
}

/* Blocks sit anywhere in the pool, and the hardware prefetcher stops at page edges: the next block is
   fetched a few lines at a time while this one is computed on (a burst of the whole block at once
   crowded out the current block's own loads). */
typedef struct { const char *next, *end; } prefetcher;

static inline prefetcher prefetch_from(const void *block, int64_t bytes) {
    const prefetcher p = {(const char *)block, (const char *)block + bytes};
    return p;
}

static inline void prefetch_lines(prefetcher *p, int lines) {
    for (int l = 0; l < lines && p->next < p->end; ++l, p->next += 64) __builtin_prefetch(p->next);
}
"""

# The kernel over a cache of KV_T elements, read as fp32 vectors (KV(load8), KV(loadv)); KV(name) names
# its functions.
_KERNEL = r"""
/* Four independent accumulators: one would chain every FMA on the last one's latency. */
static inline float KV(dot)(const float *a, const KV_T *b, int64_t D) {
    v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
        s0 += load8(a + d) * KV(load8)(b + d);
        s1 += load8(a + d + 8) * KV(load8)(b + d + 8);
        s2 += load8(a + d + 16) * KV(load8)(b + d + 16);
        s3 += load8(a + d + 24) * KV(load8)(b + d + 24);
    }
    for (; d + 8 <= D; d += 8) s0 += load8(a + d) * KV(load8)(b + d);
    const v8f s = (s0 + s1) + (s2 + s3);
    float r = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (; d < D; ++d) r += a[d] * (float)b[d];
    return r;
}

/* Eight dots at once, q against the rows k + r * stride (r < 8). D % VLANES == 0. */
static inline v8f KV(dot8)(const float *q, const KV_T *k, int64_t stride, int64_t D) {
    vecf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
    for (int64_t d = 0; d < D; d += VLANES) {
        const vecf x = loadv(q + d);
        a0 += x * KV(loadv)(k + d);              a1 += x * KV(loadv)(k + stride + d);
        a2 += x * KV(loadv)(k + 2 * stride + d); a3 += x * KV(loadv)(k + 3 * stride + d);
        a4 += x * KV(loadv)(k + 4 * stride + d); a5 += x * KV(loadv)(k + 5 * stride + d);
        a6 += x * KV(loadv)(k + 6 * stride + d); a7 += x * KV(loadv)(k + 7 * stride + d);
    }
    return reduce8(to8(a0), to8(a1), to8(a2), to8(a3), to8(a4), to8(a5), to8(a6), to8(a7));
}

/* o[0:D] += sum over j < n of p[j] * v[j * vstride : + D], o held in registers. D % (4 VLANES) == 0. */
static inline void KV(add_weighted_rows)(float *o, const float *p, const KV_T *v, int64_t vstride, int64_t n,
                                         int64_t D) {
    const int64_t W = VLANES;
    for (int64_t d = 0; d < D; d += 4 * W) {
        vecf a0 = loadv(o + d), a1 = loadv(o + d + W), a2 = loadv(o + d + 2 * W), a3 = loadv(o + d + 3 * W);
        vecf b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        int64_t j = 0;
        for (; j + 2 <= n; j += 2) {  /* two positions a round, into two sets: half the FMA latency chain */
            const KV_T *vr = v + j * vstride + d, *wr = vr + vstride;
            const float pj = p[j], qj = p[j + 1];
            a0 += pj * KV(loadv)(vr); a1 += pj * KV(loadv)(vr + W);
            a2 += pj * KV(loadv)(vr + 2 * W); a3 += pj * KV(loadv)(vr + 3 * W);
            b0 += qj * KV(loadv)(wr); b1 += qj * KV(loadv)(wr + W);
            b2 += qj * KV(loadv)(wr + 2 * W); b3 += qj * KV(loadv)(wr + 3 * W);
        }
        if (j < n) {
            const KV_T *vr = v + j * vstride + d;
            const float pj = p[j];
            a0 += pj * KV(loadv)(vr); a1 += pj * KV(loadv)(vr + W);
            a2 += pj * KV(loadv)(vr + 2 * W); a3 += pj * KV(loadv)(vr + 3 * W);
        }
        a0 += b0; a1 += b1; a2 += b2; a3 += b3;
        memcpy(o + d, &a0, sizeof a0); memcpy(o + d + W, &a1, sizeof a1);
        memcpy(o + d + 2 * W, &a2, sizeof a2); memcpy(o + d + 3 * W, &a3, sizeof a3);
    }
}

/* the block after the one at position s0 of a request's table (rs elements per position), or nothing at the end */
static inline prefetcher KV(prefetch_next)(const KV_T *cache, const int64_t *table, int64_t s0, int64_t S,
                                           int64_t BS, int64_t rs) {
    const int64_t bytes = BS * rs * (int64_t)sizeof(KV_T);
    return s0 + BS < S ? prefetch_from(cache + table[s0 / BS + 1] * BS * rs, bytes) : prefetch_from(cache, 0);
}

/* Causal attention of each request's new query rows over its cached context, read in place.
   q: [T, H, D] (row strides qs0, qs1; unit stride in D); request b owns rows qstart[b] .. + qlen[b] - 1,
   the last qlen[b] of its lens[b] positions; k, v: [NB, BS, KVH, D] contiguous; tables: [B, MB] int64;
   out: [T, H, D] contiguous, only the requests' rows written.
   Work item = request: each block is read whole, once, each position's K (then V) row serving every
   query row that sees it and all H heads. */
void KV(paged_attention)(const float *q, int64_t qs0, int64_t qs1, const KV_T *k, const KV_T *v,
                         const int64_t *tables, int64_t mb, const int64_t *lens, const int64_t *qstart,
                         const int64_t *qlen, float *out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                         int64_t BS, float scale, int threads) {
    const int64_t G = H / KVH;
    /* cache lines of the next block to prefetch per dot8 call (groups * H calls per block), and per head */
    const int64_t block_lines = (BS * KVH * D * (int64_t)sizeof(KV_T) + 63) / 64, groups = BS >= 8 ? BS / 8 : 1;
    const int k_lines = (int)((block_lines + groups * H - 1) / (groups * H));
    const int v_lines = (int)((block_lines + H - 1) / H);
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
        const int64_t S = lens[b], L = qlen[b], first = S - L;  /* query row i sits at position first + i */
        float *sc = (float *)malloc(sizeof(float) * L * H * (S > 0 ? S : 1));  /* scores [L, H, S] */
        for (int64_t s0 = 0; s0 < S; s0 += BS) {
            const KV_T *kb = k + tables[b * mb + s0 / BS] * BS * KVH * D;
            const int64_t n = S - s0 < BS ? S - s0 : BS;
            prefetcher pf = KV(prefetch_next)(k, tables + b * mb, s0, S, BS, KVH * D);
            int64_t j = 0;
            if (D % VLANES == 0)  /* groups of eight positions; a row may get scores past its last one: never read */
                for (; j + 8 <= n; j += 8)
                    for (int64_t i = s0 + j > first ? s0 + j - first : 0; i < L; ++i) {
                        const float *qi = q + (qstart[b] + i) * qs0;
                        float *si = sc + i * H * S + s0 + j;
                        for (int64_t h = 0; h < H; ++h) {
                            const v8f r = KV(dot8)(qi + h * qs1, kb + (j * KVH + h / G) * D, KVH * D, D) * scale;
                            prefetch_lines(&pf, k_lines);
                            memcpy(si + h * S, &r, sizeof r);
                        }
                    }
            for (; j < n; ++j) {
                const int64_t pos = s0 + j;
                for (int64_t i = pos > first ? pos - first : 0; i < L; ++i) {  /* the rows that see pos */
                    const float *qi = q + (qstart[b] + i) * qs0;
                    float *si = sc + i * H * S;
                    for (int64_t h = 0; h < H; ++h)
                        si[h * S + pos] = KV(dot)(qi + h * qs1, kb + (j * KVH + h / G) * D, D) * scale;
                }
            }
        }
        prefetcher first_v = prefetch_from(v + (S > 0 ? tables[b * mb] : 0) * BS * KVH * D,
                                           (S < BS ? S : BS) * KVH * D * (int64_t)sizeof(KV_T));
        for (int64_t i = 0; i < L; ++i) {
            const int64_t len = first + i + 1;
            for (int64_t h = 0; h < H; ++h) {
                prefetch_lines(&first_v, v_lines);
                const v8i lanes = {0, 1, 2, 3, 4, 5, 6, 7};
                float *row = sc + (i * H + h) * S;
                const float mx = row_max(row, len);
                v8f acc = {0};
                for (int64_t s = 0; s < len; s += 8) {
                    const int64_t n = len - s < 8 ? len - s : 8;
                    const v8f e = exp8(load_n(row + s, n) - mx);
                    store_n(row + s, e, n);
                    acc += n == 8 ? e : (v8f)((v8i)e & (lanes < (int)n));  /* the lanes past len add nothing */
                }
                const float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
                const float inv = sum > 0.f ? 1.f / sum : 0.f;
                for (int64_t s = 0; s < len; ++s) row[s] *= inv;
            }
        }
        memset(out + qstart[b] * H * D, 0, sizeof(float) * L * H * D);
        for (int64_t s0 = 0; s0 < S; s0 += BS) {
            const KV_T *vb = v + tables[b * mb + s0 / BS] * BS * KVH * D;
            const int64_t n = S - s0 < BS ? S - s0 : BS;
            prefetcher pf = KV(prefetch_next)(v, tables + b * mb, s0, S, BS, KVH * D);
            for (int64_t i = s0 > first ? s0 - first : 0; i < L; ++i) {  /* the rows that see the block */
                const int64_t seen = first + i + 1 - s0 < n ? first + i + 1 - s0 : n;
                const float *si = sc + i * H * S + s0;
                float *oi = out + (qstart[b] + i) * H * D;
                for (int64_t h = 0; h < H; ++h) {
                    const KV_T *vh = vb + (h / G) * D;
                    float *o = oi + h * D;
                    if (D % (4 * VLANES) == 0) {
                        KV(add_weighted_rows)(o, si + h * S, vh, KVH * D, seen, D);
                        prefetch_lines(&pf, v_lines);
                        continue;
                    }
                    for (int64_t j = 0; j < seen; ++j) {
                        const float p = si[h * S + j];
                        const KV_T *vr = vh + j * KVH * D;
                        #pragma omp simd
                        for (int64_t d = 0; d < D; ++d) o[d] += p * (float)vr[d];
                    }
                }
            }
        }
        free(sc);
    }
}
"""

# fp16 caches where the compiler has _Float16 (GCC 12+, clang 15+ on x86-64): half the bytes to read per
# step, converted to fp32 in registers (one instruction per 8 values with F16C, on every AVX2 CPU).
C_BODY = (_COMMON + cpu_build.kv_variant("float", "f32", _KERNEL)
          + "#if defined(__FLT16_MAX__)\n" + cpu_build.kv_variant("_Float16", "f16", _KERNEL)
          + "#endif\n")

_SOURCE = cpu_build.PRELUDE + C_BODY


_SUFFIX = {torch.float32: "f32", torch.float16: "f16"}  # the cache dtypes the kernel reads


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built (see kernels/cpu_build.py)."""
    lib = cpu_build.load("paged_attention", _SOURCE)
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        for fn in _kernels(lib).values():
            fn.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64,
                           ctypes.c_float, ctypes.c_int]
            fn.restype = None
    return lib


@functools.cache
def _kernels(lib: ctypes.CDLL) -> dict[torch.dtype, ctypes._CFuncPtr]:
    """The kernel per cache dtype this build has (fp16 needs a compiler with _Float16)."""
    return {dtype: getattr(lib, f"paged_attention_{suffix}") for dtype, suffix in _SUFFIX.items()
            if hasattr(lib, f"paged_attention_{suffix}")}


def available(cache_dtype: torch.dtype = torch.float32) -> bool:
    lib = _library()
    return lib is not None and cache_dtype in _kernels(lib)


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype == torch.float32 and q.stride(-1) == 1 and k_cache.is_contiguous()
            and available(k_cache.dtype))


# Queries up to this many rows per request go to the kernel; longer ones (prompt chunks) to SDPA.
SHORT_QUERY = 8
# Below this many (kv head x position x query row) dots a call runs on one thread: a parallel region
# costs a few microseconds on an idle machine, and a whole scheduler slice whenever another process
# holds a core.
_PARALLEL_MIN_ROWS = 8192


def cpu_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, query_start: torch.Tensor, query_len: torch.Tensor,
                        out: torch.Tensor, scale: float, work: int) -> None:
    """Writes out[query_start[b] : + query_len[b]] for each request b: the causal attention of its last
    query_len[b] positions over all seq_lens[b]. q: [T, H, D]; out: [T, H, D] contiguous.
    block_tables / seq_lens / query_start / query_len: int64, contiguous, a row or entry per request.
    work: the sum of seq_len * query_len over the requests (picks the thread count)."""
    lib = _library()
    assert lib is not None and supports(q, k_cache) and v_cache.is_contiguous() and out.is_contiguous()
    _, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    assert v_cache.dtype == k_cache.dtype
    _kernels(lib)[k_cache.dtype](q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
                                 block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
                                 query_start.data_ptr(), query_len.data_ptr(), out.data_ptr(), len(seq_lens), h,
                                 kvh, d, bs, scale, _threads(kvh * work))


def _threads(rows: int) -> int:
    return torch.get_num_threads() if rows >= _PARALLEL_MIN_ROWS else 1
