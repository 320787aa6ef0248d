"""Structured-output fields of a request body -> one GrammarSpec (or None).

OpenAI's `response_format` (json_schema, json_object, text), vLLM's `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar` (Lark), and vLLM's newer `structured_outputs` object. At most one
constraint per request; each malformed one is a 400 naming its field.
"""
from __future__ import annotations

from typing import Any

from gateway.errors import bad_request
from grammar import GrammarError, GrammarSpec

Body = dict[str, Any]
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def parse_structured_output(body: Body) -> GrammarSpec | None:
    found: list[tuple[str, GrammarSpec]] = []
    fmt = body.get("response_format")
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            found.append(("response_format", spec))
    for name, kind in _GUIDED.items():
        if body.get(name) is not None:
            found.append((name, _build(name, kind, body[name])))
    so = body.get("structured_outputs")
    if so is not None:
        found.extend(_structured_outputs(so))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise bad_request(f"only one output constraint per request, got {names}", found[1][0])
    return found[0][1] if found else None


def constraint_field(body: Body) -> str:
    """The field the request's output constraint came from (the one parse_structured_output took), which a
    compile error found later names."""
    for name in ("response_format", *_GUIDED, "structured_outputs"):
        value = body.get(name)
        if value is not None and not (name == "response_format" and isinstance(value, dict)
                                      and value.get("type") == "text"):
            return name
    return "response_format"


def _response_format(fmt: Any) -> GrammarSpec | None:
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad_request("response_format must be an object with a type", "response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_object()
    if kind != "json_schema":
        raise bad_request(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                          "response_format")
    inner = fmt.get("json_schema")
    if not isinstance(inner, dict) or not isinstance(inner.get("name"), str):
        raise bad_request("response_format.json_schema must be an object with a name", "response_format")
    schema = inner.get("schema", {})  # OpenAI: a missing schema means any JSON
    if not isinstance(schema, (dict, bool)):  # `true` / `false` are JSON Schemas too
        raise bad_request("response_format.json_schema.schema must be a JSON Schema object", "response_format")
    return _build("response_format", "json", schema)


# vLLM's StructuredOutputsParams fields that need nothing here: output is compact JSON already, and a
# grammar this server cannot compile is a 400, never a fallback to another backend.
_SO_NO_OPS = frozenset({"disable_any_whitespace", "disable_fallback"})
_SO_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _structured_outputs(so: Any) -> list[tuple[str, GrammarSpec]]:
    if not isinstance(so, dict):
        raise bad_request("structured_outputs must be an object", "structured_outputs")
    # an unknown or unsupported key (structural_tag, whitespace_pattern, a typo) would otherwise leave the
    # output silently unconstrained
    unknown = sorted(k for k in so if k not in _SO_KINDS and k not in _SO_NO_OPS and so[k] not in (None, False))
    if unknown:
        raise bad_request(f"structured_outputs.{unknown[0]} is not supported; expected one of "
                          f"{', '.join(_SO_KINDS)}", "structured_outputs")
    out = []
    for kind in ("json", "regex", "choice", "grammar"):
        if so.get(kind) is not None:
            out.append(("structured_outputs", _build("structured_outputs", kind, so[kind])))
    if so.get("json_object"):
        out.append(("structured_outputs", GrammarSpec.json_object()))
    return out


def _build(field: str, kind: str, value: Any) -> GrammarSpec:
    try:
        if kind == "json" and isinstance(value, (dict, bool, str)):
            return GrammarSpec.json_schema(value)
        if kind == "regex" and isinstance(value, str):
            return GrammarSpec.regex(value)
        if kind == "choice" and isinstance(value, list) and value and all(isinstance(c, str) for c in value):
            return GrammarSpec.choice(value)
        if kind == "grammar" and isinstance(value, str):
            return GrammarSpec.lark(value)
    except GrammarError as exc:
        raise bad_request(str(exc), field, "invalid_grammar") from None
    expected = {"json": "a JSON schema (object or string)", "regex": "a string",
                "choice": "a non-empty list of strings", "grammar": "a Lark grammar string"}[kind]
    raise bad_request(f"{field} must be {expected}", field)
