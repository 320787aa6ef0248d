"""Each token's text and its real bytes, for the logprobs of responses.

A token that holds part of a UTF-8 character decodes alone to U+FFFD; OpenAI's `bytes` field exists so a
client can join such tokens back into the character, so it must carry the token's own bytes, not the
UTF-8 of the replacement character.
"""
from __future__ import annotations

from typing import Any, Callable

# The piece -> bytes reading that grammar vocabularies use (GPT-2 byte-level, or SentencePiece with byte
# fallback): one definition of how a tokenizer spells bytes.
from grammar import token_decoder


class TokenText:
    """Cached per token id: what it decodes to alone, and the bytes it stands for."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        self._decoder: Callable[[str], bytes] | None = None
        self._literal: set[int] | None = None  # added tokens: stored as their text, not in the byte alphabet

    def text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def bytes(self, token_id: int) -> list[int]:
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = self._bytes[token_id] = list(self._raw(token_id))
        return raw

    def _raw(self, token_id: int) -> bytes:
        text = self.text(token_id)
        if "\ufffd" not in text:  # whole characters: the text's UTF-8 is the token's bytes
            return text.encode("utf-8")
        if self._literal is None:
            self._literal = set(getattr(self.tokenizer, "added_tokens_decoder", {}))
            try:
                self._decoder = token_decoder(self.tokenizer)
            except (AttributeError, ValueError, TypeError):  # not a fast tokenizer: no piece spelling to read
                self._decoder = None
        piece = self.tokenizer.convert_ids_to_tokens(token_id) if token_id not in self._literal else None
        if self._decoder is None or not isinstance(piece, str):
            return text.encode("utf-8")
        return self._decoder(piece)
