"""llguidance backend: JSON schema, regex, choice and Lark grammars; an Earley parser over a lazy lexer,
so compiling is cheap and every mask is computed on demand (tens of microseconds)."""
from __future__ import annotations

from typing import Any

import llguidance
import llguidance.hf

from grammar.backend import CompiledGrammar, GrammarBackend, Matcher
from grammar.spec import KIND_NAMES, GrammarError, GrammarSpec, choice_regex
from grammar.vocab import TokenVocab

# Compact JSON ("," and ":" with no whitespace): outputs stay short and the model is not free to pad
# them with spaces or newlines. Defaults, so a schema's own "x-guidance" options may still override.
JSON_OPTIONS = {"whitespace_flexible": False}


def default_limits() -> llguidance.LLParserLimits:
    """llguidance's complexity limits (its defaults: grammar size 500k symbols, 250k lexer states, per-mask
    fuel), without the verbose errors that would echo the whole grammar into an API error message."""
    return llguidance.LLParserLimits(verbose_errors=False)


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"
    kinds = frozenset({"json_schema", "json_object", "regex", "choice", "lark"})

    def __init__(self, tokenizer: Any, vocab: TokenVocab, limits: llguidance.LLParserLimits | None = None):
        super().__init__(tokenizer, vocab)
        # ~0.3 s for a 50k vocabulary: once per compiler. n_vocab = the logits width, so masks cover
        # the padded ids too (llguidance never allows ids the tokenizer does not have).
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab.vocab_size,
                                                         eos_token=list(vocab.eos_token_ids))
        self.limits = limits or default_limits()

    def compile(self, spec: GrammarSpec) -> "LLGuidanceGrammar":
        try:
            if spec.kind in ("json_schema", "json_object"):
                grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_OPTIONS)
            elif spec.kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(spec.value)
            elif spec.kind == "choice":
                grammar = llguidance.LLMatcher.grammar_from_regex(choice_regex(spec.choices()))
            else:
                grammar = llguidance.LLMatcher.grammar_from_lark(spec.value)
        except ValueError as e:  # grammar_from_json_schema checks JSON well-formedness and nesting depth
            raise GrammarError(f"invalid {KIND_NAMES[spec.kind]}: {e}") from None
        # Building the matcher validates the grammar and builds the parser (the GIL is released meanwhile).
        template = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=self.limits)
        if template.is_error():
            raise GrammarError(f"invalid or unsupported {KIND_NAMES[spec.kind]}: {_summary(template.get_error())}")
        return LLGuidanceGrammar(spec, self.vocab, template)


def _summary(message: str, limit: int = 400) -> str:
    """The gist of an llguidance error: its first line, plus the `error: ...` line where a regex parse error
    puts the actual reason ("look-around ... is not supported") a few lines below. Capped: the first line
    may quote the whole regex."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    reason = next((line[len("error:"):].strip() for line in lines[1:] if line.startswith("error:")), None)
    head = lines[0] if len(lines[0]) <= limit else lines[0][:limit] + "..."
    return f"{head} {reason}" if reason else head


class LLGuidanceGrammar(CompiledGrammar):
    backend = "llguidance"

    def __init__(self, spec: GrammarSpec, vocab: TokenVocab, template: llguidance.LLMatcher):
        super().__init__(spec, vocab)
        self._template = template  # never advanced: each request gets a copy

    def matcher(self) -> "LLGuidanceMatcher":
        # deep_copy shares the compiled grammar and lexer with the template: about a microsecond
        return LLGuidanceMatcher(self.vocab, self._template.deep_copy())


class LLGuidanceMatcher(Matcher):
    def __init__(self, vocab: TokenVocab, matcher: llguidance.LLMatcher):
        super().__init__(vocab)
        self._m = matcher
        self._mask_bytes = vocab.width * 4

    @property
    def error(self) -> str | None:
        return _summary(self._m.get_error()) if self._m.is_error() else None

    def _fill(self, row_pointer: int) -> None:
        self._m.unsafe_compute_mask_ptr(row_pointer, self._mask_bytes)

    def _advance(self, token_id: int) -> bool:
        # try_consume_tokens, not consume_token: a refused token must not put the matcher in its error state
        return self._m.try_consume_tokens([token_id]) == 1

    def _rollback(self, n: int) -> bool:
        return self._m.rollback(n) and not self._m.is_error()

    def _reset(self) -> None:
        self._m.reset()

    def _can_end(self) -> bool:
        return self._m.is_accepting()

    def _is_terminal(self) -> bool:
        return self._m.is_stopped() and not self._m.is_error()

    def _forced(self) -> list[int]:
        # llguidance's fast-forward tokens are canonical: it holds back a forced tail that the tokenizer
        # would merge with whatever comes next (e.g. `":` before a number), so feeding them never puts
        # the model on a tokenization it was not trained on.
        return [t for t in self._m.compute_ff_tokens() if t not in self._eos]
