"""What outlines-core cannot compile faithfully, refused up front with a clear GrammarError.

outlines-core turns a JSON schema into one regex and silently skips what it does not implement, so
without these checks a request "succeeds" with output that breaks the schema or is not even JSON:
`allOf` is a concatenation (`{"a":1}{"b":2}`), a string `pattern` is pasted raw between quotes (`.*`
emits bare `"` and control characters), `pattern`/`format` are dropped next to `minLength`/`maxLength`,
and keywords such as `uniqueItems` or `not` are ignored. Numeric bounds and formats' digits are
outlines' known looseness (see grammar/compiler.py) and are not refused here.

Recursive `$ref`s are unrolled here instead: outlines cuts them at a depth by skipping the property that
holds the deepest one, which leaves `{"head":"x",}` in the output; `inline_refs` cuts one level earlier
and removes the branches that would need to go deeper, so every output is valid JSON for the schema.
"""
from __future__ import annotations

import re._constants as sre
import re._parser as sre_parse
from typing import Any

from grammar.spec import GrammarError

# Keywords outlines-core ignores: the output would not be checked against them.
IGNORED = ("not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains", "propertyNames",
           "patternProperties", "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedProperties",
           "unevaluatedItems", "multipleOf")
# Subschema-holding keywords, by shape: one schema, a list of schemas, a dict of schemas.
_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
        "unevaluatedProperties", "unevaluatedItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_DICT = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def check_outlines_schema(schema: Any) -> None:
    """Raise GrammarError for the first construct outlines-core would compile into wrong output."""
    stack = [(schema, "#")]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        problem = _problem(node)
        if problem:
            raise GrammarError(f"unsupported JSON schema: the outlines backend does not support {problem} (at {path})")
        stack.extend(_children(node, path))


def _children(node: dict, path: str) -> list[tuple[Any, str]]:
    out: list[tuple[Any, str]] = []
    for key in _ONE:
        if isinstance(node.get(key), dict):
            out.append((node[key], f"{path}/{key}"))
    for key in _LIST:
        if isinstance(node.get(key), list):
            out.extend((sub, f"{path}/{key}/{i}") for i, sub in enumerate(node[key]))
    for key in _DICT:
        if isinstance(node.get(key), dict):
            out.extend((sub, f"{path}/{key}/{name}") for name, sub in node[key].items())
    return out


def _problem(node: dict) -> str | None:
    """Why outlines-core would mis-compile this one schema node (its subschemas are checked apart)."""
    ignored = [k for k in IGNORED if k in node]
    if ignored:
        return f"{ignored[0]!r}, which it would ignore"
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        return "'allOf' with more than one schema"
    if node.get("enum") == []:
        return "an empty 'enum' (no value satisfies it)"
    if "properties" in node:
        mixed = [k for k in ("anyOf", "oneOf", "allOf", "minProperties", "maxProperties") if k in node]
        if mixed:
            return f"{mixed[0]!r} next to 'properties', which it would ignore"
    required = node.get("required")
    if isinstance(required, list):
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        missing = [name for name in required if name not in properties]
        if missing:
            return f"required property {missing[0]!r} that is not in 'properties'"
    if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
        return "'pattern' or 'format' together with 'minLength'/'maxLength', which would drop the pattern"
    pattern = node.get("pattern")
    if isinstance(pattern, str) and not pattern_is_json_safe(pattern):
        return (f"the pattern {_short(pattern)!r} (outlines pastes a pattern unescaped into the JSON string, so it "
                "must provably match no '\"', '\\\\' or control character)")
    return None


def inline_refs(schema: Any, max_refs: int) -> Any:
    """`schema` with every local `$ref` replaced by its target, at most `max_refs` refs deep. A deeper ref
    is impossible: the anyOf/oneOf branch or optional property holding it is dropped, an array that would
    need it stays empty; where nothing is left, GrammarError. Refs' sibling keywords are dropped, as
    outlines-core does."""
    budget = [_MAX_INLINED_NODES]
    try:
        out = _inline(schema, schema, max_refs, budget)
    except RecursionError:  # nesting deeper than Python's stack: a 400 like any too complex schema
        raise GrammarError("unsupported JSON schema: too deeply nested for the outlines backend") from None
    if out is _IMPOSSIBLE:
        raise GrammarError(f"unsupported JSON schema: the outlines backend unrolls $refs only {max_refs} deep, "
                           "and this schema needs deeper ones; the llguidance backend does not")
    return out


_IMPOSSIBLE = None
_MAX_INLINED_NODES = 100_000  # k refs per level unroll to k ** max_refs copies: a hostile schema stops here


def _inline(node: Any, root: Any, refs_left: int, budget: list[int]) -> Any:
    if not isinstance(node, dict):
        return node
    budget[0] -= 1
    if budget[0] < 0:
        raise GrammarError("unsupported JSON schema: too many $refs to unroll for the outlines backend")
    if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
        if refs_left == 0:
            return _IMPOSSIBLE
        return _inline(_resolve(root, node["$ref"]), root, refs_left - 1, budget)
    out = dict(node)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(node.get(key), list):
            subs = [_inline(sub, root, refs_left, budget) for sub in node[key]]
            kept = [sub for sub in subs if sub is not _IMPOSSIBLE]
            if not kept or (key in ("allOf", "prefixItems") and len(kept) < len(subs)):
                return _IMPOSSIBLE
            out[key] = kept
    if isinstance(node.get("properties"), dict):
        required = node.get("required") or []
        out["properties"] = {}
        for name, sub in node["properties"].items():
            sub = _inline(sub, root, refs_left, budget)
            if sub is _IMPOSSIBLE and name in required:
                return _IMPOSSIBLE
            if sub is not _IMPOSSIBLE:
                out["properties"][name] = sub
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out[key] = _inline(node[key], root, refs_left, budget)
            if out[key] is _IMPOSSIBLE and key == "additionalProperties":
                return _IMPOSSIBLE
            if out[key] is _IMPOSSIBLE:  # an array that cannot hold an item: `[]`, if that is allowed
                if node.get("minItems", 0):
                    return _IMPOSSIBLE
                del out[key]
                out["maxItems"] = 0
    return out


def _resolve(root: Any, ref: str) -> Any:
    """The target of a local JSON pointer `#/a/b`; GrammarError when there is none."""
    target = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        elif isinstance(target, dict) and part in target:
            target = target[part]
        else:
            raise GrammarError(f"invalid JSON schema: $ref {_short(ref)!r} points to nothing")
    return target


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------- string patterns

_UNSAFE = frozenset([ord('"'), ord("\\"), *range(0x20), 0x7F])  # outlines' string regex escapes these
_SAFE_CATEGORIES = frozenset([sre.CATEGORY_DIGIT, sre.CATEGORY_WORD])


def pattern_is_json_safe(pattern: str) -> bool:
    """True when the pattern can match no character that JSON needs escaped (outlines pastes the pattern
    between the quotes as it is). Parsed with Python's regex parser, which reads the common syntax the
    same way as Rust's; a pattern it cannot parse counts as unsafe."""
    try:
        return _safe(sre_parse.parse(pattern))
    except (sre.error, RecursionError, OverflowError):
        return False


def _safe(items) -> bool:
    for op, av in items:
        if op is sre.LITERAL:
            if av in _UNSAFE:
                return False
        elif op is sre.IN:
            if not _class_safe(av):
                return False
        elif op is sre.BRANCH:
            if not all(_safe(sub) for sub in av[1]):
                return False
        elif op is sre.SUBPATTERN:
            if not _safe(av[-1]):
                return False
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            if not _safe(av[2]):
                return False
        elif op is not sre.AT:  # ANY, NOT_LITERAL, look-arounds, back references...: not provably safe
            return False
    return True


def _class_safe(members) -> bool:
    for op, av in members:
        if op is sre.LITERAL and av in _UNSAFE:
            return False
        if op is sre.RANGE and any(av[0] <= c <= av[1] for c in _UNSAFE):
            return False
        if op is sre.CATEGORY and av not in _SAFE_CATEGORIES:
            return False
        if op not in (sre.LITERAL, sre.RANGE, sre.CATEGORY):  # NEGATE and the like
            return False
    return True
