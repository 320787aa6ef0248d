"""The HTTP gateway on a tiny model: a real uvicorn server on loopback, driven by the openai SDK and raw httpx."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from tests.server import AUTH, KEY, MODEL, Server, idle, slowed

MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=512, block_size=4,
                                                  quantization="none"))
    with Server(engine) as srv:
        yield srv
    assert not engine.is_running  # the lifespan stopped it


def sse_events(text: str) -> list[str]:
    """The data payloads of a raw SSE body, checking the framing: `data: ...` then a blank line, each."""
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        if block.startswith(":"):  # a keep-alive comment
            continue
        lines = block.split("\n")
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        events.append(lines[0].removeprefix("data: "))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events


def test_health_and_models(http, client):
    assert http.get("/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_usage_reports_the_prompt_tokens_the_prefix_cache_served(client):
    messages = [{"role": "user", "content": "A prompt no other test sends, long enough to fill whole KV blocks."}]
    first, second = (client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
                     for _ in range(2))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    # whole 4-token blocks of the first request's prompt; the last prompt token is always computed
    assert cached % 4 == 0 and first.usage.prompt_tokens - 4 <= cached < first.usage.prompt_tokens
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True,
                                                   stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == cached


def test_chat_non_streaming_and_streaming_agree(client, server):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.model == MODEL and full.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    prompt_len = len(server.engine.engine.prepare_request(
        "x", server.engine.engine.tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                                                add_generation_prompt=True),
        _params()).token_ids)
    assert full.usage.prompt_tokens == prompt_len
    assert full.usage.total_tokens == prompt_len + full.usage.completion_tokens
    assert 1 <= full.usage.completion_tokens <= 12

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [choice.finish_reason]
    assert chunks[-1].choices[0].finish_reason is not None


def test_completions_streaming_and_not(client):
    kw = dict(model=MODEL, prompt="Paged attention stores", max_tokens=10, temperature=0, extra_body={
        "ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 10
    chunks = list(client.completions.create(stream=True, **kw))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sampling_options_n_stop_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=2, seed=3, top_p=0.9,
                                         presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"5": 2},
                                         stop=["zzz"], logprobs=True, top_logprobs=2,
                                         extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1,
                                                     "min_tokens": 2})
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == sum(len(c.logprobs.content) for c in out.choices)
    for entry in out.choices[0].logprobs.content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
    text = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=4, logprobs=3, temperature=0,
                                     extra_body={"ignore_eos": True})
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert text.usage.prompt_tokens == 3


def test_raw_sse_framing_and_include_usage(http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"

    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 3, "stream": True}
    r = http.post("/v1/completions", json=body)
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert all(set(c) == {"id", "object", "created", "model", "choices"} for c in chunks)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_errors(http, server):
    chat = {"model": MODEL, "messages": MESSAGES}
    assert _error(http.post("/v1/chat/completions", json={**chat, "temperature": -1}), 400)["param"] == "temperature"
    assert _error(http.post("/v1/chat/completions", json={**chat, "temperature": "hot"}), 400)["param"] == "temperature"
    assert _error(http.post("/v1/chat/completions", json={**chat, "logit_bias": {"x": 1}}), 400)["param"] == "logit_bias"
    assert _error(http.post("/v1/chat/completions", json={**chat, "messages": "hi"}), 400)["param"] == "messages"
    assert _error(http.post("/v1/completions", json={"model": MODEL}), 400)["param"] == "prompt"
    err = _error(http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error"
    _error(http.post("/v1/chat/completions", content=b"[1, 2]"), 400)
    _error(http.post("/v1/chat/completions", content=b"[" * 200_000 + b"]" * 200_000), 400)
    _error(http.post("/v1/chat/completions", content=b"\xff\xfe{}"), 400)
    assert _error(http.post("/v1/chat/completions", json={**chat, "model": "gpt-9"}), 404)["code"] == "model_not_found"
    _error(http.get("/v1/nope"), 404)
    _error(http.get("/v1/chat/completions"), 405)
    _error(httpx.post(f"{server.url}/v1/chat/completions", json=chat), 401)
    _error(httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    _error(http.post("/v1/completions", content=b"x" * (3 << 19)), 413)
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 200
    err = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": long_prompt}), 400)
    assert "context" in err["message"]
    # still serving after all of that
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "The", "max_tokens": 2}).status_code == 200


def _params():
    from engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=1)


def test_client_disconnect_mid_stream_aborts(http, server):
    aborted = []
    real_abort = server.engine.abort

    async def spy(request_id):
        aborted.append(request_id)
        await real_abort(request_id)

    server.engine.abort = spy
    try:
        body = {"model": MODEL, "prompt": "The quick", "max_tokens": 400, "stream": True, "ignore_eos": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        assert idle(server.engine)
        assert len(aborted) == 1

        # Non-streaming: the client gives up waiting; the server notices and aborts.
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 480}, timeout=0.3)
        assert idle(server.engine)
        assert len(aborted) == 2
    finally:
        del server.engine.abort


_FIELDS = ["n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "max_completion_tokens", "stop",
           "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs", "top_logprobs",
           "ignore_eos", "min_tokens", "stream", "stream_options", "messages", "model"]


@pytest.mark.parametrize("value", ["x", -5, 10**30, 10**400, 1.5, [], {}, True, [1, "a"], {"include_usage": 3}])
def test_no_malformed_field_is_a_server_error(http, value):
    for field in _FIELDS:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, field: value}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code in (200, 400, 404), (field, value, r.status_code, r.text)
        if r.status_code != 200:
            _error(r, r.status_code)
    for field in ["prompt", "logprobs", "echo", "max_tokens"]:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "The", "max_tokens": 2, field: value})
        assert r.status_code in (200, 400), (field, value, r.status_code, r.text)


def test_chat_streaming_n2(http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "n": 2, "stream": True, "ignore_eos": True}
    chunks = [json.loads(e) for e in sse_events(http.post("/v1/chat/completions", json=body).text)[:-1]]
    assert [c["index"] for c in chunks[0]["choices"]] == [0, 1]
    finished = [ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"] == "length"]
    assert sorted(finished) == [0, 1]


def test_metrics_count_requests_and_expose_engine_gauges(http):
    def scrape() -> dict[str, float]:
        res = http.get("/metrics")
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in res.text.splitlines() if line and not line.startswith("#")}

    before = scrape()
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    after = scrape()
    key = 'sluice_requests_total{outcome="length"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["sluice_time_to_first_token_seconds_count"] == before.get("sluice_time_to_first_token_seconds_count", 0) + 1
    assert after["sluice_time_per_output_token_seconds_count"] >= 1
    for gauge in ("sluice_requests_running", "sluice_requests_waiting", "sluice_kv_blocks_used",
                  "sluice_kv_blocks_free", "sluice_prefix_cache_hit_rate"):
        assert gauge in after
    assert after["sluice_kv_blocks_used"] + after["sluice_kv_blocks_free"] == 512


def test_requests_over_the_concurrency_limit_get_429(tiny_llama_dir):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=4,
                                                  quantization="none"))
    engine.engine.runner.execute = slowed(engine.engine.runner.execute)  # the first stream stays open
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with Server(engine, max_in_flight=1) as srv, httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # keep it: a dropped iterator closes the stream
            next(lines)
            deadline = time.monotonic() + 10
            while engine.stats().num_running == 0:  # the first request is generating
                assert time.monotonic() < deadline
                time.sleep(0.01)
            res = c.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
            assert res.status_code == 429
            assert res.json()["error"]["code"] == "rate_limit_exceeded"
        assert idle(engine)
        ok = c.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert ok.status_code == 200  # the slot came back when the first stream closed


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"best_of": 3},
])
def test_recognised_but_unsupported_fields_are_refused_not_ignored(http, extra):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **extra}
    res = http.post("/v1/chat/completions", json=body)
    assert res.status_code == 400
    assert res.json()["error"]["code"] == "unsupported_parameter"
    plain = http.post("/v1/chat/completions", json={**body, **{k: None for k in extra}, "response_format": {"type": "text"}})
    assert plain.status_code == 200


def test_static_ui_is_served_at_root_and_the_api_still_wins(server, tmp_path):
    from starlette.testclient import TestClient

    from gateway.app import build_app

    (tmp_path / "index.html").write_text("<!doctype html><title>Sluice</title>")
    (tmp_path / "app.js").write_text("console.log(1)")
    with TestClient(build_app(server.engine, MODEL, KEY, web_dir=tmp_path)) as c:  # no lifespan: engine untouched
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "Sluice" in r.text
        assert c.get("/app.js").text == "console.log(1)"
        assert c.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL
        assert _error(c.get("/v1/chat/completions"), 405)  # not the static files' answer
        assert _error(c.get("/v1/nope"), 404)["code"] == "not_found"
        assert c.get("/nope.css").status_code == 404
    # No index.html (or no folder): no UI, and no error.
    for web_dir in (tmp_path / "empty", None):
        with TestClient(build_app(server.engine, MODEL, KEY, web_dir=web_dir)) as c:
            assert _error(c.get("/"), 404)["code"] == "not_found"

