"""Errors of the serving path, each mapped to the HTTP status the server answers with."""

from __future__ import annotations

from fpt_deploy.errors import FptDeployError


class InvalidInputError(FptDeployError, ValueError):
    """A request's tensors do not match what the task expects (wrong name, shape, dtype, value): 400."""

    status = 400


class MalformedRequestError(FptDeployError, ValueError):
    """A request body is not valid Open Inference Protocol JSON or binary data: 400."""

    status = 400


class RequestTooLargeError(FptDeployError, ValueError):
    """A request body exceeds the server's limit: 413."""

    status = 413


class QueueFullError(FptDeployError, RuntimeError):
    """The batcher's queue is full; the client should retry later: 503."""

    status = 503


class ServerClosingError(FptDeployError, RuntimeError):
    """The server is shutting down and takes no new requests: 503."""

    status = 503


class ServerBusyError(FptDeployError, RuntimeError):
    """The server already holds as many request bytes as it may buffer; the client should retry later: 503."""

    status = 503


class UnloadTimeoutError(FptDeployError, TimeoutError):
    """An unload whose task still had requests when its timeout passed; the task keeps serving: 409.

    A conflict with the task's state, not a server failure: the client retries once the requests finish.
    """

    status = 409
