"""Incremental detokenization: split UTF-8 characters and stop strings across tokens."""
from __future__ import annotations

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams
from tests.tiny_models import save_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def _stream(tok, ids, params, prompt=(1,)):
    detok = IncrementalDetokenizer(tok, list(prompt), params)
    deltas, stop = [], None
    for i, t in enumerate(ids):
        upd = detok.update([t], finished=i == len(ids) - 1)
        deltas.append(upd.delta_text)
        if upd.stop_string is not None:
            stop = upd.stop_string
            break
    return deltas, stop, detok


def _byte_level_alphabet() -> dict[int, str]:
    # GPT-2's byte -> printable character map, the base vocabulary of every byte-level BPE
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_tokens(tok, text: str) -> list[int]:
    # one token per byte: forces every multi-byte character to be split across tokens
    table = _byte_level_alphabet()
    ids = [tok.convert_tokens_to_ids(table[b]) for b in text.encode()]
    assert tok.unk_token_id not in ids
    return ids


def test_split_multibyte_characters_never_stream_a_replacement_char(tok):
    text = "héllo 日本 🙂!"
    deltas, _, _ = _stream(tok, _byte_tokens(tok, text), SamplingParams())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_stop_string_split_across_tokens_is_cut_and_never_leaked(tok):
    text = "one two STOP three"
    params = SamplingParams(stop=["STOP"])
    deltas, stop, detok = _stream(tok, _byte_tokens(tok, text), params)
    assert stop == "STOP"
    assert "".join(deltas) == "one two "
    assert all("S" not in d for d in deltas)  # not even the stop string's first letter leaks
    with_stop = _stream(tok, _byte_tokens(tok, text), SamplingParams(stop=["STOP"], include_stop_str_in_output=True))
    assert "".join(with_stop[0]) == "one two STOP"
    # kept in the output, a stop string's first letters stream at once instead of waiting to be ruled out
    assert "".join(with_stop[0][:len("one two S")]) == "one two S"


def test_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode("alpha beta gamma", add_special_tokens=False)
    deltas, stop, _ = _stream(tok, ids, SamplingParams(stop=["gamma", "beta"]))
    assert stop == "beta" and "".join(deltas) == "alpha "


def test_held_back_text_is_released_at_the_end(tok):
    ids = tok.encode("the end", add_special_tokens=False)
    deltas, stop, _ = _stream(tok, ids, SamplingParams(stop=["ending"]))
    assert stop is None and "".join(deltas) == "the end"


def test_matches_full_decode_on_real_text(tok):
    text = "The quick brown fox jumps over the lazy dog. Héllo wörld, ça va?"
    ids = tok.encode(text, add_special_tokens=False)
    deltas, _, _ = _stream(tok, ids, SamplingParams(), prompt=tok.encode("Prompt: ", add_special_tokens=False))
    assert "".join(deltas) == tok.decode(ids)
