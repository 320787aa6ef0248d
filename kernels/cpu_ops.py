"""A decoder layer's small ops on CPU in C: RMSNorm (with the residual add fused in), SiLU-and-mul, and
rotary embedding fused with the KV-cache write, as vLLM's CPU backend has them in C++.

Why: at one decode row, each torch op here costs 10-50 us of dispatch and threading for a few
microseconds of work (an fp32 RMSNorm of 576 values took 25 us), and a layer ran about fifteen of
them. These run in one ctypes call each. Every function has a torch path, taken on GPU, in other
dtypes, for non-contiguous tensors, under autograd, or where the C library cannot be built (kernels/cpu_build.py).
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from kernels import cpu_build

_OPS = r"""
/* y = x / rms(x) * w for each of T rows of N; rows of x at stride xs, y contiguous. */
static inline void norm_row(const float *x, const float *w, float *y, int64_t N, float eps) {
    float ss = 0.f;
    #pragma omp simd reduction(+:ss)
    for (int64_t i = 0; i < N; ++i) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)N + eps);
    #pragma omp simd
    for (int64_t i = 0; i < N; ++i) y[i] = x[i] * r * w[i];
}

void rms_norm_f32(const float *x, int64_t xs, const float *w, float *y, int64_t T, int64_t N, float eps,
                  int threads) {
    #pragma omp parallel for num_threads(threads)
    for (int64_t t = 0; t < T; ++t) norm_row(x + t * xs, w, y + t * N, N, eps);
}

/* s = x + d (the residual stream), y = rms_norm(s) * w; all [T, N] contiguous. */
void add_rms_norm_f32(const float *x, const float *d, const float *w, float *s, float *y, int64_t T,
                      int64_t N, float eps, int threads) {
    #pragma omp parallel for num_threads(threads)
    for (int64_t t = 0; t < T; ++t) {
        const float *xt = x + t * N, *dt = d + t * N;
        float *st = s + t * N;
        #pragma omp simd
        for (int64_t i = 0; i < N; ++i) st[i] = xt[i] + dt[i];
        norm_row(st, w, y + t * N, N, eps);
    }
}

/* out[t] = silu(gu[t, :I]) * gu[t, I:]; gu: [T, 2I], out: [T, I], contiguous. */
void silu_and_mul_f32(const float *gu, float *out, int64_t T, int64_t I, int threads) {
    #pragma omp parallel for num_threads(threads)
    for (int64_t t = 0; t < T; ++t) {
        const float *g = gu + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        for (int64_t i = 0; i < I; i += 8) {
            const int64_t n = I - i < 8 ? I - i : 8;
            const v8f gi = load_n(g + i, n);
            store_n(o + i, gi / (1.f + exp8(-gi)) * load_n(u + i, n), n);
        }
    }
}

/* qkv: [T, (H + 2 KVH) * D] contiguous, q then k then v heads. Rotates the q and k heads in place
   (rotate-half layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)) with cos, sin: [T, D/2]. */
static inline void rope_row(float *row, const float *c, const float *s, int64_t heads, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < heads; ++h) {
        float *x1 = row + h * D, *x2 = x1 + half;
        #pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
            const float a = x1[i], b = x2[i];
            x1[i] = a * c[i] - b * s[i];
            x2[i] = b * c[i] + a * s[i];
        }
    }
}
"""

# rope_row, then each token's k and v heads to its cache slot: caches [slots, KVH, D] of KV_T, converted from
# fp32 on the way; slot < 0: not written.
_ROPE_WRITE_KV = r"""
void KV(rope_write_kv)(float *qkv, const float *cos_t, const float *sin_t, const int64_t *slots, KV_T *kc,
                       KV_T *vc, int64_t T, int64_t H, int64_t KVH, int64_t D, int threads) {
    const int64_t width = (H + 2 * KVH) * D, n = KVH * D;
    #pragma omp parallel for num_threads(threads)
    for (int64_t t = 0; t < T; ++t) {
        float *row = qkv + t * width;
        rope_row(row, cos_t + t * (D / 2), sin_t + t * (D / 2), H + KVH, D);
        if (slots[t] >= 0) {
            const float *k = row + H * D, *v = k + n;
            KV_T *kt = kc + slots[t] * n, *vt = vc + slots[t] * n;
            #pragma omp simd
            for (int64_t i = 0; i < n; ++i) kt[i] = (KV_T)k[i];
            #pragma omp simd
            for (int64_t i = 0; i < n; ++i) vt[i] = (KV_T)v[i];
        }
    }
}
"""

_INT8_AND_ARGMAX = r"""
/* The input of an int8 linear (engine/linear.py): o [T, K] gathers the outlier channels idx; y = x with
   them zeroed (mask: 0 there, 1 elsewhere) and each row divided by its max |y|, kept in scale [T].
   x rows at stride xs; y, o contiguous. */
void int8_prepare_f32(const float *x, int64_t xs, const float *mask, const int64_t *idx, int64_t K, float *y,
                      float *o, float *scale, int64_t T, int64_t N, int threads) {
    #pragma omp parallel for num_threads(threads)
    for (int64_t t = 0; t < T; ++t) {
        const float *xt = x + t * xs;
        float *yt = y + t * N, mx = 0.f;
        #pragma omp simd reduction(max:mx)
        for (int64_t i = 0; i < N; ++i) {
            yt[i] = xt[i] * mask[i];
            mx = fabsf(yt[i]) > mx ? fabsf(yt[i]) : mx;
        }
        for (int64_t j = 0; j < K; ++j) o[t * K + j] = xt[idx[j]];
        mx = mx > 1e-12f ? mx : 1e-12f;
        scale[t] = mx;
        #pragma omp simd
        for (int64_t i = 0; i < N; ++i) yt[i] /= mx;
    }
}

/* As int8_prepare_f32, but y is written as int8 codes q = round(127 y / max |y|), with scale[t] = max |y| / 127:
   the input of a static int8 GEMM, per-token symmetric, in one pass over x. */
void int8_quantize_f32(const float *x, int64_t xs, const float *mask, const int64_t *idx, int64_t K, int8_t *q,
                       float *o, float *scale, int64_t T, int64_t N, int threads) {
    #pragma omp parallel for num_threads(threads)
    for (int64_t t = 0; t < T; ++t) {
        const float *xt = x + t * xs;
        int8_t *qt = q + t * N;
        float mx = 0.f;
        int64_t i = 0;
#if defined(__AVX512F__)
        __m512 m16 = _mm512_setzero_ps();
        for (; i + 16 <= N; i += 16)
            m16 = _mm512_max_ps(m16, _mm512_abs_ps(_mm512_mul_ps(_mm512_loadu_ps(xt + i), _mm512_loadu_ps(mask + i))));
        mx = _mm512_reduce_max_ps(m16);
#endif
        for (; i < N; ++i) mx = fabsf(xt[i] * mask[i]) > mx ? fabsf(xt[i] * mask[i]) : mx;
        for (int64_t j = 0; j < K; ++j) o[t * K + j] = xt[idx[j]];
        mx = mx > 1e-12f ? mx : 1e-12f;
        scale[t] = mx / 127.f;
        const float r = 127.f / mx;
        i = 0;
#if defined(__AVX512F__)
        /* GCC vectorized the loop below into a slow chain of shuffles to pack the bytes (~1 value a cycle):
           convert with the current rounding (to nearest even, as nearbyintf), then narrow 16 at once */
        for (; i + 16 <= N; i += 16) {
            const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xt + i), _mm512_loadu_ps(mask + i)),
                                           _mm512_set1_ps(r));
            _mm_storeu_si128((__m128i *)(qt + i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
        }
#endif
        for (; i < N; ++i) qt[i] = (int8_t)nearbyintf(xt[i] * mask[i] * r);
    }
}

/* The end of an int8 linear: y [T, N] = y * scale[t] (NULL: no row scales) + o [T, K] . wt [K, N], the outlier
   channels' fp32 product, per element in that order. All contiguous. R rows at once, so that each vector of wt is
   read once for all of them: a row at a time re-read all of wt per row, and ran slower than torch's mul_ and
   addmm_ (587 against 399 us for 512 rows of 3072 with 10 outliers). */
static inline __attribute__((always_inline)) void finish_rows(float *y, const float *scale, const float *o,
                                                              const float *wt, const int R, int64_t N, int64_t K) {
    int64_t n = 0;
    for (; n + VLANES <= N; n += VLANES) {
        vecf acc[4];
        for (int r = 0; r < R; ++r) {
            acc[r] = loadv(y + r * N + n);
            if (scale != NULL) acc[r] *= scale[r];
        }
        for (int64_t j = 0; j < K; ++j) {
            const vecf w = loadv(wt + j * N + n);
            for (int r = 0; r < R; ++r) acc[r] += o[r * K + j] * w;
        }
        for (int r = 0; r < R; ++r) memcpy(y + r * N + n, &acc[r], sizeof acc[r]);
    }
    for (; n < N; ++n)
        for (int r = 0; r < R; ++r) {
            float v = y[r * N + n];
            if (scale != NULL) v *= scale[r];
            for (int64_t j = 0; j < K; ++j) v += o[r * K + j] * wt[j * N + n];
            y[r * N + n] = v;
        }
}

void int8_finish_f32(float *y, const float *scale, const float *o, const float *wt, int64_t T, int64_t N, int64_t K,
                     int threads) {
    #pragma omp parallel for num_threads(threads)
    for (int64_t t = 0; t < T; t += 4) {
        const float *st = scale == NULL ? NULL : scale + t;
        float *yt = y + t * N;
        const float *ot = K > 0 ? o + t * K : o;  /* o may be NULL where there are no outliers */
        switch (T - t < 4 ? T - t : 4) {  /* a constant R: the accumulators stay in registers */
            case 4: finish_rows(yt, st, ot, wt, 4, N, K); break;
            case 3: finish_rows(yt, st, ot, wt, 3, N, K); break;
            case 2: finish_rows(yt, st, ot, wt, 2, N, K); break;
            default: finish_rows(yt, st, ot, wt, 1, N, K);
        }
    }
}

/* out[t] = the index of the first maximum of row t of x [T, N] (rows at stride xs), a NaN counting as the
   maximum, as torch.argmax has it. */
void argmax_rows_f32(const float *x, int64_t xs, int64_t *out, int64_t T, int64_t N, int threads) {
    #pragma omp parallel for num_threads(threads)
    for (int64_t t = 0; t < T; ++t) {
        const float *r = x + t * xs;
        float mx = -INFINITY;
        int nan = 0;
        #pragma omp simd reduction(max:mx) reduction(|:nan)
        for (int64_t i = 0; i < N; ++i) {
            mx = r[i] > mx ? r[i] : mx;
            nan |= r[i] != r[i];
        }
        int64_t at = 0;
        if (nan) while (r[at] == r[at]) ++at;
        else while (at < N - 1 && r[at] != mx) ++at;  /* all -inf: index 0, as torch */
        out[t] = at;
    }
}
"""

C_BODY = (_OPS + cpu_build.kv_variant("float", "f32", _ROPE_WRITE_KV)
          + "#if defined(__FLT16_MAX__)\n" + cpu_build.kv_variant("_Float16", "f16", _ROPE_WRITE_KV)
          + "#endif\n" + _INT8_AND_ARGMAX)

_SOURCE = cpu_build.PRELUDE + C_BODY

# Below this many elements a call runs on one thread: a parallel region costs more than the work.
_PARALLEL_MIN = 1 << 16


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load("layer_ops", _SOURCE)
    if lib is None:
        return None
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    signatures = {
        "rms_norm_f32": [ptr, i64, ptr, ptr, i64, i64, f32, i32],
        "add_rms_norm_f32": [ptr, ptr, ptr, ptr, ptr, i64, i64, f32, i32],
        "silu_and_mul_f32": [ptr, ptr, i64, i64, i32],
        "rope_write_kv_f32": [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i32],
        "int8_prepare_f32": [ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, i64, i64, i32],
        "int8_quantize_f32": [ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, i64, i64, i32],
        "argmax_rows_f32": [ptr, i64, ptr, i64, i64, i32],
        "int8_finish_f32": [ptr, ptr, ptr, ptr, i64, i64, i64, i32],
    }
    if hasattr(lib, "rope_write_kv_f16"):  # built where the compiler has _Float16
        signatures["rope_write_kv_f16"] = signatures["rope_write_kv_f32"]
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


def _fast(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library, if every tensor is a CPU fp32 one with unit stride in its last dimension and
    nothing needs gradients (training the EAGLE head runs these layers under autograd)."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if not t.is_cpu or t.dtype != torch.float32 or t.stride(-1) != 1 or (grad and t.requires_grad):
            return None
    return _library()


def _threads(elements: int) -> int:
    return torch.get_num_threads() if elements >= _PARALLEL_MIN else 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, N] -> [T, N]
    lib = _fast(x, weight)
    if lib is None or x.dim() != 2 or not weight.is_contiguous():
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    t, n = x.shape
    y = torch.empty(t, n)
    lib.rms_norm_f32(x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(), t, n, eps, _threads(t * n))
    return y


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y): s = x + delta, the new residual stream, and y = rms_norm(s) * weight. x, delta: [T, N]."""
    lib = _fast(x, delta, weight)
    if lib is None or x.dim() != 2 or not (x.is_contiguous() and delta.is_contiguous() and weight.is_contiguous()):
        s = x + delta
        return s, F.rms_norm(s, (s.shape[-1],), weight, eps)
    t, n = x.shape
    s, y = torch.empty(t, n), torch.empty(t, n)
    lib.add_rms_norm_f32(x.data_ptr(), delta.data_ptr(), weight.data_ptr(), s.data_ptr(), y.data_ptr(), t, n, eps,
                         _threads(t * n))
    return s, y


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up: [T, 2I] -> silu(gate) * up: [T, I]
    t, i2 = gate_up.shape
    lib = _fast(gate_up)
    if lib is None or not gate_up.is_contiguous():
        gate, up = gate_up.split(i2 // 2, dim=-1)
        return F.silu(gate) * up
    out = torch.empty(t, i2 // 2)
    lib.silu_and_mul_f32(gate_up.data_ptr(), out.data_ptr(), t, i2 // 2, _threads(t * i2))
    return out


_ROPE_WRITE_KV_FN = {torch.float32: "rope_write_kv_f32", torch.float16: "rope_write_kv_f16"}  # by cache dtype


def rope_write_kv_supported(qkv: torch.Tensor, k_cache: torch.Tensor, cos: torch.Tensor,
                            slot_mapping: torch.Tensor) -> bool:
    lib = _fast(qkv, cos)
    return (lib is not None and hasattr(lib, _ROPE_WRITE_KV_FN.get(k_cache.dtype, "")) and k_cache.is_cpu
            and qkv.is_contiguous() and k_cache.is_contiguous() and cos.is_contiguous()
            and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous())


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    """Rotates q and k inside qkv [T, (H + 2 KVH) * D] in place and writes k and v to their cache slots.
    cos, sin: [T, ..., D/2] contiguous; caches: [NB, BS, KVH, D] (both contiguous); slot_mapping: [T] int64.
    Callers check `rope_write_kv_supported` first."""
    assert v_cache.is_contiguous() and sin.is_contiguous() and v_cache.dtype == k_cache.dtype
    write = getattr(_library(), _ROPE_WRITE_KV_FN[k_cache.dtype])
    t, d = qkv.shape[0], k_cache.shape[-1]
    write(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(), k_cache.data_ptr(),
          v_cache.data_ptr(), t, num_heads, num_kv_heads, d, _threads(qkv.numel()))


def int8_prepare(x: torch.Tensor, outliers: torch.Tensor, inlier_mask: torch.Tensor,
                 scale_rows: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(y, o, scale) for an int8 linear's input x [T, N]: o [T, K] = x's outlier channels (None if
    there are none), y = x with them zeroed and, if scale_rows, each row divided by scale [T, 1], its
    max |y| (else scale is None). Never writes into x."""
    lib = _fast(x, inlier_mask) if scale_rows else None  # one row: two torch ops cost less than a C call
    if lib is None or x.dim() != 2:
        o = torch.index_select(x, 1, outliers) if len(outliers) else None
        y = x * inlier_mask if o is not None else x
        if not scale_rows:
            return y, o, None
        scale = y.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)  # [T, 1]
        return y / scale, o, scale
    t, n = x.shape
    y, o = torch.empty(t, n), torch.empty(t, len(outliers))
    scale = torch.empty(t, 1)
    lib.int8_prepare_f32(x.data_ptr(), x.stride(0), inlier_mask.data_ptr(), outliers.data_ptr(), len(outliers),
                         y.data_ptr(), o.data_ptr(), scale.data_ptr(), t, n,
                         _threads(t * n))
    return y, (o if len(outliers) else None), scale


def int8_quantize(x: torch.Tensor, outliers: torch.Tensor,
                  inlier_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(q, o, scale) for a static int8 GEMM's input x [T, N]: o as `int8_prepare`; q [T, N] int8 holds x with
    the outliers zeroed, per row symmetric: x_inliers ~= q * scale, scale [T, 1] = max |row| / 127."""
    lib = _fast(x, inlier_mask)
    if lib is None or x.dim() != 2:  # int8_prepare's torch path, its rows (max |y| = 1) then coded
        y, o, row_max = int8_prepare(x, outliers, inlier_mask, scale_rows=True)
        return torch.round(y * 127).to(torch.int8), o, row_max / 127
    t, n = x.shape
    q, o_all, scale = torch.empty(t, n, dtype=torch.int8), torch.empty(t, len(outliers)), torch.empty(t, 1)
    lib.int8_quantize_f32(x.data_ptr(), x.stride(0), inlier_mask.data_ptr(), outliers.data_ptr(), len(outliers),
                          q.data_ptr(), o_all.data_ptr(), scale.data_ptr(), t, n, _threads(t * n))
    return q, (o_all if len(outliers) else None), scale


def int8_finish(y: torch.Tensor, scale: torch.Tensor | None, outliers: torch.Tensor | None,
                outlier_weight_t: torch.Tensor) -> torch.Tensor:
    """y * scale + outliers @ outlier_weight_t, written into y [T, N]: an int8 GEMM's output with its rows' scales
    [T, 1] (None: none) and the outlier channels [T, K] (None: none) times their fp32 weights [K, N]."""
    parts = [t for t in (y, scale, outliers) if t is not None]
    lib = _fast(*parts, outlier_weight_t)
    if lib is None or y.dim() != 2 or not all(t.is_contiguous() for t in parts + [outlier_weight_t]):
        y = y if scale is None else y.mul_(scale)
        return y if outliers is None else y.addmm_(outliers, outlier_weight_t)
    t, n = y.shape
    k = 0 if outliers is None else outliers.shape[1]
    lib.int8_finish_f32(y.data_ptr(), None if scale is None else scale.data_ptr(),
                        None if outliers is None else outliers.data_ptr(), outlier_weight_t.data_ptr(), t, n, k,
                        _threads(t * n * (k + 1)))
    return y


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of a 2-D tensor [T, N] -> [T] int64. torch's CPU argmax over rows of a vocabulary
    ran at ~3 GB/s (1.9 ms for 32 x 49152 logits, against 0.09 ms for amax); this reads them at memory speed."""
    lib = _fast(x)
    if lib is None or x.dim() != 2 or x.shape[1] == 0:
        return x.argmax(dim=-1)
    t, n = x.shape
    out = torch.empty(t, dtype=torch.int64)
    lib.argmax_rows_f32(x.data_ptr(), x.stride(0), out.data_ptr(), t, n, _threads(t * n))
    return out
