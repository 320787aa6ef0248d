"""vLLM's /tokenize and /detokenize: the ids are exactly what generation feeds the model."""
from __future__ import annotations

import httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from tests.server import AUTH, MODEL, Server

TEXT = "The quick brown fox jumps over the lazy dog"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXT}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=128, block_size=4,
                                                  quantization="none"))
    with Server(engine) as srv:
        yield srv


def _ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def test_a_prompt_tokenizes_as_completions_counts_it(http, server):
    got = _ok(http.post("/tokenize", json={"model": MODEL, "prompt": TEXT}))
    usage = _ok(http.post("/v1/completions", json={"model": MODEL, "prompt": TEXT, "max_tokens": 1}))["usage"]
    assert got["count"] == len(got["tokens"]) == usage["prompt_tokens"]
    assert got["tokens"] == server.engine.engine.prepare_request("x", TEXT, SamplingParams(max_tokens=1)).token_ids
    assert got["max_model_len"] == _ok(http.get(f"/v1/models/{MODEL}"))["max_model_len"]
    assert got["token_strs"] is None


def test_messages_tokenize_as_chat_renders_them(http):
    got = _ok(http.post("/tokenize", json={"messages": MESSAGES}))
    usage = _ok(http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1}))["usage"]
    assert got["count"] == usage["prompt_tokens"]
    without = _ok(http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}))
    assert without["count"] < got["count"] and got["tokens"][:without["count"]] == without["tokens"]


def test_detokenize_reads_tokenize_back(http):
    got = _ok(http.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False, "return_token_strs": True}))
    assert "".join(got["token_strs"]) == TEXT and len(got["token_strs"]) == got["count"]
    assert _ok(http.post("/detokenize", json={"model": MODEL, "tokens": got["tokens"]})) == {"prompt": TEXT}


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"content": "no role"}]}, "messages[0]"),
    ("/tokenize", {"prompt": TEXT, "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"prompt": TEXT, "return_token_strs": 1}, "return_token_strs"),
    ("/detokenize", {"tokens": [1, 10 ** 9]}, "tokens"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
])
def test_bad_bodies_are_a_400_naming_the_field(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_the_api_key_and_the_model_name_are_checked(server):
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": TEXT}).status_code == 401
    r = httpx.post(f"{server.url}/detokenize", json={"model": "other", "tokens": [1]}, headers=AUTH)
    assert r.status_code == 404
