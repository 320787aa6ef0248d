"""kernels/cpu_amx.py: GGUF block linears from compact tiles (few rows on AVX-512 VNNI or AVX2, more on AMX),
against the dequantized weights' product."""
from __future__ import annotations

import pytest
import torch

from kernels import cpu_amx, cpu_quant
from tests.test_gguf_blocks import linear_holding, random_blocks

pytestmark = pytest.mark.skipif(not cpu_amx.available() and cpu_amx.small_rows("q4_1") == 0,
                                reason="no tile kernel in this build (neither AMX nor AVX2)")


def _needs(rows: int, kind: str) -> None:
    if not cpu_amx.takes(rows, kind):
        pytest.skip(f"{rows} rows from tiles need AMX")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 8, 12, 16, 17, 40, 300])  # VNNI to 7 (Q8_0: 5); tiles of 8 and 16
@pytest.mark.parametrize("cols", [64, 96, 1536])  # 96: an odd number of blocks (the two C tiles in turn)
def test_tiles_equal_the_dequantized_product(kind, rows, cols):
    _needs(rows, kind)
    blocks = random_blocks(kind, 208, cols, seed=rows)  # 13 column tiles: not a multiple of the threads
    x = torch.randn(rows, cols)
    want = x.double() @ cpu_quant.dequantize(blocks, kind).double().t()
    got = cpu_amx.linear(x, cpu_amx.pack(blocks, kind), kind)
    # AMX: each x is split into two bf16 parts (16 significant bits); VNNI: ~31 bits against each block's
    # largest value. fbgemm's fp16 weights are off by ~2e-4.
    assert _relative_error(got, want) < (1e-6 if rows <= cpu_amx.small_rows(kind) else 2e-5)


def test_inputs_of_very_different_sizes_keep_their_precision():
    # the model's down projections see a few channels near 2000 beside values near 0.01
    blocks = random_blocks("q4_1", 64, 256)
    x = torch.randn(20, 256) * 0.01
    x[:, 5] = 2000.0
    x[3] = 0.0
    want = x.double() @ cpu_quant.dequantize(blocks, "q4_1").double().t()
    tiles = cpu_amx.pack(blocks, "q4_1")
    for rows in (slice(0, 20), slice(2, 4)):  # AMX, and the few-row kernel
        if cpu_amx.takes(rows.stop - rows.start, "q4_1"):
            got = cpu_amx.linear(x[rows], tiles, "q4_1")
            assert torch.equal(got[3 - rows.start], torch.zeros(64))
            assert _relative_error(got, want[rows]) < 2e-5
    assert torch.equal(cpu_amx.linear(x[3:4], tiles, "q4_1"), torch.zeros(1, 64))  # an all-zero row alone


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_linear_routes_calls_by_rows(kind):
    lin, blocks = linear_holding(kind, 96, 64)
    x = torch.randn(50, 64)
    ref = lin(x)
    lin.pack_gguf(kind, blocks)
    w = lin.packed
    assert w.tiles is not None and w.tiles.shape == (96 // cpu_amx.TILE, 2, cpu_amx.TILE_BYTES[kind])
    # where AMX takes every call, no call would read the blocks or an fp16 copy
    assert (w.blocks is None and w.fp16 is None) == cpu_amx.available()
    small = cpu_amx.small_rows(kind)
    for n in sorted({1, small, small + 1, 50} - {0}):
        got = lin(x[:n])
        if cpu_amx.takes(n, kind):
            assert torch.equal(got, cpu_amx.linear(x[:n], w.tiles, kind) + lin.bias)
        elif n <= cpu_quant.max_rows(kind):
            assert torch.equal(got, cpu_quant.block_linear(x[:n], w.blocks, kind) + lin.bias)
        assert ((got - ref[:n]).norm() / ref[:n].norm()).item() < (1e-5 if cpu_amx.takes(n, kind) else 1e-3)


def test_outputs_not_a_multiple_of_a_tile_keep_the_blocks():
    lin, blocks = linear_holding("q8_0", 40, 64)
    lin.pack_gguf("q8_0", blocks)
    assert lin.packed.tiles is None
    x = torch.randn(3, 64)
    assert torch.equal(lin(x), cpu_quant.block_linear(x, blocks, "q8_0") + lin.bias)


def test_inputs_no_kernel_takes_go_through_torch():
    lin, blocks = linear_holding("q4_1", 96, 64)
    x = torch.randn(64, 20).t()  # [20, 64], not contiguous
    ref = lin(x)
    lin.pack_gguf("q4_1", blocks)
    # (without AMX, fbgemm's fp16 copy takes the view: ~2e-4)
    assert ((lin(x) - ref).norm() / ref.norm()).item() < (1e-5 if cpu_amx.available() else 1e-3)
    x = torch.randn(20, 64, requires_grad=True)
    lin(x).sum().backward()  # the dequantized weights' product carries the gradient
    assert x.grad is not None and x.grad.shape == x.shape



@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_unpack_gives_back_the_blocks(kind):
    blocks = random_blocks(kind, 160, 96)
    assert torch.equal(cpu_amx.unpack(cpu_amx.pack(blocks, kind), kind), blocks)

