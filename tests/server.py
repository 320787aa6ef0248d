"""A real gateway server on loopback for the gateway tests: uvicorn in a thread, the engine in the lifespan."""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable

from engine.async_engine import AsyncEngine
from gateway.serve import GracefulServer, build_served_app, server_config

MODEL, KEY = "tiny-llama", "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Server:
    def __init__(self, engine: AsyncEngine, **app_options):
        self.engine = engine
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.ws_url = self.url.replace("http://", "ws://") + "/v1/ws"
        config = server_config(build_served_app(engine, MODEL, KEY, **app_options), log_level="warning",
                               lifespan="on")
        self.server = GracefulServer(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def idle(engine: AsyncEngine, timeout: float = 10) -> bool:
    """Wait until the engine has nothing running or waiting and no KV block in use."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if engine.engine.block_manager.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0:
            return True
        time.sleep(0.02)
    return False


def slowed(execute: Callable, seconds: float = 0.01) -> Callable:
    """A model runner's `execute` that takes `seconds` more a step: long requests stay open while a test acts."""

    def slow_execute(out):
        time.sleep(seconds)
        return execute(out)

    return slow_execute
