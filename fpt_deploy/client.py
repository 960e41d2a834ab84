"""A served model from Python: infer by task name, numpy in, a dict of numpy arrays out.

    with fpt_deploy.Client("localhost:8000") as client:
        client.tasks()                                 # ["bit-xor", "mnist"]
        out = client.infer("mnist", images)            # {"logits": (N, 10), "probabilities": ..., ...}

A thin layer over ``tritonclient.http`` (a base dependency): the task's input name and datatype come
from the server's model metadata, so the caller passes only the array. The server is ``fpt-deploy
serve`` or Triton serving the repository ``fpt-deploy export --format triton`` wrote.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fpt_deploy.errors import ConfigError


class Client:
    """An HTTP client of one server (KServe v2 / Triton protocol); ``url`` is ``host:port``."""

    def __init__(self, url: str = "localhost:8000", *, timeout_s: float = 60.0) -> None:
        import tritonclient.http as http

        self._http = http
        self._client = http.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        self._metadata: dict[str, dict] = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def ready(self) -> bool:
        """Whether the server is up and ready to serve."""
        return bool(self._client.is_server_ready())

    def tasks(self) -> list[str]:
        """The tasks (models) the server has ready, sorted."""
        index = self._client.get_model_repository_index()
        return sorted(m["name"] for m in index if m.get("state", "READY") == "READY")

    def metadata(self, task: str) -> dict:
        """The task's model metadata: its input (name, datatype, shape) and outputs."""
        if task not in self._metadata:
            self._metadata[task] = self._client.get_model_metadata(task)
        return self._metadata[task]

    def infer(self, task: str, inputs: np.ndarray, *, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run ``inputs`` (rows, *example shape) through ``task``; ``outputs`` names some (default: all)."""
        from tritonclient.utils import triton_to_np_dtype

        meta = self.metadata(task)
        (spec,) = meta["inputs"]
        x = np.asarray(inputs)
        want = np.dtype(triton_to_np_dtype(spec["datatype"]))
        if x.dtype != want:
            if not _fits(x, want):
                raise ConfigError(f"task {task!r} takes {want} input ({spec['datatype']}); got {x.dtype}")
            x = x.astype(want)
        tensor = self._http.InferInput(spec["name"], list(x.shape), spec["datatype"])
        tensor.set_data_from_numpy(x, binary_data=True)
        names = list(outputs) if outputs is not None else [o["name"] for o in meta["outputs"]]
        requested = [self._http.InferRequestedOutput(n, binary_data=True) for n in names]
        result = self._client.infer(task, [tensor], outputs=requested)
        return {n: result.as_numpy(n) for n in names}


def _fits(x: np.ndarray, want: np.dtype) -> bool:
    """Whether ``x`` casts to ``want`` without changing a value: integers in range, or a same-kind cast."""
    if x.dtype.kind in "biu" and want.kind in "iu":
        info = np.iinfo(want)
        return x.size == 0 or (info.min <= x.min() and x.max() <= info.max)
    return bool(np.can_cast(x.dtype, want, casting="same_kind"))
