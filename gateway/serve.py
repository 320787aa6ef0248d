"""Run the gateway under uvicorn, with the engine's lifetime tied to the app's lifespan.

Shutdown (SIGTERM, Ctrl-C, or `should_exit`): stop accepting, let the gateway end every open SSE stream and
WebSocket request with a final event (`Gateway.drain`), then let uvicorn close connections and run the
lifespan's exit. Without the drain, uvicorn would wait on open streams until its graceful-shutdown timeout.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from dataclasses import dataclass
from typing import AsyncIterator

import uvicorn
from starlette.applications import Starlette

from engine.async_engine import AsyncEngine
from gateway.app import DEFAULT_MAX_IN_FLIGHT, DRAIN_S, build_app

# The backstop: connections still open this long after shutdown began are cut.
GRACEFUL_SHUTDOWN_S = int(DRAIN_S) + 5


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    log_level: str = "info"
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT


def build_served_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
                     max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, **app_options) -> Starlette:
    """The app, starting the engine on lifespan startup and stopping it on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The engine thread must live exactly as long as the server, and start on the server's loop.
        async with engine:
            yield

    return build_app(engine, model_name, api_key, max_in_flight=max_in_flight, lifespan=lifespan, **app_options)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, draining the gateway's streams before uvicorn closes the connections.

    uvicorn closes WebSockets at once (code 1012) and waits for HTTP responses to finish, which a long
    stream does only at its end; the drain gives both a final event first.
    """

    def __init__(self, config: uvicorn.Config, started_line: str | None = None):
        super().__init__(config)
        self.app = config.app
        self.started_line = started_line

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # exits the process when it cannot listen
        if self.started_line:  # said once listening, so the URL in it works
            logging.getLogger("uvicorn.error").info("%s", self.started_line)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting first, so nothing new starts during the drain
            server.close()
        await self.app.state.gateway.drain()
        await super().shutdown(sockets)


def server_config(app: Starlette, **options) -> uvicorn.Config:
    return uvicorn.Config(app, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, **options)


def serve(engine: AsyncEngine, model_name: str, options: ServeOptions) -> None:
    # The GIL switch interval stays at CPython's 5 ms: 0.5 ms (set here until the engine's OpenMP workers
    # spun, see AsyncEngine.start) now served 229 / 233 tok/s against 266 / 254 (32 streams x 128 tokens).
    app = build_served_app(engine, model_name, options.api_key, options.max_in_flight)
    config = server_config(app, host=options.host, port=options.port, log_level=options.log_level)
    server = GracefulServer(config, started_line(engine, model_name, options))
    with _stop_signals_are_a_normal_exit():
        server.run()


def started_line(engine: AsyncEngine, model_name: str, options: ServeOptions) -> str:
    core = engine.engine
    blocks, block_size = core.block_manager.num_blocks, core.config.block_size
    host = f"[{options.host}]" if ":" in options.host else options.host
    return (f"Serving {model_name} at http://{host}:{options.port} (KV cache: {blocks} blocks = "
            f"{blocks * block_size} tokens, max model len {core.max_model_len})")


def check_can_listen(host: str, port: int) -> None:
    """Fail in a second, before the model loads, when the address is taken, malformed or not this machine's."""
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in [1, 65535], got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
            sock.bind(address)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _stop_signals_are_a_normal_exit():
    """uvicorn re-raises the signal that stopped it once it has shut down, so the process ends the way the
    signal says: death by SIGTERM, or KeyboardInterrupt for Ctrl-C, after a clean shutdown. No-op handlers
    make both a normal exit (status 0), as a server that was asked to stop and did."""
    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's alone
        yield
        return
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
