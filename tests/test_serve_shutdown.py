"""`sluice serve`'s shutdown: SIGTERM gives every open stream a final event, then the process exits with 0."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.server import AUTH, MODEL

# gateway.serve.serve, as `sluice serve` runs it, on a model made slow enough (10 ms a step) that a long
# request is still running when SIGTERM comes.
_SERVE_SLOWLY = """
import sys
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from gateway.serve import ServeOptions, serve
from tests.server import KEY, MODEL, slowed

engine = AsyncEngine.from_config(EngineConfig(model=sys.argv[1], num_kv_blocks=256, block_size=4, quantization="none"))
engine.engine.runner.execute = slowed(engine.engine.runner.execute)
serve(engine, MODEL, ServeOptions(port=int(sys.argv[2]), api_key=KEY, log_level="warning"))
"""
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "The quick brown fox"}], "max_tokens": 480,
        "ignore_eos": True, "stream": True}


def _wait_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)


def test_sigterm_ends_open_streams_with_a_final_event_and_exits_cleanly(tiny_llama_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-c", _SERVE_SLOWLY, str(tiny_llama_dir), str(port)],
                            cwd=Path(__file__).resolve().parents[1], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http, \
                http.stream("POST", "/v1/chat/completions", json=BODY) as sse, \
                connect(f"ws://127.0.0.1:{port}/v1/ws", additional_headers=AUTH, proxy=None) as ws:
            lines = sse.iter_lines()
            assert next(lines).startswith("data: ")
            ws.send(json.dumps({"type": "request", "id": 1, "body": BODY}))
            assert json.loads(ws.recv(timeout=30))["type"] == "chunk"
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
            frames = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(json.loads(ws.recv(timeout=30)))
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - sent < 10  # the drain, not uvicorn's graceful-shutdown timeout, ended them
    finally:
        proc.kill()
        proc.wait()
        log.seek(0)
        print(log.read())  # shown if the test fails
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    assert [f["type"] for f in frames[:-1]] == ["chunk"] * (len(frames) - 1)
    assert frames[-1]["type"] == "error" and frames[-1]["id"] == 1
    assert frames[-1]["error"]["code"] == "server_shutdown"
    assert closed.value.rcvd.code == 1001  # going away
