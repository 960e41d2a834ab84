"""Triton's protocol extensions beside ``infer`` over HTTP: model repository, statistics, model
configuration, and the page at ``/`` (classification is the service's: service.py).

    POST /v2/repository/index                       every task of the repository, with its state
    POST /v2/repository/models/{task}/load          open a task exported while the server runs
    POST /v2/repository/models/{task}/unload        drain its requests, then close it
    GET  /v2/models/stats, /v2/models/{task}/stats  Triton's statistics JSON (counts, durations)
    GET  /v2/models/{task}/config                   Triton's model configuration JSON
    GET  /                                          the page (``serving/static``)

``--model-control-mode`` follows Triton: ``none`` serves the tasks found at start-up and refuses load
and unload; ``explicit`` starts with only the tasks named by ``--load-model`` (``*``: all; none named:
no task at all, the server still live and ready) and takes the others through the API; ``poll``
follows the manifest (a task listed there is loaded, changed tasks reloaded, dropped ones unloaded)
and refuses the API calls, as Triton refuses them when it polls. ``RepositoryControl`` does the work
for HTTP, gRPC and the poller alike, one operation at a time; the model's ``add_task``/``remove_task``
keep every other task serving.
Spec: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_model_repository.md
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fpt_deploy.serving.errors import InvalidInputError
from fpt_deploy.serving.protocol import MODEL_VERSION
from fpt_deploy.serving.service import InferenceService, status_of

from fpt_deploy.artifacts import open_repository
from fpt_deploy.errors import FingerprintMismatchError, FptDeployError, UnknownNameError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MODES = ("none", "explicit", "poll")


class ModelControlError(FptDeployError, RuntimeError):
    """A load or unload the server's ``--model-control-mode`` does not allow: 400."""

    status = 400


def startup_tasks(config) -> list[str] | None:
    """The tasks a server of ``config`` (a ``ServeConfig``) loads at start-up, as Triton chooses them.

    ``None`` means every task of the served body: modes none and poll, or explicit with
    ``--load-model *``. In explicit mode, the tasks named by ``--load-model`` (an empty list without
    it); a name the repository does not list is refused, every such name in one error. Outside
    explicit mode ``--load-model`` has no effect, as in Triton, and a warning says so.
    """
    names = list(config.load_model)
    if config.model_control_mode != "explicit":
        if names:
            log.warning(
                "--load-model %s is ignored: it applies only with --model-control-mode explicit, and mode %s "
                "loads every task at start-up",
                " ".join(names),
                config.model_control_mode,
            )
        return None
    if names == ["*"]:
        return None
    listed = open_repository(config.repo).tasks
    unknown = [n for n in names if n not in listed]
    if unknown:
        raise UnknownNameError(
            f"--load-model names {', '.join(map(repr, unknown))}, not in {config.repo}; "
            f"its tasks: {', '.join(sorted(listed)) or '(none yet)'}"
        )
    return list(dict.fromkeys(names))


class RepositoryControl:
    """Loads and unloads the repository's tasks while the server runs (Triton's model control)."""

    def __init__(self, state, repo: Path, mode: str = "none", poll_interval: float = 5.0) -> None:
        if mode not in MODES:
            raise ModelControlError(f"model control mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.state, self.repo, self.mode, self.poll_interval = state, Path(repo), mode, poll_interval
        self._lock = threading.Lock()  # one load or unload at a time (API calls and the poller)
        self._stop = threading.Event()
        listed = self._listed_checksums()
        self._checksums = {n: c for n, c in listed.items() if n in state.model.tasks}  # of what is loaded
        self._poller = None
        if mode == "poll":
            self._poller = threading.Thread(target=self._poll, name="fpt-repository-poll", daemon=True)
            self._poller.start()

    @property
    def fingerprint(self) -> str:
        return self.state.model.backbone.fingerprint

    def _listed_checksums(self) -> dict[str, dict]:
        repo = open_repository(self.repo)
        return {name: dict(t.sha256) for name, t in repo.tasks.items() if t.fingerprint == self.fingerprint}

    # -- Triton's repository API ----------------------------------------------------------------------

    def index(self, ready: bool = False) -> list[dict]:
        """Triton's repository index: each task of the manifest with ``state`` READY or UNAVAILABLE."""
        loaded = set(self.state.model.tasks)
        entries = []
        try:
            listed = open_repository(self.repo).tasks
        except FptDeployError as e:  # a manifest being rewritten, say: report what is served
            log.warning("repository index: %s", e)
            listed = {}
        for name in sorted(set(listed) | loaded):
            if name in loaded:
                entries.append({"name": name, "version": MODEL_VERSION, "state": "READY", "reason": ""})
            elif not ready:
                art = listed[name]
                reason = (
                    "unloaded"
                    if art.fingerprint == self.fingerprint
                    else f"trained on backbone {art.fingerprint[:16]}, not the served {self.fingerprint[:16]}"
                )
                entries.append({"name": name, "version": MODEL_VERSION, "state": "UNAVAILABLE", "reason": reason})
        return entries

    def _check_mode(self, what: str) -> None:
        if self.mode == "none":
            raise ModelControlError(
                f"explicit model {what} is not allowed: the server runs with --model-control-mode none; "
                "restart it with --model-control-mode explicit"
            )
        if self.mode == "poll":
            raise ModelControlError(
                f"explicit model {what} is not allowed while the server polls the repository "
                "(--model-control-mode poll): export or remove the task instead"
            )

    def load(self, name: str) -> None:
        """Open task ``name`` of the repository (again, when its files changed since it was loaded)."""
        self._check_mode("load")
        self._load(name)

    def unload(self, name: str) -> None:
        """Stop taking requests for ``name``, finish its queued and in-flight ones, then close it."""
        self._check_mode("unload")
        self._unload(name)

    def _load(self, name: str) -> None:
        with self._lock:
            repo = open_repository(self.repo)
            art = repo.task(name)  # UnknownNameError naming the tasks it has
            if art.fingerprint != self.fingerprint:
                raise FingerprintMismatchError(
                    f"task {name!r} was trained on backbone {art.fingerprint[:16]}, but this server runs "
                    f"{self.fingerprint[:16]}; serve it from a server of that backbone, or train it on this one"
                )
            if name in self.state.model.tasks:
                if self._checksums.get(name) == art.sha256:
                    log.info("task %s is loaded and unchanged", name)
                    return
                log.info("task %s changed in the repository; reloading it", name)
                self.state.model.remove_task(name)
                self.state.metrics.forget(name)
            try:
                self.state.model.add_task(name)
            except Exception:
                if name in self.state.model.tasks:  # listed before the runtime refused it (capacity): undo
                    self.state.model.remove_task(name)
                raise
            self._checksums[name] = dict(art.sha256)
            log.info("loaded task %s", name)

    def _unload(self, name: str) -> None:
        with self._lock:
            self.state.model.task(name)  # UnknownNameError naming the served tasks
            self.state.model.remove_task(name)
            self._checksums.pop(name, None)
            self.state.metrics.forget(name)
            log.info("unloaded task %s", name)

    # -- poll mode ------------------------------------------------------------------------------------

    def poll_once(self) -> None:
        """Make the served tasks what the manifest lists on this backbone (one pass of the poller)."""
        try:
            listed = self._listed_checksums()
        except FptDeployError as e:
            log.warning("repository poll: %s; trying again in %.0fs", e, self.poll_interval)
            return
        for name in sorted(set(self.state.model.tasks) - set(listed)):
            self._try(self._unload, name)
        for name, checksums in sorted(listed.items()):
            if self._checksums.get(name) != checksums:
                self._try(self._load, name)

    def _try(self, action, name: str) -> None:
        try:
            action(name)
        except FptDeployError as e:
            log.error("repository poll: %s of %s failed: %s", action.__name__.strip("_"), name, e)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            if not getattr(self.state, "ready", True):
                return
            self.poll_once()

    def close(self) -> None:
        self._stop.set()


# -- routes -----------------------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def control_of(state) -> RepositoryControl:
    """The state's repository control, made on first use from its ``ServeConfig`` (mode none without one)."""
    if getattr(state, "control", None) is None:
        config = getattr(state, "config", None)
        if config is None:
            state.control = RepositoryControl(state, state.model.repository.root)
        else:
            state.control = RepositoryControl(state, config.repo, config.model_control_mode, config.poll_interval)
    return state.control


def router(service: InferenceService, control, read_json) -> APIRouter:
    """The extension routes; the server includes them before its own ``/v2/models/{name}`` routes.

    ``control`` does the repository operations (``load``, ``unload``, ``index``); ``read_json`` reads a
    request's small JSON object body, bounded and counted as ``infer``'s are (server.py).
    """
    api = APIRouter()

    async def in_thread(fn, *args):
        """Run a blocking call (opening sessions, draining a task) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def guarded(fn):
        try:
            return await fn()
        except Exception as e:  # noqa: BLE001  (every failure answers {"error": ...})
            status = status_of(e)
            if status >= 500:
                log.exception("repository operation failed")
            return _error(status, str(e))

    @api.post("/v2/repository/index")
    async def repository_index(request: Request):
        async def run():
            ready = (await read_json(request)).get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidInputError(f"'ready' must be true or false, got {ready!r}")
            return JSONResponse(await in_thread(control.index, ready))

        return await guarded(run)

    @api.post("/v2/repository/models/{name}/load")
    async def repository_load(name: str, request: Request):
        async def run():
            await read_json(request)  # parameters (a config override) are not supported; the body must parse
            await in_thread(control.load, name)
            return Response(status_code=200)

        return await guarded(run)

    @api.post("/v2/repository/models/{name}/unload")
    async def repository_unload(name: str, request: Request):
        async def run():
            await read_json(request)
            await in_thread(control.unload, name)
            return Response(status_code=200)

        return await guarded(run)

    async def described(make) -> Response:
        async def run():
            return JSONResponse(make())

        return await guarded(run)

    async def stats_of(name: str | None, version: str | None) -> Response:
        return await described(lambda: {"model_stats": service.statistics(name, version)})

    @api.get("/v2/models/stats")
    async def all_stats():
        return await stats_of(None, None)

    @api.get("/v2/models/{name}/stats")
    @api.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(name: str, version: str | None = None):
        return await stats_of(name, version)

    @api.get("/v2/models/{name}/config")
    @api.get("/v2/models/{name}/versions/{version}/config")
    async def config(name: str, version: str = MODEL_VERSION):
        return await described(lambda: service.model_config(service.task(name, version)))

    @api.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/static/{file}", include_in_schema=False)
    async def static(file: str):
        if file not in _STATIC_FILES:  # the page's own files only: no path ever reaches the file system
            return _error(404, f"no static file {file!r}")
        return FileResponse(STATIC / file, media_type=_STATIC_FILES[file])

    return api


_STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
