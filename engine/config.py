"""Configuration dataclasses: what the model is, and how the engine runs it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a Llama-family decoder (Llama, Qwen2, SmolLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict."""
        try:
            return cls._from_hf(cfg)
        except KeyError as exc:  # a config.json of something else than a decoder LLM
            raise ValueError(f"config.json has no {exc.args[0]!r}: not a Llama-family model's config") from None

    @classmethod
    def _from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        is_qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=_rope_theta(cfg),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=bool(cfg.get("attention_bias", is_qwen2) if cfg.get("attention_bias") is not None else is_qwen2),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=arch,
        )


SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"})


# transformers 5 moved rope_theta and the scaling into `rope_parameters`; accept both spellings.
def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    return None if kind == "default" else dict(params)


@dataclass
class EngineConfig:
    """How the engine runs a model: device, dtype, KV cache and batching limits."""

    model: str = "smollm2"
    device: str = "cpu"
    dtype: str = "auto"  # fp32 on CPU, the checkpoint's dtype on CUDA
    quantization: str = "auto"  # "none" (exact), "fp16", "int8", "gguf"; auto: fastest gated CPU format
    kv_cache_dtype: str = "auto"  # a DTYPES name; auto: fp16 on CPU for fp16 / gguf weights, else the model's
    block_size: int = 16
    num_kv_blocks: int | None = None  # overrides kv_cache_memory when given
    kv_cache_memory: int | None = None  # bytes; None = a fraction of free memory
    kv_cache_memory_fraction: float = 0.25
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # None = the model's own limit
    enable_prefix_caching: bool = True
    # draft proposer: "none", "ngram" (prompt lookup), "eagle" (draft head), "draft" (a smaller model)
    speculative: str = "none"
    # eagle: the head's safetensors (None = the one shipped for smollm2); draft: the draft model (name or path)
    speculative_model: str | None = None
    speculative_quantization: str | None = None  # the draft model's CPU weight format; None = the target's
    num_speculative_tokens: int = 4  # drafts per request per step
    # stop drafting once the drafter's chance that all drafts so far are accepted falls below this
    speculative_min_draft_prob: float = 0.5
    # no drafting when more requests than this sample in a step; None: 1 on CPU, 4 on a GPU
    speculative_max_batch: int | None = None
    grammar_backend: str = "llguidance"  # structured output: "llguidance" or "outlines" (outlines-core)
    grammar_timeout_s: float = 5.0  # a grammar that compiles longer than this is refused

    def __post_init__(self) -> None:
        # Checked here, before any model loads, so a bad value is a clear error in seconds, not a
        # ZeroDivisionError (block_size 0) or a silently ignored value (0 reads as "unset" below) later.
        _choice("dtype", self.dtype, DTYPES)
        _choice("kv_cache_dtype", self.kv_cache_dtype, DTYPES)
        _choice("quantization", self.quantization, QUANTIZATIONS)
        _choice("speculative", self.speculative, SPECULATIVE_METHODS)
        _choice("grammar_backend", self.grammar_backend, GRAMMAR_BACKENDS)
        if self.speculative_quantization is not None:
            _choice("speculative_quantization", self.speculative_quantization, QUANTIZATIONS)
        check_device_name(self.device)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_speculative_tokens"):
            _at_least(name, getattr(self, name), 1)
        for name in ("num_kv_blocks", "kv_cache_memory", "max_model_len", "speculative_max_batch"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if not 0 <= self.speculative_min_draft_prob <= 1:
            raise ValueError(f"speculative_min_draft_prob must be in [0, 1], got {self.speculative_min_draft_prob}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.speculative == "draft" and not self.speculative_model:
            raise ValueError("speculative 'draft' needs a draft model: speculative_model (--speculative-model)")
        if self.speculative_model and self.speculative not in ("eagle", "draft"):  # else it is silently unused
            raise ValueError(f"a speculative_model (--speculative-model) is for speculative 'eagle' or 'draft', "
                             f"not {self.speculative!r}")


DTYPES = ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "float32": torch.float32,
               "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("auto", "none", "fp16", "int8", "gguf")
SPECULATIVE_METHODS = ("none", "ngram", "eagle", "draft")
GRAMMAR_BACKENDS = ("llguidance", "outlines")
DEVICE_TYPES = ("cpu", "cuda")


def check_device_name(device: str) -> None:
    """`cpu`, `cuda` or `cuda:N`: the devices the model runner and kernels support."""
    kind, _, index = str(device).partition(":")
    if kind not in DEVICE_TYPES or (index and not (kind == "cuda" and index.isdigit())):
        raise ValueError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")


def _at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
