"""GrammarSpec: what one request's output must match, as plain text (hashable, cacheable, loggable)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, get_args

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]
GRAMMAR_KINDS: tuple[str, ...] = get_args(GrammarKind)

# A spec is user input that we compile: its text size is the first line of defence against hostile
# grammars (the backends' own complexity limits and the compile timeout are the others).
MAX_SPEC_BYTES = 64 * 1024
MAX_CHOICES = 1024

# How error messages name each kind.
KIND_NAMES = {"json_schema": "JSON schema", "json_object": "JSON schema", "regex": "regex", "choice": "choice",
              "lark": "Lark grammar"}

# The schema `json_object` compiles to: any JSON object (OpenAI's response_format {"type": "json_object"}).
ANY_JSON_OBJECT = '{"type":"object"}'


class GrammarError(ValueError):
    """A spec that cannot be served: invalid or unsupported, too large or complex, or too slow to compile.

    The message is meant for the API client (a 400), so it names the problem without internals.
    """


@dataclass(frozen=True)
class GrammarSpec:
    """kind + value: a JSON schema as canonical JSON text, a regex, a JSON list of choices, or a Lark grammar.

    The output must match the whole grammar (regexes are anchored at both ends). Build with the
    constructors below rather than by hand: they canonicalise, so equal requests share a cache entry.
    """

    kind: GrammarKind
    value: str

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; expected one of {', '.join(GRAMMAR_KINDS)}")
        if not isinstance(self.value, str):
            raise GrammarError(f"grammar value must be a string, got {type(self.value).__name__}")
        try:  # no backend can compile a lone surrogate (JSON text may spell one: "\\ud800")
            size = len(self.value.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise GrammarError(f"invalid {KIND_NAMES[self.kind]}: it contains a lone surrogate "
                               f"({self.value[e.start]!a}), which is not valid Unicode text") from None
        if size > MAX_SPEC_BYTES:
            raise GrammarError(f"{self.kind} is too large: {size} bytes, the limit is {MAX_SPEC_BYTES}")

    @cached_property
    def key(self) -> str:
        """Cache key: kind + a digest of the text (a 64 KiB schema need not be hashed again per lookup)."""
        digest = hashlib.blake2b(self.value.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return f"{self.kind}:{digest}"

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str) -> "GrammarSpec":
        """A JSON schema given as a dict, a boolean schema or JSON text. Key order is kept: it is the order
        fields are generated in."""
        if isinstance(schema, str):
            schema = _loads(schema, "JSON schema")
        if schema is True:  # a valid JSON Schema: any JSON value (the backends only take objects)
            schema = {}
        if schema is False:
            raise GrammarError("the JSON schema `false` allows no value")
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
        return cls("json_schema", _dumps(schema, "JSON schema"))

    @classmethod
    def json_object(cls) -> "GrammarSpec":
        """Any JSON object."""
        return cls("json_object", ANY_JSON_OBJECT)

    @classmethod
    def regex(cls, pattern: str) -> "GrammarSpec":
        """A regular expression in Rust `regex` syntax (close to Python's for common patterns), matched in full."""
        if not isinstance(pattern, str):
            raise GrammarError(f"regex must be a string, got {type(pattern).__name__}")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: list[str]) -> "GrammarSpec":
        """Exactly one of the given strings."""
        if not isinstance(choices, (list, tuple)) or not choices:
            raise GrammarError("choice needs a non-empty list of strings")
        if len(choices) > MAX_CHOICES:
            raise GrammarError(f"choice has {len(choices)} options, the limit is {MAX_CHOICES}")
        if not all(isinstance(c, str) and c for c in choices):
            raise GrammarError("every choice must be a non-empty string")
        return cls("choice", _dumps(list(choices), "choice list"))

    @classmethod
    def lark(cls, grammar: str) -> "GrammarSpec":
        """A Lark-style context-free grammar (llguidance's dialect; `start` is the top rule)."""
        if not isinstance(grammar, str):
            raise GrammarError(f"lark grammar must be a string, got {type(grammar).__name__}")
        return cls("lark", grammar)

    def choices(self) -> list[str]:
        """The options of a `choice` spec."""
        assert self.kind == "choice", self.kind
        return json.loads(self.value)


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise GrammarError(f"invalid {what}: not valid JSON ({e})") from None


def _dumps(value: Any, what: str) -> str:
    # compact separators and real UTF-8: the canonical text, and what the size limit counts
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as e:
        raise GrammarError(f"invalid {what}: {e}") from None


_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")


def regex_escape(text: str) -> str:
    """Escape `text` as a literal for Rust's regex syntax (both backends parse it). Only meta characters
    are escaped: Rust rejects escapes of ordinary letters, unlike Python's re.escape of spaces."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def choice_regex(choices: list[str]) -> str:
    """One alternation that matches exactly one of `choices`."""
    return "(?:" + "|".join(regex_escape(c) for c in choices) + ")"
