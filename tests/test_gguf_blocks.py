"""gguf: linear layers read from a GGUF checkpoint's own Q4_1 / Q8_0 blocks (kernels/cpu_quant.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from engine import LLM, SamplingParams
from engine.linear import Linear
from engine.loader import load_model
from kernels import cpu_amx, cpu_quant

GGML = {"q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """ggml block rows [rows, cols / 32 * block bytes]: fp16 scale (and offset) of a weight's size, random codes."""
    g = torch.Generator().manual_seed(seed)
    nb = cols // 32
    parts = [(torch.rand(rows, nb, 1, generator=g) * 0.02).half().view(torch.uint8)]  # d: [rows, nb, 2]
    if kind == "q4_1":
        parts.append((-torch.rand(rows, nb, 1, generator=g) * 0.1).half().view(torch.uint8))  # m
    codes = cpu_quant.BLOCK_BYTES[kind] - 2 * len(parts)
    parts.append(torch.randint(0, 256, (rows, nb, codes), generator=g, dtype=torch.uint8))
    return torch.cat(parts, dim=-1).reshape(rows, -1).contiguous()


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_blocks_read_as_ggml_reads_them(kind):
    blocks = random_blocks(kind, 8, 96)
    ggml = dequantize(blocks.numpy(), GGML[kind]).reshape(8, 96)
    assert torch.equal(cpu_quant.dequantize(blocks, kind), torch.from_numpy(np.array(ggml)))


@pytest.mark.skipif(not cpu_quant.available(), reason="the C kernels cannot be built here")
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16, 21, 40])  # any count: groups of rows, passes of groups
@pytest.mark.parametrize("cols", [576, 1536])  # 1536: x of many rows no longer fits L1, so K goes in slices
def test_kernel_equals_the_dequantized_product(kind, rows, cols):
    blocks = random_blocks(kind, 200, cols, seed=rows)  # 200 outputs: not a multiple of the threads' split
    x = torch.randn(rows, cols)
    want = x.double() @ cpu_quant.dequantize(blocks, kind).double().t()
    got = cpu_quant.block_linear(x, blocks, kind)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def linear_holding(kind: str, rows: int, cols: int) -> tuple[Linear, torch.Tensor]:
    """An unpacked Linear (with a bias) whose fp32 weights are those of random `kind` blocks, and the blocks."""
    blocks = random_blocks(kind, rows, cols)
    lin = Linear(cols, rows, bias=True)
    with torch.no_grad():
        lin.weight_t.copy_(cpu_quant.dequantize(blocks, kind).t())
        torch.nn.init.normal_(lin.bias, std=0.1)
    return lin, blocks


def test_linear_reads_blocks_for_few_rows_and_fp16_for_more(monkeypatch):
    monkeypatch.setattr(cpu_amx, "available", lambda: False)  # tiles take the calls of more rows (test_cpu_amx.py)
    lin, blocks = linear_holding("q4_1", 96, 64)
    most = cpu_quant.max_rows("q4_1")
    x = torch.randn(most + 1, 64)
    ref = lin(x)
    lin.pack_gguf("q4_1", blocks)
    assert lin.weight_t.numel() == 0
    for n in (1, 4, most, most + 1):
        tolerance = 1e-5 if n <= most else 1e-3  # more rows than the blocks take: the fp16 GEMM
        assert ((lin(x[:n]) - ref[:n]).norm() / ref[:n].norm()).item() < tolerance


def test_blocks_of_other_weights_are_refused():
    lin = Linear(64, 96, bias=False)
    torch.nn.init.normal_(lin.weight_t, std=0.1)
    with pytest.raises(ValueError, match="do not hold"):
        lin.pack_gguf("q8_0", random_blocks("q8_0", 96, 64))


def test_a_model_without_gguf_blocks_says_so_and_auto_falls_back_to_fp16(tiny_llama_dir):
    with pytest.raises(ValueError, match="Q4_1"):
        load_model(str(tiny_llama_dir), quantization="gguf")
    assert load_model(str(tiny_llama_dir), quantization="auto").quantization == "fp16"


def test_the_default_model_decodes_as_fp32_does_at_batch_one():
    # Its projections are Q4_1 and its embedding (the tied LM head) Q8_0 in the shipped GGUF, so one-row
    # steps compute the fp32 model's own weights.
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    chats = [[{"role": "user", "content": p}] for p in ("Name three rivers.", "What is a prime number?")]
    fast = LLM("smollm2", quantization="gguf", kv_cache_memory=64 << 20)
    assert fast.engine.loaded.quantization == "gguf"
    kinds = {m.packed.kind for m in fast.engine.loaded.model.modules() if isinstance(m, Linear)}
    assert kinds == {"q4_1", "q8_0"}
    got = [fast.chat([c], params)[0].outputs[0].token_ids for c in chats]  # one request at a time: one-row steps
    del fast
    exact = LLM("smollm2", quantization="none", kv_cache_memory=64 << 20)
    assert got == [exact.chat([c], params)[0].outputs[0].token_ids for c in chats]
