"""TokenVocab: each token id's real bytes, the EOS id(s) and the model's logits width, from a local HF tokenizer."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row: one bit per token id."""
    return (vocab_size + 31) // 32


@dataclass(frozen=True, eq=False)
class TokenVocab:
    """What a grammar backend needs to know about the tokenizer.

    token_bytes[i] is what token i appends to the output, or None for a token no grammar may produce
    (special/control tokens, and the EOS ids, which are handled apart: allowed exactly where the
    grammar may end). vocab_size is the model's logits width, which can exceed the tokenizer
    (padded embeddings): ids in [len(token_bytes), vocab_size) are never allowed.
    """

    token_bytes: tuple[bytes | None, ...]
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    eos_row: torch.Tensor = field(init=False, repr=False)  # [W] int32: a bitmask row allowing only EOS

    def __post_init__(self) -> None:
        if not self.eos_token_ids:
            raise ValueError("a grammar vocabulary needs at least one EOS token id")
        if self.vocab_size < len(self.token_bytes):
            raise ValueError(f"vocab_size {self.vocab_size} is smaller than the tokenizer ({len(self.token_bytes)} tokens)")
        bad = [t for t in self.eos_token_ids if not 0 <= t < len(self.token_bytes)]
        if bad:
            raise ValueError(f"EOS token ids {bad} are outside the tokenizer's {len(self.token_bytes)} tokens")
        object.__setattr__(self, "eos_row", bits_row(self.eos_token_ids, self.vocab_size))

    @property
    def width(self) -> int:
        return bitmask_width(self.vocab_size)

    @classmethod
    def from_hf(cls, tokenizer: Any, vocab_size: int | None = None,
                eos_token_ids: Sequence[int] | None = None) -> "TokenVocab":
        """From a transformers fast tokenizer. vocab_size: the model's logits width (default: len(tokenizer));
        eos_token_ids: every id that ends generation (default: the tokenizer's eos_token_id)."""
        n = len(tokenizer)
        if eos_token_ids is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has no eos_token_id; pass eos_token_ids")
            eos_token_ids = [tokenizer.eos_token_id]
        eos = tuple(dict.fromkeys(int(t) for t in eos_token_ids))
        excluded = set(eos) | set(tokenizer.all_special_ids)
        excluded |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        # added non-special tokens are stored as their literal text, not in the byte-level alphabet
        literal = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if not t.special}
        decode = token_decoder(tokenizer)
        pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
        token_bytes: list[bytes | None] = []
        for i, piece in enumerate(pieces):
            if i in excluded or piece is None:
                token_bytes.append(None)
            elif i in literal:
                token_bytes.append(literal[i].encode("utf-8") or None)
            else:
                token_bytes.append(decode(piece) or None)  # an empty token could repeat forever
        return cls(tuple(token_bytes), eos, vocab_size if vocab_size is not None else n)


def bits_row(token_ids: Sequence[int], vocab_size: int) -> torch.Tensor:
    """A bitmask row [W] int32 with exactly `token_ids` allowed."""
    words = [0] * bitmask_width(vocab_size)
    for t in token_ids:
        words[t >> 5] |= 1 << (t & 31)
    # bit 31 makes a word negative as an int32
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def token_decoder(tokenizer: Any):
    """piece (the tokenizer's own spelling of a token) -> the bytes it stands for."""
    config = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds = {config.get("type")} | {d.get("type") for d in config.get("decoders", [])}
    if "ByteLevel" in kinds:  # GPT-2 style: every byte is spelled as one printable character
        table = {c: b for b, c in _bytes_to_unicode().items()}

        def byte_level(piece: str) -> bytes:
            try:
                return bytes(table[c] for c in piece)
            except KeyError:  # not in the byte alphabet (a literal added token): its UTF-8 is its text
                return piece.encode("utf-8")
        return byte_level

    def sentencepiece(piece: str) -> bytes:  # "▁" is a space, <0xAB> a raw byte (byte fallback)
        match = _BYTE_FALLBACK.match(piece)
        return bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode("utf-8")
    return sentencepiece


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table
