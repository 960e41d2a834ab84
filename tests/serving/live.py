"""Real servers for the serving tests, on loopback sockets (tritonclient and the browser need them).

- ``live_server``: in this process, uvicorn on a free port in a thread, gRPC beside it;
- ``ServerProcess`` (``bench/server_process.py``, shared with the benchmarks): ``fpt-deploy serve``
  or any launcher in a child process, ready when it answers ``/v2/health/ready``, stopped with SIGTERM.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.server_process import ServerProcess, ServerStartError, free_port  # noqa: E402

__all__ = ["LiveServer", "ServerProcess", "ServerStartError", "free_port", "live_server"]


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
