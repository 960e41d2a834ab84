"""Triton's model repository control: the tasks a server loads at start-up, and load, unload and the
index while it runs, for HTTP, gRPC and the poller alike.

``--model-control-mode`` follows Triton: ``none`` serves the tasks found at start-up and refuses load
and unload; ``explicit`` starts with only the tasks named by ``--load-model`` (``*``: all; none named:
no task at all, the server still live and ready) and takes the others through the API; ``poll``
follows the manifest (a task listed there is loaded, changed tasks reloaded, dropped ones unloaded)
and refuses the API calls, as Triton refuses them when it polls.

Each task's state (LOADING, READY, UNLOADING, UNAVAILABLE: ``serving.model.TaskState``) lives with it
in ``ServingModel``, whose ``add_task``/``remove_task`` are all or nothing and keep every other task
serving. ``RepositoryControl`` runs them one at a time and reports the states as Triton's index.
A task is reloaded when its task file changed in any way (contract, labels, checksums of its files).
Spec: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_model_repository.md
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fpt_deploy.serving.metrics import MODEL_VERSION
from fpt_deploy.serving.model import UNLOAD_TIMEOUT_S, TaskState

from fpt_deploy.artifacts import open_repository
from fpt_deploy.errors import FptDeployError, UnknownNameError

log = logging.getLogger(__name__)

MODES = ("none", "explicit", "poll")


class ModelControlError(FptDeployError, RuntimeError):
    """A load or unload the server's ``--model-control-mode`` or its parameters do not allow: 400."""

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
    repo = open_repository(config.repo, skip_unreadable=True)
    listed = set(repo.tasks) | set(repo.unreadable)
    unknown = [n for n in names if n not in listed]
    if unknown:
        raise UnknownNameError(
            f"--load-model names {', '.join(map(repr, unknown))}, not in {config.repo}; "
            f"its tasks: {', '.join(sorted(listed)) or '(none yet)'}"
        )
    return list(dict.fromkeys(names))


def request_parameters(body: dict, operation: str) -> dict | None:
    """The ``parameters`` of a load or unload request object (Triton's ``$repository_load_request``);
    any other member is refused by name."""
    unknown = sorted(set(body) - {"parameters"})
    if unknown:
        raise ModelControlError(
            f"{operation} request members {', '.join(map(repr, unknown))} are not supported; "
            "the request object holds only 'parameters'"
        )
    return body.get("parameters")


def check_parameters(parameters: dict | None, operation: str) -> None:
    """Refuse, naming each, the parameters of ``operation`` ("load" or "unload") this server cannot apply.

    Load takes none. Triton's ``config`` (a model configuration to load with) cannot apply here: a
    task's input, outputs and labels come from its export, and batching is the server's, shared by
    every task. Nor can ``file:...`` (model files sent with the request): tasks come from the
    repository. Unload takes Triton's ``unload_dependents`` (true or false): no task has dependents.
    """
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise ModelControlError(f"{operation} 'parameters' must be an object, got {type(parameters).__name__}")
    problems = []
    for key, value in parameters.items():
        if operation == "unload" and key == "unload_dependents":
            if not isinstance(value, bool):
                problems.append(f"'unload_dependents' must be true or false, got {value!r}")
        elif operation == "load" and key == "config":
            problems.append(
                "'config' (a model configuration to load the task with) is not supported: a task's input, "
                "outputs and labels come from its export, and batching from the server's options; re-export "
                "the task, or restart the server with other options"
            )
        elif operation == "load" and key.startswith("file:"):
            problems.append(
                f"{key[:60]!r} (a model file sent with the load) is not supported: export the task into "
                "the repository, then load it by name"
            )
        else:
            problems.append(f"{key[:60]!r} is not a parameter of {operation}")
    if problems:
        raise ModelControlError(f"{operation} refused: {'; '.join(problems)}")


class RepositoryControl:
    """Loads and unloads the repository's tasks while the server runs (Triton's model control).

    ``state`` is the server's (``model``, ``metrics``, ``ready``). ``unload_timeout`` bounds how long an
    unload (or the unload half of a reload) waits for a task's requests; past it the task keeps serving
    and the call fails with 503.
    """

    def __init__(
        self,
        state,
        repo: Path,
        mode: str = "none",
        poll_interval: float = 5.0,
        *,
        unload_timeout: float = UNLOAD_TIMEOUT_S,
    ) -> None:
        if mode not in MODES:
            raise ModelControlError(f"model control mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.state, self.repo, self.mode, self.poll_interval = state, Path(repo), mode, poll_interval
        self.unload_timeout = unload_timeout
        self._lock = threading.Lock()  # one load or unload at a time (API calls and the poller)
        self._stop = threading.Event()
        self._poller = None
        if mode == "poll":
            self._poller = threading.Thread(target=self._poll, name="fpt-repository-poll", daemon=True)
            self._poller.start()

    @property
    def fingerprint(self) -> str:
        return self.state.model.backbone.fingerprint

    # -- Triton's repository API ----------------------------------------------------------------------

    def index(self, ready: bool = False) -> list[dict]:
        """Triton's repository index: each task of the manifest (and each served one) with its state,
        and for an UNAVAILABLE one the reason (unloaded, another body, or why its load failed)."""
        model = self.state.model
        try:
            repo = open_repository(self.repo, skip_unreadable=True)
            listed, unreadable = repo.tasks, repo.unreadable
        except FptDeployError as e:  # a manifest being rewritten, say: report what is served
            log.warning("repository index: %s", e)
            listed, unreadable = {}, {}
        entries = []
        for name in sorted(set(listed) | set(unreadable) | set(model.tasks)):
            state, reason = model.state_of(name)
            if ready and state is not TaskState.READY:
                continue
            if state is TaskState.UNAVAILABLE:
                art = listed.get(name)
                if name in unreadable:
                    reason = unreadable[name]
                elif art is not None and art.fingerprint != self.fingerprint:
                    reason = f"trained on backbone {art.fingerprint[:16]}, not the served {self.fingerprint[:16]}"
                else:
                    reason = reason or "unloaded"
            entries.append({"name": name, "version": MODEL_VERSION, "state": state.value, "reason": reason})
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

    def load(self, name: str, parameters: dict | None = None) -> None:
        """Open task ``name`` of the repository (again, when its task file changed since it was loaded)."""
        self._check_mode("load")
        check_parameters(parameters, "load")
        self._load(name)

    def unload(self, name: str, parameters: dict | None = None) -> None:
        """Stop taking requests for ``name``, finish its queued and in-flight ones, then close it."""
        self._check_mode("unload")
        check_parameters(parameters, "unload")
        self._unload(name)

    def _load(self, name: str) -> None:
        with self._lock:
            model = self.state.model
            before = model.tasks.get(name)
            task = model.add_task(name, self.unload_timeout)
            if task is before:
                log.info("task %s is loaded and unchanged", name)
            elif before is not None:
                self.state.metrics.forget(name)  # the statistics of the version that was unloaded

    def _unload(self, name: str) -> None:
        with self._lock:
            self.state.model.remove_task(name, self.unload_timeout)
            self.state.metrics.forget(name)

    # -- poll mode ------------------------------------------------------------------------------------

    def poll_once(self) -> None:
        """Make the served tasks what the manifest lists on this backbone (one pass of the poller).

        A task whose load fails is tried again on the next pass (its error is logged once); one that
        is served and whose new task file cannot be read keeps serving the version it has.
        """
        try:
            repo = open_repository(self.repo, skip_unreadable=True)
        except FptDeployError as e:
            log.warning("repository poll: %s; trying again in %.0fs", e, self.poll_interval)
            return
        model = self.state.model
        ours = {name: art for name, art in repo.tasks.items() if art.fingerprint == self.fingerprint}
        for name in sorted(set(model.tasks) - set(ours) - set(repo.unreadable)):
            self._try(self._unload, name)
        for name in sorted(set(ours) | set(repo.unreadable)):
            task = model.tasks.get(name)
            if task is None or name in repo.unreadable or task.source != ours[name].to_json():
                self._try(self._load, name)

    def _try(self, action, name: str) -> None:
        what = action.__name__.strip("_")
        try:
            action(name)
        except FptDeployError as e:
            if action != self._load:  # a failed load is logged, once per reason, where it is recorded
                log.warning("repository poll: %s of %s failed: %s", what, name, e)
        except Exception:  # noqa: BLE001  (the poller outlives any one task's failure)
            log.exception("repository poll: %s of %s failed", what, name)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            if not getattr(self.state, "ready", True):
                return
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001
                log.exception("repository poll failed; trying again in %.0fs", self.poll_interval)

    def close(self) -> None:
        self._stop.set()


def control_of(state) -> RepositoryControl:
    """The state's repository control, made on first use from its ``ServeConfig`` (mode none without one)."""
    if getattr(state, "control", None) is None:
        config = getattr(state, "config", None)
        if config is None:
            state.control = RepositoryControl(state, state.model.repository.root)
        else:
            state.control = RepositoryControl(state, config.repo, config.model_control_mode, config.poll_interval)
    return state.control
