"""A server in a child process on loopback, for benchmarks and tests: started, ready, stopped.

    with ServerProcess.fpt_deploy(repo, max_batch_size=8, threads=1) as server:   # fpt-deploy serve
        status, body = server.request("GET", "/v2/models/mnist")
    print(server.returncode)                                                     # its exit status

``ServerProcess(name, argv, port)`` runs any ``python ARGV`` that serves KServe v2 on ``port`` (the
baselines of bench/baseline_server.py, a test's own launcher). The process starts when the object is
made; ``wait_ready`` returns once ``GET /v2/health/ready`` answers 200, and raises ``ServerStartError``
with the end of the server's log when the process exits or the time runs out first. ``stop`` sends
SIGTERM (the server finishes in-flight requests), waits, kills only after ``stop_timeout`` and
returns the exit status. Standard library only (psutil for ``rss_mb``): the serving tests import it.
"""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
READY_PATH = "/v2/health/ready"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def serve_options(**options) -> list[str]:
    """``fpt-deploy serve`` options from ``ServeConfig`` field names: ``max_batch_size=8`` -> ``--max-batch-size 8``.

    A list repeats the option (``load_model=["a", "b"]``); ``True`` is a bare flag; ``None`` and
    ``False`` are left out.
    """
    args = []
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
            continue
        for one in value if isinstance(value, list | tuple) else [value]:
            args += [flag, str(one)]
    return args


class ServerStartError(RuntimeError):
    """The server process exited, or did not answer ready in time; the message holds its log's end."""


class ServerProcess:
    """``python ARGV`` serving on ``HOST:port`` in a child process (see the module docstring)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        *,
        grpc_port: int | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 300.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.name, self.port, self.grpc_port = name, port, grpc_port
        self.ready_timeout, self.stop_timeout = ready_timeout, stop_timeout
        self._own_log = log_path is None  # a temporary log, removed on stop
        if log_path is None:
            fd, tmp = tempfile.mkstemp(prefix="fpt-server-", suffix=".log")
            log_path = Path(tmp)
            self._log = open(fd, "w")  # noqa: SIM115  (closed in stop)
        else:
            self._log = open(log_path, "w")  # noqa: SIM115  (closed in stop)
        self.log_path = Path(log_path)
        self.returncode: int | None = None
        self.proc = subprocess.Popen([sys.executable, *argv], stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    @classmethod
    def fpt_deploy(
        cls,
        repo: str | Path,
        *,
        name: str = "fpt-deploy",
        quiet: bool = False,
        log_path: Path | None = None,
        ready_timeout: float = 300.0,
        stop_timeout: float = 30.0,
        wait: bool = True,
        **options,
    ) -> ServerProcess:
        """``fpt-deploy serve --repo REPO`` with ``options`` (``serve_options``) on a free port unless given.

        Ready on return, unless ``wait=False`` (start several, then ``wait_ready`` each).
        """
        options.setdefault("port", free_port())
        head = ["-m", "fpt_deploy.cli", *(["-q"] if quiet else []), "serve"]
        argv = [*head, *serve_options(repo=str(repo), **options)]
        server = cls(
            name,
            argv,
            options["port"],
            grpc_port=options.get("grpc_port"),
            log_path=log_path,
            ready_timeout=ready_timeout,
            stop_timeout=stop_timeout,
        )
        return server.wait_ready() if wait else server

    @property
    def address(self) -> str:
        """``host:port`` of HTTP, as tritonclient takes it."""
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def grpc_address(self) -> str | None:
        return None if self.grpc_port is None else f"{HOST}:{self.grpc_port}"

    def wait_ready(self) -> ServerProcess:
        """Return once the server answers ready; stop it and raise ``ServerStartError`` if it never does."""
        deadline = time.monotonic() + self.ready_timeout
        while not self.ready():
            exited, late = self.proc.poll() is not None, time.monotonic() > deadline
            if exited or late:
                tail = self.log_tail()  # before stop, which removes a temporary log
                why = f"exited with {self.proc.returncode}" if exited else f"not ready in {self.ready_timeout:.0f} s"
                self.stop()
                raise ServerStartError(f"{self.name} {why}; the end of its log:\n{tail}")
            time.sleep(0.05)
        return self

    def ready(self) -> bool:
        try:
            return self.request("GET", READY_PATH, timeout=2.0)[0] == 200
        except OSError:
            return False

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30.0
    ) -> tuple[int, bytes]:
        """One HTTP request on a fresh connection: (status, body)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def metric(self, name: str) -> float:
        """The sum of the ``/metrics`` samples of series ``name``, all labels, or those starting as ``name``
        does when it holds some (``'fpt_inference_failures_total{code="500"'``)."""
        status, body = self.request("GET", "/metrics")
        if status != 200:
            raise RuntimeError(f"{self.name}: GET /metrics answered {status}")
        ends = ("",) if "{" in name else (" ", "{")
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.decode().splitlines()
            if any(line.startswith(name + end) for end in ends)
        )

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def log(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """The exit status, once the process has ended (``subprocess.TimeoutExpired`` after ``timeout``)."""
        self.returncode = self.proc.wait(timeout)
        return self.returncode

    def stop(self) -> int:
        """SIGTERM, wait up to ``stop_timeout`` (then SIGKILL); the exit status. Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.returncode = self.proc.returncode
        if not self._log.closed:
            self._log.close()
            if self._own_log:
                self.log_path.unlink(missing_ok=True)
        return self.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
