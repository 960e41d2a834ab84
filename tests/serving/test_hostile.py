"""Hostile input: every request a client can get wrong, answered with its 4xx, never a 500 or a stall.

The cases of issue 15 ("Found") at small scale: limits are set small (a 2 KiB header limit, 0.5 s read
timeouts, a 4-row batch) so each case takes milliseconds instead of the 60 MB originals. Cases that need
real sockets (stalled uploads, slow headers, disconnects, SIGTERM, RSS) run against a real server
process on the synthetic repository; the rest also run in-process. After each case the server must
still answer a good request exactly as before, must not have logged a traceback, and its RSS must stay
within ``RSS_BOUND`` of what it was after start-up.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fpt_deploy.serving.errors import InvalidInputError, MalformedRequestError
from fpt_deploy.serving.protocol import DeclaredTensor, InputContract, JsonLimits, decode_request, validate_inputs

from tests.serving.live import ServerProcess, free_port

RSS_BOUND = 40 << 20
LIMITS = {
    "max_batch_size": 4,
    "max_queue_delay_ms": 1.0,
    "threads": 1,
    "max_header_bytes": 2048,
    "max_body_bytes": 1 << 20,
    "max_buffered_bytes": 48_000,
    "header_timeout_s": 0.5,
    "body_timeout_s": 0.5,
    "keep_alive_timeout_s": 1.0,
    "graceful_timeout_s": 5.0,
    "json_max_depth": 16,
    "max_queue_rows": 8,
}
VEC = "/v2/models/vec/infer"  # FP32 [-1, 4, 3]; its largest valid body is about 20 KB (4 rows)
TOK = "/v2/models/tok/infer"  # INT64 token ids [-1, 6], vocabulary 7
LAUNCH = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
import fpt_deploy.serving.server as server
from fpt_deploy.serving import ServeConfig, serve
server.INLINE_DECODE_BYTES = 256  # the small bodies of these tests decode in the pool, as large ones do
serve(ServeConfig(**json.loads(sys.argv[1])))
"""


def tensor_json(name="input", datatype="FP32", shape=(1, 4, 3), data=None, **extra) -> bytes:
    data = np.linspace(-1, 1, int(np.prod(shape))).tolist() if data is None else data
    return json.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": data}], **extra}
    ).encode()


GOOD = tensor_json()


class Server(ServerProcess):
    """A real ``serve`` process on the synthetic repository with ``LIMITS`` (``LAUNCH``), ready."""

    def __init__(self, repo: Path, log_path: Path, **overrides) -> None:
        port = free_port()
        config = {**LIMITS, **overrides, "repo": str(repo), "port": port}
        super().__init__("hostile", ["-c", LAUNCH, json.dumps(config)], port, log_path=log_path, ready_timeout=60.0)
        self.wait_ready()

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[int | None, bytes, bool]:
    """Send ``data`` on a fresh connection and read until the server closes it.

    (status or None, response bytes, closed by the server): the server must close within ``timeout``.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if data:
            s.sendall(data)
        chunks, closed = [], False
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                chunks.append(chunk)
        except TimeoutError:
            pass
    answer = b"".join(chunks)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return status, answer, closed


def post_head(path: str, length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{size}{extra}\r\n".encode()


@pytest.fixture(scope="module")
def server(synthetic_repo, tmp_path_factory):
    srv = Server(synthetic_repo, tmp_path_factory.mktemp("hostile") / "server.log")
    status, answer = srv.request("POST", VEC, GOOD)
    assert status == 200, answer
    srv.reference = json.loads(answer)["outputs"]
    srv.baseline_rss = srv.rss()
    try:
        yield srv
    finally:
        srv.stop()


def assert_unharmed(srv: Server) -> None:
    """The server answers a good request exactly as before, logged no traceback, and kept its memory."""
    status, answer = srv.request("POST", VEC, GOOD)
    assert status == 200, answer
    assert json.loads(answer)["outputs"] == srv.reference
    log = srv.log()
    assert "Traceback" not in log, log[-3000:]
    assert srv.rss() - srv.baseline_rss < RSS_BOUND


def deep(depth: int, inner: str = "0") -> str:
    return "[" * depth + inner + "]" * depth


# (id, path, body, headers, status, text the error must contain)
BAD_BODIES = [
    ("datatype-object", VEC, tensor_json(datatype={}), {}, 400, "inputs[0] ('input').datatype"),
    ("datatype-list", VEC, tensor_json(datatype=[]), {}, 400, "unsupported datatype []"),
    ("zero-rows-huge-dim", VEC, tensor_json(shape=(0, 2**70), data=[]), {}, 400, "must have shape [-1, 4, 3]"),
    ("zero-rows-huge-dims", VEC, tensor_json(shape=(0, 2**62, 2**62), data=[]), {}, 400, "must have shape"),
    ("zero-rows", VEC, tensor_json(shape=(0, 4, 3), data=[]), {}, 400, "between 1 and 4 rows"),
    ("38000-rows-declared", VEC, tensor_json(shape=(38000, 4, 3), data=[0.0] * 12), {}, 400, "between 1 and 4 rows"),
    (
        "5000-digit-int",
        TOK,
        tensor_json(datatype="INT64", shape=(1, 6), data=[1] * 6).replace(b"[1, ", b"[" + b"9" * 5000 + b", ", 1),
        {},
        400,
        "more than",
    ),
    ("deep-top-level", VEC, deep(1000).encode(), {}, 400, "more than 16 deep"),
    (
        "deep-in-data",
        VEC,
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4, 3], "data": '
        + deep(5000).encode()
        + b"}]}",
        {},
        400,
        "more than 16 deep",
    ),
    ("deep-100000", VEC, deep(100_000).encode(), {}, 413, "the limit is"),
    (
        "string-binary-flag",
        VEC,
        tensor_json(parameters={"binary_data_output": "false"}),
        {},
        400,
        "binary_data_output must be a JSON boolean",
    ),
    (
        "true-in-int64",
        TOK,
        tensor_json(datatype="INT64", shape=(1, 6), data=[True, 1, 1, 1, 1, 1]),
        {},
        400,
        "not booleans",
    ),
    ("true-in-fp32", VEC, tensor_json(data=[True] + [0.5] * 11), {}, 400, "not booleans"),
    ("all-bools-in-fp32", VEC, tensor_json(data=[True] * 12), {}, 400, "not booleans"),
    ("string-data", VEC, tensor_json(data=["1"] * 12), {}, 400, "must be numbers"),
    ("null-data", VEC, tensor_json(data=[None] * 12), {}, 400, "must be numbers"),
    ("ragged", VEC, tensor_json(shape=(1, 4, 3), data=[[1, 2, 3]] * 3 + [[1, 2]]), {}, 400, "not a regular array"),
    ("truncated-json", VEC, GOOD[: len(GOOD) // 2], {}, 400, "not valid JSON"),
    ("not-utf8", VEC, b'{"inputs": "\xff\xfe"}', {}, 400, "must be UTF-8"),
    ("id-not-string", VEC, tensor_json(id=7), {}, 400, "'id' must be a string"),
    ("binary-header-garbage", VEC, GOOD, {"Inference-Header-Content-Length": "-5"}, 400, "must be an integer"),
    ("binary-header-unicode-digit", VEC, GOOD, {"Inference-Header-Content-Length": "\u00b2"}, 400, "an integer"),
    ("binary-truncated", VEC, None, "binary-truncated", 400, "binary bytes for it"),
    ("binary-huge-zero-rows", VEC, None, "binary-huge", 400, "must have shape"),
    ("wrong-input-name", VEC, tensor_json(name="image"), {}, 400, "inputs[0].name: model 'vec' has one input"),
    ("unknown-model", "/v2/models/nope/infer", GOOD, {}, 404, "not served here"),
    ("unknown-version", "/v2/models/vec/versions/9/infer", GOOD, {}, 404, "only version 1"),
]


def _binary(kind: str) -> tuple[bytes, dict]:
    if kind == "binary-truncated":
        header = {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 4, 3], "parameters": {"binary_data_size": 48}}
            ]
        }
        payload = bytes(20)
    else:
        header = {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [0, 2**70], "parameters": {"binary_data_size": 0}}
            ]
        }
        payload = b""
    text = json.dumps(header).encode()
    return text + payload, {"Inference-Header-Content-Length": str(len(text))}


@pytest.mark.parametrize("case", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_body_gets_its_4xx_naming_the_field(server, case):
    _, path, body, headers, status, text = case
    if isinstance(headers, str):
        body, headers = _binary(headers)
    got, answer = server.request("POST", path, body, headers)
    assert got == status, answer
    message = json.loads(answer)["error"]
    assert text in message
    assert len(message) < 400  # short: never the input echoed back
    assert_unharmed(server)


def test_declared_38000_rows_of_60mb_refused_from_content_length(server):
    """Declare a 60 MB body, send 1 KB: 413 before the rest is read; the connection is closed."""
    status, answer, closed = raw_exchange(server.port, post_head(VEC, 60 << 20) + b"{" + b" " * 1023)
    assert status == 413 and closed
    assert b"the limit is" in answer
    assert_unharmed(server)


def test_oversized_header_gets_431(server):
    big = post_head(VEC, len(GOOD), extra=f"X-Padding: {'a' * 100_000}\r\n") + GOOD
    status, _, closed = raw_exchange(server.port, big)
    assert status == 431 and closed
    many = post_head(VEC, len(GOOD), extra="".join(f"X-H{i}: v\r\n" for i in range(400))) + GOOD
    assert raw_exchange(server.port, many)[0] == 431
    assert_unharmed(server)


def test_stalled_upload_closed_by_the_body_timeout(server):
    status, answer, closed = raw_exchange(server.port, post_head(VEC, len(GOOD)) + GOOD[:-1])
    assert status == 408 and closed, answer
    assert b"no request body data" in answer
    assert_unharmed(server)


def test_unfinished_chunked_body_closed(server):
    status, _, closed = raw_exchange(server.port, post_head(VEC, None) + b"10\r\n" + GOOD[:16] + b"\r\n")
    assert status == 408 and closed
    assert_unharmed(server)


def test_unfinished_headers_and_silent_connections_closed(server):
    status, _, closed = raw_exchange(server.port, b"POST /v2/models/vec/infer HTTP/1.1\r\nHost: x\r\n")
    assert status == 408 and closed
    sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(20)]
    try:
        for s in sockets:  # each is closed by the server, without an answer
            assert s.recv(10) == b""
    finally:
        for s in sockets:
            s.close()
    assert server.metric("fpt_connections_closed_total") >= 21
    assert_unharmed(server)


def test_buffered_bytes_are_bounded_across_connections(server):
    """Two stalled uploads that sent 20 KB each hold the 48 KB budget's room; a third body is refused with 503."""
    stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
    try:
        for s in stalled:
            s.sendall(post_head(VEC, 20_500) + b" " * 20_000)
        for _ in range(200):  # until both bodies are held
            if server.metric("fpt_request_bytes_buffered") >= 40_000:
                break
        status, answer, closed = raw_exchange(server.port, post_head(VEC, 20_000) + b" " * 20_000)
        assert status == 503 and closed
        assert b"retry later" in answer
        for s in stalled:  # the stalled ones are then closed by the body timeout, and their bytes given back
            assert s.recv(65536).startswith(b"HTTP/1.1 408")
    finally:
        for s in stalled:
            s.close()
    assert_unharmed(server)
    assert server.metric("fpt_request_bytes_buffered") == 0


def test_disconnect_mid_body_is_not_a_server_error(server):
    before = server.metric("fpt_client_disconnects_total")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(post_head(VEC, len(GOOD)) + GOOD[:10])
    for _ in range(200):
        if server.metric("fpt_client_disconnects_total") > before:
            break
    assert server.metric("fpt_client_disconnects_total") == before + 1
    assert server.metric('fpt_inference_failures_total{code="500"') == 0
    assert_unharmed(server)


def test_keep_alive_serves_requests_in_turn_then_closes_when_idle(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for _ in range(3):  # each request's header clock starts at its own first byte
            conn.request("POST", VEC, body=GOOD)
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["outputs"] == server.reference
        assert conn.sock.recv(10) == b""  # closed by the server after the 1 s keep-alive timeout
    finally:
        conn.close()
    assert_unharmed(server)


def test_garbage_http_gets_400(server):
    status, _, closed = raw_exchange(server.port, b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
    assert status == 400 and closed
    assert_unharmed(server)


def test_health_answers_while_bodies_decode_in_the_pool(server):
    """Four 2-row JSON requests at once (decoded in the pool) and a health check among them all answer."""
    body = tensor_json(shape=(2, 4, 3), data=np.full((2, 4, 3), 0.123456789).tolist(), id="pooled")
    assert len(body) > 256
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(server.request("POST", VEC, body))) for _ in range(4)]
    for t in threads:
        t.start()
    assert server.request("GET", "/v2/health/live")[0] == 200
    for t in threads:
        t.join(10)
    assert [status for status, _ in answers] == [200] * 4
    assert all(json.loads(answer)["id"] == "pooled" for _, answer in answers)
    assert_unharmed(server)


def test_sigterm_finishes_within_grace_with_a_stalled_upload(synthetic_repo, tmp_path):
    srv = Server(synthetic_repo, tmp_path / "server.log", body_timeout_s=60.0, graceful_timeout_s=30.0)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(post_head(VEC, len(GOOD)) + GOOD[:-1])
            for _ in range(200):
                if srv.metric("fpt_request_bytes_buffered") > 0:
                    break
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            assert srv.proc.wait(30) in (0, -signal.SIGTERM)
            # dropped after a second without data, long before the 60 s body timeout or the 30 s grace
            assert time.monotonic() - t0 < 15
            assert s.recv(65536).startswith(b"HTTP/1.1 408")
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()


def padded(body: bytes, size: int) -> bytes:
    """``body`` with spaces after its JSON up to ``size`` bytes: the same request, a larger body."""
    return body + b" " * (size - len(body))


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


def test_slow_uploads_hold_only_what_they_sent_and_are_dropped_below_the_minimum_rate(server):
    """Three uploads declare 20 KB each (60 KB: more than the 48 KB budget) and trickle a byte every 0.1 s.

    Declared lengths reserve nothing: good requests, one of 9 KB too, get 200 while they trickle. Each
    trickle gets 408 once a body-timeout window passes below the minimum rate (1024 bytes/s), although
    it never goes the 0.5 s body timeout without data.
    """
    import select

    before = server.metric('fpt_connections_closed_total{reason="body_too_slow"')
    tricklers = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(3)]
    answers: dict[socket.socket, bytes] = {}
    try:
        for s in tricklers:
            s.sendall(post_head(VEC, 20_000) + b"{")
        statuses = [server.request("POST", VEC, body)[0] for body in (GOOD, padded(GOOD, 9_000), GOOD)]
        assert statuses == [200, 200, 200]
        for _ in range(50):  # at most 5 s of trickling
            readable, _, _ = select.select([s for s in tricklers if s not in answers], [], [], 0.1)
            for s in readable:
                answers[s] = s.recv(65536)
            if len(answers) == len(tricklers):
                break
            for s in tricklers:
                if s not in answers:
                    s.sendall(b" ")
        assert len(answers) == len(tricklers), "a trickle below the minimum rate was never dropped"
        for answer in answers.values():
            assert answer.startswith(b"HTTP/1.1 408") and b"bytes/s" in answer, answer
    finally:
        for s in tricklers:
            s.close()
    assert server.metric('fpt_connections_closed_total{reason="body_too_slow"') == before + 3
    assert server.metric("fpt_request_bytes_buffered") == 0
    assert_unharmed(server)


def test_pipelined_bytes_of_the_next_request_are_not_this_requests_header(server):
    """A 10 KB request (5x the header limit) and the start of the next in one write: both answered."""
    first = post_head(VEC, 10_000) + padded(GOOD, 10_000)
    second = post_head(VEC, len(GOOD)) + GOOD
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(first + second[:10])
        status, answer = read_response(s)
        assert status == 200, answer
        assert json.loads(answer)["outputs"] == server.reference
        s.sendall(second[10:] + first + second + second[:40])  # two whole requests and a third begun
        for _ in range(3):
            if _ == 2:
                s.sendall(second[40:])
            status, answer = read_response(s)
            assert status == 200, answer
            assert json.loads(answer)["outputs"] == server.reference
    assert_unharmed(server)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32-be"])
def test_json_in_another_encoding_than_utf8_is_refused(server, encoding):
    """The byte scans and the boolean check read UTF-8: a UTF-16 body could slip ``true`` into INT64 data."""
    body = tensor_json(datatype="INT64", shape=(1, 6), data=[True, 1, 1, 1, 1, 1]).decode().encode(encoding)
    status, answer = server.request("POST", TOK, body)
    assert status == 400, answer
    assert "must be UTF-8" in json.loads(answer)["error"]
    status, answer = server.request("POST", VEC, GOOD.decode().encode(encoding))
    assert status == 400 and "must be UTF-8" in json.loads(answer)["error"]
    assert_unharmed(server)


KILLED_REWRITE = """
import sys, time
from pathlib import Path
from fpt_deploy.serving.runtimes.cache import Rewrite, cached_rewrite

def slow(source, target):
    target.write_bytes(source.read_bytes())
    time.sleep(60)  # SIGKILLed here, its copy written

with cached_rewrite(Path(sys.argv[1]), Rewrite(name="ort", key="k", apply=slow)):
    pass
"""


def test_temp_files_of_a_rewrite_killed_mid_start_are_removed_at_the_next_start(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    source = tmp_path / "backbones" / "0123" / "backbone.onnx"
    source.parent.mkdir(parents=True)
    source.write_bytes(np.random.default_rng(0).bytes(100_000))
    cache = source.parent / ".cache"
    child = subprocess.Popen([sys.executable, "-c", KILLED_REWRITE, str(source)], cwd=Path(__file__).parents[2])
    try:
        for _ in range(3000):  # until the child has written its whole copy (at most 30 s)
            if [p for p in cache.glob(".*.tmp") if p.stat().st_size == 100_000] or child.poll() is not None:
                break
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait(10)
    assert len(list(cache.glob(".*.tmp"))) == 1  # left behind by the killed start

    from fpt_deploy.serving.runtimes.cache import Rewrite, cached_rewrite

    def fast(source, target):
        target.write_bytes(b"rewritten")
        return {"copied": 1}

    with cached_rewrite(source, Rewrite(name="ort", key="k", apply=fast)) as graph:
        assert graph.read_bytes() == b"rewritten"
    assert sorted(p.name for p in cache.iterdir() if p.name.endswith(".tmp")) == []


# -- in-process: the queue bound in rows, the OpenAPI document, the decode path itself -------------------


@pytest.fixture
def gated(synthetic_repo):
    """An app whose batcher holds every batch at ``gate``; its queue holds 8 rows."""
    from fpt_deploy.serving import ServeConfig

    from tests.serving.conftest import gated_client

    config = ServeConfig(repo=synthetic_repo, threads=1, max_batch_size=4, max_queue_rows=8, max_queue_delay_ms=0)
    kw = dict(max_batch_size=4, max_queue_delay_ms=0, max_queue_size=1024, max_queue_rows=8)
    with gated_client(config, **kw) as (client, state, gate, entered):
        yield client, state.batcher, gate, entered


def test_queue_full_in_rows_answers_503_at_once(gated):
    client, batcher, gate, entered = gated
    full_batch = tensor_json(shape=(4, 4, 3), data=np.ones((4, 4, 3)).tolist())
    answers = []

    def send():
        answers.append(client.post(VEC, content=full_batch).status_code)

    first = threading.Thread(target=send)
    first.start()
    assert entered.wait(10)  # one 4-row batch executes, held at the gate
    waiting = [threading.Thread(target=send) for _ in range(2)]  # 8 rows queue behind it
    for t in waiting:
        t.start()
    for _ in range(1000):
        if batcher._queued_rows == 8:
            break
        gate.wait(0.01)
    refused = [client.post(VEC, content=full_batch) for _ in range(5)]
    assert [r.status_code for r in refused] == [503] * 5
    assert "the queue is full" in refused[0].json()["error"]
    gate.set()
    for t in [first, *waiting]:
        t.join(10)
    assert answers == [200] * 3


def test_openapi_describes_exactly_the_routes(synthetic_repo):
    from fastapi.routing import APIRoute
    from fastapi.testclient import TestClient
    from fpt_deploy.serving import ServeConfig
    from fpt_deploy.serving.openapi import CORE_PATHS
    from fpt_deploy.serving.server import ServerState, create_app
    from starlette.routing import Route

    state = ServerState.load(ServeConfig(repo=synthetic_repo, threads=1))
    try:
        app = create_app(state)
        client = TestClient(app)
        doc = client.get("/openapi.json").json()
        assert doc["openapi"].startswith("3.") and "InferenceRequest" in doc["components"]["schemas"]
        served = {
            (r.path, m.lower())
            for r in app.routes
            if isinstance(r, Route) and (not isinstance(r, APIRoute) or r.include_in_schema)
            for m in r.methods
            if m != "HEAD"
        }
        described = {(p, m) for p, ops in doc["paths"].items() for m in ops}
        assert served == described
        infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
        assert {"400", "404", "408", "413", "431", "503"} <= set(infer["responses"])
        # the served models are the name examples, and the example request is one they answer
        (name,) = [p for p in infer["parameters"] if p["name"] == "name"]
        assert name["schema"]["examples"] == list(state.model.tasks)
        example = infer["requestBody"]["content"]["application/json"]["example"]
        answer = client.post(f"/v2/models/{name['schema']['examples'][0]}/infer", json=example)
        assert answer.status_code == 200, answer.text
        assert CORE_PATHS["/v2/models/{name}"]["get"]["parameters"][0]["schema"] == {"type": "string"}  # unchanged
    finally:
        state.close(5)


UINT8 = InputContract(model="mnist", name="input", dtype=np.dtype(np.uint8), example_shape=(28, 28), max_rows=32)


@pytest.mark.parametrize(
    "body, error, text",
    [
        (
            tensor_json(datatype="UINT8", shape=(1, 28, 28), data=[True] + [0] * 783),
            MalformedRequestError,
            "not booleans",
        ),
        (tensor_json(datatype="UINT8", shape=(1, 28, 28), data=[256] + [0] * 783), MalformedRequestError, "[0, 255]"),
        (tensor_json(datatype="UINT8", shape=(0, 1180591620717411303424), data=[]), InvalidInputError, "[-1, 28, 28]"),
        (tensor_json(datatype="UINT8", shape=(38000, 28, 28), data=[]), InvalidInputError, "between 1 and 32 rows"),
        (tensor_json(datatype={}, shape=(1, 28, 28)), MalformedRequestError, "datatype"),
        (
            tensor_json(
                datatype="UINT8",
                shape=(1, 28, 28),
                data=[0] * 784,
                outputs=[{"name": "labels", "parameters": {"binary_data": 1}}],
            ),
            MalformedRequestError,
            "outputs[0].parameters.binary_data",
        ),
        (
            b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 28, 28], "data": [' + b"1" * 65 + b"]}]}",
            MalformedRequestError,
            "more than 64 characters",
        ),
    ],
)
def test_decode_path_refuses_before_reading_data(body, error, text):
    with pytest.raises(error, match=None) as caught:
        decode_request(body, None, UINT8, JsonLimits(max_depth=16))
    assert text in str(caught.value)


def test_one_validated_path_for_every_transport():
    """What gRPC hands over (typed contents or raw bytes) goes through the same checks as HTTP JSON."""
    x = np.arange(784, dtype=np.uint8).reshape(1, 28, 28)
    raw = DeclaredTensor(name="input", datatype="UINT8", shape=[1, 28, 28], raw=x.tobytes())
    np.testing.assert_array_equal(validate_inputs(UINT8, [raw])["input"], x)
    typed = DeclaredTensor(name="input", datatype="UINT8", shape=[1, 28, 28], data=x.reshape(-1).tolist())
    np.testing.assert_array_equal(validate_inputs(UINT8, [typed])["input"], x)
    with pytest.raises(InvalidInputError, match="between 1 and 32 rows"):
        validate_inputs(UINT8, [DeclaredTensor(name="input", datatype="UINT8", shape=[33, 28, 28], raw=b"")])
    with pytest.raises(MalformedRequestError, match="needs 784"):
        validate_inputs(UINT8, [DeclaredTensor(name="input", datatype="UINT8", shape=[1, 28, 28], raw=b"\0" * 10)])


def test_server_error_answers_500_without_internal_text(synthetic_repo, caplog):
    from fastapi.testclient import TestClient
    from fpt_deploy.serving import ServeConfig
    from fpt_deploy.serving.server import ServerState, create_app

    state = ServerState.load(ServeConfig(repo=synthetic_repo, threads=1))

    def broken(task, array):
        raise RuntimeError("secret internal detail")

    state.batcher.submit = broken
    try:
        with caplog.at_level("WARNING", logger="fpt_deploy.serving.server"):
            answer = TestClient(create_app(state)).post(VEC, content=GOOD, headers={"X-Request-ID": "abc-1"})
        assert answer.status_code == 500
        assert "secret" not in answer.text and "request abc-1" in answer.json()["error"]
        assert answer.headers["X-Request-ID"] == "abc-1"
        (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
        assert "request abc-1" in record.getMessage() and record.exc_info is not None  # the traceback
    finally:
        state.close(5)


def test_json_bodies_of_extension_routes_are_bounded_too():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient
    from fpt_deploy.serving.http_limits import BodyBudget, read_json_body

    from fpt_deploy.errors import FptDeployError

    budget = BodyBudget(1 << 20)
    app = FastAPI()

    async def ext(request):
        try:
            return JSONResponse(await read_json_body(request, budget, JsonLimits(max_depth=8), limit=1024))
        except FptDeployError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)

    app.add_route("/ext", ext, methods=["POST"])
    client = TestClient(app)
    assert client.post("/ext", content=b'{"ready": true}').json() == {"ready": True}
    assert client.post("/ext", content=b"").json() == {}
    assert client.post("/ext", content=b"{" + b" " * 2000 + b"}").status_code == 413
    assert client.post("/ext", content=b'{"a": ' + deep(20).encode() + b"}").status_code == 400
    assert client.post("/ext", content=b"[1]").status_code == 400
    assert "must be UTF-8" in client.post("/ext", content='{"ready": true}'.encode("utf-16")).json()["error"]
    assert budget.held == 0  # every reservation given back


def _depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


def test_json_scan_counts_only_outside_strings():
    """Brackets, digits and escaped quotes inside names never count; the scan agrees with the parser."""
    import random

    from fpt_deploy.serving.protocol import scan_json

    tight = JsonLimits(max_depth=3, max_number_chars=24)
    scan_json(b'{"a[[[[[": "]]]]1111111111111111111111111111", "b\\\\": [[1]], "c\\"[[[[": 2}', tight)
    with pytest.raises(MalformedRequestError, match="more than 3 deep"):
        scan_json(b'{"a\\\\": [[["x"]]]}', tight)  # the escaped backslash ends in the string; the quote closes it
    with pytest.raises(MalformedRequestError, match="more than 24 characters"):
        scan_json(b'{"a": "x", "b": [1234567890123456789012345]}', tight)
    scan_json(b'"' + b'\\"' * 50_000, tight)  # one unterminated string of escaped quotes: linear, no number runs
    rng = random.Random(0)
    alphabet = '[]{}"\\0123456789e.-+ ,:ab'

    def value(level=0):
        r = rng.random()
        if level > 6 or r < 0.3:
            return rng.choice(
                [rng.randint(-(10**12), 10**12), "".join(rng.choices(alphabet, k=rng.randint(0, 8))), True]
            )
        if r < 0.65:
            return [value(level + 1) for _ in range(rng.randint(0, 4))]
        return {"".join(rng.choices(alphabet, k=rng.randint(0, 6))): value(level + 1) for _ in range(rng.randint(0, 4))}

    for _ in range(300):
        doc = value()
        text = json.dumps(doc).encode()
        limit = JsonLimits(max_depth=max(_depth(doc), 1), max_number_chars=24)
        scan_json(text, limit)  # exactly at the limit: accepted
        if _depth(doc) > 1:
            with pytest.raises(MalformedRequestError, match="deep"):
                scan_json(text, JsonLimits(max_depth=_depth(doc) - 1, max_number_chars=24))
