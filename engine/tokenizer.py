"""Tokenizer and chat template, from local files only (a HF folder or a GGUF file), never a hub."""
from __future__ import annotations

import json
from typing import Any

from engine.default_model import ModelSource

Message = dict[str, Any]


def load_tokenizer(source: ModelSource):
    if source.kind == "gguf":
        from engine.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(source.path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)


def eos_token_ids(tokenizer, source: ModelSource, hf_config: dict) -> set[int]:
    """Every id that ends a generation: the tokenizer's EOS, config.json's and generation_config.json's."""
    ids: set[int] = set()
    candidates: list[Any] = [tokenizer.eos_token_id, hf_config.get("eos_token_id")]
    gen_config = source.path / "generation_config.json" if source.kind == "hf" else None
    if gen_config is not None and gen_config.exists():
        candidates.append(json.loads(gen_config.read_text()).get("eos_token_id"))
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, list):
            ids.update(int(x) for x in c)
    return ids


def render_chat(tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model's tokenizer has no chat template; use a plain completion prompt")
    if not isinstance(template, str) or "developer" not in template:
        messages = [_developer_as_system(m) for m in messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _developer_as_system(message: Message) -> Message:
    """OpenAI's `developer` role is its newer name for the system prompt. A template that never mentions it
    would render it as an unknown role the model was not trained on (or reject it), so it becomes `system`,
    as llama.cpp's server does."""
    return {**message, "role": "system"} if message.get("role") == "developer" else message


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    # Chat templates already spell out BOS where the model wants one; plain prompts get the tokenizer's default.
    return list(tokenizer.encode(prompt, add_special_tokens=not _starts_with_bos(tokenizer, prompt)))


def _starts_with_bos(tokenizer, prompt: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and prompt.startswith(bos)
