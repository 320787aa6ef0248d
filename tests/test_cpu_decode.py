"""kernels/cpu_decode.py: a gguf or int8 model's decoder stack in one C call gives bit for bit the Python path's
output."""
from __future__ import annotations

import pytest
import torch

from engine import linear
from engine.default_model import resolve_model
from engine.linear import Linear
from engine.loader import build_model
from engine.model_runner import ModelRunner
from kernels import cpu_amx, cpu_decode, cpu_library_gemm, cpu_quant
from kernels.cpu_decode import DecodeStack
from tests.helpers import CountingStack, scheduled, step_logits
from tests.test_gguf_blocks import random_blocks

pytestmark = pytest.mark.skipif(not DecodeStack.available(), reason="the C kernels cannot be built here")


def _gguf_model(folder, o_kind: str = "q4_1"):
    """The tiny model with every projection's weights replaced by random blocks, packed as gguf."""
    model = build_model(resolve_model(str(folder)))[0].requires_grad_(False)
    blocks = {}
    for i, layer in enumerate(model.layers):
        for j, lin in enumerate((layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                 layer.mlp.down_proj)):
            kind = o_kind if lin is layer.self_attn.o_proj else "q4_1"
            k, n = lin.weight_t.shape
            blocks[lin] = (kind, random_blocks(kind, n, k, seed=10 * i + j))
            lin.weight_t.copy_(cpu_quant.dequantize(blocks[lin][1], kind).t())
    model.pack_linears("gguf", blocks=blocks)
    assert model.decode_stack is not None
    return model


SHORT_STEP_ROWS = [1, 2, 5, 5, 20]  # the rows of _steps' steps that hold no prompt chunk


def _steps(model, fused: bool, kv_cache_dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], int]:
    """Prompts, then decode rows, several short queries at once (drafts to verify), a step mixing a prompt
    chunk with a decode, and 20 short rows of three requests, through a fresh cache: each step's logits,
    and the stack's call count."""
    stack = CountingStack(model.decode_stack)
    model.decode_stack = stack if fused else None
    try:
        runner = ModelRunner(model, num_blocks=64, block_size=4, kv_cache_dtype=kv_cache_dtype)
        gen = torch.Generator().manual_seed(0)
        a, b, c = (torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (37, 26, 18))
        tables = [list(range(0, 12)), list(range(20, 32)), list(range(40, 48))]
        out = [step_logits(runner, [scheduled("a", a[:20], 0, tables[0]), scheduled("b", b[:15], 0, tables[1])])]
        out.append(step_logits(runner, [scheduled("a", a[20:21], 20, tables[0])]))  # one row
        out.append(step_logits(runner, [scheduled("a", a[21:22], 21, tables[0]),
                                        scheduled("b", b[15:16], 15, tables[1])]))  # two requests
        out.append(step_logits(runner, [scheduled("a", a[22:27], 22, tables[0])]))  # five rows, one request
        out.append(step_logits(runner, [scheduled("a", a[27:29], 27, tables[0]),
                                        scheduled("b", b[16:19], 16, tables[1])]))  # 2 + 3 rows
        out.append(step_logits(runner, [scheduled("c", c[:12], 0, tables[2]), scheduled("a", a[29:30], 29, tables[0])]))
        out.append(step_logits(runner, [scheduled("a", a[30:], 30, tables[0]), scheduled("b", b[19:], 19, tables[1]),
                                        scheduled("c", c[12:], 12, tables[2])]))  # 7 + 7 + 6 rows
        return out, stack.calls
    finally:
        model.decode_stack = stack.stack


# The portable C build (no AVX2) sends one row at a time to the blocks: no multi-row stack steps to compare.
multi_row = pytest.mark.skipif(cpu_quant.max_rows("q8_0") < 2, reason="this CPU's build runs one-row stacks only")


@pytest.fixture(params=["amx", "no amx"])
def amx(request, monkeypatch) -> bool:
    """Both with the AMX tiles, where this CPU has them, and without."""
    if request.param == "no amx":
        monkeypatch.setattr(cpu_amx, "available", lambda: False)
    elif not cpu_amx.available():
        pytest.skip("no AMX here")
    return request.param == "amx"


@multi_row
@pytest.mark.parametrize("arch, kv_cache_dtype", [("llama", torch.float32), ("qwen2", torch.float32),
                                                  ("llama", torch.float16)])  # qwen2: q/k/v biases
def test_stack_equals_the_layer_by_layer_path(arch, kv_cache_dtype, amx, tiny_llama_dir, tiny_qwen2_dir):
    model = _gguf_model(tiny_llama_dir if arch == "llama" else tiny_qwen2_dir)
    # with tiles the stack takes the 20-row step too, its projections on AMX
    assert model.decode_stack.max_rows == (cpu_decode._TILED_MAX_ROWS if amx else cpu_quant.max_rows("q4_1"))
    fused, calls = _steps(model, True, kv_cache_dtype)
    plain, no_calls = _steps(model, False, kv_cache_dtype)
    assert no_calls == 0 and calls == sum(rows <= model.decode_stack.max_rows for rows in SHORT_STEP_ROWS) >= 4
    for got, want in zip(fused, plain):
        assert torch.equal(got, want)


@multi_row
def test_stack_takes_only_the_rows_every_layer_kind_takes(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(cpu_amx, "available", lambda: False)  # tiles take any rows
    model = _gguf_model(tiny_llama_dir, o_kind="q8_0")
    assert model.decode_stack.max_rows == min(cpu_quant.max_rows("q4_1"), cpu_quant.max_rows("q8_0"))
    model.decode_stack.max_rows = 2
    fused, calls = _steps(model, fused=True)
    plain, _ = _steps(model, fused=False)
    assert calls == 2  # the one-row and the two-request steps; 5 rows go layer by layer
    for got, want in zip(fused, plain):
        assert torch.equal(got, want)


@pytest.mark.skipif(not cpu_library_gemm.available(), reason="no C++ compiler or torch headers here")
@pytest.mark.parametrize("quantization", ["int8", "none"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_library_gemm_stack_equals_the_layer_by_layer_path(quantization, arch, tiny_llama_dir, tiny_qwen2_dir,
                                                           monkeypatch):
    # oneDNN's int8 GEMM runs on any x86 CPU (the engine packs for it where there is AMX); the Python path
    # takes it at every row count here, as the stack does, so both run the same kernels
    monkeypatch.setattr(linear, "_onednn_int8_fits", lambda: True)
    monkeypatch.setattr(linear, "ONEDNN_MIN_ROWS", 1)
    model = build_model(resolve_model(str(tiny_llama_dir if arch == "llama" else tiny_qwen2_dir)))[0]
    model.requires_grad_(False)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    model.pack_linears(quantization, outliers={lin: torch.tensor([1, 6]) for lin in linears[::2]})  # int8's fp32 channels
    assert model.decode_stack is not None and model.decode_stack.max_rows == cpu_decode._TILED_MAX_ROWS
    fused, calls = _steps(model, True)
    plain, no_calls = _steps(model, False)
    assert no_calls == 0 and calls == len(SHORT_STEP_ROWS)
    for got, want in zip(fused, plain):
        assert torch.equal(got, want)


def test_no_int8_stack_without_onednn_weights(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(linear, "_onednn_int8_fits", lambda: False)  # fbgemm's weights: no GEMM C can call
    model = build_model(resolve_model(str(tiny_llama_dir)))[0].requires_grad_(False)
    model.pack_linears("int8")
    assert model.decode_stack is None


def test_no_stack_where_a_projection_has_no_blocks(tiny_llama_dir):
    model = build_model(resolve_model(str(tiny_llama_dir)))[0].requires_grad_(False)
    lin: Linear = model.layers[0].mlp.down_proj
    k, n = lin.weight_t.shape
    blocks = random_blocks("q4_1", n, k)
    lin.weight_t.copy_(cpu_quant.dequantize(blocks, "q4_1").t())
    model.pack_linears("gguf", blocks={lin: ("q4_1", blocks)})  # the rest fp16
    assert model.decode_stack is None
