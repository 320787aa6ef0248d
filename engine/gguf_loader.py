"""Read llama.cpp GGUF checkpoints into Hugging Face names, shapes and config; convert them to HF folders."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm

from engine.rope import llama3_scaling_from_divisors

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Written last into a converted folder: its presence means every other file is complete.
CONVERTED_MARKER = "sluice_converted.json"

# llama.cpp runs "llama" with a GPT-J style RoPE and so interleaves the q/k rows of each head;
# qwen2 uses its NEOX RoPE, which already is HF's rotate-half, and is stored unpermuted.
_PERMUTED_ARCHS = frozenset({"llama"})
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Not a weight: llama.cpp's baked Llama-3 RoPE divisors, turned back into config["rope_scaling"].
_ROPE_FREQS = "rope_freqs.weight"
_STALE_PARTIAL_SECONDS = 24 * 3600
_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_gguf(path: str | Path, progress: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (HF config dict, fp32 state dict in HF names and [out, in] shapes) for a llama/qwen2 GGUF."""
    reader = _open(path)
    arch = _architecture(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = _hf_config(reader, arch, tensors)
    permute = arch in _PERMUTED_ARCHS
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress):
        if tensor.name == _ROPE_FREQS:
            continue
        weight = _dequantize(tensor)
        kind = tensor.name.split(".")[-2]
        if permute and kind in heads:
            weight = _unpermute_rows(weight, heads[kind])
        state[_hf_name(tensor.name)] = weight
    return config, state


def read_gguf_blocks(path: str | Path) -> dict[str, tuple[str, torch.Tensor]]:
    """The Q4_1 and Q8_0 weights of a GGUF as stored, in HF names and row order: (kind, uint8 [out,
    in / 32 * block bytes]), rows of ggml blocks (see kernels/cpu_quant.py). Rows are whole blocks, so
    llama's q/k row un-permute applies to them as to the dequantized weights."""
    reader = _open(path)
    arch = _architecture(reader)
    config = _hf_config(reader, arch, {t.name: t for t in reader.tensors})
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    kinds = {GGMLQuantizationType.Q4_1: "q4_1", GGMLQuantizationType.Q8_0: "q8_0"}
    blocks: dict[str, tuple[str, torch.Tensor]] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type not in kinds:
            continue
        rows = torch.from_numpy(np.array(tensor.data, dtype=np.uint8, copy=True))  # [out, in / 32 * block bytes]
        kind = tensor.name.split(".")[-2]
        if arch in _PERMUTED_ARCHS and kind in heads:
            rows = _unpermute_rows(rows, heads[kind])
        blocks[_hf_name(tensor.name)] = (kinds[tensor.tensor_type], rows.contiguous())
    return blocks


def load_gguf_tokenizer(path: str | Path) -> Any:
    """A transformers fast tokenizer rebuilt from the GGUF's vocabulary, merges and chat template."""
    from transformers import AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tokenizer.chat_template is None:
        template = _field(_open(path), "tokenizer.chat_template")
        if template:
            tokenizer.chat_template = template
    return tokenizer


def convert_gguf(path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Write a HF folder (config, safetensors, tokenizer, generation config) for a GGUF, atomically."""
    from safetensors.torch import save_file

    path, out_dir = Path(path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        config, state = read_gguf(path, progress=progress)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del state
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {k: v for k, v in config.items() if k in _GENERATION_KEYS})
        if progress:  # the tokenizer rebuild is silent and takes seconds; say what the pause is
            print("Building tokenizer from GGUF metadata ...", file=sys.stderr, flush=True)
        load_gguf_tokenizer(path).save_pretrained(str(tmp))
        _write_json(tmp / CONVERTED_MARKER, {"source": path.name, "sha256": file_sha256(path)})
        _make_shareable(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def converted_sha256(folder: str | Path) -> str | None:
    """The source GGUF's sha256 recorded in a finished conversion, or None if the folder is not one."""
    try:
        return json.loads((Path(folder) / CONVERTED_MARKER).read_text()).get("sha256")
    except (OSError, ValueError):
        return None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- metadata -------------------------------------------------------------------------------------


def _open(path: str | Path) -> GGUFReader:
    try:
        return GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError) as exc:  # numpy's words for bytes that are no GGUF
        raise ValueError(f"{path} is not a readable GGUF file (corrupt or truncated?): {exc}") from None

def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _float_field(reader: GGUFReader, key: str, default: float) -> float:
    # GGUF stores float32; its shortest decimal form gives back e.g. 1e-05 instead of 9.9999997e-06.
    value = _field(reader, key)
    return default if value is None else float(str(np.float32(value)))


def _architecture(reader: GGUFReader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
    return arch


def _hf_config(reader: GGUFReader, arch: str, tensors: dict[str, ReaderTensor]) -> dict[str, Any]:
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    heads = int(_field(reader, key("attention.head_count")))
    # The q projection's row count is authoritative; hidden // heads is wrong for models with a custom head_dim.
    head_dim = _hf_shape(tensors["blk.0.attn_q.weight"])[0] // heads
    rope_theta = _float_field(reader, key("rope.freq_base"), 10000.0)
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": _hf_shape(tensors["token_embd.weight"])[0],
        "hidden_size": int(_field(reader, key("embedding_length"))),
        "intermediate_size": int(_field(reader, key("feed_forward_length"))),
        "num_hidden_layers": int(_field(reader, key("block_count"))),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, key("attention.head_count_kv"), heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float_field(reader, key("attention.layer_norm_rms_epsilon"), 1e-6),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(_field(reader, key("context_length"), 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "torch_dtype": "float32",
    }
    rope_freqs = _dequantize(tensors[_ROPE_FREQS]) if _ROPE_FREQS in tensors else None
    scaling = _rope_scaling(reader, arch, rope_freqs, head_dim, rope_theta)
    if scaling is not None:
        config["rope_scaling"] = scaling
    config.update(_special_tokens(reader))
    return config


def _special_tokens(reader: GGUFReader) -> dict[str, Any]:
    ids = lambda *names: [_field(reader, f"tokenizer.ggml.{n}_token_id") for n in names]  # noqa: E731
    # Chat models end a turn with eot/eom rather than eos; generation must stop on any of them.
    eos = list(dict.fromkeys(int(i) for i in ids("eos", "eot", "eom") if i is not None))
    bos, pad = ids("bos", "padding")
    out: dict[str, Any] = {k: int(v) for k, v in (("bos_token_id", bos), ("pad_token_id", pad)) if v is not None}
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return out


def _rope_scaling(reader: GGUFReader, arch: str, rope_freqs: torch.Tensor | None, head_dim: int,
                  theta: float) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None if rope_freqs is None else llama3_scaling_from_divisors(rope_freqs, head_dim, theta)
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _float_field(reader, f"{arch}.rope.scaling.factor", 1.0)}
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


# --- tensors --------------------------------------------------------------------------------------


def _hf_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-varying first (ggml "ne"); torch wants them the other way round.
    return tuple(int(n) for n in reversed(tensor.shape))


def _dequantize(tensor: ReaderTensor) -> torch.Tensor:
    values = dequantize(tensor.data, tensor.tensor_type).reshape(_hf_shape(tensor))
    # F32 comes back as a read-only view of the memory-mapped file; torch needs memory it may own.
    return torch.from_numpy(np.require(values, dtype=np.float32, requirements=["C", "W"]))


def _unpermute_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleave of the two rotary halves, back to rotate-half order."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r} (not a llama/qwen2 weight)")


# --- files ----------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _make_shareable(folder: Path) -> None:
    # mkdtemp (and safetensors) create private files; the result is an ordinary model folder.
    os.chmod(folder, 0o755)
    for file in folder.iterdir():
        os.chmod(file, 0o644)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    try:
        os.replace(tmp, out_dir)  # atomic when out_dir is absent (or an empty folder)
        return
    except OSError:
        if not out_dir.exists():
            raise
    # An older or concurrent result is in the way: swap it aside so out_dir is never half-written.
    old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_partials(out_dir: Path) -> None:
    # A killed conversion leaves its temp folder behind; clear old ones, never a live one's.
    cutoff = time.time() - _STALE_PARTIAL_SECONDS
    for leftover in out_dir.parent.glob(f".{out_dir.name}.*.partial"):
        if leftover.stat().st_mtime < cutoff:
            shutil.rmtree(leftover, ignore_errors=True)
