"""The serving path under load, on a tiny model: many SSE streams, non-streamed requests, completions batches and
WebSocket sockets at once, with clients leaving at random moments, bad requests, the in-flight limit, a failing
engine and a shutdown in the middle. Afterwards nothing may be left behind: no KV block or engine request, no
in-flight slot or open socket, no logged error or unraisable warning, and the server still answers."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import re
import time
import warnings

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from gateway.app import DRAIN_S
from tests.server import AUTH, KEY, MODEL, Server, idle, slowed

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "The quick brown fox"}], "ignore_eos": True}
BATCH = {"model": MODEL, "prompt": ["The quick", "Paged attention"], "ignore_eos": True}
SSE_END = b"data: [DONE]\n\n\r\n0\r\n\r\n"  # the last event, then the end of the chunked body
_FINISH = re.compile(rb'"finish_reason":"')


def _engine(tiny_llama_dir, max_num_seqs: int = 8) -> AsyncEngine:
    # Few KV blocks and few sequences at once: requests wait for admission and get preempted under load.
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=160, block_size=4,
                                                  max_num_seqs=max_num_seqs, quantization="none"))
    engine.engine.runner.execute = slowed(engine.engine.runner.execute, 0.002)
    return engine


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with Server(_engine(tiny_llama_dir), max_in_flight=48) as srv:
        yield srv


@contextlib.contextmanager
def _quiet(caplog, expected: set[str]):
    """Fail on an ERROR log (but from the `expected` loggers), a RuntimeWarning (a coroutine never awaited), an
    unclosed resource or an unraisable exception (a task's exception never retrieved) while the block runs."""
    caplog.set_level(logging.WARNING)
    uvicorn_log = logging.getLogger("uvicorn")  # it does not propagate to the root logger, where caplog listens
    uvicorn_log.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
            gc.collect()
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    bad = (RuntimeWarning, ResourceWarning, pytest.PytestUnraisableExceptionWarning)
    problems = [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, bad)]
    assert not problems + [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
                           and r.name not in expected]


@pytest.fixture
def clean(server, caplog):
    """After the test nothing is left behind and the server still serves; nothing went wrong quietly meanwhile.
    A test adds the loggers whose errors it expects to the set this yields."""
    expected: set[str] = set()
    with _quiet(caplog, expected):
        yield expected
        _check_left_nothing(server)


def _check_left_nothing(server: Server) -> None:
    gw, engine = server.server.config.app.state.gateway, server.engine
    # Handlers finish a moment after their clients leave, and an abort they queued is carried out by the
    # engine's next round: wait for both, then nothing may remain.
    deadline = time.monotonic() + 10
    while gw.in_flight or gw.open_sockets or engine._streams:
        assert time.monotonic() < deadline, f"{gw.in_flight} in flight, {gw.open_sockets} sockets, " \
                                            f"streams {list(engine._streams)}"
        time.sleep(0.01)
    assert idle(engine), engine.stats()
    # a peek at the engine's own records, fine once it is idle: no request is remembered
    assert not engine.engine.outputs.parents and not engine.engine.scheduler.requests
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        metrics = http.get("/metrics").text
        for gauge in ("requests_running", "requests_waiting", "requests_in_flight", "kv_blocks_used",
                      "websockets_open"):
            assert re.search(rf"^sluice_{gauge} 0\.0$", metrics, re.M), gauge
        r = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def _port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def _send(port: int, body: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload, path = json.dumps(body).encode(), "/v1/chat/completions" if "messages" in body else "/v1/completions"
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    return reader, writer


async def _http(port: int, body: dict, leave: str = "end", k: int = 0, wait: float = 30) -> bytes:
    """One raw HTTP/1.1 call; `leave`: "before" the first byte, "mid" after k SSE events, "finish" right after the
    first finish_reason, "timeout" after `wait` seconds (a non-streaming client that gives up), "end" at EOF.
    With an odd k the client leaves without a FIN: the TCP connection just ends."""
    reader, writer = await _send(port, body)
    data = b""
    deadline = time.monotonic() + (wait if leave == "timeout" else 30)
    try:
        while leave != "before" and not (leave == "mid" and data.count(b"data: ") >= k
                                         or leave == "finish" and _FINISH.search(data)):
            try:
                chunk = await asyncio.wait_for(reader.read(65536), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                assert leave == "timeout", data
                break
            if not chunk:
                break
            data += chunk
    finally:
        writer.transport.abort() if k % 2 else writer.close()
    return data


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


async def _sse_call(port: int, rng: random.Random) -> None:
    leave = rng.choice(["before", "mid", "finish", "end", "end"])
    body = {**rng.choice([CHAT, CHAT, BATCH]), "n": rng.choice([1, 1, 2]), "stream": True,
            "max_tokens": rng.randint(4, 40), "stream_options": {"include_usage": rng.random() < 0.5}}
    data = await _http(port, body, leave, rng.randint(1, 12))
    if leave == "end":
        assert _status(data) in (200, 429), data[:300]
        if _status(data) == 200:
            assert data.endswith(SSE_END) and b'"finish_reason":"length"' in data, data[-300:]


async def _full_call(port: int, rng: random.Random) -> None:
    body = {**rng.choice([CHAT, BATCH]), "max_tokens": rng.randint(4, 40)}
    data = await _http(port, body, rng.choice(["timeout", "end"]), rng.randint(0, 3), wait=rng.uniform(0.01, 0.3))
    assert not data or _status(data) in (200, 429), data[:300]


async def _bad_call(port: int, rng: random.Random) -> None:
    bad_schema = {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}
    body = rng.choice([{**CHAT, "messages": "hi"},
                       {**CHAT, "response_format": {"type": "json_schema", "json_schema": bad_schema}},
                       {"model": MODEL, "prompt": [5] * 600, "stream": rng.random() < 0.5},  # past the context
                       {"model": MODEL, "prompt": ["fine", [5] * 600], "stream": True}])
    data = await _http(port, body)
    assert _status(data) in (400, 429), data[:300]


async def _ws_socket(url: str, rng: random.Random) -> None:
    """A socket with several requests, some cancelled (some as they finish), dropped or closed at a random moment."""
    drop_after = rng.choice([None, rng.randint(1, 30)])
    async with ws_connect(url, additional_headers=AUTH, proxy=None) as ws:
        ids = list(range(rng.randint(2, 5)))
        for rid in ids:
            body = {**CHAT, "max_tokens": rng.randint(2, 30)}
            await ws.send(json.dumps({"type": "request", "id": rid, "body": body}))
            if rng.random() < 0.3:
                await ws.send(json.dumps({"type": "cancel", "id": rid}))
        ended: dict = {}
        frames = 0
        while len(ended) < len(ids):
            if drop_after is not None and frames >= drop_after:  # odd: no close handshake
                return ws.transport.abort() if drop_after % 2 else await ws.close()
            frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
            frames += 1
            assert frame["id"] not in ended, frame  # exactly one terminal frame per request
            if frame["type"] == "chunk" and rng.random() < 0.05:
                await ws.send(json.dumps({"type": "cancel", "id": frame["id"]}))
            elif frame["type"] in ("done", "error"):
                ended[frame["id"]] = frame
                await ws.send(json.dumps({"type": "cancel", "id": frame["id"]}))  # just finished: a no-op
        assert all(f["type"] == "done" or f["status"] == 429 for f in ended.values()), ended


async def _ws_ends(ws, n: int) -> list[dict]:
    """Frames until n terminal ones; the terminal ones."""
    ends: list[dict] = []
    while len(ends) < n:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
        ends += [frame] if frame["type"] != "chunk" else []
    return ends


def test_a_storm_of_clients_leaving_at_random_leaves_nothing_behind(server, clean):
    rng, port = random.Random(5), _port(server)

    async def storm():
        calls = [_sse_call] * 64 + [_full_call] * 12 + [_bad_call] * 8
        jobs = [f(port, random.Random(rng.random())) for f in calls]
        jobs += [_ws_socket(server.ws_url, random.Random(rng.random())) for _ in range(10)]
        rng.shuffle(jobs)
        await asyncio.gather(*jobs)

    for _ in range(3):
        asyncio.run(storm())


def test_a_burst_cannot_pass_the_in_flight_limit(server, clean, monkeypatch):
    monkeypatch.setattr(server.server.config.app.state.gateway, "max_in_flight", 4)
    port = _port(server)

    async def main():
        answered = asyncio.Event()
        statuses: list[tuple[int, int]] = []  # (status, prompts)

        async def one(body: dict) -> None:
            reader, writer = await _send(port, {**body, "max_tokens": 480, "stream": True})
            statuses.append((_status(await reader.readuntil(b"\r\n")), len(body.get("prompt", [1]))))
            if len(statuses) == 14:
                answered.set()
            await answered.wait()  # every stream admitted stays open until all are answered
            writer.transport.abort()

        await asyncio.gather(*(one(BATCH if i % 7 == 0 else CHAT) for i in range(14)))
        return statuses

    statuses = asyncio.run(main())
    # 4 slots: 4 streams, or a batch of 2 prompts and 2 streams, and so on; everything else is refused
    assert sum(prompts for status, prompts in statuses if status == 200) == 4, statuses
    assert all(status in (200, 429) for status, _ in statuses), statuses


def _send_together(ws, *frames: dict) -> None:
    """Frames in one TCP write, so that the server reads them in one go."""
    with ws.protocol_mutex:
        for frame in frames:
            ws.protocol.send_text(json.dumps(frame).encode())
        ws.socket.sendall(b"".join(ws.protocol.data_to_send()))


def test_a_cancel_right_behind_its_request_ends_it_once(server, clean):
    with connect(server.ws_url, additional_headers=AUTH, proxy=None) as ws:
        for _ in range(2):  # the second round reuses the ids: none may be left "in flight"
            for rid in range(4):
                _send_together(ws, {"type": "request", "id": rid, "body": {**CHAT, "max_tokens": 50}},
                               {"type": "cancel", "id": rid})
            ends: dict = {}
            while len(ends) < 4:
                frame = json.loads(ws.recv(timeout=10))
                assert frame["id"] not in ends and frame["id"] is not None, frame
                if frame["type"] != "chunk":
                    ends[frame["id"]] = frame
            assert all(f["type"] == "done" and f["finish_reason"] == "cancelled" for f in ends.values()), ends


def test_shutdown_gives_every_client_its_final_event_within_the_drain(tiny_llama_dir, caplog):
    engine = _engine(tiny_llama_dir, max_num_seqs=32)
    long = {"max_tokens": 400, "ignore_eos": True}

    async def socket(url: str) -> tuple[list[dict], int | None]:
        async with ws_connect(url, additional_headers=AUTH, proxy=None) as ws:
            for rid in range(3):
                await ws.send(json.dumps({"type": "request", "id": rid, "body": {**CHAT, **long}}))
            ends = await _ws_ends(ws, 3)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 30)
        return ends, ws.close_code

    async def main(srv: Server) -> tuple[list, float]:
        port, gw = _port(srv), srv.server.config.app.state.gateway
        bodies = [{**CHAT, "stream": True, **long}] * 6 + [{**BATCH, "stream": True, **long}] * 2
        calls = [_http(port, body) for body in bodies + [{**CHAT, **long}] * 2]
        tasks = [asyncio.ensure_future(c) for c in calls + [socket(srv.ws_url) for _ in range(2)]]
        while gw.in_flight < 18 or engine.stats().num_running < 18:  # every request is being decoded
            await asyncio.sleep(0.01)
        srv.server.should_exit = True  # what uvicorn's SIGTERM handler does
        start = time.monotonic()
        results = await asyncio.gather(*tasks)
        await asyncio.to_thread(srv.thread.join, 30)
        return results, time.monotonic() - start

    with _quiet(caplog, set()), Server(engine) as srv:
        results, took = asyncio.run(main(srv))
        assert not srv.thread.is_alive() and not engine.is_running
    assert took < DRAIN_S, took
    for data in results[:8]:  # SSE: each prompt's last chunk says "abort", then [DONE]
        assert _status(data) == 200 and data.endswith(SSE_END), data[-300:]
        assert data.count(b'"finish_reason":"abort"') == (2 if b"text_completion" in data else 1), data[-300:]
    for data in results[8:10]:  # not streamed: a 503 that says why
        assert _status(data) == 503 and b'"code":"server_shutdown"' in data, data
    for ends, code in results[10:]:
        assert sorted(f["id"] for f in ends) == [0, 1, 2] and code == 1001, (ends, code)
        assert all(f["type"] == "error" and f["error"]["code"] == "server_shutdown" for f in ends), ends


def test_a_failing_engine_step_fails_every_client_and_serving_goes_on(server, clean, monkeypatch):
    monkeypatch.setattr(server.engine.engine, "step", lambda: 1 / 0)
    clean.add("sluice.async_engine")  # the step's failure is logged, as it should be
    port = _port(server)

    async def socket() -> list[dict]:
        async with ws_connect(server.ws_url, additional_headers=AUTH, proxy=None) as ws:
            for rid in range(3):
                await ws.send(json.dumps({"type": "request", "id": rid, "body": {**CHAT, "max_tokens": 20}}))
            return await _ws_ends(ws, 3)

    async def main():
        bodies = [{**CHAT, "stream": True}] * 4 + [{**BATCH, "stream": True}] * 2 + [CHAT] * 2
        return await asyncio.gather(*(_http(port, {**body, "max_tokens": 20}) for body in bodies), socket())

    *answers, frames = asyncio.run(main())
    for data in answers[:6]:  # SSE: the error as an event, then [DONE]
        assert data.endswith(SSE_END) and b"ZeroDivisionError" in data, data[-300:]
    for data in answers[6:]:
        assert _status(data) == 500 and b'"type":"server_error"' in data, data
    assert all(f["type"] == "error" and f["status"] == 500 for f in frames), frames
    monkeypatch.undo()  # the engine works again: `clean` checks the server answers normally
