"""grammar/ with the real default model's tokenizer (SmolLM2-135M-Instruct, 49152 tokens; tokenizer only)."""
from __future__ import annotations

import json

import pytest

from grammar import GrammarCompiler, GrammarSpec, allowed_token_ids
from tests.test_grammar import LARK, LARK_CHECKS, SUITE, check_suite_walks, mask_of, walk_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    from engine.default_model import ModelSource, ensure_default_model
    from engine.tokenizer import load_tokenizer

    folder = ensure_default_model(progress=False)
    tokenizer = load_tokenizer(ModelSource("hf", folder))
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    return tokenizer, vocab_size


@pytest.fixture(scope="module")
def llguidance_compiler(real):
    tokenizer, vocab_size = real
    return GrammarCompiler(tokenizer, backend="llguidance", vocab_size=vocab_size, timeout_s=60)


def test_suite_walks_validate_with_llguidance(llguidance_compiler):
    check_suite_walks(llguidance_compiler, list(SUITE), range(3))


def test_suite_compiles_and_walks_with_outlines(real):
    tokenizer, vocab_size = real
    compiler = GrammarCompiler(tokenizer, backend="outlines", vocab_size=vocab_size, timeout_s=60)
    check_suite_walks(compiler, list(SUITE), range(1))  # every schema compiles: 100% coverage


def test_real_vocab_matches_llguidance_and_excludes_special_tokens(real, llguidance_compiler):
    tokenizer, vocab_size = real
    vocab = llguidance_compiler.vocab
    assert vocab.vocab_size == vocab_size and vocab.eos_token_ids == (tokenizer.eos_token_id,)
    ll_tokenizer = llguidance_compiler.backend.ll_tokenizer
    for i, piece in enumerate(vocab.token_bytes):
        if piece is not None and piece != b"\xff":
            assert ll_tokenizer.decode_bytes([i]) == piece, i
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    assert len(special) >= 17 and all(vocab.token_bytes[i] is None for i in special)
    matcher = llguidance_compiler.compile(GrammarSpec.regex(r"(?s:.*)")).matcher()
    allowed = set(allowed_token_ids(mask_of(matcher), vocab_size))
    assert allowed & special == {tokenizer.eos_token_id}


@pytest.mark.parametrize("name", list(LARK))
def test_lark_walks_parse_with_the_real_tokenizer(llguidance_compiler, name):
    compiled = llguidance_compiler.compile(GrammarSpec.lark(LARK[name]))
    for seed in range(3):
        text = walk_text(compiled.matcher(), seed)
        assert LARK_CHECKS[name](text), (name, text)
