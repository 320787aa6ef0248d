"""grammar/: specs, vocabulary, bitmasks and matcher semantics under both backends, with the tiny tokenizer.

The suite of JSON schemas in tests/schemas/ is walked at random through each backend's masks; every
finished walk must parse and validate (tests/test_grammar_real.py repeats it with the real tokenizer).
"""
from __future__ import annotations

import ast
import datetime
import json
import random
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from grammar import (
    MAX_SPEC_BYTES,
    GrammarCompiler,
    GrammarError,
    GrammarSpec,
    Matcher,
    TokenVocab,
    allocate_bitmask,
    allowed_token_ids,
    apply_bitmask,
    unpack_bitmask,
)
from grammar.walk import random_walk
from tests.tiny_models import save_tiny_tokenizer

SCHEMA_DIR = Path(__file__).parent / "schemas"
SUITE = {path.stem: json.loads(path.read_text()) for path in sorted(SCHEMA_DIR.glob("*.json"))}
BACKENDS = ["llguidance", "outlines"]

REGEXES = [
    r"[0-9]{3}-[0-9]{4}",
    r"(yes|no|maybe)",
    r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
    r"(ab|cd)*e",
    r"[A-Z][a-z]{2,8}( [A-Z][a-z]{2,8}){0,2}",
    r"0x[0-9a-f]{1,8}",
    r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?",
    r"(café|naïve|日本)+!",
    r"\([a-z]+(, [a-z]+)*\)",
]

LARK = {
    "arithmetic": r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /0|[1-9][0-9]{0,2}/
""",
    "key_value": r"""
start: line+
line: KEY "=" VALUE "\n"
KEY: /[a-z_]{1,10}/
VALUE: /[0-9]{1,4}/ | /"[a-z ]{0,10}"/
""",
    "sql_select": r"""
start: "SELECT " cols " FROM " NAME where?
cols: "*" | NAME (", " NAME)*
where: " WHERE " NAME " = " VALUE
NAME: /[a-z_]{1,12}/
VALUE: /[0-9]{1,6}/ | /'[a-z]{0,8}'/
""",
    "json_answer": r"""
start: "Answer: " answer
answer: %json {"type": "object", "properties": {"x": {"type": "integer"}, "ok": {"type": "boolean"}},
               "required": ["x", "ok"], "additionalProperties": false}
""",
}
LARK_CHECKS = {
    "arithmetic": lambda text: isinstance(ast.parse(text, mode="eval").body, (ast.BinOp, ast.Constant)),
    "key_value": lambda text: re.fullmatch(r'([a-z_]{1,10}=([0-9]{1,4}|"[a-z ]{0,10}")\n)+', text),
    "sql_select": lambda text: re.fullmatch(
        r"SELECT (\*|[a-z_]{1,12}(, [a-z_]{1,12})*) FROM [a-z_]{1,12}( WHERE [a-z_]{1,12} = ([0-9]{1,6}|'[a-z]{0,8}'))?",
        text),
    "json_answer": lambda text: text.startswith("Answer: ") and isinstance(json.loads(text[8:])["x"], int),
}


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("grammar-tiny-tokenizer")
    save_tiny_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def compilers(tiny_tokenizer) -> dict[str, GrammarCompiler]:
    return {name: GrammarCompiler(tiny_tokenizer, backend=name, timeout_s=60) for name in BACKENDS}


def format_checker() -> jsonschema.FormatChecker:
    """The formats the backends promise, checked without optional packages. RFC 3339 allows a leap second
    (:60); no grammar can know which minutes have one, so any minute may end in one."""
    time_re = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?([zZ]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
    checker = jsonschema.FormatChecker(formats=())
    checker.checks("date")(lambda s: not isinstance(s, str) or _is_date(s))
    checker.checks("time")(lambda s: not isinstance(s, str) or re.fullmatch(time_re, s) is not None)
    checker.checks("date-time")(lambda s: not isinstance(s, str) or (
        _is_date(s[:10]) and s[10:11] in ("T", "t") and re.fullmatch(time_re, s[11:]) is not None))
    checker.checks("uuid")(lambda s: not isinstance(s, str) or re.fullmatch(
        r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", s) is not None)
    checker.checks("email")(lambda s: not isinstance(s, str) or re.fullmatch(r"[^@\s]+@[^@\s]+", s) is not None)
    return checker


def _is_date(s: str) -> bool:
    if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", s) is None:
        return False
    try:
        datetime.date.fromisoformat(s)
    except ValueError:
        return False
    return True


FORMATS = format_checker()


def assert_valid_json(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=FORMATS)


def outlines_is_loose(schema: dict) -> bool:
    """outlines-core 0.2.14 does not enforce numeric bounds, writes dates with any Unicode digit, times without
    the RFC 3339 offset and emails that are not JSON-escaped, and cuts recursive $refs at depth 3 with
    invalid JSON. Its outputs for such schemas are only held to its own regex."""
    text = json.dumps(schema)
    bounds = any(f'"{k}"' in text for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))
    formats = any(f'"format": "{f}"' in text for f in ("date", "time", "date-time", "email"))
    recursive = any(f'"$ref": "#/$defs/{name}"' in json.dumps(body) for name, body in schema.get("$defs", {}).items())
    return bounds or formats or recursive


def walk_text(matcher: Matcher, seed: int, max_tokens: int = 400) -> str:
    walk = random_walk(matcher, random.Random(seed), max_tokens=max_tokens)
    assert walk.finished, f"walk did not finish in {max_tokens} tokens: {walk.text[-80:]!r}"
    return walk.text.decode("utf-8")


def check_suite_walks(compiler: GrammarCompiler, names: list[str], seeds: range) -> None:
    from outlines_core import json_schema as oc_json_schema

    for name in names:
        schema = SUITE[name]
        spec = GrammarSpec.json_schema(schema)
        compiled = compiler.compile(spec)
        for seed in seeds:
            walk = random_walk(compiled.matcher(), random.Random(seed))
            loose = compiler.backend_name == "outlines" and outlines_is_loose(schema)
            if loose and not walk.finished:  # its email regex has corners a random walk does not leave
                continue
            assert walk.finished, f"{name} seed {seed}: walk did not finish: {walk.text[-80:]!r}"
            text = walk.text.decode("utf-8")
            if compiler.backend_name == "outlines":
                # outlines' Unicode tables (for \d) are newer than Python's: any non-ASCII char may be a digit
                regex = oc_json_schema.build_regex_from_schema(spec.value, "", 3).replace("\\d", "(?:\\d|[^\\x00-\\x7f])")
                assert re.fullmatch(regex, text, re.DOTALL), (name, text)
                if loose:
                    continue
            try:
                assert_valid_json(text, schema)
            except (ValueError, jsonschema.ValidationError) as e:
                raise AssertionError(f"{compiler.backend_name} {name} seed {seed}: {text!r}: {e}") from None


def mask_of(matcher: Matcher) -> torch.Tensor:
    bitmask = allocate_bitmask(1, matcher.vocab.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    return bitmask[0].clone()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------- GrammarSpec


def test_spec_constructors_canonicalise_and_key():
    a = GrammarSpec.json_schema({"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}})
    b = GrammarSpec.json_schema('{ "type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}} }')
    assert a == b and a.key == b.key and hash(a) == hash(b)
    assert a.value == '{"type":"object","properties":{"b":{"type":"integer"},"a":{"type":"string"}}}'  # order kept
    assert GrammarSpec.json_schema({"properties": {"a": {}, "b": {}}}).key != \
        GrammarSpec.json_schema({"properties": {"b": {}, "a": {}}}).key
    assert GrammarSpec.choice(["a", "é"]).value == '["a","é"]'
    assert GrammarSpec.choice(["x", "y"]).choices() == ["x", "y"]
    assert GrammarSpec.json_object().kind == "json_object"
    assert GrammarSpec.regex("a+").key != GrammarSpec.lark("a+").key
    assert GrammarSpec.regex("a+").key.startswith("regex:")


@pytest.mark.parametrize("make, message", [
    (lambda: GrammarSpec.json_schema("{not json"), "not valid JSON"),
    (lambda: GrammarSpec.json_schema("[1, 2]"), "must be a JSON object"),
    (lambda: GrammarSpec.json_schema({"x": float("nan")}), "invalid JSON schema"),
    (lambda: GrammarSpec.choice([]), "non-empty list"),
    (lambda: GrammarSpec.choice(["a", 1]), "non-empty string"),
    (lambda: GrammarSpec.regex("a" * (MAX_SPEC_BYTES + 1)), "too large"),
    (lambda: GrammarSpec.json_schema({"enum": ["x" * 1000] * 70}), "too large"),
    (lambda: GrammarSpec("yaml", "a: 1"), "unknown grammar kind"),
])
def test_bad_specs_raise_grammar_error(make, message):
    with pytest.raises(GrammarError, match=message):
        make()
    assert issubclass(GrammarError, ValueError)


# ---------------------------------------------------------------- vocabulary


def test_vocab_decodes_byte_level_tokens_to_bytes(tiny_tokenizer, compilers):
    vocab = compilers["llguidance"].vocab
    assert len(vocab.token_bytes) == len(tiny_tokenizer) and vocab.vocab_size == len(tiny_tokenizer)
    assert vocab.eos_token_ids == (tiny_tokenizer.eos_token_id,)
    special = set(tiny_tokenizer.all_special_ids)
    assert all(vocab.token_bytes[i] is None for i in special)
    # every other token's bytes concatenate to what the tokenizer decodes, multi-byte UTF-8 included
    text = "Héllo wörld, ça va? 日本語のテキスト 🙂 def add(a, b):\n    return a + b\n"
    ids = encode(tiny_tokenizer, text)
    assert b"".join(vocab.token_bytes[i] for i in ids).decode("utf-8") == text
    # ... and agree with llguidance's own reading of the tokenizer
    ll_tokenizer = compilers["llguidance"].backend.ll_tokenizer
    for i, piece in enumerate(vocab.token_bytes):
        if piece is not None and piece != b"\xff":  # llguidance's marker byte for special tokens; never UTF-8
            assert ll_tokenizer.decode_bytes([i]) == piece, i
    assert {len(p) for p in vocab.token_bytes if p is not None} >= {1, 2, 3}
    assert sum(p is not None and len(p) == 1 for p in vocab.token_bytes) == 256  # all bytes reachable


def test_vocab_decodes_sentencepiece_style_tokens():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b", "▁a", "ab", "▁ab"]
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b")]
    model = models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    vocab = TokenVocab.from_hf(hf)
    ids = {p: i for i, p in enumerate(pieces)}
    assert vocab.token_bytes[ids["<0x41>"]] == b"A" and vocab.token_bytes[ids["<0x0A>"]] == b"\n"
    assert vocab.token_bytes[ids["▁ab"]] == b" ab" and vocab.token_bytes[ids["ab"]] == b"ab"
    assert vocab.token_bytes[ids["</s>"]] is None and vocab.eos_token_ids == (ids["</s>"],)
    for backend in BACKENDS:
        compiled = GrammarCompiler(hf, backend=backend).compile(GrammarSpec.regex(r"( ab|[A-Z]\n){1,4}"))
        for seed in range(3):
            assert re.fullmatch(r"( ab|[A-Z]\n){1,4}", walk_text(compiled.matcher(), seed))


def test_vocab_rejects_a_logits_width_smaller_than_the_tokenizer(tiny_tokenizer):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        TokenVocab.from_hf(tiny_tokenizer, vocab_size=len(tiny_tokenizer) - 1)


# ---------------------------------------------------------------- bitmask helpers


def test_allocate_bitmask_allows_everything():
    bitmask = allocate_bitmask(3, 70)
    assert bitmask.shape == (3, 3) and bitmask.dtype == torch.int32
    logits = torch.randn(3, 70)
    assert torch.equal(apply_bitmask(logits.clone(), bitmask), logits)


def test_apply_bitmask_matches_a_per_token_reference():
    g = torch.Generator().manual_seed(0)
    batch, vocab_size = 5, 100
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch, 4), dtype=torch.int32, generator=g)
    logits = torch.randn(batch, vocab_size, generator=g)
    expected = logits.clone()
    for r in range(batch):
        for t in range(vocab_size):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                expected[r, t] = float("-inf")
    out = logits.clone()
    assert apply_bitmask(out, bitmask) is out
    assert torch.equal(out, expected)
    # only the listed rows are masked; the others keep their logits
    out = logits.clone()
    apply_bitmask(out, bitmask, rows=[1, 3])
    for r in range(batch):
        assert torch.equal(out[r], expected[r] if r in (1, 3) else logits[r])
    assert torch.equal(apply_bitmask(logits.clone(), bitmask, rows=[]), logits)
    # a preallocated mask with more rows than this step's batch
    out = logits[:2].clone()
    apply_bitmask(out, bitmask)
    assert torch.equal(out, expected[:2])
    assert allowed_token_ids(bitmask[2], vocab_size) == expected[2].isfinite().nonzero().view(-1).tolist()


def test_apply_bitmask_masks_logits_wider_than_the_bitmask_and_keeps_dtype():
    bitmask = torch.full((2, 1), -1, dtype=torch.int32)  # 32 tokens allowed
    logits = torch.zeros(2, 40, dtype=torch.bfloat16)
    apply_bitmask(logits, bitmask)
    assert logits.dtype == torch.bfloat16
    assert logits[:, :32].isfinite().all() and logits[:, 32:].isneginf().all()
    assert unpack_bitmask(bitmask, 40).shape == (2, 40)


# ---------------------------------------------------------------- compile coverage and errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_suite_schema_compiles(compilers, backend):
    assert len(SUITE) >= 30
    for name, schema in SUITE.items():
        compilers[backend].compile(GrammarSpec.json_schema(schema))  # raises GrammarError on failure


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec, message", [
    (GrammarSpec.json_schema({"type": "foo"}), "JSON schema"),
    (GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "JSON schema"),
    (GrammarSpec.json_schema({"type": "string", "pattern": "(("}), "JSON schema"),
    (GrammarSpec.regex("(("), "regex"),
    (GrammarSpec.regex("[z-a]"), "regex"),
])
def test_invalid_specs_raise_grammar_error(compilers, backend, spec, message):
    with pytest.raises(GrammarError, match=message):
        compilers[backend].compile(spec)


@pytest.mark.parametrize("grammar", ["start: foo", "start: /((/", "start: \"a", "not a grammar"])
def test_invalid_lark_raises_grammar_error(compilers, grammar):
    with pytest.raises(GrammarError, match="Lark grammar"):
        compilers["llguidance"].compile(GrammarSpec.lark(grammar))


def test_outlines_refuses_lark_and_oversized_regexes(compilers):
    with pytest.raises(GrammarError, match="does not support lark"):
        compilers["outlines"].compile(GrammarSpec.lark(LARK["arithmetic"]))
    # 100 optional properties: a 2.5 KB schema whose regex is 145 KB (outlines grows it quadratically)
    many = GrammarSpec.json_schema({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(100)}})
    with pytest.raises(GrammarError, match="too complex for the outlines backend"):
        compilers["outlines"].compile(many)
    compilers["llguidance"].compile(many)


def test_llguidance_complexity_limits_raise_grammar_error(tiny_tokenizer, compilers):
    import llguidance

    from grammar.llguidance_backend import LLGuidanceBackend

    backend = LLGuidanceBackend(tiny_tokenizer, compilers["llguidance"].vocab,
                                limits=llguidance.LLParserLimits(max_grammar_size=100, verbose_errors=False))
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(50)}}
    with pytest.raises(GrammarError, match="too big"):
        GrammarCompiler(None, grammar_backend=backend).compile(GrammarSpec.json_schema(schema))


# ---------------------------------------------------------------- random walks


@pytest.mark.parametrize("backend", BACKENDS)
def test_suite_walks_parse_and_validate(compilers, backend):
    check_suite_walks(compilers[backend], list(SUITE), range(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_json_object_walks_are_objects(compilers, backend):
    compiled = compilers[backend].compile(GrammarSpec.json_object())
    for seed in range(5):
        assert isinstance(json.loads(walk_text(compiled.matcher(), seed)), dict)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_walks_fullmatch(compilers, backend, pattern):
    compiled = compilers[backend].compile(GrammarSpec.regex(pattern))
    for seed in range(4):
        text = walk_text(compiled.matcher(), seed)
        assert re.fullmatch(pattern, text), (pattern, text)


@pytest.mark.parametrize("backend", BACKENDS)
def test_choice_walks_produce_one_of_the_choices(compilers, backend):
    choices = ["yes", "no", "maybe so", "日本", "a.b*c (d)", "no way"]
    compiled = compilers[backend].compile(GrammarSpec.choice(choices))
    seen = {walk_text(compiled.matcher(), seed) for seed in range(30)}
    assert seen <= set(choices) and len(seen) >= 3


@pytest.mark.parametrize("name", list(LARK))
def test_lark_walks_parse(compilers, name):
    compiled = compilers["llguidance"].compile(GrammarSpec.lark(LARK[name]))
    for seed in range(5):
        text = walk_text(compiled.matcher(), seed)
        assert LARK_CHECKS[name](text), (name, text)


# ---------------------------------------------------------------- matcher semantics


def _person_tokens(tokenizer) -> list[int]:
    return encode(tokenizer, '{"name":"Ann","age":41}')


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_allows_exactly_what_accept_token_accepts(compilers, tiny_tokenizer, backend):
    vocab = compilers[backend].vocab
    matcher = compilers[backend].compile(GrammarSpec.json_schema(SUITE["person"])).matcher()
    for token in _person_tokens(tiny_tokenizer) + [None]:
        before = mask_of(matcher)
        allowed = set(allowed_token_ids(before, vocab.vocab_size))
        for candidate in range(vocab.vocab_size):
            accepted = matcher.accept_token(candidate)
            assert accepted == (candidate in allowed), (candidate, token)
            if accepted:
                matcher.rollback(1)
        assert torch.equal(mask_of(matcher), before)  # refused tokens left the state as it was
        if token is not None:
            assert matcher.accept_token(token)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_then_reaccept_restores_every_state(compilers, tiny_tokenizer, backend):
    compiled = compilers[backend].compile(GrammarSpec.json_schema(SUITE["order_items"]))
    tokens = random_walk(compiled.matcher(), random.Random(1)).token_ids
    matcher = compiled.matcher()
    masks, finished = [mask_of(matcher)], [matcher.is_finished()]
    for t in tokens:
        assert matcher.accept_token(t)
        masks.append(mask_of(matcher))
        finished.append(matcher.is_finished())
    n = len(tokens)
    for k in (1, 2, 5, n // 2, n):
        matcher.rollback(k)
        assert matcher.num_accepted == n - k
        assert torch.equal(mask_of(matcher), masks[n - k]) and matcher.is_finished() == finished[n - k]
        for t in tokens[n - k:]:
            assert matcher.accept_token(t)
        assert torch.equal(mask_of(matcher), masks[n]) and matcher.is_finished()
    with pytest.raises(ValueError):
        matcher.rollback(n + 1)
    matcher.reset()
    assert matcher.num_accepted == 0 and torch.equal(mask_of(matcher), masks[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_past_the_backend_history_replays(compilers, tiny_tokenizer, backend, monkeypatch):
    compiled = compilers[backend].compile(GrammarSpec.json_schema(SUITE["person"]))
    tokens = _person_tokens(tiny_tokenizer)
    matcher = compiled.matcher()
    for t in tokens:
        matcher.accept_token(t)
    expected = compiled.matcher()
    for t in tokens[:3]:
        expected.accept_token(t)
    monkeypatch.setattr(matcher, "_rollback", lambda n: False)  # as if the backend kept no history
    matcher.rollback(len(tokens) - 3)
    assert matcher.num_accepted == 3 and torch.equal(mask_of(matcher), mask_of(expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eos_only_where_the_grammar_can_end(compilers, tiny_tokenizer, backend):
    vocab = compilers[backend].vocab
    eos = vocab.eos_token_ids[0]
    matcher = compilers[backend].compile(GrammarSpec.regex("[0-9]{1,3}")).matcher()
    assert not matcher.accept_token(eos) and eos not in allowed_token_ids(mask_of(matcher), vocab.vocab_size)
    digit = encode(tiny_tokenizer, "7")[0]
    assert matcher.accept_token(digit) and not matcher.is_finished()  # "7" may end or go on
    assert eos in allowed_token_ids(mask_of(matcher), vocab.vocab_size)
    assert matcher.accept_token(eos) and matcher.is_finished()
    assert allowed_token_ids(mask_of(matcher), vocab.vocab_size) == [eos]  # after EOS: only EOS
    assert not matcher.accept_token(digit) and matcher.forced_tokens() == []
    matcher.rollback(1)  # undo the EOS
    assert not matcher.is_finished() and matcher.accept_token(digit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finished_as_soon_as_nothing_but_eos_can_follow(compilers, tiny_tokenizer, backend):
    vocab = compilers[backend].vocab
    matcher = compilers[backend].compile(GrammarSpec.json_schema(SUITE["person"])).matcher()
    tokens = _person_tokens(tiny_tokenizer)
    for t in tokens[:-1]:
        assert matcher.accept_token(t) and not matcher.is_finished()
    assert matcher.accept_token(tokens[-1]) and matcher.is_finished()  # the closing "}": no EOS sampled yet
    assert allowed_token_ids(mask_of(matcher), vocab.vocab_size) == list(vocab.eos_token_ids)
    assert matcher.accept_token(vocab.eos_token_ids[0]) and matcher.num_accepted == len(tokens) + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_eos_id_ends_and_special_and_padded_ids_never_appear(tiny_tokenizer, backend):
    eos_ids = [tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    padded = len(tiny_tokenizer) + 45  # the model's logits are wider than the tokenizer
    compiler = GrammarCompiler(tiny_tokenizer, backend=backend, vocab_size=padded, eos_token_ids=eos_ids)
    assert compiler.allocate_bitmask(2).shape == (2, (padded + 31) // 32)
    matcher = compiler.compile(GrammarSpec.regex(r"(?s:.*)")).matcher()
    allowed = allowed_token_ids(mask_of(matcher), padded)
    assert max(allowed) < len(tiny_tokenizer)
    assert set(allowed) & set(tiny_tokenizer.all_special_ids) == set(eos_ids)
    assert set(allowed) >= {i for i, p in enumerate(compiler.vocab.token_bytes) if p is not None and p.isascii()}
    other = compiler.compile(GrammarSpec.regex("ab")).matcher()
    for t in encode(tiny_tokenizer, "ab"):
        other.accept_token(t)
    assert allowed_token_ids(mask_of(other), padded) == sorted(eos_ids)
    assert other.accept_token(eos_ids[1]) and other.is_finished()


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_tokens_can_always_be_taken(compilers, backend):
    """Jump-forward along random walks: whenever tokens are forced, accepting them all works, and the
    outputs stay valid. outlines' forced tokens are exactly those the mask leaves alone."""
    compiler = compilers[backend]
    names = ["const_version", "pattern_ids", "deep_nesting", "unicode_keys"]
    for name in names + (["recursive_tree", "formats", "person"] if backend == "llguidance" else []):
        compiled = compiler.compile(GrammarSpec.json_schema(SUITE[name]))
        for seed in range(3):
            matcher, rng, jumps = compiled.matcher(), random.Random(seed), 0
            while not matcher.is_finished():
                assert matcher.num_accepted < 400
                forced = matcher.forced_tokens()
                if forced:
                    if backend == "outlines":
                        assert allowed_token_ids(mask_of(matcher), compiler.vocab_size) == forced[:1]
                    assert all(matcher.accept_token(t) for t in forced), name
                    jumps += 1
                else:  # one random token (finishing-minded after 32)
                    random_walk(matcher, rng, max_tokens=1, patience=0 if matcher.num_accepted > 32 else 32)
            text = b"".join(compiler.vocab.token_bytes[t] for t in matcher._tokens if t not in compiler.vocab.eos_token_ids)
            assert_valid_json(text.decode(), SUITE[name])
            assert jumps > 0 and matcher.forced_tokens() == []


def test_forced_tokens_do_not_advance_and_cover_a_const(compilers, tiny_tokenizer):
    compiler = compilers["llguidance"]
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"version": {"const": "quick brown fox"}},
                                    "required": ["version"], "additionalProperties": False})
    matcher = compiler.compile(spec).matcher()
    forced = matcher.forced_tokens()
    assert matcher.num_accepted == 0 and matcher.forced_tokens() == forced
    text = b"".join(compiler.vocab.token_bytes[t] for t in forced)
    # llguidance holds back a forced tail the tokenizer could merge with what follows
    assert len(text) >= 20 and b'{"version":"quick brown fox"}'.startswith(text)
    outlines = compilers["outlines"].compile(GrammarSpec.regex(r"[0-9]\}")).matcher()
    assert outlines.accept_token(encode(tiny_tokenizer, "7")[0])
    assert outlines.forced_tokens() == encode(tiny_tokenizer, "}")


def test_matchers_from_one_compiled_grammar_are_independent(compilers, tiny_tokenizer):
    compiled = compilers["llguidance"].compile(GrammarSpec.json_schema(SUITE["person"]))
    a, b = compiled.matcher(), compiled.matcher()
    start = mask_of(b)
    for t in _person_tokens(tiny_tokenizer)[:4]:
        assert a.accept_token(t)
    assert torch.equal(mask_of(b), start) and b.num_accepted == 0
    assert not torch.equal(mask_of(a), start)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fill_bitmask_rejects_a_wrong_bitmask(compilers, backend):
    matcher = compilers[backend].compile(GrammarSpec.regex("a+")).matcher()
    width = compilers[backend].vocab.width
    with pytest.raises(ValueError):
        matcher.fill_bitmask(torch.zeros(2, width + 1, dtype=torch.int32), 0)
    with pytest.raises(ValueError):
        matcher.fill_bitmask(torch.zeros(2, width, dtype=torch.int64), 0)
    with pytest.raises(ValueError):
        matcher.fill_bitmask(torch.zeros(2, width, dtype=torch.int32), 2)
    bitmask = torch.zeros(3, width, dtype=torch.int32)
    matcher.fill_bitmask(bitmask, 1)  # writes only its own row
    assert bitmask[1].any() and not bitmask[0].any() and not bitmask[2].any()


def test_masked_sampling_end_to_end(compilers, tiny_tokenizer):
    """What the engine will do: a batch with a constrained and a free row, greedy over random logits."""
    compiler = compilers["llguidance"]
    matcher = compiler.matcher(GrammarSpec.json_schema(SUITE["enum_status"]))
    bitmask = compiler.allocate_bitmask(2)
    g = torch.Generator().manual_seed(0)
    out: list[int] = []
    while not matcher.is_finished():
        logits = torch.randn(2, compiler.vocab_size, generator=g)
        free = logits[1].clone()
        matcher.fill_bitmask(bitmask, 0)
        apply_bitmask(logits, bitmask, rows=[0])
        assert torch.equal(logits[1], free)
        token = int(logits[0].argmax())
        assert matcher.accept_token(token)
        out.append(token)
    text = b"".join(compiler.vocab.token_bytes[t] for t in out).decode()
    assert json.loads(text)["status"] in SUITE["enum_status"]["properties"]["status"]["enum"]
