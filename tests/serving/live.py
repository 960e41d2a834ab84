"""A real server in this process: uvicorn on a free port in a thread, gRPC beside it (for tritonclient
and the browser, which need sockets rather than FastAPI's TestClient)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    state: object
    http_url: str  # host:port, as tritonclient takes it
    grpc_url: str


@contextmanager
def live_server(config, timeout: float = 30.0):
    """Serve ``config`` (a ``ServeConfig``) over HTTP and gRPC until the block ends, then drain and stop."""
    import uvicorn
    from fpt_deploy.serving.server import ServerState, create_app, start_grpc_of

    state = ServerState.load(config)
    grpc, grpc_port = start_grpc_of(state, port=0)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:  # uvicorn sets it once the socket listens
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(state, f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}")
    finally:
        grpc.stop(0)
        server.should_exit = True
        thread.join(timeout)
