"""q4_1: linear layers read from a GGUF checkpoint's own Q4_1 blocks (kernels/cpu_quant.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from engine import LLM, SamplingParams
from engine.linear import Linear
from engine.loader import load_model
from kernels import cpu_quant


def random_blocks(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """ggml block_q4_1 rows [rows, cols / 32 * 20]: fp16 scale and offset of a weight's size, random codes."""
    g = torch.Generator().manual_seed(seed)
    nb = cols // 32
    d = (torch.rand(rows, nb, 1, generator=g) * 0.02).half().view(torch.uint8)  # [rows, nb, 2]
    m = (-torch.rand(rows, nb, 1, generator=g) * 0.1).half().view(torch.uint8)
    qs = torch.randint(0, 256, (rows, nb, 16), generator=g, dtype=torch.uint8)
    return torch.cat([d, m, qs], dim=-1).reshape(rows, nb * 20).contiguous()


def test_blocks_read_as_ggml_reads_them():
    blocks = random_blocks(8, 96)
    ggml = dequantize(blocks.numpy(), GGMLQuantizationType.Q4_1).reshape(8, 96)
    assert torch.equal(cpu_quant.dequantize_q4_1(blocks), torch.from_numpy(np.array(ggml)))


@pytest.mark.skipif(not cpu_quant.available(), reason="the C kernels cannot be built here")
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_kernel_equals_the_dequantized_product(rows):
    blocks = random_blocks(200, 576, seed=rows)  # 200 outputs: not a multiple of the threads' split
    x = torch.randn(rows, 576)
    want = x.double() @ cpu_quant.dequantize_q4_1(blocks).double().t()
    got = cpu_quant.q4_1_linear(x, blocks)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_linear_reads_blocks_for_few_rows_and_fp16_for_more():
    blocks = random_blocks(96, 64)
    lin = Linear(64, 96, bias=True)
    with torch.no_grad():
        lin.weight_t.copy_(cpu_quant.dequantize_q4_1(blocks).t())
        torch.nn.init.normal_(lin.bias, std=0.1)
    x = torch.randn(9, 64)
    ref = lin(x)
    lin.pack_q4_1(blocks)
    assert lin.weight_t.numel() == 0
    for n, tolerance in ((1, 1e-5), (4, 1e-5), (9, 1e-3)):  # 9 rows: the fp16 GEMM
        assert ((lin(x[:n]) - ref[:n]).norm() / ref[:n].norm()).item() < tolerance


def test_blocks_of_other_weights_are_refused():
    lin = Linear(64, 96, bias=False)
    torch.nn.init.normal_(lin.weight_t, std=0.1)
    with pytest.raises(ValueError, match="do not hold"):
        lin.pack_q4_1(random_blocks(96, 64))


def test_a_model_without_q4_1_blocks_says_so_and_auto_falls_back_to_fp16(tiny_llama_dir):
    with pytest.raises(ValueError, match="Q4_1"):
        load_model(str(tiny_llama_dir), quantization="q4_1")
    assert load_model(str(tiny_llama_dir), quantization="auto").quantization == "fp16"


def test_the_default_model_decodes_as_fp32_does_at_batch_one():
    # Its projections are Q4_1 in the shipped GGUF, so one-row steps compute the fp32 model's own weights.
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    chats = [[{"role": "user", "content": p}] for p in ("Name three rivers.", "What is a prime number?")]
    q4 = LLM("smollm2", quantization="q4_1", kv_cache_memory=64 << 20)
    assert q4.engine.loaded.quantization == "q4_1"
    got = [q4.chat([c], params)[0].outputs[0].token_ids for c in chats]  # one request at a time: one-row steps
    del q4
    exact = LLM("smollm2", quantization="none", kv_cache_memory=64 << 20)
    assert got == [exact.chat([c], params)[0].outputs[0].token_ids for c in chats]
