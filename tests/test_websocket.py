"""The WebSocket API (/v1/ws) on a tiny model: a real uvicorn server on loopback, driven by `websockets`."""
from __future__ import annotations

import json
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from tests.server import AUTH, KEY, MODEL, Server, idle, slowed

MESSAGES = [{"role": "user", "content": "The quick brown fox"}]
BODY = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "ignore_eos": True}


def _engine(tiny_llama_dir, blocks: int = 512) -> AsyncEngine:
    return AsyncEngine.from_config(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=blocks, block_size=4,
                                                quantization="none"))


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with Server(_engine(tiny_llama_dir)) as srv:
        yield srv


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Each engine step takes 10 ms more, so a long request is surely still running when the test acts."""
    runner = server.engine.engine.runner
    monkeypatch.setattr(runner, "execute", slowed(runner.execute))


@pytest.fixture
def aborted(server, monkeypatch) -> list[str]:
    """The request ids the gateway aborts in the engine."""
    ids: list[str] = []
    real_abort = server.engine.abort

    async def spy(request_id):
        ids.append(request_id)
        await real_abort(request_id)

    monkeypatch.setattr(server.engine, "abort", spy)
    return ids


def open_ws(server: Server, headers: dict | None = AUTH, query: str = "") -> ClientConnection:
    return connect(server.ws_url + query, additional_headers=headers, proxy=None, open_timeout=10)


def recv(ws: ClientConnection) -> dict:
    return json.loads(ws.recv(timeout=30))


def request(ws: ClientConnection, rid, **body) -> None:
    ws.send(json.dumps({"type": "request", "id": rid, "body": {**BODY, **body}}))


def run_to_end(ws: ClientConnection, ids) -> dict:
    """The frames received, by id, until each of `ids` has had its terminal frame (`done`, or `error`)."""
    frames: dict = {rid: [] for rid in ids}
    ended: set = set()
    while not ended.issuperset(ids):
        frame = recv(ws)
        assert frame["id"] not in ended, frame  # nothing comes after a request's terminal frame
        frames.setdefault(frame["id"], []).append(frame)
        if frame["type"] in ("done", "error"):
            ended.add(frame["id"])
    return frames


def prompt_tokens(server: Server) -> int:
    return len(server.engine.engine.prepare_request("x", server.engine.engine.tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True), _params()).token_ids)


def _params():
    from engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=1)


def test_two_requests_at_once_on_one_socket(server):
    with open_ws(server) as ws:
        request(ws, "a", max_tokens=8)
        request(ws, 7, max_tokens=12, stream_options={"include_usage": True})
        frames = run_to_end(ws, ["a", 7])
    for rid, max_tokens in (("a", 8), (7, 12)):
        *chunks, done = frames[rid]
        assert all(f["type"] == "chunk" for f in chunks) and len(chunks) >= 2
        usage = done.pop("usage")
        assert done == {"type": "done", "id": rid, "finish_reason": "length"}
        # the two share their prompt: the prefix cache may serve one from the other, never the whole prompt
        assert usage.pop("prompt_tokens_details")["cached_tokens"] in range(prompt_tokens(server))
        assert usage == {"prompt_tokens": prompt_tokens(server), "completion_tokens": max_tokens,
                         "total_tokens": prompt_tokens(server) + max_tokens}
        objs = [f["chunk"] for f in chunks]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == objs[0]["id"] for c in objs)
        assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["choices"][0]["finish_reason"] for c in objs if c["choices"]][-1] == "length"
    # include_usage asks for SSE's usage chunk, and WebSocket passes every SSE chunk on
    assert frames[7][-2]["chunk"]["usage"]["completion_tokens"] == 12
    assert "usage" not in frames["a"][-2]["chunk"]
    assert idle(server.engine)


def test_chunks_are_the_ones_sse_sends(server):
    body = {**BODY, "max_tokens": 10, "logprobs": True, "top_logprobs": 2}
    with open_ws(server) as ws:
        request(ws, "x", **body)
        ws_chunks = [f["chunk"] for f in run_to_end(ws, ["x"])["x"][:-1]]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        text = http.post("/v1/chat/completions", json={**body, "stream": True}).text
    sse_chunks = [json.loads(line.removeprefix("data: ")) for line in text.split("\n")
                  if line.startswith("data: {")]
    strip = lambda c: {k: v for k, v in c.items() if k not in ("id", "created")}  # noqa: E731
    assert [strip(c) for c in ws_chunks] == [strip(c) for c in sse_chunks]


def test_cancel_mid_stream(server, slow_steps, aborted):
    with open_ws(server) as ws:
        request(ws, "long", max_tokens=400)
        while not recv(ws)["chunk"]["choices"][0]["delta"].get("content"):  # until tokens flow
            pass
        ws.send(json.dumps({"type": "cancel", "id": "long"}))
        rest = run_to_end(ws, ["long"])["long"]
        done = rest[-1]
        assert done["type"] == "done" and done["finish_reason"] == "cancelled"
        assert 0 < done["usage"]["completion_tokens"] < 400
        # The abort was awaited before `done` was sent: the blocks are already free.
        assert len(aborted) == 1 and server.engine.engine.block_manager.num_used_blocks == 0
        # Cancelling what has ended is a no-op, and the socket still serves.
        ws.send(json.dumps({"type": "cancel", "id": "long"}))
        request(ws, "next", max_tokens=3)
        assert run_to_end(ws, ["next"])["next"][-1]["finish_reason"] == "length"
    assert idle(server.engine)


def _frame_error(ws: ClientConnection, status: int = 400) -> dict:
    frame = recv(ws)
    assert frame["type"] == "error" and frame["status"] == status, frame
    assert set(frame["error"]) == {"message", "type", "param", "code"} and frame["error"]["message"]
    return frame


def test_malformed_frames_get_errors_and_the_socket_stays_open(server):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 200
    with open_ws(server) as ws:
        for raw in ["{not json", "[1, 2]", json.dumps({"type": "bogus", "id": "x"}),
                    json.dumps({"type": "request", "body": BODY}), json.dumps({"type": "request", "id": True}),
                    json.dumps({"type": "request", "id": 1.5, "body": BODY})]:
            ws.send(raw)
            frame = _frame_error(ws)
            assert frame["id"] is None and frame["error"]["code"] == "invalid_frame", (raw, frame)
        ws.send(b"\x00binary")
        assert _frame_error(ws)["id"] is None
        ws.send("x" * (1 << 20 | 1))
        assert _frame_error(ws, 413)["error"]["code"] == "body_too_large"

        # Bad bodies: what HTTP would answer, with the request's id.
        cases = [({"messages": "hi"}, 400, "messages", "invalid_type"), ({"temperature": -1}, 400, "temperature", None),
                 ({"model": "gpt-9"}, 404, "model", "model_not_found"),
                 ({"messages": [{"role": "user", "content": long_prompt}]}, 400, "messages",
                  "context_length_exceeded"),
                 ({"guided_regex": "(unclosed"}, 400, "guided_regex", "invalid_grammar"),
                 ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported_parameter")]
        for i, (change, status, param, code) in enumerate(cases):
            request(ws, i, **change)
            frame = _frame_error(ws, status)
            assert frame["id"] == i and frame["error"]["param"] == param and frame["error"]["code"] == code
        ws.send(json.dumps({"type": "request", "id": "nobody", "body": "hi"}))
        assert _frame_error(ws)["id"] == "nobody"

        # An id already in flight: refused without touching the request that has it.
        request(ws, "dup", max_tokens=6)
        request(ws, "dup", max_tokens=6)
        frames = run_to_end(ws, [None, "dup"])
        assert frames[None][0]["error"]["code"] == "duplicate_id"
        assert frames["dup"][-1]["type"] == "done" and frames["dup"][-1]["usage"]["completion_tokens"] == 6

        request(ws, "ok", max_tokens=2)
        assert run_to_end(ws, ["ok"])["ok"][-1]["type"] == "done"
    assert idle(server.engine)


def _refused(ws: ClientConnection) -> None:
    frame = _frame_error(ws, 401)
    assert frame["id"] is None and frame["error"]["code"] == "invalid_api_key"
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1008


def test_api_key(server):
    for headers, query in [(None, ""), ({"Authorization": "Bearer wrong"}, ""), (None, "?api_key=wrong")]:
        with open_ws(server, headers=headers, query=query) as ws:
            _refused(ws)
    for headers, query in [(AUTH, ""), (None, f"?api_key={KEY}")]:
        with open_ws(server, headers=headers, query=query) as ws:
            request(ws, 1, max_tokens=2)
            assert run_to_end(ws, [1])[1][-1]["type"] == "done"


@pytest.mark.parametrize("how", ["close", "drop"])
def test_client_going_away_aborts_everything_it_had_in_flight(server, slow_steps, aborted, how):
    with open_ws(server) as ws:
        request(ws, "a", max_tokens=400)
        request(ws, "b", max_tokens=400)
        started: set = set()
        while started != {"a", "b"}:
            frame = recv(ws)
            assert frame["type"] == "chunk"
            started.add(frame["id"])
        # the role chunk goes out before the engine schedules a request: wait for the blocks
        deadline = time.monotonic() + 10
        while server.engine.engine.block_manager.num_used_blocks == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.engine.engine.block_manager.num_used_blocks > 0
        if how == "close":
            ws.close()
        else:  # no close handshake: the TCP connection just ends
            ws.socket.close()
        assert idle(server.engine, timeout=5)
        assert len(aborted) == 2


def test_in_flight_limit(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, blocks=128)
    engine.engine.runner.execute = slowed(engine.engine.runner.execute)  # the first request stays running
    with Server(engine, max_in_flight=1) as srv, open_ws(srv) as ws:
        request(ws, "first", max_tokens=200)
        assert recv(ws)["id"] == "first"
        request(ws, "second", max_tokens=2)
        frames = run_to_end(ws, ["second"])
        assert frames["second"][-1]["status"] == 429
        assert frames["second"][-1]["error"]["code"] == "rate_limit_exceeded"
        ws.send(json.dumps({"type": "cancel", "id": "first"}))
        assert run_to_end(ws, ["first"])["first"][-1]["finish_reason"] == "cancelled"
        request(ws, "third", max_tokens=2)  # the slot came back
        assert run_to_end(ws, ["third"])["third"][-1]["type"] == "done"
        assert idle(engine)
