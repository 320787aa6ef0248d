"""Load a model: Hugging Face folder, GGUF file, or the default alias, into Sluice's fused layout."""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from engine.config import DTYPE_NAMES, QUANTIZATIONS, ModelConfig, check_device_name
from engine.default_model import ModelSource, resolve_model
from engine.model import LlamaForCausalLM
from engine.platform import available_memory
from kernels import attention_backend

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_GATE_UP = {"gate_proj": 0, "up_proj": 1}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    hf_config: dict
    source: ModelSource
    load_seconds: float
    quantization: str = "none"


def resolve_dtype(dtype: str, device: str, hf_config: dict) -> torch.dtype:
    if dtype != "auto":
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[dtype]
    if torch.device(device).type == "cpu":
        return torch.float32  # bf16 matmuls are hundreds of times slower than fp32 on CPUs without AMX
    declared = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    return DTYPE_NAMES.get(declared, torch.float32)  # a checkpoint that declares fp8 etc. loads in fp32


def check_device(device: str, kv_cache_memory: int | None = None) -> None:
    """A clear error for a device this machine lacks, or a KV budget it has no room for, before loading."""
    check_device_name(device)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available here (torch {torch.__version__} "
                         f"{'has no CUDA support' if torch.version.cuda is None else 'sees none'}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if kv_cache_memory:  # the pool is zeroed as it is allocated: too big is an OOM kill later, not an error
        if kv_cache_memory > (free := available_memory(device)):
            raise ValueError(f"a KV cache of {kv_cache_memory / (1 << 30):.1f}G (--kv-cache-memory) is more than "
                             f"the {free / (1 << 30):.1f}G of free memory on {device}")


# Which CPU weight formats pass the quality gate of tests/test_quantization.py (>= 80% of 20
# greedy chat answers equal over 16 tokens, perplexity +3% at most); that test keeps these true.
# int8 fails on agreement: even int8 weights alone (fp32 activations) keep only 8 of 20 answers equal
# over 16 tokens here. With calibrated outliers and per-token activation scales its perplexity on the
# gate's text is 37.1 against fp32's 36.0 (+3%; 98.2 with fbgemm's plain per-tensor scales); where the CPU
# has AMX, batched calls take symmetric 8-bit per-token codes into oneDNN (engine/linear.py), and the gate
# reads 4 of 20 answers equal and perplexity 36.73 (+2.0%). The last figures move with fp32 rounding order alone:
# the row scales and outlier product as torch's mul_ and addmm_ gave 7 of 20 and 36.57, the same sums in one C
# loop (cpu_ops.int8_finish, as accurate against fp64) 4 and 36.73; 1e-6 relative noise on the embeddings moves
# the final hidden states of this int8 path by 2-4%.
# Simulated (fake-quant) on the gate: int8 weights with fp32 outlier columns keep 13-15 of 20, but
# quantizing activations (7-bit as fbgemm on AVX2, or 8-bit) drops that to 4-6 of 20, and neither
# GPTQ weights (2.8x lower layer output error) nor SmoothQuant scaling (alpha 0.5 / 0.8) lifts it past
# 7: the fp32 answers have top-2 logit margins as small as 0.007 (5 of 20 prompts under 0.06).
PASSES_QUALITY_GATE = {"fp16": True, "int8": False, "gguf": True}
# gguf is fp16 with one- to four-row calls read from a GGUF checkpoint's own blocks (models stored that way)
_FASTEST_FIRST = ("int8", "gguf", "fp16")


def resolve_quantization(quantization: str, device: str, dtype: torch.dtype = torch.float32) -> str:
    """`auto`: on CPU the fastest weight format that passes the quality gate; elsewhere the model dtype."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
    on_cpu = torch.device(device).type == "cpu"
    if quantization in _FASTEST_FIRST and not on_cpu:
        raise ValueError(f"{quantization} weights run through fbgemm on CPU only; use --quantization none on GPU")
    if quantization in _FASTEST_FIRST and dtype != torch.float32:  # they pack fp32 weights, with fp32 activations
        raise ValueError(f"{quantization} weights need an fp32 model; use --dtype auto or --quantization none")
    if quantization != "auto":
        return quantization
    if not on_cpu or dtype != torch.float32 or "fbgemm" not in torch.backends.quantized.supported_engines:
        return "none"
    return next((q for q in _FASTEST_FIRST if PASSES_QUALITY_GATE[q]), "none")


def load_model(name_or_path: str, device: str = "cpu", dtype: str = "auto",
               quantization: str = "none") -> LoadedModel:
    start = time.perf_counter()
    check_device(device)
    source = resolve_model(name_or_path)
    model, hf_config = build_model(source, device, dtype)
    asked, quantization = quantization, resolve_quantization(quantization, device, next(model.parameters()).dtype)
    outliers = _calibrate(model, source) if quantization == "int8" else None
    blocks = _gguf_blocks(model, source) if quantization == "gguf" else None
    if quantization == "gguf" and not blocks:
        if asked != "auto":
            raise ValueError("gguf computes from a GGUF's Q4_1 / Q8_0 blocks, and this model has none: use fp16")
        quantization = "fp16"
    model.pack_linears(quantization, progress=quantization != "none", outliers=outliers, blocks=blocks)
    model.eval().requires_grad_(False)
    return LoadedModel(model, model.config, hf_config, source, time.perf_counter() - start, quantization)


def build_model(source: ModelSource, device: str = "cpu", dtype: str = "auto") -> tuple[LlamaForCausalLM, dict]:
    """The model with its weights loaded, before any packing (linears still hold plain weights)."""
    hf_config, tensors = _read_source(source)
    torch_dtype = resolve_dtype(dtype, device, hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(ModelConfig.from_hf(hf_config))
    model = model.to_empty(device=device)
    load_weights(model, tensors)
    model.tie_weights()
    model.set_attention_backend(attention_backend(device))
    model = model.to(torch_dtype)
    model.rope.build(device)  # fp32 tables, cast per use
    return model, hf_config


def _calibrate(model: LlamaForCausalLM, source: ModelSource) -> dict:
    """int8's outlier channels, from one forward over the calibration chat."""
    from engine.calibration import CALIBRATION_CHAT, outlier_channels
    from engine.tokenizer import encode_prompt, load_tokenizer, render_chat

    tokenizer = load_tokenizer(source)
    if getattr(tokenizer, "chat_template", None):
        text = render_chat(tokenizer, CALIBRATION_CHAT, add_generation_prompt=False)
    else:
        text = "\n".join(turn["content"] for turn in CALIBRATION_CHAT)
    return outlier_channels(model, encode_prompt(tokenizer, text))


def _gguf_blocks(model: LlamaForCausalLM, source: ModelSource) -> dict:
    """Per linear layer, (kind, its weights as the source GGUF's blocks), fused rows stacked as the fusion
    stacks them; empty when the model did not come from a GGUF or holds no Q4_1 / Q8_0 weights."""
    from engine.gguf_loader import read_gguf_blocks

    gguf = _source_gguf(source)
    found = read_gguf_blocks(gguf) if gguf is not None else {}
    head = found.get("lm_head.weight") or (found.get("model.embed_tokens.weight")
                                           if model.config.tie_word_embeddings else None)
    blocks = {model.lm_head: head} if head is not None else {}
    for i, layer in enumerate(model.layers):
        fused = {layer.self_attn.qkv_proj: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 layer.self_attn.o_proj: ("self_attn.o_proj",),
                 layer.mlp.gate_up_proj: ("mlp.gate_proj", "mlp.up_proj"), layer.mlp.down_proj: ("mlp.down_proj",)}
        for module, names in fused.items():
            parts = [found.get(f"model.layers.{i}.{name}.weight") for name in names]
            if all(p is not None for p in parts) and len({kind for kind, _ in parts}) == 1:
                blocks[module] = (parts[0][0], torch.cat([rows for _, rows in parts]))
    return blocks


def _source_gguf(source: ModelSource) -> Path | None:
    """The GGUF a model came from: itself, or the verified file a converted folder was made from."""
    from engine.default_model import sluice_home
    from engine.gguf_loader import CONVERTED_MARKER, converted_sha256, file_sha256

    if source.kind == "gguf":
        return source.path
    sha = converted_sha256(source.path)
    if sha is None:
        return None
    name = json.loads((source.path / CONVERTED_MARKER).read_text()).get("source", "")
    gguf = sluice_home() / "gguf" / Path(name).name
    return gguf if name and gguf.is_file() and file_sha256(gguf) == sha else None


def _read_source(source: ModelSource) -> tuple[dict, Iterable[tuple[str, torch.Tensor]]]:
    if source.kind == "gguf":
        from engine.gguf_loader import read_gguf

        hf_config, state_dict = read_gguf(source.path)
        return hf_config, state_dict.items()
    try:
        hf_config = json.loads((source.path / "config.json").read_text())
    except ValueError as exc:
        raise ValueError(f"{source.path / 'config.json'} is not valid JSON: {exc}") from None
    return hf_config, _iter_safetensors(source.path)


def _iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: LlamaForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into the fused parameters; every parameter must be filled exactly once."""
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()
    for hf_name, tensor in tensors:
        target = _map_name(hf_name)
        if target is None:
            continue
        name, shard = target
        param = params[name]
        if name.endswith(".weight_t"):
            tensor = tensor.t()  # checkpoints store [out, in]
        with torch.no_grad():
            _param_slice(model, name, param, shard).copy_(tensor.to(param.dtype))
        filled.add(name if shard is None else f"{name}#{shard}")
    if model.config.tie_word_embeddings:
        filled.add("lm_head.weight_t")
    missing = [n for n in _expected(model, params) if n not in filled]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")


def _map_name(hf_name: str) -> tuple[str, int | None] | None:
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    if hf_name == "model.embed_tokens.weight":
        return "embed_tokens.weight", None
    if hf_name == "model.norm.weight":
        return "norm.weight", None
    if hf_name == "lm_head.weight":
        return "lm_head.weight_t", None
    m = _LAYER.match(hf_name)
    if not m:
        raise ValueError(f"unexpected tensor {hf_name!r} in checkpoint")
    layer, rest = m.group(1), m.group(2)
    module, _, leaf = rest.rpartition(".")  # e.g. self_attn.q_proj, weight
    parent, _, proj = module.rpartition(".")
    if leaf == "weight" and proj.endswith("_proj"):
        leaf = "weight_t"
    if proj in _QKV:
        return f"layers.{layer}.self_attn.qkv_proj.{leaf}", _QKV[proj]
    if proj in _GATE_UP:
        return f"layers.{layer}.mlp.gate_up_proj.{leaf}", _GATE_UP[proj]
    return f"layers.{layer}.{module}.{leaf}", None


def _param_slice(model: LlamaForCausalLM, name: str, param: torch.Tensor, shard: int | None) -> torch.Tensor:
    if shard is None:
        return param
    cfg = model.config
    out_dim = param.dim() - 1  # weights are [in, out], biases [out]: shards split the last dim
    if ".qkv_proj." in name:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        bounds = [(0, q), (q, q + kv), (q + kv, q + 2 * kv)][shard]
    else:
        n = cfg.intermediate_size
        bounds = (shard * n, (shard + 1) * n)
    return param.narrow(out_dim, bounds[0], bounds[1] - bounds[0])


def _expected(model: LlamaForCausalLM, params: dict[str, torch.Tensor]) -> list[str]:
    names = []
    for name in params:
        if ".qkv_proj." in name:
            names += [f"{name}#{i}" for i in range(3)]
        elif ".gate_up_proj." in name:
            names += [f"{name}#{i}" for i in range(2)]
        else:
            names.append(name)
    return names
