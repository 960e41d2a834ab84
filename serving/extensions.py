"""Triton's protocol extensions beside ``infer`` over HTTP: model repository, statistics, model
configuration, and the page at ``/`` (classification is the service's: service.py).

    POST /v2/repository/index                       every task of the repository, with its state
    POST /v2/repository/models/{task}/load          open a task exported while the server runs
    POST /v2/repository/models/{task}/unload        drain its requests, then close it
    GET  /v2/models/stats, /v2/models/{task}/stats  Triton's statistics JSON (counts, durations)
    GET  /v2/models/{task}/config                   Triton's model configuration JSON
    GET  /                                          the page (``serving/static``)

Repository control itself (modes, task states, the poller) is ``serving.repository``.
Spec: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_model_repository.md
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fpt_deploy.serving.errors import InvalidInputError
from fpt_deploy.serving.protocol import MODEL_VERSION
from fpt_deploy.serving.repository import request_parameters
from fpt_deploy.serving.service import InferenceService, status_of

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


# -- routes -----------------------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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
            parameters = request_parameters(await read_json(request), "load")
            await in_thread(control.load, name, parameters)
            return Response(status_code=200)

        return await guarded(run)

    @api.post("/v2/repository/models/{name}/unload")
    async def repository_unload(name: str, request: Request):
        async def run():
            parameters = request_parameters(await read_json(request), "unload")
            await in_thread(control.unload, name, parameters)
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
