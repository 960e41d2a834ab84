"""Hostile clients against real ``serve`` processes: the ten cases of the hostile table, each with "fixed".

    python -m bench.hostile                               # trains + exports a tiny-bert mnist repository first
    python -m bench.hostile --repo deploy --markdown hostile.md --out bench/results/hostile.json

Every case is replayed on 127.0.0.1 against a server subprocess (``sys.executable``: the code of the
Python that runs this) on copies of one repository, with the server's default limits:

 1. gRPC ModelInfer of shape [1, 28, 28] whose ``uint_contents`` hold 62,914,560 zeros (60 MB), once
    and then from ``--grpc-senders`` clients at once, and 200,000 declared inputs in 3 MB;
 2. ``--tricklers`` connections declare the largest valid body and send a byte every 4 s;
 3. explicit model control: ``unload`` while a request waits in the queue (delay 60 s), then ``load``;
 4. a task.json with ``"shape": "ab"``: in poll mode (does a valid task added later load?) and in
    explicit mode (its load, and another task's);
 5. a 25 KB binary request and the first 10 bytes of the next one in one write;
 6. a JSON body in UTF-16 (with ``true`` in UINT8 data);
 7. task.json labels changed, then ``load``;
 8. the bytes ``ff ff ff ff 0f`` as a ModelInfer message, and gRPC requests during SIGTERM;
 9. ``load`` with ``{"parameters": {"config": ...}}``;
10. the server SIGKILLed during its first start's ONNX Runtime rewrite, three times, then started.

Beside the table: a good request's p50/p99 when idle and during cases 1 and 2 (goal: within 2x, no
503), the server's RSS during case 1 (goal: +50 MB at most), and every 5xx answered in the whole run
(goal: 0). Every loop is bounded in count and time; the run takes a few minutes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.server_process import ROOT, ServerProcess, free_port

LAUNCH = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
from fpt_deploy.serving import ServeConfig, serve
serve(ServeConfig(**json.loads(sys.argv[1])))
"""
MB = 1 << 20
TASK = "mnist"  # UINT8 [-1, 28, 28]
INFER = f"/v2/models/{TASK}/infer"
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
# The largest valid body of the mnist task at max batch 32 (serving/protocol.py: 16 KiB + 32*784*(64+24)).
LARGEST_VALID_BODY = 16384 + 32 * 784 * (64 + 24)
BUFFERED_BYTES = 256 << 20  # ServeConfig.max_buffered_bytes' default: case 2's connections declare this much
# gRPC codes that stand for a server error (5xx in the HTTP mapping of gRPC statuses).
GRPC_5XX = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS", "UNIMPLEMENTED", "DEADLINE_EXCEEDED"}

# What the issue measured on main 8e1f06f, case by case.
ISSUE = {
    1: ("gRPC ModelInfer [1,28,28] with 60 MB of uint_contents zeros; 200,000 declared inputs in 3 MB",
        "INVALID_ARGUMENT after 7.5 s, +1.5 GB RSS (four at once +2.6 GB), health checks 3.9 s; 200,000 inputs: 1.7 s"),
    2: ("121 connections declare 2,224,128 bytes, trickle 1 byte / 4 s",
        "declared lengths reserved: budget full at 65 MB RSS, every good request 503, body timeout never fires"),
    3: ("explicit: unload while a request waits (queue delay 60 s), then load",
        "unload 503 after 30 s; load 200, ready 200, index READY, every infer 404 'being unloaded'"),
    4: ('a task.json with "shape": "ab" (input, or spec): poll mode; explicit load',
        "poll thread dies, later valid tasks never load; its load 500; every other task's load 400"),
    5: ("a 25 KB binary infer + the first 10 bytes of the next request in one write",
        '431 "(25326 received)", connection closed, the good answer lost'),
    6: ("JSON body encoded UTF-16", "parsed (200); `true` in UINT8 data accepted"),
    7: ("task.json changed (labels), then load", '"unchanged": the old contract keeps being served'),
    8: ("bytes ff ff ff ff 0f as ModelInfer; gRPC during SIGTERM",
        "INTERNAL + an ERROR traceback each time; shutdown refusals logged as tracebacks"),
    9: ('load with {"parameters": {"config": ...}}', "200, the override silently ignored"),
    10: ("SIGKILL during the first start's ORT rewrite, 3 times", "three backbone-sized .tmp files stay in .cache/"),
}  # fmt: skip


class Tally:
    """Every 5xx (and gRPC server-error status) the servers answered in the run, by where it came from."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def http(self, status: int | None, where: str) -> None:
        if status is not None and status >= 500:
            with self._lock:
                self.errors.append(f"{where}: HTTP {status}")

    def grpc(self, code: str, where: str) -> None:
        if code in GRPC_5XX:
            with self._lock:
                self.errors.append(f"{where}: gRPC {code}")


TALLY = Tally()


class Server(ServerProcess):
    """``serve`` with ``config`` (``ServeConfig`` fields) through ``LAUNCH`` (bench/server_process.py); every
    answer it gives counts in ``TALLY``."""

    def __init__(self, repo: Path, log_path: Path, wait: bool = True, **config) -> None:
        port = free_port()
        self.config = {"repo": str(repo), "port": port, "threads": 1, **config}
        launch = ["-c", LAUNCH, json.dumps(self.config)]
        super().__init__("hostile", launch, port, log_path=log_path, ready_timeout=120.0, stop_timeout=30.0)
        if wait:
            self.wait_ready()

    def request(self, method, path, body=None, headers=None, timeout=60.0, where="") -> tuple[int, bytes]:
        status, answer = super().request(method, path, body, headers, timeout)
        TALLY.http(status, where or f"{method} {path}")
        return status, answer

    def tracebacks(self) -> int:
        return self.log().count("Traceback")


class RssSampler:
    """Peak RSS of a process, sampled every 10 ms on a thread."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(pid), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss / MB)
            except Exception:  # noqa: BLE001  (the process exited)
                return
            self._stop.wait(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# -- requests ------------------------------------------------------------------------------------------


def binary_body(x: np.ndarray) -> tuple[bytes, dict]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "UINT8",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "labels"}],
        }
    ).encode()
    return header + x.tobytes(), {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def json_body(shape, data, datatype="UINT8") -> bytes:
    return json.dumps(
        {"inputs": [{"name": "input", "datatype": datatype, "shape": list(shape), "data": data}]}
    ).encode()


def head(path: str, length: int, extra: dict | None = None) -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items())
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n{lines}\r\n".encode()


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


def status_of(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def big_contents_message(zeros: int) -> bytes:
    """ModelInferRequest: one UINT8 [1, 28, 28] input whose packed ``uint_contents`` hold ``zeros`` zeros."""
    from tritonclient.grpc import service_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="UINT8", shape=[1, 28, 28])
    contents = _field(4, bytes(zeros))  # InferTensorContents.uint_contents = 4, packed varints (0 is one byte)
    inp = tensor.SerializeToString() + _field(5, contents)  # InferInputTensor.contents = 5
    return pb.ModelInferRequest(model_name=TASK).SerializeToString() + _field(5, inp)  # .inputs = 5


def many_inputs_message(count: int) -> bytes:
    """ModelInferRequest declaring ``count`` inputs (without data)."""
    from tritonclient.grpc import service_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="UINT8", shape=[1, 28, 28])
    return pb.ModelInferRequest(model_name=TASK).SerializeToString() + _field(5, tensor.SerializeToString()) * count


def good_grpc_message(x: np.ndarray) -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=TASK, raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="UINT8", shape=list(x.shape))
    request.outputs.add(name="labels")
    return request.SerializeToString()


def grpc_call(port: int, message: bytes, timeout: float = 60.0, channel=None) -> tuple[str, bytes, float]:
    """(status code name, response bytes, seconds) of ``message`` sent raw as ModelInfer."""
    import grpc

    own = channel is None
    if own:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)])
    method = channel.unary_unary(GRPC_INFER)  # no serializers: bytes in, bytes out
    t0 = time.perf_counter()
    try:
        answer, code = method(message, timeout=timeout), "OK"
    except grpc.RpcError as e:
        answer, code = b"", e.code().name
    finally:
        if own:
            channel.close()
    return code, answer, time.perf_counter() - t0


def grpc_labels(answer: bytes) -> list[int]:
    from tritonclient.grpc import service_pb2 as pb

    response = pb.ModelInferResponse.FromString(answer)
    return np.frombuffer(response.raw_output_contents[0], "<i8").tolist()


class Good:
    """A correct 1-row request over HTTP and gRPC, and the answer each must get."""

    def __init__(self, srv: Server, grpc_port: int, x: np.ndarray) -> None:
        self.srv, self.grpc_port = srv, grpc_port
        self.body, self.headers = binary_body(x)
        self.grpc_message = good_grpc_message(x)
        status, answer = srv.request("POST", INFER, self.body, self.headers)
        assert status == 200, answer
        self.labels = self._labels(answer)
        code, answer, _ = grpc_call(grpc_port, self.grpc_message)
        assert code == "OK" and grpc_labels(answer) == self.labels, code

    @staticmethod
    def _labels(answer: bytes) -> list:
        return json.loads(answer)["outputs"][0]["data"]

    def http(self, where: str) -> tuple[int, float]:
        t0 = time.perf_counter()
        status, answer = self.srv.request("POST", INFER, self.body, self.headers, where=where)
        seconds = time.perf_counter() - t0
        if status == 200 and self._labels(answer) != self.labels:
            status = -1  # answered wrongly
        return status, seconds

    def grpc(self, where: str) -> tuple[int, float]:
        code, answer, seconds = grpc_call(self.grpc_port, self.grpc_message, timeout=30.0)
        TALLY.grpc(code, where)
        ok = code == "OK" and grpc_labels(answer) == self.labels
        return (200 if ok else code), seconds

    def window(self, seconds: float, where: str, transports=("http",), max_requests: int = 2000) -> dict:
        """Good requests back to back for ``seconds`` (alternating ``transports``): latencies and failures."""
        results = {t: [] for t in transports}
        health = []
        t_end = time.monotonic() + seconds
        for i in range(max_requests):
            if time.monotonic() >= t_end:
                break
            transport = transports[i % len(transports)]
            results[transport].append(getattr(self, transport)(f"{where} (good {transport})"))
            if i % 10 == 0:
                t0 = time.perf_counter()
                self.srv.request("GET", "/v2/health/ready", where=f"{where} (health)")
                health.append(time.perf_counter() - t0)
        return {t: summarize(r) for t, r in results.items()} | {"health_ms_max": ms(max(health, default=0.0))}


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def summarize(results: list[tuple]) -> dict:
    times = [t for status, t in results if status == 200]
    failed = [status for status, _ in results if status != 200]
    return {
        "requests": len(results),
        "p50_ms": ms(statistics.median(times)) if times else None,
        "p99_ms": ms(float(np.percentile(times, 99))) if times else None,
        "not_200": len(failed),
        "503": sum(1 for s in failed if s in (503, "UNAVAILABLE")),
        "failures": sorted({str(s) for s in failed})[:5],
    }


STARTED = time.monotonic()


def row(case: int, happened: str, fixed: bool, **details) -> dict:
    print(f"[{time.monotonic() - STARTED:5.0f} s] case {case}: {happened}", file=sys.stderr, flush=True)
    return {"case": case, "happened": happened, "fixed": bool(fixed), **details}


# -- the cases -----------------------------------------------------------------------------------------


def _grpc_attack(port: int, senders: int, seconds: float, per_sender: int, out) -> None:
    """Case 1's attackers, in a child process (the measuring client never waits for their GIL)."""
    message = big_contents_message(62_914_560)
    codes: list[tuple[str, float]] = []
    lock = threading.Lock()
    t_end = time.monotonic() + seconds

    def send() -> None:
        for _ in range(per_sender):
            if time.monotonic() >= t_end:
                return
            code, _, took = grpc_call(port, message, timeout=30.0)
            with lock:
                codes.append((code, took))

    threads = [threading.Thread(target=send) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 90)
    out.send(codes)


def case_1(srv: Server, good: Good, grpc_port: int, seconds: float, senders: int) -> tuple[dict, dict]:
    idle_rss = srv.rss_mb()
    big = big_contents_message(62_914_560)
    with RssSampler(srv.proc.pid) as one:
        code, _, took = grpc_call(grpc_port, big, timeout=60.0)
    TALLY.grpc(code, "case 1 (60 MB uint_contents)")
    del big
    many = many_inputs_message(200_000)
    many_code, _, many_took = grpc_call(grpc_port, many, timeout=120.0)
    TALLY.grpc(many_code, "case 1 (200,000 inputs)")
    ctx = multiprocessing.get_context("spawn")  # a fresh process: gRPC does not survive a fork
    receive, send = ctx.Pipe(duplex=False)
    attacker = ctx.Process(target=_grpc_attack, args=(grpc_port, senders, seconds, 10, send), daemon=True)
    with RssSampler(srv.proc.pid) as attacked:
        attacker.start()
        time.sleep(1.0)  # the attackers have built their message and are sending
        during = good.window(seconds - 1.0, "case 1", transports=("http", "grpc"))
        codes = receive.recv() if receive.poll(120) else []
        attacker.join(30)
    for c, _ in codes:
        TALLY.grpc(c, "case 1 (60 MB uint_contents, concurrent)")
    busy = settle(srv)  # messages the clients gave up on may still be converted: case 2 starts on a quiet server
    after_rss = srv.rss_mb()
    peak = max(one.peak, attacked.peak)
    refused = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE"}
    fast = code in refused and took < 1.0 and many_code in refused and many_took < 0.5
    concurrent = sorted({c for c, _ in codes})
    worst = max((t for _, t in codes), default=0.0)
    fixed = fast and peak - idle_rss <= 50 and set(concurrent) <= refused
    happened = (
        f"{code} after {took:.2f} s; 200,000 inputs: {many_code} after {many_took:.2f} s; "
        f"{len(codes)} sent by {senders} at once: {', '.join(concurrent) or 'none answered'} (slowest {worst:.1f} s); "
        f"RSS {idle_rss:.0f} MB, peak +{peak - idle_rss:.0f} MB, +{after_rss - idle_rss:.0f} MB after; "
        f"health max {during['health_ms_max']:.0f} ms; server busy {busy:.0f} s after the clients stopped"
    )
    rss = {"idle_mb": round(idle_rss, 1), "peak_mb": round(peak, 1), "after_mb": round(after_rss, 1)}
    return row(1, happened, fixed, rss=rss), during


def settle(srv: Server, limit_s: float = 120.0) -> float:
    """Wait (at most ``limit_s``) until the server uses under a fifth of a core; the seconds waited."""
    import psutil

    proc, t0 = psutil.Process(srv.proc.pid), time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if proc.cpu_percent(interval=0.5) < 20:
            break
    return time.monotonic() - t0


def case_2(srv: Server, good: Good, tricklers: int, seconds: float) -> tuple[dict, dict]:
    """``tricklers`` connections declare the largest valid body (the last one the rest of the server's
    default budget, so that together they declare it exactly) and send a byte every 4 s."""
    sizes = [LARGEST_VALID_BODY] * tricklers
    sizes[-1] = max(1024, min(LARGEST_VALID_BODY, BUFFERED_BYTES - LARGEST_VALID_BODY * (tricklers - 1)))
    socks, answers = [], {}
    try:
        for size in sizes:
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(head(INFER, size, {"Content-Type": "application/json"}) + b"{")
            socks.append(s)
        stop = threading.Event()
        t_start = time.monotonic()

        def trickle() -> None:
            next_byte = t_start + 4.0
            while not stop.is_set():
                open_socks = [s for s in socks if s not in answers]
                if not open_socks:
                    return
                readable, _, _ = select.select(open_socks, [], [], 0.2)
                for s in readable:
                    try:
                        answers[s] = (s.recv(4096), time.monotonic() - t_start)
                    except OSError:
                        answers[s] = (b"", time.monotonic() - t_start)
                if time.monotonic() < next_byte:
                    continue
                next_byte += 4.0
                for s in open_socks:
                    if s not in answers:
                        try:
                            s.sendall(b" ")
                        except OSError:
                            answers[s] = (b"", time.monotonic() - t_start)

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        time.sleep(0.5)
        during = good.window(max(seconds, 12.0), "case 2", max_requests=6000)  # past the drop at the body timeout
        deadline = time.monotonic() + 10  # those still open: until the next round of bytes answers them
        while len(answers) < len(socks) and time.monotonic() < deadline:
            time.sleep(0.2)
        stop.set()
        trickler.join(10)
    finally:
        for s in socks:
            s.close()
    statuses = [status_of(a) for a, _ in answers.values()]
    for st in statuses:
        TALLY.http(st, "case 2 (trickle)")
    dropped = sum(1 for st in statuses if st == 408)
    took = [t for (a, t) in answers.values() if status_of(a) == 408]
    good_503 = during["http"]["503"]
    fixed = good_503 == 0 and during["http"]["not_200"] == 0 and dropped == tricklers
    happened = (
        f"{sum(sizes):,} bytes declared; good requests: {during['http']['requests']}, "
        f"{during['http']['not_200']} not 200 ({good_503} x 503); "
        f"trickles answered {dropped} x 408"
        + (f" after {min(took):.0f}-{max(took):.0f} s" if took else "")
        + f", {len(socks) - len(answers)} still open after {seconds + 10:.0f} s"
        + (f", other answers {sorted({str(s) for s in statuses if s != 408})}" if dropped < len(answers) else "")
    )
    return row(2, happened, fixed), during


def case_5(srv: Server, x32: np.ndarray, expected: list) -> dict:
    body, headers = binary_body(x32)
    first = head(INFER, len(body), headers) + body
    second_body, second_headers = binary_body(x32[:1])
    second = head(INFER, len(second_body), second_headers) + second_body
    status, answer, right = None, b"", False
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(first + second[:10])
        try:
            status, answer = read_response(s)
            right = status == 200 and json.loads(answer)["outputs"][0]["data"] == expected
            s.sendall(second[10:])
            status2, _ = read_response(s)
        except (OSError, http.client.HTTPException) as e:
            status2, right = type(e).__name__, False
    TALLY.http(status, "case 5")
    TALLY.http(status2 if isinstance(status2, int) else None, "case 5 (second)")
    message = "" if status == 200 else f" {answer[:90].decode(errors='replace')}"
    happened = f"{len(first)} bytes + 10: first {status}{message} ({'right' if right else 'wrong'}), then {status2}"
    return row(5, happened, right and status2 == 200)


def case_6(srv: Server) -> dict:
    statuses = []
    for name, data in (("zeros", [0] * 784), ("true in UINT8", [True] + [0] * 783)):
        body = json_body([1, 28, 28], data).decode().encode("utf-16")
        status, answer = srv.request("POST", INFER, body, {"Content-Type": "application/json"}, where="case 6")
        error = json.loads(answer).get("error", "") if status != 200 else ""
        statuses.append((name, status, error[:70]))
    happened = "; ".join(f"{name}: {status}" + (f" '{err}'" if err else "") for name, status, err in statuses)
    return row(6, happened, all(status == 400 for _, status, _ in statuses))


def case_8(srv: Server, grpc_port: int) -> dict:
    before = srv.tracebacks()
    codes = [grpc_call(grpc_port, b"\xff\xff\xff\xff\x0f")[0] for _ in range(3)]
    for code in codes:
        TALLY.grpc(code, "case 8")
    time.sleep(0.3)
    tracebacks = srv.tracebacks() - before
    return row(
        8,
        f"malformed x3: {', '.join(sorted(set(codes)))}, {tracebacks} tracebacks",
        set(codes) == {"INVALID_ARGUMENT"} and tracebacks == 0,
        tracebacks=tracebacks,
    )


def shutdown_under_grpc(srv: Server, good: Good) -> dict:
    """SIGTERM while a client sends gRPC requests: refusals are answered, and logged without tracebacks."""
    before = srv.tracebacks()
    codes: list[str] = []
    stop = threading.Event()

    def load() -> None:
        for _ in range(5000):
            if stop.is_set():
                return
            code, _, _ = grpc_call(good.grpc_port, good.grpc_message, timeout=10.0)
            codes.append(code)

    clients = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in clients:
        t.start()
    wait_until(lambda: len(codes) >= 2, "the gRPC clients' first answers")
    srv.proc.send_signal(signal.SIGTERM)
    try:
        exit_code = srv.proc.wait(60)
    except subprocess.TimeoutExpired:
        exit_code = "timeout"
    stop.set()
    for t in clients:
        t.join(15)
    srv.stop()
    tracebacks = srv.tracebacks() - before
    return {
        "exit_code": exit_code,
        "codes": {c: codes.count(c) for c in sorted(set(codes))},
        "tracebacks": tracebacks,
    }


# -- repository control --------------------------------------------------------------------------------


def write_json_atomic(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.bench.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def wait_until(condition, what: str, seconds: float = 30.0) -> None:
    """Return once ``condition()`` holds; ``RuntimeError`` naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {seconds:.0f} s")
        time.sleep(0.05)


def unavailable_reason(srv: Server, name: str) -> str:
    """The reason the repository index gives for ``name`` being UNAVAILABLE ("" while it is not)."""
    index = json.loads(srv.request("POST", "/v2/repository/index", b"{}", where="index")[1])
    return next((e["reason"] for e in index if e["name"] == name and e["state"] == "UNAVAILABLE"), "")


def add_task(repo: Path, name: str, source: str = TASK, **changes) -> None:
    """Copy task ``source`` as ``name`` (task.json updated with ``changes``) and list it in the manifest."""
    src, dst = repo / "tasks" / source, repo / "tasks" / name
    shutil.copytree(src, dst, dirs_exist_ok=True)
    doc = json.loads((src / "task.json").read_text())
    doc["name"] = name
    doc["spec"]["name"] = name
    doc["files"] = {k: v.replace(f"tasks/{source}/", f"tasks/{name}/") for k, v in doc["files"].items()}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            doc[section][field] = value
        else:
            doc[section] = value
    write_json_atomic(dst / "task.json", doc)
    manifest = json.loads((repo / "manifest.json").read_text())
    manifest["tasks"][name] = {"file": f"tasks/{name}/task.json", "fingerprint": doc["fingerprint"]}
    write_json_atomic(repo / "manifest.json", manifest)


def case_3(srv: Server, x1: np.ndarray, x32: np.ndarray) -> dict:
    """A request waits in the queue (delay 60 s); unload, then load: is the task served after the load?"""
    body, headers = binary_body(x1)
    # after a batch of 32 rows, a 1-row request waits for company (32 rows, or the 60 s delay)
    srv.request("POST", INFER, *binary_body(x32), where="case 3 (first)")
    waiting: list = []
    waiter = threading.Thread(
        target=lambda: waiting.append(
            srv.request("POST", INFER, body, headers, timeout=90, where="case 3 (waiting)")[0]
        ),
        daemon=True,
    )
    waiter.start()
    wait_until(lambda: srv.metric("fpt_queue_depth") >= 1, "case 3's request to be queued")
    t0 = time.perf_counter()
    try:
        unload = srv.request("POST", f"/v2/repository/models/{TASK}/unload", b"", timeout=60, where="case 3 unload")[0]
    except OSError as e:
        unload = type(e).__name__
    unload_s = time.perf_counter() - t0
    load = srv.request("POST", f"/v2/repository/models/{TASK}/load", b"", where="case 3 load")[0]
    ready = srv.request("GET", f"/v2/models/{TASK}/ready", where="case 3 ready")[0]
    index = json.loads(srv.request("POST", "/v2/repository/index", b"{}", where="case 3 index")[1])
    state = next((m["state"] for m in index if m["name"] == TASK), "absent")
    infers = [srv.request("POST", INFER, body, headers, where="case 3 infer")[0] for _ in range(3)]
    waiter.join(1.0)
    fixed = load == 200 and ready == 200 and state == "READY" and infers == [200, 200, 200]
    happened = (
        f"unload {unload} after {unload_s:.1f} s; load {load}, ready {ready}, index {state}; "
        f"infer {', '.join(map(str, infers))}; the waiting request: {waiting[0] if waiting else 'still waiting'}"
    )
    return row(3, happened, fixed)


def case_7(srv: Server, repo: Path) -> dict:
    task_json = repo / "tasks" / TASK / "task.json"
    doc = json.loads(task_json.read_text())
    new_labels = [f"digit-{label}" for label in doc["labels"]]
    doc["labels"] = new_labels
    doc["spec"]["labels"] = new_labels
    write_json_atomic(task_json, doc)
    load = srv.request("POST", f"/v2/repository/models/{TASK}/load", b"", where="case 7 load")[0]
    meta = json.loads(srv.request("GET", f"/v2/models/{TASK}", where="case 7 metadata")[1])
    served = meta.get("parameters", {}).get("labels")
    fixed = load == 200 and served == new_labels
    shown = "the new labels" if served == new_labels else f"old labels {served[:2] if served else served}..."
    return row(7, f"load {load}; metadata serves {shown}", fixed)


def case_9(srv: Server) -> dict:
    override = {"parameters": {"config": json.dumps({"max_batch_size": 8})}}
    status, answer = srv.request(
        "POST", f"/v2/repository/models/{TASK}/load", json.dumps(override).encode(), where="case 9 load"
    )
    error = json.loads(answer).get("error", "") if answer else ""
    config = json.loads(srv.request("GET", f"/v2/models/{TASK}/config", where="case 9 config")[1])
    applied = config.get("max_batch_size") == 8
    refused = 400 <= status < 500 and "config" in error
    happened = (
        f"load {status}"
        + (f" '{error[:80]}'" if error else "")
        + f"; config max_batch_size {config.get('max_batch_size')}"
    )
    return row(9, happened, refused or (status == 200 and applied))


# Two task.json files with ``"shape": "ab"``: the shape clients see, and the task spec's.
BAD_TASKS = {"badshape": {"input__shape": "ab"}, "badspec": {"spec__input_shape": "ab"}}


def case_4_explicit(srv: Server, repo: Path) -> dict:
    loads = {}
    for name, changes in BAD_TASKS.items():
        add_task(repo, name, **changes)
        for target in (name, TASK):
            status, answer = srv.request(
                "POST", f"/v2/repository/models/{target}/load", b"", where=f"case 4 load {target}"
            )
            error = json.loads(answer).get("error", "").replace(str(repo), "<repo>") if answer else ""
            loads[f"{target} (with {name} listed)" if target == TASK else target] = (status, error[:70])
    return loads


def case_4_poll(repo: Path, log: Path) -> dict:
    srv = Server(repo, log, model_control_mode="poll", poll_interval=0.5)
    try:
        for name, changes in BAD_TASKS.items():
            add_task(repo, name, **changes)
            wait_until(lambda name=name: unavailable_reason(srv, name), f"the poller to mark {name} unavailable")
        add_task(repo, "later")
        ready = None
        for _ in range(60):  # at most 6 s
            ready = srv.request("GET", "/v2/models/later/ready", where="case 4 poll ready")[0]
            if ready == 200:
                break
            time.sleep(0.1)
        return {"later_ready": ready, "tracebacks": srv.tracebacks()}
    finally:
        srv.stop()


def case_4(poll: dict, explicit: dict) -> dict:
    fixed = (
        poll["later_ready"] == 200
        and poll["tracebacks"] == 0
        and all(
            status == 200 if name.startswith(TASK) else 400 <= status < 500 for name, (status, _) in explicit.items()
        )
    )
    loads = ", ".join(
        f"{name} {status}" + (f" '{error}'" if error and status != 200 else "")
        for name, (status, error) in explicit.items()
    )
    happened = (
        f"poll: a valid task added later {'loads' if poll['later_ready'] == 200 else 'never loads'}, "
        f"{poll['tracebacks']} tracebacks; explicit loads: {loads}"
    )
    return row(4, happened, fixed)


# -- case 10 -------------------------------------------------------------------------------------------


def case_10(repo: Path, work: Path, kills: int = 3, tries: int = 10) -> dict:
    """SIGKILL the server while its first start rewrites the backbone (its temp file written), ``kills`` times."""
    backbone = next((repo / "backbones").glob("*/backbone.onnx"))
    cache = backbone.parent / ".cache"
    size = backbone.stat().st_size
    killed = 0
    for attempt in range(tries):
        if killed == kills:
            break
        for done in list(cache.glob("*.json")) + list(cache.glob("*.onnx")):  # a finished rewrite: start again
            done.unlink()
        known = {p.name for p in cache.glob(".*.tmp")}
        srv = Server(repo, work / f"kill-{attempt}.log", wait=False)
        seen = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and srv.proc.poll() is None:
            temps = [p for p in cache.glob(".*.tmp") if p.name not in known and _size(p) >= size // 2]
            if temps:  # this start's copy is written: the rewrite is checking it now
                seen = True
                break
            if list(cache.glob("*.json")):  # too late: the rewrite finished
                break
            time.sleep(0.002)
        srv.proc.kill()
        srv.proc.wait(10)
        srv.stop()
        killed += seen
    left_after_kills = len(list(cache.glob(".*.tmp")))
    srv = Server(repo, work / "after-kills.log")
    srv.stop()
    left = sorted(p.name for p in cache.glob(".*.tmp"))
    happened = (
        f"killed {killed} times mid-rewrite, {left_after_kills} .tmp files then; "
        f"after a normal start: {len(left)} .tmp files ({sum(_size(cache / n) for n in left) / 1e3:.0f} KB)"
    )
    return row(10, happened, killed > 0 and not left, temps_left=left)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# -- main ----------------------------------------------------------------------------------------------


def build_repo(work: Path, backbone: str) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import train_tiny
    from fpt_deploy.export import ExportConfig, export_task

    checkpoint = train_tiny(work / "ckpt", TASK, backbone=backbone, steps=2)
    repo = work / "repo"
    export_task(ExportConfig(checkpoints=[checkpoint], repo=repo, validation_rows=16))
    return repo


def copy_repo(repo: Path, to: Path) -> Path:
    return Path(shutil.copytree(repo, to, ignore=shutil.ignore_patterns(".cache", ".manifest.lock")))


def server_code() -> str:
    """Where the servers' code lives (the install of ``sys.executable``) and its commit."""
    where = subprocess.run(
        [sys.executable, "-c", "import fpt_deploy.serving, os; print(os.path.dirname(fpt_deploy.serving.__file__))"],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    ).stdout.strip()
    commit = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    changes = " (uncommitted changes)" if dirty.stdout.strip() else ""
    return f"{Path(where).parent} at {commit.stdout.strip() or '?'}{changes}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n")[0])
    p.add_argument("--repo", type=Path, help="deployment repository with a tiny mnist task (default: built)")
    p.add_argument("--backbone", default="tiny-bert", help="backbone of the repository built here")
    p.add_argument("--work", type=Path, help="keep the built repository here and reuse it (default: a temp dir)")
    p.add_argument("--seconds", type=float, default=8.0, help="good-request window during cases 1 and 2 (and idle)")
    p.add_argument("--tricklers", type=int, default=121, help="case 2's slow uploads")
    p.add_argument("--grpc-senders", type=int, default=4, help="case 1's concurrent 60 MB messages")
    p.add_argument("--cases", default="1-10", help="the cases to run, e.g. 2,5,6 (default: all, 1-10)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, help="write the tables (markdown, for an issue note) here")
    args = p.parse_args(argv)
    cases = parse_cases(args.cases)
    work = Path(tempfile.mkdtemp(prefix="fpt-hostile-"))
    started = time.monotonic()
    try:
        repo = args.repo
        if repo is None and args.work and (args.work / "repo" / "manifest.json").exists():
            repo = args.work / "repo"
        repo = repo or build_repo(args.work or work, args.backbone)
        results = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f} at start",
            "server_code": server_code(),
            "repo": str(repo),
        }
        rows, latency = {}, {}
        rng = np.random.default_rng(0)
        x1 = rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)
        x32 = rng.integers(0, 256, (32, 28, 28), dtype=np.uint8)

        if cases & {1, 2, 5, 6, 8}:  # the server with default limits and gRPC
            grpc_port = free_port()
            srv = Server(copy_repo(repo, work / "main-repo"), work / "main.log", grpc_port=grpc_port)
            try:
                good = Good(srv, grpc_port, x1)
                expected32 = json.loads(srv.request("POST", INFER, *binary_body(x32))[1])["outputs"][0]["data"]
                if 5 in cases:
                    rows[5] = case_5(srv, x32, expected32)
                if 6 in cases:
                    rows[6] = case_6(srv)
                if 8 in cases:
                    rows[8] = case_8(srv, grpc_port)
                if 1 in cases:  # each attack's latency against an idle window right before it (the machine's
                    # other load changes over minutes)
                    latency["idle before case 1"] = good.window(args.seconds, "idle", transports=("http", "grpc"))
                    rows[1], latency["case 1"] = case_1(srv, good, grpc_port, args.seconds, args.grpc_senders)
                    results["rss_case_1"] = rows[1].pop("rss")
                if 2 in cases:
                    latency["idle before case 2"] = good.window(args.seconds, "idle", transports=("http",))
                    rows[2], latency["case 2"] = case_2(srv, good, args.tricklers, args.seconds)
                if 8 in cases:
                    results["shutdown"] = shutdown = shutdown_under_grpc(srv, good)
                    rows[8]["fixed"] &= shutdown["tracebacks"] == 0
                    rows[8]["happened"] += (
                        f"; SIGTERM under gRPC load: {shutdown['codes']}, {shutdown['tracebacks']} tracebacks"
                    )
            finally:
                srv.stop()
        if cases & {3, 4, 7, 9}:  # explicit model control
            explicit_repo = copy_repo(repo, work / "explicit-repo")
            srv = Server(
                explicit_repo,
                work / "explicit.log",
                model_control_mode="explicit",
                load_model=["*"],
                max_queue_delay_ms=60_000.0,
                graceful_timeout_s=3.0,
            )
            try:
                if 3 in cases:
                    rows[3] = case_3(srv, x1, x32)
                if 7 in cases:
                    rows[7] = case_7(srv, explicit_repo)
                if 9 in cases:
                    rows[9] = case_9(srv)
                if 4 in cases:
                    explicit = case_4_explicit(srv, explicit_repo)
            finally:
                srv.stop_timeout = 15
                srv.stop()
        if 4 in cases:
            poll = case_4_poll(copy_repo(repo, work / "poll-repo"), work / "poll.log")
            rows[4] = case_4(poll, explicit)
        if 10 in cases:
            rows[10] = case_10(copy_repo(repo, work / "kill-repo"), work)
        results["cases"] = [rows[n] for n in sorted(rows)]
        results["latency"] = latency
        results["errors_5xx"] = TALLY.errors
        results["seconds"] = round(time.monotonic() - started, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = render(results)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
    return results


def parse_cases(text: str) -> set[int]:
    cases = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        cases |= set(range(int(low), int(high or low) + 1))
    if not cases <= set(ISSUE):
        raise SystemExit(f"--cases: the cases are 1-10, got {text!r}")
    return cases


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(r: dict) -> str:
    lines = [
        f"Hostile suite, {r['date']}: {r['machine']}; server code {r['server_code']}; {r['seconds']} s.",
        "",
        "| # | case | on main 8e1f06f (the issue) | this run | fixed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in r["cases"]:
        what, before = ISSUE[c["case"]]
        fixed = "yes" if c["fixed"] else "no"
        lines.append(f"| {c['case']} | {_cell(what)} | {_cell(before)} | {_cell(c['happened'])} | {fixed} |")
    if r["latency"]:
        lines += [
            "",
            "| good request (1 row, binary) | requests | p50 ms | p99 ms | not 200 | 503 | health max ms |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
    for window, by_transport in r["latency"].items():
        for transport, s in by_transport.items():
            if transport == "health_ms_max":
                continue
            name = "HTTP" if transport == "http" else "gRPC"
            lines.append(
                f"| {window}, {name} | {s['requests']} | {s['p50_ms']} | {s['p99_ms']} | {s['not_200']} | "
                f"{s['503']} | {by_transport['health_ms_max']} |"
            )
    goals = []
    for window in ("case 1", "case 2"):
        idle = r["latency"].get(f"idle before {window}")
        for transport, s in r["latency"].get(window, {}).items():
            if transport == "health_ms_max" or not idle or idle[transport]["p50_ms"] is None:
                continue
            if s["p50_ms"] is None:
                goals.append(f"{window} {transport}: no good request answered 200 ({s['503']} x 503; missed)")
                continue
            ratio50 = s["p50_ms"] / idle[transport]["p50_ms"]
            ratio99 = s["p99_ms"] / idle[transport]["p99_ms"]
            within = ratio50 <= 2 and ratio99 <= 2 and s["503"] == 0
            goals.append(
                f"{window} {transport}: p50 x{ratio50:.1f}, p99 x{ratio99:.1f} ({'met' if within else 'missed'})"
            )
    lines.append("")
    if goals:
        lines.append(f"- Goal, good requests within 2x of idle and no 503: {'; '.join(goals)}.")
    if "rss_case_1" in r:
        rss = r["rss_case_1"]
        grown = rss["peak_mb"] - rss["idle_mb"]
        lines.append(
            f"- Goal, RSS during case 1 +50 MB at most: {rss['idle_mb']:.0f} MB idle, peak {rss['peak_mb']:.0f} MB "
            f"(+{grown:.0f} MB, {'met' if grown <= 50 else 'missed'}), {rss['after_mb']:.0f} MB after."
        )
    errors = r["errors_5xx"]
    by_kind = {e: errors.count(e) for e in sorted(set(errors))}
    lines.append(
        f"- Goal, 0 5xx in the whole run: {len(errors)}"
        + (f" ({'; '.join(f'{n} x {e}' for e, n in list(by_kind.items())[:8])})" if errors else "")
        + "."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
