"""The model's linear layer and its CPU weight formats: oneDNN fp32, fbgemm fp16 weights, int8 (fbgemm, and
oneDNN for batched calls where the CPU has AMX), and a GGUF checkpoint's own blocks (C kernels, AMX tiles).
Decode steps of oneDNN fp32 and int8 weights run the same library calls from C (kernels/cpu_decode.py).

Measured here (2 cores, AVX2) over the default model's 120 projection matrices, ms per pass, each
through Linear.forward as the model calls it:

    rows   oneDNN fp32   fbgemm fp16 weights   int8 (fbgemm, with the outlier channels and row scales below)
       1         23.3          11.0                  10.2
      32         76.9          56.8                  45.0
     512        770           850                   551

(Plain fp32 `x @ W^T` took 29.5 / 134.8 / 1140 ms at the time the formats were chosen.)
The int8 kernel adds fp32 outlier channels and per-token scales to fbgemm's call (perplexity
on the quality-gate text 98 -> 37 against fp32's 36); that costs ~+2 ms at 1 row and ~+12 ms at 32,
mostly the outliers' rank-k update (torch addmm, ~90 us for 32 rows of a 3072-wide output; now one C pass
with the row scales, cpu_ops.int8_finish).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from kernels import cpu_amx, cpu_ops, cpu_quant

Kernel = Callable[[torch.Tensor, object, torch.Tensor | None], torch.Tensor]


def _onednn(x: torch.Tensor, packed: object, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def onednn_fp32_weight(lin: Linear) -> torch.Tensor | None:
    """`lin`'s oneDNN-packed fp32 weights [out, in], where `pack_fp32` packed it."""
    return lin.packed if lin.kernel is _onednn else None


def _scripted(fn: Callable) -> Callable:
    """fn compiled by TorchScript, or fn itself where TorchScript cannot compile it (same results).

    fbgemm's packed weights are TorchScript objects. An op taking one, called from Python, paid ~30 us
    per call converting it (its profile is mostly C++ exception unwinding): 121 calls, ~3.8 ms of a
    ~28 ms batch-1 step here. Called from a scripted function, the same call costs ~9 us in all."""
    try:
        with warnings.catch_warnings():
            # torch marks TorchScript deprecated; where it is gone, the plain function runs
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(fn)
    except Exception:  # noqa: BLE001 - a speed-up only
        return fn


@_scripted
def _fbgemm_fp16(x: torch.Tensor, packed: torch.classes.quantized.LinearPackedParamsBase) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic_fp16(x, packed)


@_scripted
def _fbgemm_int8(x: torch.Tensor, packed: torch.classes.quantized.LinearPackedParamsBase) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, packed, True)


def _onednn_int8(q: torch.Tensor, w: OneDNNInt8) -> torch.Tensor:
    # q: [T, in] int8 codes of the (row-scaled) input, scale 1: y [T, out] = (q . W_q) * w_scale, fp32
    return torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, w.packed, w.scales, w.zero_points, None, 1.0, 0,
                                              torch.float32, "none", [], "")


def _onednn_int8_fits() -> bool:
    """Where the CPU has AMX, oneDNN's int8 GEMM ran the default model's gate/up projection 3.6x faster than
    fbgemm's at 512 rows here (0.65 vs 2.36 ms) and 1.7x at 32. Fed int8 codes that int8_quantize wrote in
    the same pass that scales the rows (a static GEMM instead of torch's dynamic one, which finds a scale and
    quantizes again), the 121 projections of a 32-row step took 10.8 ms instead of 14.7."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return amx and hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available()


ONEDNN_MIN_ROWS = 10  # the crossover, 121 projections: 8 rows 13.9 (fbgemm) vs 14.0 ms, 12 rows 15.8 vs 14.8


@contextmanager
def _quantized_engine(name: str) -> Iterator[None]:
    """torch packs int8 weights for the library its process-wide engine names; the packed weights
    then run on that library whatever the engine is."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def _fp16(x: torch.Tensor, packed: object, bias: torch.Tensor | None) -> torch.Tensor:
    return _fbgemm_fp16(x, packed)  # bias is packed in


@dataclass
class OneDNNInt8:
    """The same int8 weights in oneDNN's own layout, for its static GEMM (int8 input codes, fp32 output)."""
    packed: torch.Tensor
    scales: torch.Tensor  # [out] fp32
    zero_points: torch.Tensor  # [out] zeros

    @classmethod
    def pack(cls, qweight: torch.Tensor, scales: torch.Tensor) -> OneDNNInt8:
        # qweight: [out, in] int8
        packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        return cls(packed, scales.float(), torch.zeros(len(scales), dtype=torch.int64))


@dataclass
class Int8Weights:
    """fbgemm int8 weights for the inlier input channels, plus the outlier channels' fp32 weights."""
    packed: object
    outliers: torch.Tensor  # [k] input channels that skip quantization
    inlier_mask: torch.Tensor  # [in] 0 at the outliers, 1 elsewhere
    outlier_weight_t: torch.Tensor  # [k, out]
    onednn: OneDNNInt8 | None = None  # for calls of ONEDNN_MIN_ROWS and more


def _int8(x: torch.Tensor, w: Int8Weights, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [T, in]. fbgemm quantizes the whole input with one scale and zero point (7-bit: AVX2's u8 x s8
    # multiply-add saturates int16 with 8 bits). This model's activations have a few huge channels
    # (|x| up to ~2000 into some down projections) and some tokens far larger than others, so the
    # outlier channels found at load go through an fp32 matmul, and rows are scaled to max |x| = 1
    # first (per-token precision; scaling a row commutes with the matmul).
    # (one row: fbgemm's per-tensor scale already is per token). oneDNN's calls get the scaled rows as
    # symmetric 8-bit codes: with them the quality gate read 7 of 20 answers equal, not 3 (4 with the C epilogue's
    # rounding order: engine/loader.py).
    if w.onednn is not None and x.shape[0] >= ONEDNN_MIN_ROWS:
        q, outliers, scale = cpu_ops.int8_quantize(x, w.outliers, w.inlier_mask)
        y = _onednn_int8(q, w.onednn)  # [T, out]
    else:
        x, outliers, scale = cpu_ops.int8_prepare(x, w.outliers, w.inlier_mask, scale_rows=x.shape[0] > 1)
        y = _fbgemm_int8(x, w.packed)  # [T, out]
    y = cpu_ops.int8_finish(y, scale, outliers, w.outlier_weight_t)
    return y if bias is None else y.add_(bias)


@dataclass
class GGUFWeights:
    """A GGUF checkpoint's own quantized blocks, and the same codes repacked as compact tiles (kernels/cpu_amx.py).
    Where the CPU has AMX, the tiles take every call. Elsewhere they take calls of a row or two (up to 7 with
    AVX-512 VNNI), the blocks' C kernels (kernels/cpu_quant.py) those of a few rows more, and fbgemm's fp16
    packing of the weights the rest, where the GEMM is compute-bound."""
    kind: str  # "q4_1" or "q8_0"
    blocks: torch.Tensor | None  # [out, in / 32 * block bytes] uint8; None where AMX tiles take every call
    fp16: object | None  # None where AMX tiles take every call: 2 more bytes a weight for no call
    tiles: torch.Tensor | None = None

    def dequantized(self) -> torch.Tensor:
        blocks = self.blocks if self.blocks is not None else cpu_amx.unpack(self.tiles, self.kind)
        return cpu_quant.dequantize(blocks, self.kind)  # [out, in]


def _gguf(x: torch.Tensor, w: GGUFWeights, bias: torch.Tensor | None) -> torch.Tensor:
    if w.tiles is not None and cpu_quant.readable(x) and cpu_amx.takes(x.shape[0], w.kind):
        y = cpu_amx.linear(x, w.tiles, w.kind)
    elif w.blocks is not None and cpu_quant.supports(x, w.kind):
        y = cpu_quant.block_linear(x, w.blocks, w.kind)
    elif w.fp16 is not None and not (x.requires_grad and torch.is_grad_enabled()):
        return _fbgemm_fp16(x, w.fp16)  # bias is packed in
    else:  # an input no kernel takes (autograd, a view): the dequantized weights, in torch
        y = x @ w.dequantized().t().to(x.dtype)
    return y if bias is None else y.add_(bias)


class Linear(nn.Module):
    """y = x W^T + b. W is stored transposed, [in, out], until a `pack_*` call moves it into a
    library's packed format (and drops the plain copy).

    The transposed layout itself matters for unpacked fp32 (GPU, or CPU without oneDNN): for the
    few rows of a decode step CPU GEMM streams it about twice as fast as nn.Linear's [out, in].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.packed: object | None = None
        self.kernel: Kernel | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.packed, self.bias)
        return x @ self.weight_t if self.bias is None else torch.addmm(self.bias, x, self.weight_t)

    def _weight(self) -> torch.Tensor:
        return self.weight_t.detach().t().float().contiguous()  # [out, in]

    def _bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.detach().float()

    def _set(self, packed: object, kernel: Kernel) -> None:
        self.packed, self.kernel = packed, kernel
        self.weight_t = nn.Parameter(torch.empty(0), requires_grad=False)

    def pack_fp32(self, batch_hint: int = 32) -> None:
        """oneDNN's blocked fp32 layout: exact up to summation order."""
        self._set(torch.ops.mkldnn._reorder_linear_weight(self._weight(), batch_hint), _onednn)

    def pack_fp16(self) -> None:
        """fp16 weights, fp32 activations and accumulation (fbgemm): relative error ~2e-4."""
        self._set(torch.ops.quantized.linear_prepack_fp16(self._weight(), self._bias()), _fp16)

    def pack_gguf(self, kind: str, blocks: torch.Tensor) -> None:
        """Keeps the checkpoint's `blocks` of `kind` ("q4_1", "q8_0"; uint8 [out, in / 32 * block bytes],
        which must hold exactly this layer's weights), and AMX tiles of them or, without, an fp16 packing for calls
        of many rows."""
        weight = self._weight()
        if blocks.shape[0] != weight.shape[0] or not torch.equal(cpu_quant.dequantize(blocks, kind), weight):
            raise ValueError(f"the {kind} blocks do not hold this layer's weights")
        tiles = cpu_amx.pack(blocks, kind) if cpu_amx.packable(blocks, kind) else None
        if tiles is not None and cpu_amx.available():  # tiles take every call
            self._set(GGUFWeights(kind, None, None, tiles), _gguf)
        else:  # the blocks and fp16 take the calls of more rows than the tiles' few-row kernels
            fp16 = torch.ops.quantized.linear_prepack_fp16(weight, self._bias())
            self._set(GGUFWeights(kind, blocks.contiguous(), fp16, tiles), _gguf)

    def pack_int8(self, outliers: torch.Tensor | None = None) -> None:
        """Symmetric per-output-channel int8 weights, activations quantized per token at run time;
        the input channels in `outliers` (found by calibration, see engine/calibration.py) stay fp32."""
        weight = self._weight()  # [out, in]
        outliers = torch.empty(0, dtype=torch.long) if outliers is None else outliers
        outlier_weight_t = weight[:, outliers].t().contiguous()  # [k, out]
        weight[:, outliers] = 0.0
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            # torch marks its quantized tensor types deprecated (torchao is the successor);
            # fbgemm's dynamic linear still takes them.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
            with _quantized_engine("fbgemm"):  # bias added after the row scaling
                packed = torch.ops.quantized.linear_prepack(qweight, None)
        onednn = OneDNNInt8.pack(qweight.int_repr(), scales) if _onednn_int8_fits() else None
        inlier_mask = torch.ones(weight.shape[1]).index_fill_(0, outliers, 0.0)
        self._set(Int8Weights(packed, outliers, inlier_mask, outlier_weight_t, onednn), _int8)


# gguf's layers without checkpoint blocks (an EAGLE head, a layer the GGUF keeps in fp16) are fp16
PACKERS = {"none": Linear.pack_fp32, "fp16": Linear.pack_fp16, "int8": Linear.pack_int8, "gguf": Linear.pack_fp16}
