"""The int8 quality gate on the real model, and int8 linears on a tiny one."""
from __future__ import annotations

import math

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.config import DTYPE_NAMES
from engine.kv_cache import resolve_kv_cache_dtype
from engine import linear
from engine.linear import Linear
from engine.loader import PASSES_QUALITY_GATE, resolve_quantization
from kernels import cpu_library_gemm

PROMPTS = [
    "What is the capital of France?", "Write a haiku about autumn leaves.", "Explain what a linked list is.",
    "List three tips for better sleep.", "Translate 'good morning' into Spanish.", "What is 12 times 7?",
    "Name the planets of the solar system.", "Give me a synonym for 'happy'.", "What does a compiler do?",
    "Describe a cat in one sentence.", "Why is the sky blue?", "Write a limerick about a programmer.",
    "What is photosynthesis?", "Suggest a name for a coffee shop.", "How do vaccines work?",
    "What is the boiling point of water?", "Summarize the plot of Romeo and Juliet.",
    "Give an example of a prime number greater than 50.", "What is machine learning?",
    "How many days are in a leap year?",
]
# Written for this test: plain expository prose, no quotations from elsewhere.
TEXT = (
    "The river town woke slowly on market days. Before sunrise the bakers lit their ovens, and the smell of warm "
    "bread drifted over the water. Fishermen pulled their boats onto the gravel and sorted the night's catch into "
    "wooden crates. By seven o'clock the square was full of stalls selling apples, cheese, honey and wool. "
    "Children ran between the tables while their parents argued cheerfully about prices. The old bridge, built of "
    "grey stone three centuries ago, carried a steady stream of carts from the farms on the far bank. In the "
    "afternoon the wind usually turned, and clouds gathered over the hills to the west. Most traders packed up "
    "early, because a sudden rain could ruin a whole day's work. In the evening the town grew quiet again, and "
    "the only sounds were the river, the church bell, and a dog barking somewhere beyond the mill."
)


@pytest.mark.parametrize("fmt, tolerance", [("fp32", 1e-5), ("fp16", 1e-3), ("int8", 0.03)])
def test_packed_linears_are_close_to_fp32(fmt, tolerance):
    torch.manual_seed(0)
    lin = Linear(64, 96, bias=True)
    torch.nn.init.normal_(lin.weight_t, std=0.1)
    torch.nn.init.normal_(lin.bias, std=0.1)
    x = torch.randn(5, 64)
    ref = lin(x)
    getattr(lin, f"pack_{fmt}")()
    out = lin(x)
    assert lin.weight_t.numel() == 0  # the plain fp32 copy is gone
    assert (out - ref).norm() / ref.norm() < tolerance


def _outlier_case() -> tuple[Linear, torch.Tensor]:
    torch.manual_seed(0)
    lin = Linear(64, 96, bias=True)
    torch.nn.init.normal_(lin.weight_t, std=0.1)
    torch.nn.init.normal_(lin.bias, std=0.1)
    x = torch.randn(6, 64)
    x[:, 7] *= 300.0  # one huge channel, as in the model's down projections
    return lin, x


def _error_on_other_channels(outliers: torch.Tensor | None) -> float:
    """Output error relative to what the 63 ordinary channels contribute (the huge one dwarfs them)."""
    lin, x = _outlier_case()
    others = x.index_fill(1, torch.tensor([7]), 0.0)
    ref, ref_others = lin(x), lin(others) - lin.bias
    lin.pack_int8(outliers)
    return ((lin(x) - ref).norm(dim=1) / ref_others.norm(dim=1)).max().item()


def test_int8_outlier_channels_stay_fp32():
    assert _error_on_other_channels(None) > 0.2  # quantized with it, the ordinary channels drown
    assert _error_on_other_channels(torch.tensor([7])) < 0.03


def test_int8_scales_activations_per_token():
    torch.manual_seed(0)
    lin = Linear(64, 96, bias=False)
    torch.nn.init.normal_(lin.weight_t, std=0.1)
    x = torch.randn(4, 64) * torch.tensor([[1000.0], [1.0], [0.01], [3.0]])  # rows of very different size
    ref = lin(x)
    lin.pack_int8()
    for got, want in ((lin(x), ref), (lin(x[2:3]), ref[2:3])):  # a batch, and the one-row path
        errors = (got - want).norm(dim=1) / want.norm(dim=1)
        assert errors.max() < 0.03, errors


def test_int8_calls_of_many_rows_take_onednn_where_it_has_amx():
    torch.manual_seed(0)
    lin = Linear(64, 96, bias=True)
    torch.nn.init.normal_(lin.weight_t, std=0.1)
    x = torch.randn(linear.ONEDNN_MIN_ROWS + 8, 64)
    ref = lin(x)
    engine = torch.backends.quantized.engine
    lin.pack_int8()
    assert torch.backends.quantized.engine == engine  # packing for oneDNN leaves the process's engine alone
    assert (lin.packed.onednn is not None) == linear._onednn_int8_fits()
    many, few = lin(x), lin(x[:4])  # few: fbgemm
    for got, want in ((many, ref), (few, ref[:4])):
        assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < 0.03


@pytest.mark.skipif(not cpu_library_gemm.available(), reason="no C++ compiler or torch headers here")
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_library_gemm_from_c_sums_what_the_op_returns(rows):
    # the int8 decode stack's GEMM (kernels/cpu_library_gemm.py): the same op, summing into the caller's output
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randint(-127, 128, (96, 64), dtype=torch.int8, generator=gen)
    w = linear.OneDNNInt8.pack(weight, torch.rand(96, generator=gen) / 100)
    gemm = cpu_library_gemm.Int8Gemm(w.packed, w.scales, w.zero_points, 96)
    q = torch.randint(-127, 128, (rows, 64), dtype=torch.int8, generator=gen)
    y = torch.randn(rows, 96, generator=gen)
    product = linear._onednn_int8(q, w)  # [rows, 96]
    exact = (q.double() @ weight.double().t() * w.scales.double()).float()
    torch.testing.assert_close(product, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gemm(q, y.clone()), y + product, rtol=1e-6, atol=1e-6)


def test_fbgemm_calls_go_through_torchscript():
    # From Python each call of these ops paid ~30 us converting the packed weights (engine/linear.py)
    assert isinstance(linear._fbgemm_fp16, torch.jit.ScriptFunction)
    assert isinstance(linear._fbgemm_int8, torch.jit.ScriptFunction)
    uncompilable = lambda x: x  # noqa: E731 - TorchScript needs a function's source; a lambda in a call has none
    assert linear._scripted(uncompilable) is uncompilable  # falls back to the plain function


def test_calibration_finds_an_injected_outlier_channel(tiny_llama_dir):
    from engine.calibration import input_absmax, outlier_channels

    from engine.default_model import resolve_model
    from engine.loader import build_model

    model = build_model(resolve_model(str(tiny_llama_dir)))[0].requires_grad_(False)
    ids = list(range(3, 40))
    down = model.layers[0].mlp.down_proj
    with torch.no_grad():
        # make intermediate channel 5 of layer 0 huge: scale its up-projection column
        model.layers[0].mlp.gate_up_proj.weight_t[:, model.layers[0].mlp.intermediate + 5] *= 500.0
    stats = input_absmax(model, ids)
    assert set(stats) == {m for m in model.modules() if isinstance(m, Linear)}
    assert stats[down].argmax().item() == 5
    assert 5 in outlier_channels(model, ids)[down].tolist()


def test_quantization_choices():
    assert resolve_quantization("auto", "cuda") == "none"
    assert resolve_quantization("int8", "cpu") == "int8"
    with pytest.raises(ValueError):
        resolve_quantization("fp16", "cuda")
    assert resolve_quantization("none", "cpu") == "none"
    with pytest.raises(ValueError):
        resolve_quantization("int4", "cpu")


def test_kv_cache_dtype_choices(tiny_llama_dir):
    cpu = torch.device("cpu")
    for fmt in ("gguf", "fp16"):
        assert resolve_kv_cache_dtype("auto", torch.float32, fmt, cpu) == torch.float16  # as llama.cpp
    assert resolve_kv_cache_dtype("auto", torch.float32, "int8", cpu) == torch.float32  # worse with it
    assert resolve_kv_cache_dtype("auto", torch.float32, "none", cpu) == torch.float32  # exact stays exact
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, "none", torch.device("cuda")) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp32", torch.float32, "gguf", cpu) == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for dtype in ("fp32", "fp16", "bf16"):  # bf16: no C kernel reads it, the torch paths do
        llm = LLM(str(tiny_llama_dir), num_kv_blocks=64, block_size=4, quantization="none", kv_cache_dtype=dtype)
        assert {t.dtype for kv in llm.engine.runner.kv_caches for t in kv} == {DTYPE_NAMES[dtype]}
        outs[dtype] = llm.generate([[5, 9, 14, 3, 22]], params)[0].outputs[0].token_ids
    assert outs["fp16"] == outs["fp32"]  # a tiny model: fp16 rounding of K and V moves no argmax
    assert len(outs["bf16"]) == 12


def _perplexity(llm: LLM, ids: list[int]) -> float:
    """Of the text `ids` as the engine scores it (prompt logprobs): the weights and the KV cache as served."""
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return math.exp(-sum(p.logprob for p in out.prompt_logprobs[1:]) / (len(ids) - 1))


def _gate(fmt: str) -> tuple[float, float, float]:
    """Share of 20 greedy chat answers equal over 16 tokens, and perplexity in fp32 and in `fmt`."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    exact = LLM("smollm2", quantization="none", kv_cache_memory=128 << 20)
    ids = exact.get_tokenizer().encode(TEXT)
    ref = [o.outputs[0].token_ids for o in exact.chat(chats, params)]
    ppl_exact = _perplexity(exact, ids)
    del exact
    fast = LLM("smollm2", quantization=fmt, kv_cache_memory=128 << 20)
    got = [o.outputs[0].token_ids for o in fast.chat(chats, params)]
    ppl_fast = _perplexity(fast, ids)
    del fast
    agree = sum(a == b for a, b in zip(ref, got)) / len(ref)
    return agree, ppl_exact, ppl_fast


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp16", "int8", "gguf"])
def test_quality_gate(fmt):
    agree, ppl_fp32, ppl_fast = _gate(fmt)
    passes = agree >= 0.8 and ppl_fast <= 1.03 * ppl_fp32
    print(f"{fmt} gate: agreement {agree:.0%}, perplexity fp32 {ppl_fp32:.2f} {fmt} {ppl_fast:.2f}")
    assert passes == PASSES_QUALITY_GATE[fmt], "update PASSES_QUALITY_GATE in engine/loader.py"


def test_auto_picks_the_fastest_format_that_passes_the_gate():
    expected = next((q for q in ("int8", "gguf", "fp16") if PASSES_QUALITY_GATE[q]), "none")
    assert resolve_quantization("auto", "cpu") == expected
