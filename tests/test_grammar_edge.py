"""Edge cases of structured output: clear errors for what a backend cannot do, outlines' silent
mis-compilations refused or repaired, boolean schemas, lone surrogates, and the gateway's fields."""
from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from engine import LLM, SamplingParams
from gateway.errors import APIError
from gateway.structured import parse_structured_output
from grammar import GrammarCompiler, GrammarError, GrammarSpec
from grammar.outlines_schema import pattern_is_json_safe
from grammar.walk import random_walk
from tests.test_grammar import SUITE
from tests.tiny_models import save_tiny_tokenizer

BACKENDS = ["llguidance", "outlines"]


@pytest.fixture(scope="module")
def compilers(tmp_path_factory) -> dict[str, GrammarCompiler]:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("edge-tokenizer")
    save_tiny_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return {name: GrammarCompiler(tokenizer, backend=name, timeout_s=60) for name in BACKENDS}


def walk_texts(compiler: GrammarCompiler, spec: GrammarSpec, seeds: range) -> list[str]:
    compiled = compiler.compile(spec)
    texts = []
    for seed in seeds:
        walk = random_walk(compiled.matcher(), random.Random(seed), max_tokens=400)
        assert walk.finished, walk.text[-80:]
        texts.append(walk.text.decode("utf-8"))
    return texts


# ---------------------------------------------------------------- error messages


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern, reason", [(r"(?=a)a", "look-around"), (r"(?<!x)y", "look-around"),
                                             (r"(a)\1", "backreferences")])
def test_unsupported_regex_errors_say_why(compilers, backend, pattern, reason):
    with pytest.raises(GrammarError, match=f"regex: .*{reason}.* not supported"):
        compilers[backend].compile(GrammarSpec.regex(pattern))


def test_unsupported_schema_pattern_error_says_why(compilers):
    with pytest.raises(GrammarError, match="JSON schema: .*look-around.* not supported"):
        compilers["llguidance"].compile(GrammarSpec.json_schema({"type": "string", "pattern": "^(?!x)[a-z]+$"}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [lambda: GrammarSpec.regex("a\ud800"), lambda: GrammarSpec.choice(["\udc00"]),
                                  lambda: GrammarSpec.json_schema('{"enum": ["\\ud800"]}')])
def test_lone_surrogates_are_grammar_errors(compilers, backend, make):
    with pytest.raises(GrammarError, match="lone surrogate"):
        compilers[backend].compile(make())


# ---------------------------------------------------------------- both backends agree


@pytest.mark.parametrize("pattern, texts", [(r"^(yes|no)$", {"yes", "no"}), (r"\A[ab]\z", {"a", "b"}),
                                            (r"^x\$$", {"x$"})])
def test_regex_end_anchors_work_in_both_backends(compilers, pattern, texts):
    for backend in BACKENDS:  # llguidance always took them; outlines refused every anchor
        assert set(walk_texts(compilers[backend], GrammarSpec.regex(pattern), range(12))) <= texts


@pytest.mark.parametrize("backend", BACKENDS)
def test_boolean_schemas(compilers, backend):
    for text in walk_texts(compilers[backend], GrammarSpec.json_schema(True), range(3)):
        json.loads(text)
    assert GrammarSpec.json_schema("true") == GrammarSpec.json_schema({})
    with pytest.raises(GrammarError, match="allows no value"):
        GrammarSpec.json_schema(False)


# ---------------------------------------------------------------- outlines: refused, not mis-compiled

REFUSED_BY_OUTLINES = {
    # outlines concatenates allOf: {"a":1}{"b":2}
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
    # pasted raw between quotes: bare `"` and control characters
    "dot pattern": {"type": "string", "pattern": "^.{1,20}$"},
    "negated class": {"type": "object", "properties": {"s": {"type": "string", "pattern": "[^a]+"}}},
    "pattern and maxLength": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
    "required not in properties": {"type": "object", "required": ["a"]},
    "empty enum": {"type": "object", "properties": {"e": {"enum": []}}},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "anyOf next to properties": {"type": "object", "properties": {"a": {"type": "integer"}},
                                 "anyOf": [{"required": ["a"]}]},
}


@pytest.mark.parametrize("name", list(REFUSED_BY_OUTLINES))
def test_outlines_refuses_what_it_would_mis_compile(compilers, name):
    with pytest.raises(GrammarError, match="JSON schema: the outlines backend does not support"):
        compilers["outlines"].compile(GrammarSpec.json_schema(REFUSED_BY_OUTLINES[name]))


def test_pattern_safety_check():
    for safe in ["^[0-9]{5}$", "^[A-Z]{2}[0-9]{2}[A-Z0-9]{10,20}$", r"^[0-9]{1,3}\.[0-9]{1,3}$", r"^\d+-\w+$",
                 "(a|b)+c*"]:
        assert pattern_is_json_safe(safe), safe
    for unsafe in [".", "[^a]", r"\s", r"\S", r"\D", '"', r"\\", "[ -~]", r"\x00", r"(?=a)a", r"\p{L}"]:
        assert not pattern_is_json_safe(unsafe), unsafe


def accepts(compiler: GrammarCompiler, spec: GrammarSpec, text: str) -> bool:
    """The grammar takes `text`, one single-byte token at a time, and may end after it."""
    vocab = compiler.vocab
    byte_token = {piece: i for i, piece in enumerate(vocab.token_bytes) if piece is not None and len(piece) == 1}
    matcher = compiler.compile(spec).matcher()
    return all(matcher.accept_token(byte_token[bytes([b])]) for b in text.encode()) and \
        matcher.accept_token(vocab.eos_token_ids[0])


def test_outlines_cuts_recursion_without_breaking_the_json(compilers):
    spec, cell = GrammarSpec.json_schema(SUITE["recursive_linked_list"]), '{"head":"a","tail":%s}'
    for backend in BACKENDS:  # three cells deep: both backends
        assert accepts(compilers[backend], spec, cell % (cell % (cell % "null")))
    # outlines' own cut let a fourth cell in without its required "tail": {"head":"a",}
    assert not accepts(compilers["outlines"], spec, cell % (cell % (cell % '{"head":"a",}')))


def test_outlines_refuses_a_schema_that_needs_deeper_refs(compilers):
    always_deeper = {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                                     "required": ["next"]}}, "$ref": "#/$defs/n"}
    with pytest.raises(GrammarError, match="unrolls \\$refs only"):
        compilers["outlines"].compile(GrammarSpec.json_schema(always_deeper))
    with pytest.raises(GrammarError, match="points to nothing"):
        compilers["outlines"].compile(GrammarSpec.json_schema({"$ref": "#/$defs/missing"}))


def test_outlines_engine_outputs_of_a_recursive_schema_parse(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=256, block_size=4, quantization="none", grammar_backend="outlines")
    schema = SUITE["recursive_linked_list"]
    params = SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=200, structured_output=GrammarSpec.json_schema(schema))
    for out in llm.generate(["The quick brown fox", "def add(a, b):"], params):
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), schema)


# ---------------------------------------------------------------- gateway fields


@pytest.mark.parametrize("so", [{"structural_tag": "{}"}, {"jsn": {"type": "object"}},
                                {"json": {"type": "object"}, "whitespace_pattern": " *"}])
def test_unknown_structured_outputs_keys_are_400(so):
    with pytest.raises(APIError) as info:
        parse_structured_output({"structured_outputs": so})
    assert info.value.status == 400 and "not supported" in str(info.value.message)


def test_gateway_accepts_vllm_no_op_options_and_boolean_schemas():
    so = {"json": {"type": "object"}, "disable_any_whitespace": True, "disable_fallback": True}
    assert parse_structured_output({"structured_outputs": so}) == GrammarSpec.json_schema({"type": "object"})
    fmt = {"type": "json_schema", "json_schema": {"name": "any", "schema": True, "strict": True}}
    assert parse_structured_output({"response_format": fmt}) == GrammarSpec.json_schema({})
    assert re.search("allows no value", _error({"guided_json": False}))


def _error(body: dict) -> str:
    with pytest.raises(APIError) as info:
        parse_structured_output(body)
    return str(info.value.message)
