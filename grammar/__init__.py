"""Structured output: GrammarSpec -> GrammarCompiler -> CompiledGrammar -> per-request Matcher -> token bitmask.

    compiler = GrammarCompiler(tokenizer, vocab_size=model_config.vocab_size)   # once per engine
    matcher = compiler.compile(GrammarSpec.json_schema(schema)).matcher()       # once per request
    bitmask = compiler.allocate_bitmask(max_batch)                              # once per engine
    each step:  matcher.fill_bitmask(bitmask, row); apply_bitmask(logits, bitmask, rows)
                sample; matcher.accept_token(token); stop when matcher.is_finished()

Backends: "llguidance" (the default) and "outlines" (outlines-core); see grammar/backend.py for the
matcher's exact semantics.
"""
from grammar.backend import CompiledGrammar, GrammarBackend, Matcher
from grammar.bitmask import allocate_bitmask, allowed_token_ids, apply_bitmask, unpack_bitmask
from grammar.compiler import BACKENDS, DEFAULT_BACKEND, DEFAULT_COMPILE_TIMEOUT_S, GrammarCompiler, make_backend
from grammar.spec import MAX_SPEC_BYTES, GrammarError, GrammarKind, GrammarSpec
from grammar.vocab import TokenVocab, token_decoder

__all__ = [
    "BACKENDS", "DEFAULT_BACKEND", "DEFAULT_COMPILE_TIMEOUT_S", "MAX_SPEC_BYTES",
    "CompiledGrammar", "GrammarBackend", "GrammarCompiler", "GrammarError", "GrammarKind", "GrammarSpec",
    "Matcher", "TokenVocab", "allocate_bitmask", "allowed_token_ids", "apply_bitmask", "make_backend",
    "token_decoder", "unpack_bitmask",
]
