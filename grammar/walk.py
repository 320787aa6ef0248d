"""Drive a matcher without a model: random walks through a grammar, for tests, benchmarks and fuzzing.

A uniformly random allowed token rarely ends anything (a JSON string admits ~20k tokens, `"` is one of
them), so after `patience` tokens the walk turns to finishing: it tries each allowed one-byte token and
takes the one that lets the grammar end; failing that, it avoids tokens that lead to a mask it has met
before (most likely a state it has been in: a loop), then prefers a closing quote or bracket that narrows
what may follow, then the token that leaves the fewest tokens allowed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from grammar.backend import Matcher
from grammar.bitmask import allocate_bitmask, allowed_token_ids


@dataclass
class Walk:
    token_ids: list[int]  # accepted tokens, the final EOS included when one was taken
    text: bytes  # what the non-EOS tokens spell
    finished: bool  # the matcher finished within max_tokens


def random_walk(matcher: Matcher, rng: random.Random, max_tokens: int = 400, patience: int = 32,
                end_bias: float = 0.3) -> Walk:
    """Walk from the matcher's current state until it finishes or max_tokens are taken.

    end_bias: the chance, while still exploring, of taking EOS where allowed (else a random allowed token).
    """
    vocab = matcher.vocab
    bitmask = allocate_bitmask(1, vocab.vocab_size)
    tokens: list[int] = []
    seen: set[int] = set()  # masks (hashed) met while finishing: meeting one again is most likely a loop
    while not matcher.is_finished() and len(tokens) < max_tokens:
        matcher.fill_bitmask(bitmask, 0)
        allowed = allowed_token_ids(bitmask[0], vocab.vocab_size)
        if not allowed:
            raise AssertionError(f"grammar allows no token after {tokens}")
        eos = [t for t in allowed if t in vocab.eos_token_ids]
        if eos and (len(tokens) >= patience or rng.random() < end_bias):
            token = rng.choice(eos)
        elif len(tokens) >= patience:
            token = _finishing_token(matcher, allowed, bitmask, rng, seen)
        else:
            token = rng.choice(allowed)
        if not matcher.accept_token(token):
            raise AssertionError(f"matcher refused token {token} its own mask allowed")
        tokens.append(token)
    text = b"".join(vocab.token_bytes[t] or b"" for t in tokens if t not in vocab.eos_token_ids)
    return Walk(tokens, text, matcher.is_finished())


def _finishing_token(matcher: Matcher, allowed: list[int], bitmask, rng: random.Random, seen: set[int]) -> int:
    vocab = matcher.vocab
    now = _popcount(bitmask)
    seen.add(_fingerprint(bitmask))
    short = [t for t in allowed if vocab.token_bytes[t] is not None and len(vocab.token_bytes[t]) == 1]
    candidates = short or allowed[:64]
    rng.shuffle(candidates)  # ties go to a random candidate
    best, best_key = candidates[0], None
    for token in candidates:
        matcher.accept_token(token)
        if matcher.is_finished():
            key = (0, 0, False, 0)
        else:
            matcher.fill_bitmask(bitmask, 0)
            after = _popcount(bitmask)
            # a closing quote/bracket that narrows what may follow beats opening something new (a recursive
            # grammar's `{` can narrow too); one that does not narrow is still inside free text
            closes = vocab.token_bytes[token] in _CLOSERS and after < now
            # a mask seen before is most likely a state seen before (`a-b-c-` in an email domain): a loop
            looping = _fingerprint(bitmask) in seen
            key = (0 if _eos_allowed(bitmask, vocab.eos_token_ids) else 1, looping, 0 if closes else 1, after)
        matcher.rollback(1)
        if best_key is None or key < best_key:
            best, best_key = token, key
    return best


_CLOSERS = frozenset([b'"', b"}", b"]", b")", b"'"])


def _eos_allowed(bitmask, eos_token_ids: tuple[int, ...]) -> bool:
    return any(int(bitmask[0, t >> 5]) >> (t & 31) & 1 for t in eos_token_ids)


def _fingerprint(bitmask) -> int:
    return hash(bitmask[0].numpy().tobytes())


def _popcount(bitmask) -> int:
    return int(np.unpackbits(bitmask[0].numpy().view(np.uint8)).sum())
