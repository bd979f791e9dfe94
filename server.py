"""How the API is served (`python server.py`) and how every request is bounded in size and time."""

import argparse
import asyncio
import os
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from logs import logging_config
from middleware import encoded, security_headers
from observability import MULTIPROCESS_DIRECTORY, refuse
from problems import problem_bytes, send_problem
from settings import Settings, get_settings, load_settings, log_format

# The security headers, for the answers the server sends before (or instead of) the app.
PROTOCOL_HEADERS = encoded(security_headers(""))


# --- the body limit, in the app ----------------------------------------------------------------


def _declared_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() else None


async def _send_too_large(send: Send, limit: int) -> None:
    # The rest of the body is never read, so the connection cannot carry another request.
    refuse("body_too_large")
    await send_problem(send, 413, f"The request body is larger than {limit} bytes.")


class LimitRequestBody:
    """413 for a request body over HTTP_MAX_BODY_BYTES, before any route reads it (bodies are read
    before authentication): at once when Content-Length says so, otherwise as soon as the bytes
    received pass the limit. The app then sees the client as gone, and the rest is never read."""

    def __init__(self, app: ASGIApp, settings: Settings | None = None) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if "transfer-encoding" not in headers and headers.get("content-length", "0") == "0":
            await self.app(scope, receive, send)  # no body: nothing to count (every GET)
            return
        limit = (self.settings or get_settings()).HTTP_MAX_BODY_BYTES
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _send_too_large(send, limit)
            return
        received = 0
        refused = response_started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not response_started:
                        await _send_too_large(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused:  # the 413 is the answer; whatever the app makes of the "disconnect" is not
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


async def busy_problem(_scope: Scope, _receive: Receive, send: Send) -> None:
    """503 problem for a request past HTTP_MAX_CONCURRENCY (uvicorn's own is plain text); its
    connection is closed: at the limit, a connection given back is worth most."""
    detail = "The server is at its connection limit; retry shortly."
    refuse("server_busy")
    await send_problem(send, 503, detail, PROTOCOL_HEADERS)


# --- header size and slow clients, in the server -----------------------------------------------


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (one per connection) with limits httptools lacks: a request's
    line and headers must arrive within HTTP_HEADER_TIMEOUT_SECONDS of connecting or of its first
    byte, and within HTTP_MAX_HEADER_BYTES (431); its body within HTTP_BODY_TIMEOUT_SECONDS of the
    headers (408). Idle time between requests stays uvicorn's keep-alive timeout."""

    # What this relies on in uvicorn beyond its options, all checked against the pinned version
    # by tests/test_server.py::test_uvicorn_still_calls_what_the_bounded_protocol_overrides (and,
    # in effect, by the 408, 431 and 503 tests there): the methods overridden here, among them
    # the private `_start_asgi_task` (where the app past limit_concurrency is swapped for a
    # problem) and `flow_control.service_unavailable` (that app); and the protocol's attributes
    # `transport`, `loop`, `client`, `connections`, `pipeline`, `logger`,
    # `server_state.default_headers` and `cycle` (`response_started`, `response_complete`,
    # `disconnected`, `message_event`).

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = get_settings()
        self.max_header_bytes = settings.HTTP_MAX_HEADER_BYTES
        self.header_timeout = settings.HTTP_HEADER_TIMEOUT_SECONDS
        self.body_timeout = settings.HTTP_BODY_TIMEOUT_SECONDS
        self.max_connections_per_client = settings.HTTP_MAX_CONNECTIONS_PER_CLIENT
        self.trusted_proxies = {ip.strip() for ip in settings.FORWARDED_ALLOW_IPS.split(",")}
        self.header_deadline: asyncio.TimerHandle | None = None
        self.body_deadline: asyncio.TimerHandle | None = None
        # A new connection waits for its first request's headers just as a begun request does.
        self.awaiting_headers = True
        self.awaiting_body = False
        self.request_begun = False  # any byte of a request arrived on this connection
        self.began_in_chunk = False  # the request now awaiting its headers began in this chunk
        self.header_bytes = 0  # received so far of the headers still incomplete
        self.trailer_bytes = 0

    # --- connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self._over_client_limit():
            detail = "Too many connections from this address; close some and retry."
            self._refuse(503, detail, "too_many_connections")
            return
        self._arm_deadlines()

    def _over_client_limit(self) -> bool:
        """More open connections from this address than HTTP_MAX_CONNECTIONS_PER_CLIENT, so one
        client cannot take every connection slot (trusted proxies speak for many, and are not
        counted)."""
        host = self.client[0] if self.client else None
        if host is None or host in self.trusted_proxies:
            return False
        peers = (getattr(other, "client", None) for other in self.connections)
        mine = sum(1 for peer in peers if peer and peer[0] == host)
        return mine > self.max_connections_per_client

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn's answer past limit_concurrency is plain text; the API's is a problem.
        chosen: Any = busy_problem if app is service_unavailable else app
        super()._start_asgi_task(cycle, chosen)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        self._cancel_body_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused or timed out: nothing more is read
        self.began_in_chunk = False
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.awaiting_headers and self.request_begun:
            # Incomplete headers are buffered by httptools, which sets no bound of its own: count
            # them as they come. When the request began in this chunk, the bytes after the end of
            # the last header section are its own (plus the tail of a body before it, if any).
            if self.began_in_chunk:
                end = data.rfind(b"\r\n\r\n")
                self.header_bytes = len(data) - (end + 4 if end >= 0 else 0)
            else:
                self.header_bytes += len(data)
            if self.header_bytes > self.max_header_bytes:
                self._headers_too_large()
                return
        self._arm_deadlines()

    def handle_websocket_upgrade(self) -> None:
        self._cancel_header_deadline()
        self._cancel_body_deadline()
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, msg)

    # --- parser callbacks (during feed_data; after a refusal the rest of the chunk is ignored)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.awaiting_headers = self.request_begun = self.began_in_chunk = True
        self.header_bytes = self.trailer_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.transport.is_closing():
            return
        if self.awaiting_headers:
            super().on_header(name, value)
            return
        # A trailer after a chunked body. ASGI has no request trailers (uvicorn would append them
        # to headers the app already holds), so they are only counted, against the header limit.
        self.trailer_bytes += len(name) + len(value) + 4
        if self.trailer_bytes > self.max_header_bytes:
            detail = f"The request's trailers exceed {self.max_header_bytes} bytes."
            self._refuse(431, detail, "headers_too_large")

    def on_headers_complete(self) -> None:
        if self.transport.is_closing():
            return
        self.awaiting_headers = False
        self._cancel_header_deadline()
        # The request line and headers as received, less a few bytes of syntax.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_header_bytes:
            self._headers_too_large()
            return
        self.awaiting_body = True
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.transport.is_closing():
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.transport.is_closing():
            return
        self.awaiting_body = False
        self._cancel_body_deadline()
        super().on_message_complete()

    # --- deadlines

    def _arm_deadlines(self) -> None:
        # Armed after each chunk rather than per callback, so a request that arrives whole (the
        # usual case) never sets a timer; a deadline already set is kept, never extended.
        if self.awaiting_headers and self.header_deadline is None:
            self.header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)
        if self.awaiting_body and self.body_deadline is None:
            self.body_deadline = self.loop.call_later(self.body_timeout, self._body_late)

    def _cancel_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _cancel_body_deadline(self) -> None:
        if self.body_deadline is not None:
            self.body_deadline.cancel()
            self.body_deadline = None

    def _headers_late(self) -> None:
        self.header_deadline = None
        if self.flow.read_paused:
            # uvicorn stopped reading (pipelined requests wait for the one before): the delay is
            # the server's, not the client's.
            self._arm_deadlines()
        elif not self.request_begun:
            self._refuse(None, "nothing received", "header_timeout")
        else:
            detail = f"The request headers took over {self.header_timeout:g} s."
            self._refuse(408, detail, "header_timeout")

    def _body_late(self) -> None:
        self.body_deadline = None
        if self.flow.read_paused:
            self._arm_deadlines()
        else:
            self._refuse(
                408, f"The request body took over {self.body_timeout:g} s.", "body_timeout"
            )

    # --- refusing

    def _headers_too_large(self) -> None:
        detail = f"The request line and headers exceed {self.max_header_bytes} bytes."
        self._refuse(431, detail, "headers_too_large")

    def _may_answer(self) -> bool:
        """An answer written now cannot be taken for the response to another request."""
        if self.pipeline:
            return False
        if self.cycle is None:
            return True
        if self.awaiting_body:  # the cycle is the refused request's own
            return not self.cycle.response_started
        return self.cycle.response_complete

    def _refuse(self, status: int | None, detail: str, reason: str | None = None) -> None:
        """Answer with a problem (when that cannot be mistaken for another request's answer) and
        close; a request the app is still on sees the client as gone. A refusal on purpose
        (not a malformed request) is counted by its `reason`."""
        if self.transport.is_closing():
            return
        if reason is not None:
            refuse(reason)
        if status is not None and self._may_answer():
            self.transport.write(self._problem_response(status, detail))
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self.awaiting_headers = self.awaiting_body = False
        self._cancel_header_deadline()
        self._cancel_body_deadline()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
        self.logger.info("%s - connection closed: %s", client, detail)
        self.transport.close()

    def _problem_response(self, status: int, detail: str) -> bytes:
        defaults = list(self.server_state.default_headers)  # Date and Server, as uvicorn sends
        return problem_bytes(status, detail, [*defaults, *PROTOCOL_HEADERS])


# --- running it --------------------------------------------------------------------------------


def prepare_metrics_directory(settings: Settings, port: int) -> None:
    """More than one API process: prometheus-client's multiprocess mode, in a directory of
    their own (PROMETHEUS_MULTIPROC_DIR, or one in the temporary directory named for the port,
    so a restart reuses it), emptied of an earlier run's samples. The processes uvicorn starts
    read it when they first import prometheus-client; one process alone keeps its samples in
    memory, unless PROMETHEUS_MULTIPROC_DIR says."""
    directory = os.environ.get(MULTIPROCESS_DIRECTORY)
    if directory is None:
        if settings.WEB_CONCURRENCY == 1:
            return
        directory = str(Path(tempfile.gettempdir(), f"pets-metrics-{port}"))
        os.environ[MULTIPROCESS_DIRECTORY] = directory
    Path(directory).mkdir(parents=True, exist_ok=True)
    for path in Path(directory).glob("*.db"):
        if not path.stem.endswith(f"_{os.getpid()}"):  # this process's own are already open
            path.unlink(missing_ok=True)


def _stopped(_signal: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the API with every request bounded.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    args = parser.parse_args(argv)
    settings = load_settings()
    prepare_metrics_directory(settings, args.port)
    # uvicorn shuts down on SIGTERM, then sends it again to itself so that the process ends as
    # the signal would: with this handler that ends it with status 0, a clean stop.
    signal.signal(signal.SIGTERM, _stopped)
    uvicorn.run(
        "main:app",
        host=args.host,
        port=args.port,
        http=BoundedHttpToolsProtocol,
        # Should someone choose h11 instead, it bounds its buffered headers to the same size.
        h11_max_incomplete_event_size=settings.HTTP_MAX_HEADER_BYTES,
        timeout_keep_alive=settings.HTTP_KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=settings.HTTP_SHUTDOWN_GRACE_SECONDS,
        limit_concurrency=settings.HTTP_MAX_CONCURRENCY,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 by default; here only named proxies.
        proxy_headers=bool(settings.FORWARDED_ALLOW_IPS),
        forwarded_allow_ips=settings.FORWARDED_ALLOW_IPS or None,
        workers=settings.WEB_CONCURRENCY,
        # Every process logs as the service does (JSON or text, on STDERR); the access line is
        # middleware.ObserveRequests's, with the route, the duration and the request id.
        log_config=logging_config(settings.LOG_LEVEL, log_format(settings)),
        log_level=settings.LOG_LEVEL.lower(),
        access_log=False,
    )


if __name__ == "__main__":
    main()
