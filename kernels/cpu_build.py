"""Builds and caches the small C kernels of kernels/ (attention, norms, rope): compiled once with the
system C compiler into $SLUICE_HOME/kernels, keyed by a digest of source and flags, and loaded through
ctypes, which releases the GIL for each call. Without a compiler, off Linux, or with
SLUICE_CPU_KERNELS=0, `load` returns None and callers take their torch path.

Threads: the kernels use OpenMP from the libgomp torch has already loaded (same soname), so they share
torch's thread pool instead of starting a second one.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("sluice.kernels")

# no -ffast-math: the attention softmax starts from -inf, and a shared library built with it flushes
# denormals for the whole process
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]


# The kernels' shared prelude: GCC vector types (AVX on x86, NEON on arm, without intrinsics) and an
# exp over eight lanes. glibc's vector expf needs -ffast-math, which a shared library must not use (it
# flushes denormals process-wide), and a scalar expf call per element was the kernels' slowest part.
# Cody-Waite range reduction and Cephes' degree-6 polynomial: within 2 ulp of expf on [-87, 88];
# inputs are clamped there (exp(-87) ~ 1e-38 stands in for 0: softmax and SiLU add it to 1 or more).
PRELUDE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f r; memcpy(&r, p, sizeof r); return r; }

/* the first n (<= 8) lanes from p, zeros after */
static inline v8f load_n(const float *p, int64_t n) {
    if (n == 8) return load8(p);  /* a vector load; the variable-length copy below is a libc call */
    v8f r = {0};
    memcpy(&r, p, sizeof(float) * (size_t)n);
    return r;
}

static inline void store_n(float *p, v8f v, int64_t n) {
    if (n == 8) memcpy(p, &v, sizeof v);
    else memcpy(p, &v, sizeof(float) * (size_t)n);
}

static inline v8f exp8(v8f x) {
    const v8f lo = {-87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f};
    const v8f hi = {88.f, 88.f, 88.f, 88.f, 88.f, 88.f, 88.f, 88.f};
    x = (v8f)(((v8i)lo & (x < lo)) | ((v8i)x & ~(x < lo)));
    x = (v8f)(((v8i)hi & (x > hi)) | ((v8i)x & ~(x > hi)));
    const v8f n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  /* round to nearest: 1.5 * 2^23 */
    const v8f r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    v8f p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (v8f)((__builtin_convertvector(n, v8i) + 127) << 23);
}

/* vecf: the widest vectors the CPU has, VLANES fp32 lanes (16 with AVX-512, else 8); to8 folds one into 8 lanes.
   Reading KV cache elements as fp32 vectors: load8_<type> (8 lanes) and loadv_<type> (VLANES), for fp32
   and, where the compiler has _Float16, fp16. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define VLANES 16
typedef float vecf __attribute__((vector_size(64)));
static inline v8f to8(vecf a) {  /* intrinsics: a memcpy of a's halves kept every accumulator on the stack */
    const __m512 x = (__m512)a;
    return (v8f)_mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}
#else
#define VLANES 8
typedef v8f vecf;
static inline v8f to8(vecf a) { return a; }
#endif
static inline vecf loadv(const float *p) { vecf r; memcpy(&r, p, sizeof r); return r; }
static inline v8f load8_f32(const float *p) { return load8(p); }
static inline vecf loadv_f32(const float *p) { return loadv(p); }
#if defined(__FLT16_MAX__)
#if defined(__F16C__)
#include <immintrin.h>
static inline v8f load8_f16(const _Float16 *p) { return (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#else  /* GCC converts lane by lane here */
typedef _Float16 v8h __attribute__((vector_size(16)));
static inline v8f load8_f16(const _Float16 *p) { v8h r; memcpy(&r, p, sizeof r); return __builtin_convertvector(r, v8f); }
#endif
#if defined(__AVX512F__)
static inline vecf loadv_f16(const _Float16 *p) { return (vecf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
#else
static inline vecf loadv_f16(const _Float16 *p) { return load8_f16(p); }
#endif
#endif
"""


def kv_variant(element: str, suffix: str, body: str) -> str:
    """`body` for KV caches of C type `element`: it names the type KV_T and its functions KV(name), which become
    name_<suffix>; KV(load8) and KV(loadv) are the prelude's readers for the type."""
    return f"#define KV_T {element}\n#define KV(name) name##_{suffix}\n{body}#undef KV_T\n#undef KV\n"


def load(name: str, source: str, cxx_flags: list[str] | None = None) -> ctypes.CDLL | None:
    """The library built from `source`, or None where it cannot be built. With `cxx_flags` the source is
    C++, built with those flags added (include paths, libraries)."""
    if os.environ.get("SLUICE_CPU_KERNELS", "1") == "0" or platform.system() != "Linux":
        return None
    if cxx_flags is None:
        compiler, flags, suffix = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc"), FLAGS, ".c"
    else:
        compiler, flags, suffix = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++"), \
            FLAGS + ["-std=c++17", "-w"] + cxx_flags, ".cpp"
    if compiler is None:
        log.info("no compiler for %s: the CPU kernels' torch paths run instead", name)
        return None
    digest = cache_key(source, flags)
    home = Path(os.environ.get("SLUICE_HOME", Path.home() / ".cache" / "sluice"))
    target = home / "kernels" / f"{name}_{digest}.so"
    try:
        if not target.exists():
            _compile(compiler, source, target, flags, suffix)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log.warning("CPU kernel %s unavailable (%s): using the torch path", name, exc)
        return None


def cache_key(source: str, flags: list[str] = FLAGS) -> str:
    """What a built library is cached under: its source, the flags and the CPU it was built for."""
    return hashlib.sha256((source + " ".join(flags) + platform.machine() + _cpu_flags()).encode()).hexdigest()[:16]


def _cpu_flags() -> str:
    """The CPU's feature flags: -march=native builds differ by them, so a kernel cache shared between
    machines (a network home) must not hand one CPU's build (AVX-512, AMX) to another."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _compile(compiler: str, source: str, target: Path, flags: list[str], suffix: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / f"{target.stem}{suffix}", Path(tmp) / target.name
        src.write_text(source)
        # libraries after the source: with --as-needed linkers, a library named before it is dropped
        libs = [f for f in flags if f.startswith("-l")]
        subprocess.run([compiler, *[f for f in flags if f not in libs], str(src), "-o", str(out), *libs, "-lm"],
                       check=True, capture_output=True, timeout=300)
        os.replace(out, target)  # atomic: a concurrent process sees the whole file or none
