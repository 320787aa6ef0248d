"""Edge cases of the HTTP gateway against what OpenAI's API and vLLM do: malformed input is a 4xx in the OpenAI
error shape (never a 500 or a dropped connection), and logprobs, content parts and routes match OpenAI's."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from websockets.sync.client import connect

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from tests.server import AUTH, MODEL, Server

MESSAGES = [{"role": "user", "content": "The quick brown fox"}]
CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=256, block_size=4,
                                                  quantization="none"))
    with Server(engine) as srv:
        yield srv


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _raw(http: httpx.Client, path: str, text: str) -> httpx.Response:
    """POST a body written by hand: NaN, Infinity and lone surrogates, which json.dumps would not write."""
    return http.post(path, content=text.encode(), headers={"content-type": "application/json"})


# ---- malformed input: a 400 in OpenAI's shape, never a 500 ----

def test_lone_surrogates_are_a_400_not_a_500(http):
    # JSON's \ud800 escape decodes to a lone surrogate, which the tokenizer cannot encode
    cases = [("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}'),
             ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "\\udc00", "content": "x"}]}'),
             ("/v1/completions", '{"model": "%s", "prompt": "a\\udfff b", "max_tokens": 2}')]
    for path, body in cases:
        assert _error(_raw(http, path, body % MODEL), 400)["code"] == "invalid_unicode"
    # a correctly paired surrogate is an ordinary character (U+1F642)
    r = _raw(http, "/v1/completions", '{"model": "%s", "prompt": "\\ud83d\\ude42", "max_tokens": 2}' % MODEL)
    assert r.status_code == 200, r.text


def test_a_lone_surrogate_in_a_websocket_frame_keeps_the_socket_open(server):
    with connect(server.ws_url, additional_headers=AUTH, proxy=None, open_timeout=10) as ws:
        # Its id would be echoed back in a frame that cannot be encoded: that used to drop the connection.
        ws.send('{"type": "request", "id": "\\ud800", "body": {}}')
        frame = json.loads(ws.recv(timeout=30))
        assert frame["type"] == "error" and frame["id"] is None and frame["error"]["code"] == "invalid_unicode"
        ws.send(json.dumps({"type": "request", "id": 1, "body": {**CHAT, "ignore_eos": True}}))
        while (frame := json.loads(ws.recv(timeout=30)))["type"] == "chunk":
            pass
        assert frame["type"] == "done" and frame["id"] == 1 and frame["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_say_so(http, literal):
    body = '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": %s}' % (MODEL, literal)
    err = _error(_raw(http, "/v1/chat/completions", body), 400)
    assert err["param"] == "temperature" and "finite" in err["message"]  # was "must be float, got float"


def test_errors_name_the_field_the_client_sent(http):
    err = _error(http.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 21}), 400)
    assert err["param"] == "top_logprobs" and "top_logprobs" in err["message"]
    err = _error(http.post("/v1/chat/completions", json={**CHAT, "max_tokens": None, "max_completion_tokens": 0}), 400)
    assert err["param"] == "max_completion_tokens"


@pytest.mark.parametrize("key", [" 5", "5 ", "1_0", "+5", "\u0665"])  # int() takes all of these
def test_logit_bias_keys_must_be_plain_token_ids(http, key):
    assert _error(http.post("/v1/chat/completions", json={**CHAT, "logit_bias": {key: 1}}), 400)["param"] == "logit_bias"


_VALUES = ["x", -1, 0, 1.5, 10**30, [], {}, True, None, [1, "a"], {"a": 1}, "\U0001f642"]
_RAW_VALUES = ["NaN", "-Infinity", '"\\udc00"', '["\\ud800"]', '{"\\ud800": 1}']
_CHAT_FIELDS = ["n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "max_completion_tokens", "stop",
                "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs",
                "top_logprobs", "ignore_eos", "min_tokens", "stream", "stream_options", "messages", "model", "user",
                "response_format", "tools", "tool_choice", "guided_choice", "structured_outputs"]
_COMPLETION_FIELDS = ["prompt", "logprobs", "echo", "suffix", "best_of", "max_tokens", "stop", "n"]


def test_no_malformed_field_is_a_server_error(http):
    def check(r: httpx.Response, what) -> None:
        assert r.status_code in (200, 400, 404), (what, r.status_code, r.text)
        if r.status_code != 200:
            _error(r, r.status_code)

    for value in _VALUES:
        for field in _CHAT_FIELDS:
            check(http.post("/v1/chat/completions", json={**CHAT, field: value}), (field, value))
        for field in _COMPLETION_FIELDS:
            body = {"model": MODEL, "prompt": "The", "max_tokens": 2, field: value}
            check(http.post("/v1/completions", json=body), (field, value))
    for literal in _RAW_VALUES:
        for field in _CHAT_FIELDS:
            body = json.dumps({**CHAT, field: "@"}).replace('"@"', literal)
            check(_raw(http, "/v1/chat/completions", body), (field, literal))
        for field in _COMPLETION_FIELDS:
            body = json.dumps({"model": MODEL, "prompt": "The", "max_tokens": 2, field: "@"}).replace('"@"', literal)
            check(_raw(http, "/v1/completions", body), (field, literal))


# ---- OpenAI's shapes ----

def test_text_content_parts_join_with_newlines_and_refusal_parts_are_text(client):
    def prompt_tokens(content) -> int:
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": content},
                    {"role": "user", "content": "y"}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage.prompt_tokens

    parts = [{"type": "text", "text": "Paged attention"}, {"type": "text", "text": "stores keys"}]
    assert prompt_tokens(parts) == prompt_tokens("Paged attention\nstores keys")  # vLLM's join
    refusal = [{"type": "refusal", "refusal": "Paged attention"}]  # the SDK's own assistant part
    assert prompt_tokens(refusal) == prompt_tokens("Paged attention")
    with pytest.raises(openai.BadRequestError, match="only text content parts"):
        client.chat.completions.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])


def test_completion_top_logprobs_always_hold_the_sampled_token(client):
    # OpenAI: "the API will always return the logprob of the sampled token, so there may be up to logprobs+1"
    out = client.completions.create(model=MODEL, prompt="The quick", max_tokens=8, logprobs=0, seed=7,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert lp.top_logprobs == [{t: p} for t, p in zip(lp.tokens, lp.token_logprobs)]
    chunks = list(client.completions.create(model=MODEL, prompt="The quick", max_tokens=8, logprobs=1, seed=7,
                                            stream=True, extra_body={"ignore_eos": True}))
    entries = [(t, p, top) for c in chunks if c.choices and c.choices[0].logprobs
               for t, p, top in zip(c.choices[0].logprobs.tokens, c.choices[0].logprobs.token_logprobs,
                                    c.choices[0].logprobs.top_logprobs)]
    assert len(entries) == 8
    for token, logprob, top in entries:
        assert token in top and 1 <= len(top) <= 2
        if "\ufffd" not in token:  # partial characters all read "\ufffd": the format keys them alike
            assert top[token] == logprob


def test_logprob_bytes_are_the_tokens_own_bytes(client, server):
    tok = server.engine.engine.tokenizer
    part = tok.convert_tokens_to_ids("\u00e6")  # byte 0xE6 alone: the first of a 3-byte UTF-8 character
    assert tok.decode([part]) == "\ufffd"
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0, logprobs=True,
                                         logit_bias={str(part): 100})
    for entry in out.choices[0].logprobs.content:
        assert entry.token == "\ufffd" and entry.bytes == [0xE6]  # not the replacement character's [239, 191, 189]
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                           logprobs=True, logit_bias={str(tok.convert_tokens_to_ids("The")): 100})
    assert all(e.bytes == list(e.token.encode()) for e in plain.choices[0].logprobs.content)


def test_models_retrieve(client, http, server):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    assert _error(http.get("/v1/models/org/gpt-9"), 404)["code"] == "model_not_found"
    _error(httpx.get(f"{server.url}/v1/models/{MODEL}"), 401)


def test_logprobs_of_grammar_masked_alternatives_are_json_numbers(http):
    # a forced position leaves fewer allowed tokens than top_logprobs asks for: the rest are -inf, which JSON
    # cannot carry (a 500 before); they are written as -9999.0, as vLLM does
    body = {**CHAT, "max_tokens": 8, "logprobs": True, "top_logprobs": 5, "guided_choice": ["yes", "no"]}
    full = http.post("/v1/chat/completions", json=body)
    assert full.status_code == 200, full.text
    streamed = http.post("/v1/chat/completions", json={**body, "stream": True})
    assert "Infinity" not in streamed.text and "NaN" not in streamed.text
    tops = [t["logprob"] for e in full.json()["choices"][0]["logprobs"]["content"] for t in e["top_logprobs"]]
    assert len(tops) >= 5 and min(tops) == -9999.0


def test_a_grammar_compile_error_names_the_field_it_came_from(http):
    for field, value in [("guided_regex", "(?=a)a"), ("structured_outputs", {"regex": "(?=a)a"})]:
        err = _error(http.post("/v1/chat/completions", json={**CHAT, field: value}), 400)
        assert err["param"] == field and err["code"] == "invalid_grammar"


def test_a_request_is_prepared_once(http, server):
    engine = server.engine.engine
    calls = []
    real = engine.prepare_request
    engine.prepare_request = lambda *a, **kw: calls.append(a) or real(*a, **kw)
    try:
        for stream in (False, True):
            assert http.post("/v1/chat/completions", json={**CHAT, "stream": stream}).status_code == 200
    finally:
        del engine.prepare_request
    assert len(calls) == 2  # admission's only: the engine runs what admission tokenized and checked
