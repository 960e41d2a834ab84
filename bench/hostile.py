"""Hostile clients against a real ``serve`` process: what issue 15's closing note must show.

    python -m bench.hostile                          # trains + exports a tiny mnist repository first
    python -m bench.hostile --repo deploy --task mnist --out bench/results/hostile.json

Every case of the issue's "Found" list is replayed against the server with its default limits (the
old statuses are those the issue measured on main ``aec74af``), then:

- one 60 MB JSON request declaring 38,000 rows: the time to its refusal;
- three such requests in a loop plus eight stalled 60 MB uploads plus eight stalled uploads of the
  largest valid size: a correct request's latency against idle, and the server's peak RSS;
- stalled connections (an upload one byte short, unfinished headers, 1,000 connections that send
  half a header): when the server closes them;
- SIGTERM with a stalled upload open: the time to exit;
- 45 requests of 32 rows at once against the row-bounded queue: how fast the 503s come;
- schemathesis against the served ``/openapi.json`` with ``-c not_a_server_error`` (when installed).

All traffic goes to 127.0.0.1, bounded in count and time. Prints a table; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
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


class Server(ServerProcess):
    """``serve`` with ``config`` (``ServeConfig`` fields) through ``LAUNCH``, ready (bench/server_process.py)."""

    def __init__(self, repo: Path, log_path: Path, **config) -> None:
        port = free_port()
        config = {"repo": str(repo), "port": port, "threads": 1, **config}
        launch = ["-c", LAUNCH, json.dumps(config)]
        super().__init__("hostile", launch, port, log_path=log_path, ready_timeout=120.0, stop_timeout=60.0)
        self.wait_ready()

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
            self.peak = max(self.peak, self.proc.memory_info().rss / MB)
            self._stop.wait(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# -- requests ------------------------------------------------------------------------------------------


def json_body(shape, data, datatype="UINT8", **extra) -> bytes:
    doc = {"inputs": [{"name": "input", "datatype": datatype, "shape": list(shape), "data": data}], **extra}
    return json.dumps(doc).encode()


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
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def head(path: str, length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{size}{extra}\r\n".encode()


def send_and_answer(port: int, data: bytes, timeout: float = 60.0) -> tuple[int | None, float, bool]:
    """Send ``data`` (stopping if the server answers first); (status, seconds to the answer, closed)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        answered = threading.Event()
        answer = bytearray()

        def read():
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    answer.extend(chunk)
                    answered.set()
            except OSError:
                pass
            answered.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        view = memoryview(data)
        try:
            for i in range(0, len(view), MB):
                if answered.is_set():
                    break
                s.sendall(view[i : i + MB])
        except OSError:
            pass
        answered.wait(timeout)
        elapsed = time.perf_counter() - t0
        reader.join(timeout)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return status, elapsed, not reader.is_alive()


def good_latency(srv: Server, path: str, body: bytes, headers: dict, expected: list, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, answer = srv.request("POST", path, body, headers)
        times.append(time.perf_counter() - t0)
        assert status == 200, answer
        doc = json.loads(answer)
        assert doc["outputs"][0]["data"] == expected, "a good request was answered wrongly"
    return times


# -- scenarios -----------------------------------------------------------------------------------------


def found_cases(srv: Server, path: str) -> list[dict]:
    """Each case of the issue's "Found": (case, old status from the issue, new status, ms)."""
    big_dims_header = json.dumps(
        {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [0, 2**70], "parameters": {"binary_data_size": 0}}]}
    ).encode()
    deep = "[" * 100_000 + "0" + "]" * 100_000
    cases = [
        ("1 datatype {}", "500", ("POST", json_body([1, 28, 28], [0], datatype={}), {})),
        ("1 datatype []", "500", ("POST", json_body([1, 28, 28], [0], datatype=[]), {})),
        ("1 shape [0, 2**70] JSON", "500", ("POST", json_body([0, 2**70], []), {})),
        ("1 shape [0, 2**62, 2**62] JSON", "500", ("POST", json_body([0, 2**62, 2**62], []), {})),
        (
            "1 shape [0, 2**70] binary",
            "500",
            ("POST", big_dims_header, {"Inference-Header-Content-Length": str(len(big_dims_header))}),
        ),
        (
            "1 integer of 5,000 digits",
            "500",
            ("POST", json_body([1, 28, 28], [0] * 784).replace(b"[0, ", b"[" + b"9" * 5000 + b", ", 1), {}),
        ),
        ("1 nested 100,000 deep (top level)", "500", ("POST", deep.encode(), {})),
        (
            "1 nested 100,000 deep (in data)",
            "500",
            (
                "POST",
                b'{"inputs":[{"name":"input","datatype":"UINT8","shape":[1,28,28],"data":' + deep.encode() + b"}]}",
                {},
            ),
        ),
        (
            '5 binary_data_output "false"',
            "200 (binary on)",
            ("POST", json_body([1, 28, 28], [0] * 784, parameters={"binary_data_output": "false"}), {}),
        ),
        ("5 true in UINT8 data", "200 (as 1)", ("POST", json_body([1, 28, 28], [True] + [0] * 783), {})),
        ("6 GET /openapi.json", "404", ("GET", None, {})),
        # beyond the issue: bodies that make a naive string-skipping scan quadratic, at the body bound
        ("+ 2 MB of escaped quotes", "-", ("POST", b'"' + b'\\"' * (1 << 20), {})),
        ("+ 2 MB of empty strings", "-", ("POST", b'["",' + b'"",' * 700_000 + b'""]', {})),
        ("+ 2 MB of one-digit numbers", "-", ("POST", b"[" + b"1," * (1 << 20) + b"1]", {})),
    ]
    table = []
    for name, old, (method, body, headers) in cases:
        t0 = time.perf_counter()
        status, answer = srv.request(method, "/openapi.json" if method == "GET" else path, body, headers)
        ms = (time.perf_counter() - t0) * 1e3
        message = json.loads(answer).get("error", "") if status >= 400 else ""
        table.append({"case": name, "old": old, "new": status, "ms": round(ms, 1), "error": message[:100]})
    return table


def disconnect_case(srv: Server, path: str) -> dict:
    failures_500 = 'fpt_inference_failures_total{code="500"'
    before_d, before_500 = srv.metric("fpt_client_disconnects_total"), srv.metric(failures_500)
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(head(path, 10_000) + b"{" * 10)
    for _ in range(100):
        if srv.metric("fpt_client_disconnects_total") > before_d:
            break
        time.sleep(0.02)
    disconnects = srv.metric("fpt_client_disconnects_total") - before_d
    errors = srv.metric(failures_500) - before_500
    return {
        "case": "1 client disconnects mid-body",
        "old": "500 counted, traceback",
        "new": f"disconnects +{disconnects:.0f}, 500s +{errors:.0f}",
        "ms": None,
        "error": "",
    }


def big_json_refusal(srv: Server, path: str, big: bytes) -> dict:
    status, seconds, closed = send_and_answer(srv.port, head(path, len(big)) + big)
    chunked_status, chunked_s, _ = send_and_answer(
        srv.port, head(path, None) + b"".join(b"%x\r\n%s\r\n" % (MB, big[i : i + MB]) for i in range(0, 8 * MB, MB))
    )
    return {
        "status": status,
        "ms": round(seconds * 1e3, 1),
        "closed": closed,
        "chunked_status": chunked_status,
        "chunked_ms": round(chunked_s * 1e3, 1),
    }


def _attack(port: int, path: str, big: bytes, seconds: float, out) -> None:
    """The attackers, in a child process (so the measuring client never waits for their GIL)."""
    stop = threading.Event()
    refused: list[int | None] = []

    def big_loop():
        while not stop.is_set():
            refused.append(send_and_answer(port, head(path, len(big)) + big)[0])

    largest_valid = 32 * 784 * (64 + 24)  # about the body bound of this task at max batch 32 (protocol.py)

    def stalled(length: int, send: int, results: list):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=seconds + 30) as s:
                s.sendall(head(path, length))
                try:
                    for i in range(0, send, MB):
                        s.sendall(big[i : min(i + MB, send)])
                except OSError:
                    results.append("refused while sending")
                    return
                s.settimeout(0.2)
                while not stop.is_set():  # held open until the server answers or the window ends
                    try:
                        answer = s.recv(256)
                    except TimeoutError:
                        continue
                    results.append(answer.split(b"\r\n", 1)[0].decode() or "closed")
                    return
                results.append("held open")
        except OSError as e:
            results.append(type(e).__name__)

    stalled_big, stalled_valid = [], []
    threads = [threading.Thread(target=big_loop, daemon=True) for _ in range(3)]
    threads += [
        threading.Thread(target=stalled, args=(60 * MB, 60 * MB - 1, stalled_big), daemon=True) for _ in range(8)
    ]
    threads += [
        threading.Thread(target=stalled, args=(largest_valid, largest_valid - 1, stalled_valid), daemon=True)
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    out.send(
        {
            "big_requests_refused_413": sum(1 for s in refused if s == 413),
            "big_requests_other": [s for s in refused if s != 413][:5],
            "stalled_60mb": sorted(set(stalled_big)),
            "stalled_valid_size": sorted(set(stalled_valid)),
        }
    )


def under_attack(srv: Server, path: str, big: bytes, good: tuple, expected: list, seconds: float) -> dict:
    """A correct request's latency and the server's RSS and CPU, in idle windows and attacked windows.

    The windows alternate (idle, attacked, idle, ...), so a change in the machine's other load shows in
    both; the attackers run in a child process, so the measuring client never waits for their GIL.
    """
    import multiprocessing

    import psutil

    body, headers = good
    server = psutil.Process(srv.proc.pid)

    def measure(window: float) -> tuple[list[float], list[float], float]:
        """(request latencies, health latencies, server CPU seconds per second) over ``window`` seconds."""
        busy, health = [], []
        cpu0, t_end = sum(server.cpu_times()[:2]), time.monotonic() + window
        while time.monotonic() < t_end:
            busy += good_latency(srv, path, body, headers, expected, 1)
            t0 = time.perf_counter()
            srv.request("GET", "/v2/health/ready")
            health.append(time.perf_counter() - t0)
        return busy, health, (sum(server.cpu_times()[:2]) - cpu0) / window

    rounds, window = 3, seconds / 3
    idle, attacked, attacks, rounds_ms = ([], [], []), ([], [], []), [], []
    idle_rss = srv.rss_mb()
    ctx = multiprocessing.get_context("fork")
    with RssSampler(srv.proc.pid) as rss:
        for _ in range(rounds):
            quiet = measure(window)
            receive, send = ctx.Pipe(duplex=False)
            attacker = ctx.Process(target=_attack, args=(srv.port, path, big, window + 1.0, send), daemon=True)
            attacker.start()
            time.sleep(0.5)  # the attackers are running
            loud = measure(window)
            attacks.append(receive.recv())
            attacker.join(60)
            for (latencies, health, cpu), (part_latencies, part_health, part_cpu) in ((idle, quiet), (attacked, loud)):
                latencies += part_latencies
                health += part_health
                cpu.append(part_cpu)
            rounds_ms.append((round(statistics.median(quiet[0]) * 1e3, 2), round(statistics.median(loud[0]) * 1e3, 2)))
    ms = lambda xs: round(statistics.median(xs) * 1e3, 2)  # noqa: E731
    p99 = lambda xs: round(float(np.percentile(xs, 99)) * 1e3, 2)  # noqa: E731
    return {
        "idle_ms_median": ms(idle[0]),
        "idle_ms_p99": p99(idle[0]),
        "attack_ms_median": ms(attacked[0]),
        "attack_ms_p99": p99(attacked[0]),
        "rounds_idle_vs_attack_ms": rounds_ms,
        "attack_requests": len(attacked[0]),
        "idle_health_ms_median": ms(idle[1]),
        "attack_health_ms_median": ms(attacked[1]),
        "attack_health_ms_max": round(max(attacked[1]) * 1e3, 2),
        "server_cpu_idle_s_per_s": round(statistics.mean(idle[2]), 3),
        "server_cpu_attack_s_per_s": round(statistics.mean(attacked[2]), 3),
        "idle_rss_mb": round(idle_rss, 1),
        "peak_rss_mb": round(rss.peak, 1),
        "big_requests_refused_413": sum(a["big_requests_refused_413"] for a in attacks),
        "big_requests_other": [s for a in attacks for s in a["big_requests_other"]][:5],
        "stalled_60mb": sorted({s for a in attacks for s in a["stalled_60mb"]}),
        "stalled_valid_size": sorted({s for a in attacks for s in a["stalled_valid_size"]}),
    }


def stalled_connections(srv: Server, path: str, good_body: bytes, connections: int) -> dict:
    """When the server closes a stalled upload, an unfinished chunked body, and half-sent headers."""

    def closed_after(data: bytes) -> tuple[str, float]:
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as s:
            s.sendall(data)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        return answer.split(b"\r\n", 1)[0].decode() or "closed", round(time.perf_counter() - t0, 2)

    upload = closed_after(head(path, len(good_body)) + good_body[:-1])
    chunked = closed_after(head(path, None) + b"10\r\n" + good_body[:16] + b"\r\n")
    socks = []
    t0 = time.perf_counter()
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
        s.sendall(b"POST /v2/models/x/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    closed = 0
    for s in socks:
        try:
            while s.recv(65536):
                pass
            closed += 1
        except OSError:
            pass
        s.close()
    return {
        "stalled_upload": upload,
        "unfinished_chunked": chunked,
        "half_headers": {
            "connections": connections,
            "closed": closed,
            "all_closed_s": round(time.perf_counter() - t0, 2),
        },
        "connections_closed_total": srv.metric("fpt_connections_closed_total"),
    }


def sigterm_with_stalled_upload(repo: Path, log: Path, path: str, good_body: bytes, grace: float) -> dict:
    srv = Server(repo, log, graceful_timeout_s=grace)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=120) as s:
        s.sendall(head(path, len(good_body)) + good_body[:-1])
        time.sleep(0.2)  # the server has begun reading the body
        t0 = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(120)
        seconds = time.perf_counter() - t0
        answer = s.recv(256).split(b"\r\n", 1)[0].decode()
    srv.stop()
    return {"grace_s": grace, "exit_s": round(seconds, 2), "exit_code": code, "upload_got": answer}


def queue_burst(srv: Server, path: str, x32: np.ndarray, count: int) -> dict:
    """``count`` requests of ``x32``'s rows sent at once from one thread; when each answer's status arrives."""
    import selectors

    body, headers = binary_body(x32)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = head(path, len(body), extra) + body
    socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=120) for _ in range(count)]
    sel = selectors.DefaultSelector()
    answers = {s.fileno(): bytearray() for s in socks}
    done: dict[int, tuple[int, float]] = {}
    t0 = time.perf_counter()
    for s in socks:
        s.sendall(request)
        sel.register(s, selectors.EVENT_READ)
    while len(done) < count and time.perf_counter() - t0 < 180:
        for key, _ in sel.select(timeout=1.0):
            fd = key.fileobj.fileno()
            chunk = key.fileobj.recv(65536)
            answers[fd] += chunk
            if fd not in done and b"\r\n" in answers[fd]:
                done[fd] = (int(answers[fd].split(b" ", 2)[1]), time.perf_counter() - t0)
            if not chunk or fd in done:
                sel.unregister(key.fileobj)
    for s in socks:
        s.close()
    results = list(done.values())
    by = lambda code: [t for c, t in results if c == code]  # noqa: E731
    ok, full = by(200), by(503)
    return {
        "requests": count,
        "rows_each": int(x32.shape[0]),
        "ok": len(ok),
        "refused_503": len(full),
        "other": sorted({c for c, _ in results} - {200, 503}),
        "503_ms_median": round(statistics.median(full) * 1e3, 1) if full else None,
        "503_ms_max": round(max(full) * 1e3, 1) if full else None,
        "ok_ms_max": round(max(ok) * 1e3, 1) if ok else None,
        "503_ms_min": round(min(full) * 1e3, 1) if full else None,
    }


def fuzz(srv: Server, examples: int, seconds: int) -> dict:
    exe = Path(sys.executable).with_name("schemathesis")
    if not exe.exists():
        return {"skipped": "schemathesis is not installed (pip install -e '.[dev]')"}
    cmd = [
        str(exe),
        "run",
        f"http://127.0.0.1:{srv.port}/openapi.json",
        "-c",
        "not_a_server_error",
        "--max-examples",
        str(examples),
        "--no-color",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds, cwd=ROOT)
    tail = done.stdout.strip().splitlines()[-12:]
    return {"command": " ".join(cmd[1:]), "exit_code": done.returncode, "summary": tail}


# -- main ----------------------------------------------------------------------------------------------


def build_repo(work: Path, backbone: str) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import train_tiny
    from fpt_deploy.export import ExportConfig, export_task

    checkpoint = train_tiny(work / "ckpt", "mnist", backbone=backbone, steps=2)
    repo = work / "repo"
    export_task(ExportConfig(checkpoints=[checkpoint], repo=repo, validation_rows=16))
    return repo


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n")[0])
    p.add_argument("--repo", type=Path, help="deployment repository with an MNIST task (default: built)")
    p.add_argument("--task", default="mnist")
    p.add_argument("--backbone", default="tiny-bert", help="backbone of the repository built here")
    p.add_argument("--seconds", type=float, default=12.0, help="attacked time, in three windows")
    p.add_argument("--connections", type=int, default=1000, help="connections sending half a header")
    p.add_argument("--fuzz-examples", type=int, default=25)
    p.add_argument("--work", type=Path, help="keep the built repository here and reuse it (default: a temp dir)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fpt-hostile-"))
    try:
        repo = args.repo
        if repo is None and args.work and (args.work / "repo" / "manifest.json").exists():
            repo = args.work / "repo"
        repo = repo or build_repo(args.work or work, args.backbone)
        path = f"/v2/models/{args.task}/infer"
        srv = Server(repo, work / "server.log")
        try:
            rng = np.random.default_rng(0)
            x1 = rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)
            good = binary_body(x1)
            expected = json.loads(srv.request("POST", path, *good)[1])["outputs"][0]["data"]
            # the 60 MB JSON of 38,000 rows (built once, ~60 MB)
            row = ",".join(["255"] * 784).encode()
            big = b'{"inputs":[{"name":"input","datatype":"UINT8","shape":[38000,28,28],"data":[' + b",".join(
                [row] * 20_000
            )
            big = big[: 60 * MB - 3] + b"]}]"
            results = {
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": f"{os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f} at start",
                "server": "ServeConfig defaults (threads=1)",
                "repo": str(repo),
            }
            table = found_cases(srv, path)
            table.append(disconnect_case(srv, path))
            results["big_json"] = big_json_refusal(srv, path, big)
            table.append(
                {
                    "case": "2 60 MB JSON, 38,000 rows",
                    "old": "400 after 5.2 s",
                    "new": results["big_json"]["status"],
                    "ms": results["big_json"]["ms"],
                    "error": "",
                }
            )
            status, answer, _ = send_and_answer(srv.port, head(path, 100, extra=f"X-Big: {'a' * (50 * MB)}\r\n"))
            table.append(
                {"case": "2 50 MB header", "old": "accepted, 4 s stall", "new": status, "ms": None, "error": ""}
            )
            results["attack"] = under_attack(srv, path, big, good, expected, args.seconds)
            results["stalled"] = stalled_connections(srv, path, good[0], args.connections)
            x32 = rng.integers(0, 256, (32, 28, 28), dtype=np.uint8)
            results["queue"] = queue_burst(srv, path, x32, 45)
            results["fuzz"] = fuzz(srv, args.fuzz_examples, 300)
            results["found"] = table
            results["tracebacks_in_log"] = srv.tracebacks()
            results["failures_500"] = srv.metric('fpt_inference_failures_total{code="500"')
        finally:
            srv.stop()
        results["load_average_at_end"] = round(os.getloadavg()[0], 1)
        results["sigterm"] = sigterm_with_stalled_upload(repo, work / "sigterm.log", path, good[0], 30.0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


def render(r: dict) -> str:
    lines = ["| case | old (aec74af, issue 15) | new | ms |", "|---|---|---|---|"]
    for c in r["found"]:
        lines.append(f"| {c['case']} | {c['old']} | {c['new']} | {'' if c['ms'] is None else c['ms']} |")
    lines.append("")
    lines.append(json.dumps({k: v for k, v in r.items() if k != "found"}, indent=2))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
