"""outlines-core backend: regex, choice and JSON schema (compiled to a regex) only. It builds the whole
token-level automaton up front, so compiling can be slow (seconds for large regexes) but each mask is a
table lookup."""
from __future__ import annotations

import ctypes
import json
import re
from typing import Any

import outlines_core
from outlines_core import json_schema as oc_json_schema

from grammar.backend import CompiledGrammar, GrammarBackend, Matcher
from grammar.outlines_schema import check_outlines_schema, inline_refs
from grammar.spec import KIND_NAMES, GrammarError, GrammarSpec, choice_regex
from grammar.vocab import TokenVocab

# Compact JSON: no whitespace between tokens (outlines' default allows runs of spaces and newlines).
JSON_WHITESPACE = ""
# How many $refs deep a schema is unrolled (outlines' default depth). Deeper data is impossible.
MAX_RECURSION_DEPTH = 3
# States a Guide keeps for its own rollback; a longer rollback replays from the start.
GUIDE_ROLLBACK = 256
# outlines' only complexity guard, ours: a schema's regex grows quadratically with its optional properties
# (1000 of them, 26 KB of schema, took > 300 s and 15 GB without finishing). 64 KiB compiles in ~1 s.
MAX_REGEX_BYTES = 64 * 1024


class OutlinesBackend(GrammarBackend):
    name = "outlines"
    kinds = frozenset({"json_schema", "json_object", "regex", "choice"})

    def __init__(self, tokenizer: Any, vocab: TokenVocab):
        super().__init__(tokenizer, vocab)
        mapping: dict[bytes, list[int]] = {}
        for token_id, piece in enumerate(vocab.token_bytes):
            if piece is not None:
                mapping.setdefault(piece, []).append(token_id)
        # outlines knows one EOS id; the others get its bit copied in _fill and are accepted alike
        self.vocabulary = outlines_core.Vocabulary(vocab.eos_token_ids[0], mapping)

    def compile(self, spec: GrammarSpec) -> "OutlinesGrammar":
        if spec.kind not in self.kinds:
            raise GrammarError(f"the outlines backend does not support {spec.kind} grammars (llguidance does)")
        if spec.kind in ("json_schema", "json_object"):
            schema = json.loads(spec.value)
            check_outlines_schema(schema)
            # unrolled here: outlines' own cut of recursive refs leaves invalid JSON (see grammar/outlines_schema.py)
            unrolled = json.dumps(inline_refs(schema, MAX_RECURSION_DEPTH), ensure_ascii=False)
            try:
                regex = oc_json_schema.build_regex_from_schema(unrolled, JSON_WHITESPACE, MAX_RECURSION_DEPTH)
            except (ValueError, TypeError) as e:
                raise GrammarError(f"invalid or unsupported JSON schema: {_first_line(str(e))}") from None
        elif spec.kind == "choice":
            regex = choice_regex(spec.choices())
        else:
            regex = strip_end_anchors(spec.value)
        if len(regex.encode("utf-8")) > MAX_REGEX_BYTES:
            raise GrammarError(f"{spec.kind} is too complex for the outlines backend: its regex is "
                               f"{len(regex.encode('utf-8'))} bytes, the limit is {MAX_REGEX_BYTES}")
        try:
            index = outlines_core.Index(regex, self.vocabulary)  # releases the GIL while it builds
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid or unsupported {KIND_NAMES[spec.kind]}: {_regex_problem(regex, str(e))}") from None
        return OutlinesGrammar(spec, self.vocab, index)


def strip_end_anchors(regex: str) -> str:
    """Drop a leading `^` / `\\A` and a trailing unescaped `$` / `\\z`: the output is matched in full anyway,
    and outlines-core refuses anchors (llguidance accepts them, so both backends take `^...$`)."""
    if regex.startswith("^"):
        regex = regex[1:]
    elif regex.startswith("\\A"):
        regex = regex[2:]
    if regex.endswith("$") and _trailing_backslashes(regex[:-1]) % 2 == 0:  # an escaped `\$` is a literal dollar
        return regex[:-1]
    if regex.endswith("z") and _trailing_backslashes(regex[:-1]) % 2 == 1:  # `\z`, not a literal backslash and z
        return regex[:-2]
    return regex


def _trailing_backslashes(text: str) -> int:
    return len(text) - len(text.rstrip("\\"))


# outlines-core's regex errors say little ("error building NFA"): name the usual unsupported syntax
_LOOK_AROUND = re.compile(r"\(\?<?[=!]")
_BACKREFERENCE = re.compile(r"(?<!\\)(?:\\\\)*\\[1-9]")


def _regex_problem(regex: str, message: str) -> str:
    if _LOOK_AROUND.search(regex):
        return "look-around, including look-ahead and look-behind, is not supported"
    if _BACKREFERENCE.search(regex):
        return "backreferences are not supported"
    if "anchored" in message:
        return "anchors (^, $, \\A, \\z) are only supported at the very start and end"
    return _first_line(message)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


class OutlinesGrammar(CompiledGrammar):
    backend = "outlines"

    def __init__(self, spec: GrammarSpec, vocab: TokenVocab, index: outlines_core.Index):
        super().__init__(spec, vocab)
        self.index = index
        # Per-state facts found lazily, shared by every request (a dict store is atomic under the GIL,
        # and two threads computing the same entry store the same value).
        self._terminal: dict[int, bool] = {}
        self._forced: dict[int, int | None] = {}

    def matcher(self) -> "OutlinesMatcher":
        return OutlinesMatcher(self)

    def is_terminal(self, state: int) -> bool:
        """A final state that allows nothing but EOS."""
        terminal = self._terminal.get(state)
        if terminal is None:
            eos = self.vocab.eos_token_ids[0]
            terminal = self.index.is_final_state(state) and set(self.index.get_allowed_tokens(state)) <= {eos}
            self._terminal[state] = terminal
        return terminal

    def forced_token(self, state: int) -> int | None:
        """The only token allowed in `state` when exactly one non-EOS token is (None otherwise)."""
        if state not in self._forced:
            allowed = self.index.get_allowed_tokens(state)
            only = allowed[0] if len(allowed) == 1 and allowed[0] not in self.vocab.eos_token_ids else None
            self._forced[state] = only
        return self._forced[state]


class OutlinesMatcher(Matcher):
    def __init__(self, compiled: OutlinesGrammar):
        super().__init__(compiled.vocab)
        self._compiled = compiled
        self._guide = outlines_core.Guide(compiled.index, max_rollback=GUIDE_ROLLBACK)
        self._extra_eos = compiled.vocab.eos_token_ids[1:]
        self._words = compiled.vocab.width

    def _fill(self, row_pointer: int) -> None:
        # writes the whole row, zeroing the bits of ids the vocabulary does not have
        self._guide.write_mask_into(row_pointer, self._words, 4)
        if self._extra_eos and self._guide.is_finished():
            self._set_bits(row_pointer, self._extra_eos)

    @staticmethod
    def _set_bits(row_pointer: int, token_ids: tuple[int, ...]) -> None:
        for t in token_ids:
            word = ctypes.c_uint32.from_address(row_pointer + 4 * (t >> 5))
            word.value |= 1 << (t & 31)

    def _advance(self, token_id: int) -> bool:
        try:
            self._guide.advance(token_id, return_tokens=False)
        except ValueError:  # no transition: the guide's state is unchanged
            return False
        return True

    def _rollback(self, n: int) -> bool:
        if n > self._guide.get_allowed_rollback():
            return False
        self._guide.rollback_state(n)
        return True

    def _reset(self) -> None:
        self._guide.reset()

    def _can_end(self) -> bool:
        return self._guide.is_finished()

    def _is_terminal(self) -> bool:
        return self._compiled.is_terminal(self._guide.get_state())

    def _forced(self) -> list[int]:
        # While exactly one token is allowed it is forced whatever the tokenizer would do: the mask
        # leaves the model no other choice, so jumping ahead cannot change the output.
        forced: list[int] = []
        state = self._guide.get_state()
        while (token := self._compiled.forced_token(state)) is not None and len(forced) < 256:
            forced.append(token)
            state = self._compiled.index.get_next_state(state, token)
            if state is None:
                break
        return forced
