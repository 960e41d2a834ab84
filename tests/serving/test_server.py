"""The real server process (``python -m fpt_deploy.cli serve``) driven over loopback with tritonclient.

One server serves the exported mnist and bit-xor tasks (49- and 10-token rows) for the whole module.
Its pad tolerance is high, so rows of both tasks share backbone calls (padded): every answer must still
equal ``fpt-deploy predict`` on the same rows, which runs each task alone and unpadded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.serving.live import ServerProcess

ROWS = 24  # rows per task sent through the server


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_declaring_length(url: str, path: str, length: int, start: bytes) -> tuple[int, bytes]:
    import http.client

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        conn.send(start)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fpt_deploy.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parents[2],
    )


@pytest.fixture(scope="module")
def rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "mnist": rng.integers(0, 256, size=(ROWS, 28, 28), dtype=np.uint8),
        "bit-xor": rng.integers(0, 2, size=(ROWS, 10), dtype=np.uint8),
    }


@pytest.fixture(scope="module")
def expected(exported_repo, rows, tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """What `fpt-deploy predict` answers for the same rows."""
    out = {}
    folder = tmp_path_factory.mktemp("predict")
    for task, x in rows.items():
        np.save(folder / f"{task}.npy", x)
        done = cli(
            "predict",
            "--repo",
            str(exported_repo),
            "--task",
            task,
            "--input",
            str(folder / f"{task}.npy"),
            "--output",
            str(folder / f"{task}.npz"),
            "--max-batch-size",
            "8",
            "--threads",
            "1",
        )
        assert done.returncode == 0, done.stderr
        assert f"{task}: {ROWS} rows" in done.stdout
        with np.load(folder / f"{task}.npz") as z:
            out[task] = {k: z[k] for k in z.files}
        assert out[task]["labels"].shape == ((ROWS,) if task == "mnist" else (ROWS, 5))
    return out


@pytest.fixture(scope="module")
def server(exported_repo, tmp_path_factory):
    """``fpt-deploy serve`` on the exported repository: (the ``ServerProcess``, its URL, its port)."""
    options = dict(max_batch_size=16, max_queue_delay_ms=100, pad_tolerance=10, threads=1, max_body_bytes=1 << 20)
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess.fpt_deploy(exported_repo, log_path=log_path, ready_timeout=60.0, **options) as proc:
        yield proc, proc.url, proc.port


def triton_client(port: int, concurrency: int = 1):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(
        f"127.0.0.1:{port}", concurrency=concurrency, connection_timeout=30, network_timeout=30
    )


def triton_inputs(x: np.ndarray, binary: bool):
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("input", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("labels", "probabilities")]
    return [tensor], outputs


def assert_matches(result, want: dict[str, np.ndarray], index) -> None:
    np.testing.assert_array_equal(result.as_numpy("labels"), want["labels"][index])
    np.testing.assert_allclose(result.as_numpy("probabilities"), want["probabilities"][index], atol=1e-5)


def metric(url: str, name: str) -> float:
    status, body = http("GET", f"{url}/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


def test_health_and_metadata(server):
    _, url, port = server
    client = triton_client(port)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mnist") and client.is_model_ready("bit-xor")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("mnist")
    assert meta["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 28, 28]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
        "logits": [-1, 10],
        "probabilities": [-1, 10],
        "labels": [-1],
    }
    assert client.get_model_metadata("bit-xor")["outputs"][2]["shape"] == [-1, 5]
    assert http("GET", f"{url}/v2/models/nope")[0] == 404
    assert http("GET", f"{url}/v2/models/nope/ready")[0] == 404


def test_two_tasks_concurrently_binary_and_json_equal_predict(server, rows, expected):
    _, url, port = server
    client = triton_client(port, concurrency=16)
    jobs = []  # (task, row slice, binary): one row a request, plus a few two-row requests
    for i in range(ROWS):
        for task in ("mnist", "bit-xor"):
            jobs.append((task, slice(i, i + 1), i % 2 == 0))
    jobs += [("mnist", slice(0, 2), True), ("bit-xor", slice(4, 6), False)]
    handles = []
    for task, index, binary in jobs:
        inputs, outputs = triton_inputs(rows[task][index], binary)
        handles.append(client.async_infer(task, inputs, outputs=outputs))
    for (task, index, _), handle in zip(jobs, handles, strict=True):
        assert_matches(handle.get_result(timeout=60), expected[task], index)
    # Rows of both tasks meet in one batch, and (padded to one length) in one backbone call. An idle
    # server starts a request at once, so whether a burst mixes depends on arrival timing: send bounded
    # bursts until one does.
    for _ in range(20):
        if metric(url, "fpt_mixed_task_backbone_calls_total") >= 1:
            break
        burst = [(task, *triton_inputs(rows[task][0:1], True)) for _ in range(8) for task in ("mnist", "bit-xor")]
        for handle in [client.async_infer(task, inputs, outputs=outputs) for task, inputs, outputs in burst]:
            handle.get_result(timeout=60)
    assert metric(url, "fpt_mixed_task_batches_total") >= 1
    assert metric(url, "fpt_mixed_task_backbone_calls_total") >= 1
    assert metric(url, 'fpt_inference_rows_total{task="bit-xor"}') >= ROWS


def good_request(server, rows, expected, task: str = "mnist", row: int = 3) -> None:
    _, _, port = server
    inputs, outputs = triton_inputs(rows[task][row : row + 1], binary=True)
    assert_matches(triton_client(port).infer(task, inputs, outputs=outputs), expected[task], slice(row, row + 1))


def json_body(name="input", datatype="UINT8", shape=(1, 28, 28), data=None) -> bytes:
    data = [0] * int(np.prod(shape)) if data is None else data
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": data}]}).encode()


BAD_REQUESTS = [  # (id, model, body, headers, status, message)
    (
        "wrong-name",
        "mnist",
        json_body(name="image"),
        {},
        400,
        "has one input, 'input' (UINT8 [-1, 28, 28]); got 'image'",
    ),
    ("wrong-dtype", "mnist", json_body(datatype="FP32", data=[0.5] * 784), {}, 400, "must be UINT8, got FP32"),
    ("wrong-shape", "mnist", json_body(shape=(1, 27, 28)), {}, 400, "must have shape [-1, 28, 28], got [1, 27, 28]"),
    (
        "two-inputs",
        "bit-xor",
        json.dumps(
            {
                "inputs": [
                    {"name": "input", "datatype": "UINT8", "shape": [1, 10], "data": [0] * 10},
                    {"name": "extra", "datatype": "UINT8", "shape": [1], "data": [0]},
                ]
            }
        ).encode(),
        {},
        400,
        "takes one input",
    ),
    ("too-many-rows", "bit-xor", json_body(shape=(17, 10)), {}, 400, "between 1 and 16 rows"),
    (
        "nan",
        "mnist",
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [NaN, 1.0]}]}',
        {},
        400,
        "must be UINT8, got FP32",  # the declared datatype is refused before the data is read
    ),
    ("inf-binary", "mnist", None, "inf", 400, "must be UINT8, got FP32"),
    ("unknown-task", "nope", json_body(), {}, 404, "model 'nope' is not served here"),
    (
        "unknown-output",
        "mnist",
        json.dumps({"inputs": json.loads(json_body())["inputs"], "outputs": [{"name": "embedding"}]}).encode(),
        {},
        400,
        "has no output 'embedding'",
    ),
    ("too-large", "mnist", None, "large", 413, "the request body has 2097152 bytes; the limit is 1048576"),
    ("malformed-json", "mnist", b'{"inputs": [', {}, 400, "not valid JSON"),
    (
        "binary-header-too-long",
        "mnist",
        json_body(),
        {"Inference-Header-Content-Length": "99999"},
        400,
        "Inference-Header-Content-Length is 99999",
    ),
    ("binary-size-mismatch", "mnist", None, "short", 400, "binary bytes for it"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_its_status_and_the_server_carries_on(server, rows, expected, case):
    _, url, _ = server
    _, model, body, headers, status, message = case
    if headers == "inf":  # a binary FP32 tensor holding inf
        header = json.dumps(
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]}
        ).encode()
        body, headers = (
            header + np.array([1.0, np.inf], np.float32).tobytes(),
            {"Inference-Header-Content-Length": str(len(header))},
        )
    elif headers == "short":  # the header promises 784 bytes, the body carries 100
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "UINT8",
                        "shape": [1, 28, 28],
                        "parameters": {"binary_data_size": 784},
                    }
                ]
            }
        ).encode()
        body, headers = header + bytes(100), {"Inference-Header-Content-Length": str(len(header))}
    if headers == "large":  # declare 2 MiB and send the first KiB: the server answers from the header alone
        got, answer = post_declaring_length(url, f"/v2/models/{model}/infer", 2 << 20, b"{" + b" " * 1023)
    else:
        got, answer = http("POST", f"{url}/v2/models/{model}/infer", body, headers)
    assert got == status, answer
    assert message in json.loads(answer)["error"]
    good_request(server, rows, expected)


def test_tritonclient_reports_the_error_message(server):
    from tritonclient.utils import InferenceServerException

    _, _, port = server
    inputs, _ = triton_inputs(np.zeros((1, 10), np.uint8), binary=True)
    with pytest.raises(InferenceServerException, match="must have shape \\[-1, 28, 28\\], got \\[1, 10\\]"):
        triton_client(port).infer("mnist", inputs)


def test_metrics_count_failures_per_task(server, rows, expected):
    """Its own failures and successes, counted: the counts grow by exactly what this test sent."""
    _, url, _ = server
    names = (
        'fpt_inference_failures_total{code="400",task="mnist"}',
        'fpt_inference_failures_total{code="404",task="<unknown>"}',
        "fpt_queue_seconds_count",
        'fpt_compute_seconds_count{stage="backbone"}',
    )

    def counts() -> list[float]:
        return [metric_or_zero(url, name) for name in names]

    before = counts()
    assert http("POST", f"{url}/v2/models/mnist/infer", json_body(shape=(1, 27, 28)))[0] == 400
    assert http("POST", f"{url}/v2/models/nope/infer", json_body())[0] == 404
    good_request(server, rows, expected)
    after = counts()
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1
    assert after[2] == before[2] + 1 and after[3] >= before[3] + 1


def metric_or_zero(url: str, name: str) -> float:
    try:
        return metric(url, name)
    except AssertionError:  # a labelled series appears with its first count
        return 0.0


def test_graceful_shutdown_finishes_in_flight_requests(server, rows, expected):
    """Runs last in this module: SIGTERM while a request is in flight (its body half sent)."""
    import http.client

    proc, url, port = server
    x = rows["bit-xor"][7:8]
    body = json.dumps(
        {
            "inputs": [{"name": "input", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}],
            "outputs": [{"name": "labels"}, {"name": "probabilities"}],
        }
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/v2/models/bit-xor/infer")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    conn.send(body[:-8])
    deadline = time.monotonic() + 30
    while metric(url, "fpt_request_bytes_buffered") == 0:  # the server is reading this request's body
        assert time.monotonic() < deadline, "the server never began reading the request"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    conn.send(body[-8:])
    response = conn.getresponse()
    assert response.status == 200
    outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in json.loads(response.read())["outputs"]}
    conn.close()
    np.testing.assert_array_equal(outputs["labels"], expected["bit-xor"]["labels"][7:8])
    np.testing.assert_allclose(outputs["probabilities"], expected["bit-xor"]["probabilities"][7:8], atol=1e-5)
    assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    assert "shut down after finishing in-flight requests" in proc.log_path.read_text()


def test_serving_imports_and_predicts_with_torch_blocked(exported_repo, rows, expected, tmp_path):
    np.save(tmp_path / "x.npy", rows["bit-xor"])
    script = f"""
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")

sys.meta_path.insert(0, BlockTorch())
import numpy as np
import fpt_deploy.serving
from fpt_deploy.serving import PredictConfig, predict
from fpt_deploy.serving.server import create_app, ServerState
result = predict(PredictConfig(repo={str(exported_repo)!r}, task="bit-xor", input={str(tmp_path / "x.npy")!r},
                               output={str(tmp_path / "y.npz")!r}, threads=1))
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
print("rows", result.rows)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert done.returncode == 0, done.stderr
    assert f"rows {ROWS}" in done.stdout
    with np.load(tmp_path / "y.npz") as z:
        np.testing.assert_array_equal(z["labels"], expected["bit-xor"]["labels"])


def test_predict_writes_json_and_refuses_bad_input(exported_repo, rows, expected, tmp_path):
    np.save(tmp_path / "x.npy", rows["mnist"][:5])
    done = cli(
        "predict",
        "--repo",
        str(exported_repo),
        "-t",
        "mnist",
        "--input",
        str(tmp_path / "x.npy"),
        "--output",
        str(tmp_path / "y.json"),
        "--threads",
        "1",
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "y.json").read_text())
    assert doc["labels"] == expected["mnist"]["labels"][:5].tolist() and len(doc["probabilities"]) == 5
    np.save(tmp_path / "bad.npy", np.zeros((3, 27, 28), np.uint8))
    done = cli("predict", "--repo", str(exported_repo), "-t", "mnist", "--input", str(tmp_path / "bad.npy"))
    assert done.returncode == 2 and "must have shape [-1, 28, 28], got [3, 27, 28]" in done.stderr
    done = cli("predict", "--repo", str(exported_repo), "-t", "cifar10", "--input", str(tmp_path / "x.npy"))
    assert done.returncode == 2 and "task 'cifar10' is not in" in done.stderr


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorrt") is not None,
    reason="tensorrt is installed here: the tensorrt-marked test covers that runtime",
)
def test_tensorrt_runtime_explains_what_is_missing(exported_repo, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 10), np.uint8))
    done = cli(
        "predict",
        "--repo",
        str(exported_repo),
        "-t",
        "bit-xor",
        "--input",
        str(tmp_path / "x.npy"),
        "--runtime",
        "tensorrt",
    )
    assert done.returncode == 2
    assert "TensorRT engine" in done.stderr or "needs the tensorrt package" in done.stderr
