"""Connection-level limits of the HTTP server: header size, header and body read timeouts, shutdown.

uvicorn's httptools protocol has no header size limit and no read timeouts: a client could send a
50 MB header, or open a connection and send nothing, or stall an upload one byte short, and hold the
connection forever (and, for an upload, the server's shutdown with it). ``limited_protocol`` returns
a subclass that bounds each of these the way nginx does (``large_client_header_buffers``,
``client_header_timeout``, ``client_body_timeout``):

- request line and headers over ``max_header_bytes``: 431, connection closed;
- headers not complete ``header_timeout_s`` after a request's first byte (or after the connection
  opened): 408, closed (a connection that sent nothing is just closed);
- a body that receives no data for ``body_timeout_s``, or fewer than ``min_body_rate`` bytes a
  second over a whole window of ``body_timeout_s`` (a trickle that keeps the connection alive): 408,
  closed, and the application sees a disconnect (``scope["fpt.closed"]`` names why). Time when the
  server itself paused reading (flow control, a pipelined request waiting its turn) does not count
  against the client;
- on shutdown, connections mid-headers are closed, and uploads get ``SHUTDOWN_BODY_IDLE_S`` between
  bytes instead of ``body_timeout_s``: a stalled upload is dropped at once, a flowing one finishes.

Each closing is reported to ``on_close(reason)`` (the server counts them in /metrics).

The header limit counts the bytes of the current request only: when one read holds the end of a
request and the start of the next (pipelining, or a client's writes coalesced), the next request's
header bytes are those parsed after the first one ended, never the whole read.

Bodies are bounded by the application: ``read_body`` refuses one over its route's limit from its
Content-Length before reading it (413), and takes the bytes it actually holds from the server-wide
``BodyBudget`` as they arrive (503 beyond it), so a declared length alone reserves nothing;
``read_json_body`` adds UTF-8 and the JSON depth and number-length limits. Every route that
reads a body (``infer``, the extensions) goes through them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httptools
from fpt_deploy.serving.errors import InvalidInputError, MalformedRequestError, RequestTooLargeError, ServerBusyError
from fpt_deploy.serving.protocol import JsonLimits, parse_json
from prometheus_client import Gauge
from starlette.requests import Request
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

# During shutdown an upload may go this long without data before it is dropped.
SHUTDOWN_BODY_IDLE_S = 1.0
CLOSED_SCOPE_KEY = "fpt.closed"  # set in a request's ASGI scope when the server closed its connection
BODY_CLOSINGS = ("body_timeout", "body_too_slow")  # reasons a connection is closed mid-body


@dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    max_header_bytes: int = 16 << 10
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    min_body_rate: float = 1024.0  # bytes/s over each body_timeout_s window of an unfinished body; 0: none


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request the protocol has already answered."""


def limited_protocol(limits: ConnectionLimits, on_close: Callable[[str], None] = lambda reason: None) -> type:
    """An ``HttpToolsProtocol`` subclass enforcing ``limits``; pass it as ``uvicorn.Config(http=...)``."""

    class LimitedHttpToolsProtocol(_LimitedHttpToolsProtocol):
        pass

    LimitedHttpToolsProtocol.limits = limits
    LimitedHttpToolsProtocol.on_close = staticmethod(on_close)
    return LimitedHttpToolsProtocol


class _LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits: ConnectionLimits
    on_close: Callable[[str], None]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._timer = None
        self._phase = "idle"  # idle (between requests) | headers | body
        self._header_bytes = 0
        self._last_data = 0.0
        self._body_idle = self.limits.body_timeout_s
        self._refused = False
        self._bytes_seen = False
        # header bytes: counted from the raw reads, unless the request began after another ended in one read
        self._count_raw_header_bytes = True
        self._completed_in_read = False
        # the minimum body rate: bytes received in the current window, and whether reading paused in it
        self._window_start = 0.0
        self._window_bytes = 0
        self._window_paused = False

    # -- timers --------------------------------------------------------------------------------------

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._phase == "body":
            self._check_body()
        elif self._phase == "headers" or self._bytes_seen:
            self._refuse(408, "header_timeout", f"the request headers took over {self.limits.header_timeout_s:g} s")
        else:  # connected and never sent a byte
            self.on_close("idle_timeout")
            self.transport.close()

    def _check_body(self) -> None:
        """The body's idle and rate limits, on its timer; re-armed for the earlier of the two next checks."""
        now = time.monotonic()
        if self.flow.read_paused and self.cycle is not None and not self.cycle.response_complete:
            self._last_data = now  # the server stopped reading, not the client
            self._new_window(now)
        if now - self._last_data >= self._body_idle:
            self._refuse(408, "body_timeout", f"no request body data for {self._body_idle:g} s; connection closed")
            return
        window = self.limits.body_timeout_s
        if self.limits.min_body_rate > 0 and now - self._window_start >= window:
            rate = self._window_bytes / (now - self._window_start)
            if rate < self.limits.min_body_rate and not self._window_paused:
                self._refuse(
                    408,
                    "body_too_slow",
                    f"the request body arrived at {rate:.0f} bytes/s over {window:g} s, under the minimum of "
                    f"{self.limits.min_body_rate:g} bytes/s; connection closed",
                )
                return
            self._new_window(now)
        next_check = self._last_data + self._body_idle
        if self.limits.min_body_rate > 0:
            next_check = min(next_check, self._window_start + window)
        self._arm(max(next_check - now, 0.0))

    def _new_window(self, now: float) -> None:
        self._window_start, self._window_bytes, self._window_paused = now, 0, self.flow.read_paused

    # -- refusing ------------------------------------------------------------------------------------

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer ``status`` with ``{"error": message}`` unless the application already answered; close."""
        self._refused = True
        self._disarm()
        self.on_close(reason)
        if reason not in BODY_CLOSINGS:  # the application logs those, with its request id
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            self.logger.warning("connection from %s closed with %d (%s)", client, status, reason)
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            body = json.dumps({"error": message}).encode()
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
            ]
            self.transport.write(b"".join(head) + body)
        if cycle is not None and not cycle.response_complete:
            cycle.scope[CLOSED_SCOPE_KEY] = reason
            cycle.response_started = cycle.response_complete = True  # the application's answer goes nowhere
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    # -- protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s)  # a connection that sends nothing is closed too

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._bytes_seen = True
        if self._phase == "body":
            self._last_data = time.monotonic()
        self._completed_in_read = False
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:  # also a callback's _Refused, after its answer was sent
            if not self._refused:
                self.logger.warning("Invalid HTTP request received.")
                self.on_close("bad_request")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._phase == "headers" and not self._refused:
            if self._count_raw_header_bytes:  # the request began at or before this read's first byte
                self._header_bytes += len(data)
            else:  # it began after another request ended in this read: what was parsed of it so far
                self._header_bytes = self._parsed_header_bytes()
                self._count_raw_header_bytes = True  # its next reads are its own
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(431, "header_too_large", self._header_message(self._header_bytes))

    def _parsed_header_bytes(self) -> int:
        return len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase, self._header_bytes = "headers", 0
        self._count_raw_header_bytes = not self._completed_in_read
        if self._timer is None:  # a keep-alive connection's next request: its headers' clock starts now
            self._arm(self.limits.header_timeout_s)

    def on_headers_complete(self) -> None:
        size = self._parsed_header_bytes()
        if size > self.limits.max_header_bytes:
            self._refuse(431, "header_too_large", self._header_message(size))
            raise _Refused
        super().on_headers_complete()  # a pipelined request pauses reading here until its turn
        self._phase, self._last_data = "body", time.monotonic()
        self._new_window(self._last_data)
        self._check_body()

    def on_body(self, body: bytes) -> None:
        self._window_bytes += len(body)
        super().on_body(body)
        self._window_paused |= self.flow.read_paused

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = "idle"
        self._completed_in_read = True
        self._disarm()

    def shutdown(self) -> None:
        if self._phase == "headers":  # a request not yet begun is not in flight
            self._refuse(503, "shutdown", "the server is shutting down; retry on another replica")
            return
        super().shutdown()
        if self._phase == "body":
            self._body_idle = min(self._body_idle, SHUTDOWN_BODY_IDLE_S)
            self._arm(0)

    def _header_message(self, size: int) -> str:
        return f"the request line and headers exceed {self.limits.max_header_bytes} bytes ({size} received)"


# -- bodies -----------------------------------------------------------------------------------------


class BodyBudget:
    """Request body bytes held across all connections, bounded: beyond ``limit`` a request gets 503.

    Holders take the bytes they hold as they come to hold them (a body as its bytes arrive, never its
    declared length up front) and give them back when they let them go. The HTTP event loop and gRPC's
    threads share one budget, so taking and giving hold a lock.
    """

    def __init__(self, limit: int, gauge: Gauge | None = None) -> None:
        self.limit, self.held, self._gauge = limit, 0, gauge
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            if self.held + n > self.limit:
                raise ServerBusyError(
                    f"the server holds {self.held} bytes of other requests' bodies (limit {self.limit}); retry later"
                )
            self.held += n
            if self._gauge is not None:
                self._gauge.set(self.held)

    def give(self, n: int) -> None:
        with self._lock:
            self.held -= n
            if self._gauge is not None:
                self._gauge.set(self.held)


async def read_body(request: Request, limit: int, budget: BodyBudget) -> tuple[bytearray, int]:
    """(body, bytes taken from ``budget``): 413 from Content-Length before reading, or once over ``limit``.

    The bytes are taken as they arrive: a client that declares a large body and sends it slowly holds
    only what it sent (and the protocol drops it below the minimum rate). The caller gives the bytes
    back (``budget.give``) once it no longer holds the body, also when this raises: what was taken so
    far is then in the error's ``reserved`` attribute.
    """
    declared = request.headers.get("content-length")
    reserved = 0
    try:
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()) or len(declared) > 18:
                raise MalformedRequestError(f"Content-Length must be an integer, got {declared[:40]!r}")
            if int(declared) > limit:
                raise RequestTooLargeError(f"the request body has {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:  # chunked (a declared length was checked above)
                raise RequestTooLargeError(f"the request body exceeds the limit of {limit} bytes")
            budget.take(len(chunk))
            reserved += len(chunk)
            body += chunk
        return body, reserved
    except BaseException as e:
        e.reserved = reserved
        raise


async def read_json_body(request, budget: BodyBudget, limits: JsonLimits, limit: int = 64 << 10) -> dict:
    """A small JSON object body (``{}`` when empty), bounded like ``infer``'s: for routes beside it."""
    body, reserved = b"", 0
    try:
        body, reserved = await read_body(request, limit, budget)
    except BaseException as e:
        budget.give(getattr(e, "reserved", 0))
        raise
    try:
        if not bytes(body).strip():
            return {}
        doc, _ = parse_json(bytes(body), limits)
    finally:
        budget.give(reserved)
    if not isinstance(doc, dict):
        raise InvalidInputError("the request body must be a JSON object")
    return doc
