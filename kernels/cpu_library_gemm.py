"""oneDNN's GEMMs as torch ships them, callable from C: int8 (`onednn::qlinear_pointwise`) and fp32
(`mkldnn::_linear_pointwise`, the weights engine/linear.py packs for `--quantization none`).

The decode stack (kernels/cpu_decode.py) runs a decoder layer's small ops in C, and these projections
must stay on the library's GEMM. A few lines of C++ here, built against torch's own headers and
libraries, call the same ops through ATen's dispatcher: no Python between the ops of a layer. The int8
op sums into the caller's output ("sum" post-op), so no tensor is allocated per call; the fp32 op has
no such form, and its result is copied out.

Without a C++ compiler or torch's headers, `available()` is False and the layers run from Python.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

from kernels import cpu_build

_SOURCE = r"""
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/InferenceMode.h>

namespace {
/* a tensor the Python side owns, by its TensorImpl address (Tensor._cdata), with a reference of our own */
at::Tensor borrow(intptr_t impl) {
    return at::Tensor(c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim_copy(
        reinterpret_cast<c10::TensorImpl *>(impl)));
}

at::Tensor view(const void *data, int64_t rows, int64_t cols, at::ScalarType dtype) {
    return at::from_blob(const_cast<void *>(data), {rows, cols}, at::TensorOptions().dtype(dtype));
}

const c10::OperatorHandle &linear_fp32() {
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    return op;
}

const c10::OperatorHandle &linear_int8() {
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_pointwise", "binary");
    return op;
}

/* op()(stack...) through the dispatcher's boxed path (the schema's types, no C++ signature to keep in step).
   0, or 1 where the op raised: C callers have no exceptions, the message goes to stderr. */
int call(const c10::OperatorHandle &(*op)(), torch::jit::Stack &stack) {
    try {
        c10::InferenceMode guard;
        op().callBoxed(&stack);
        return 0;
    } catch (const std::exception &e) {
        fprintf(stderr, "library GEMM: %s\n", e.what());
        return 1;
    }
}

struct Fp32Gemm {
    at::Tensor packed;  /* _reorder_linear_weight's [N, K] */
    int64_t N;
};

struct Int8Gemm {
    at::Tensor packed, scales, zero_points;  /* qlinear_prepack's weights, fp32 scales [N], zeros [N] */
    int64_t N;
};
}  // namespace

extern "C" void *fp32_gemm_new(intptr_t packed, int64_t N) { return new Fp32Gemm{borrow(packed), N}; }

extern "C" void fp32_gemm_free(void *gemm) { delete static_cast<Fp32Gemm *>(gemm); }

/* y [M, N] = x [M, K] . W^T, fp32, as engine/linear.py calls the op (no bias: the stack adds it). */
extern "C" int fp32_gemm_run(void *ctx, const float *x, int64_t M, int64_t K, float *y) {
    const Fp32Gemm *g = static_cast<const Fp32Gemm *>(ctx);
    torch::jit::Stack stack{view(x, M, K, at::kFloat), g->packed, c10::IValue(), "none",
                            c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    if (call(linear_fp32, stack)) return 1;
    const at::Tensor out = stack.back().toTensor().contiguous();
    memcpy(y, out.data_ptr<float>(), sizeof(float) * (size_t)(M * g->N));
    return 0;
}

extern "C" void *int8_gemm_new(intptr_t packed, intptr_t scales, intptr_t zero_points, int64_t N) {
    return new Int8Gemm{borrow(packed), borrow(scales), borrow(zero_points), N};
}

extern "C" void int8_gemm_free(void *gemm) { delete static_cast<Int8Gemm *>(gemm); }

/* y [M, N] += (q [M, K] . W_q^T) * w_scale, fp32, summed in place by the op's "sum" post-op. */
extern "C" int int8_gemm_run(void *ctx, const int8_t *q, int64_t M, int64_t K, float *y) {
    const Int8Gemm *g = static_cast<const Int8Gemm *>(ctx);
    torch::jit::Stack stack{view(q, M, K, at::kChar), 1.0, int64_t{0}, g->packed, g->scales, g->zero_points,
                            view(y, M, g->N, at::kFloat), c10::IValue(), 1.0, int64_t{0}, c10::ScalarType::Float,
                            1.0, int64_t{0}, "sum", 1.0, "none", c10::List<std::optional<at::Scalar>>(), ""};
    return call(linear_int8, stack);
}
"""


def _flags() -> list[str] | None:
    """Compiler flags for torch's headers and libraries, or None where torch ships no headers."""
    from torch.utils import cpp_extension

    includes = [p for p in cpp_extension.include_paths() if os.path.isdir(p)]
    if not includes:
        return None
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    # the torch version keys the cache: the op's schema and the C++ ABI move between releases
    return [f"-I{p}" for p in includes] + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DSLUICE_TORCH=\"{torch.__version__}\"",
                                           f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch_cpu", "-lc10"]


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not (hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return None
    flags = _flags()
    lib = cpu_build.load("library_gemm", _SOURCE, cxx_flags=flags) if flags is not None else None
    if lib is not None:
        handle, ptr, i64 = ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_int64
        signatures = {  # name: (argument types, result type)
            "int8_gemm_new": ([handle, handle, handle, i64], ptr), "fp32_gemm_new": ([handle, i64], ptr),
            "int8_gemm_run": ([ptr, ptr, i64, i64, ptr], ctypes.c_int),
            "fp32_gemm_run": ([ptr, ptr, i64, i64, ptr], ctypes.c_int),
            "int8_gemm_free": ([ptr], None), "fp32_gemm_free": ([ptr], None),
        }
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
    return lib


def available() -> bool:
    return _library() is not None


class _Gemm:
    """One projection's packed weights as C sees them: `run` (a C function pointer) and its `ctx`, which holds
    references of its own to the tensors (as this object does, for as long as it lives)."""

    def __init__(self, new: ctypes._CFuncPtr, run: ctypes._CFuncPtr, free: ctypes._CFuncPtr,
                 tensors: tuple[torch.Tensor, ...], out_features: int):
        self._run, self._free, self._tensors = run, free, tensors
        self.ctx = new(*(t._cdata for t in tensors), out_features)
        self.run = ctypes.cast(run, ctypes.c_void_p).value

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The C stack's call, from Python: x [M, K] and y [M, N] contiguous."""
        assert x.is_contiguous() and y.is_contiguous() and y.dtype == torch.float32
        if self._run(self.ctx, x.data_ptr(), x.shape[0], x.shape[1], y.data_ptr()) != 0:
            raise RuntimeError("a oneDNN GEMM called from C failed (see stderr)")
        return y

    def __del__(self) -> None:
        if getattr(self, "ctx", None):
            self._free(self.ctx)
            self.ctx = None


class Int8Gemm(_Gemm):
    """oneDNN's int8 weights (engine/linear.py's OneDNNInt8): called, y [M, N] += (q [M, K] int8 . W_q^T) w_scale."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, out_features: int):
        lib = _library()
        assert lib is not None
        super().__init__(lib.int8_gemm_new, lib.int8_gemm_run, lib.int8_gemm_free, (packed, scales, zero_points),
                         out_features)


class Fp32Gemm(_Gemm):
    """oneDNN's packed fp32 weights (engine/linear.py's pack_fp32): called, y [M, N] = x [M, K] W^T."""

    def __init__(self, packed: torch.Tensor, out_features: int):
        lib = _library()
        assert lib is not None
        super().__init__(lib.fp32_gemm_new, lib.fp32_gemm_run, lib.fp32_gemm_free, (packed,), out_features)
