"""ASGI middleware every request passes through: its id, metrics and access line; URLs that are
not UTF-8 refused; HEAD answered as GET without a body; the security headers (their one
source); and analytics stopped when their client hangs up."""

import time
from urllib.parse import unquote_to_bytes

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from logs import REQUEST_ID, log_access, request_id_from
from observability import HTTP_DURATION, HTTP_REQUESTS, UNMATCHED
from problems import problem_response

# The methods counted by name; any other is counted as "other" (a client picks the method, and
# must not pick the metrics' labels).
COUNTED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
HUNG_UP = 499

# The docs pages (openapi.add_docs) load their scripts, styles and favicon from this origin only.
# Their inline scripts (Swagger UI's start-up, the OAuth2 redirect page) are allowed by hash, so
# nothing else inline runs; styles stay 'unsafe-inline' (both UIs set style attributes and
# ReDoc injects <style> elements); ReDoc's search runs in a blob: worker.
DOCS_PATH = "/docs"
DOCS_OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"
REDOC_PATH = "/redoc"
DOCS_PATHS = frozenset({DOCS_PATH, DOCS_OAUTH2_REDIRECT_PATH, REDOC_PATH})
DOCS_SCRIPT_HASHES = (
    "'sha256-j8SaXne87U2VMpyMoUFgvGSgdewzd5d5jACoTkrqCy4='",  # /docs
    "'sha256-Q8NLdUrRI6i0tSYa9s7b5KZd7Adbpcz558UgROi6Hy8='",  # /docs/oauth2-redirect
)
DOCS_CSP = (
    "default-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'; "
    f"script-src 'self' {' '.join(DOCS_SCRIPT_HASHES)}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; worker-src blob:"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def security_headers(path: str) -> dict[str, str]:
    """The headers every response carries (the middleware keeps a route's own Cache-Control)."""
    csp = DOCS_CSP if path in DOCS_PATHS else API_CSP
    return {**SECURITY_HEADERS, "Content-Security-Policy": csp}


def outside_headers(path: str) -> dict[str, str]:
    """What a response sent from outside the middleware (a 500) carries itself: the security
    headers, and the request's id."""
    request_id = REQUEST_ID.get()
    return {**security_headers(path), **({"X-Request-ID": request_id} if request_id else {})}


def encoded(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as ASGI and HTTP/1.1 carry them: lower-case names, bytes."""
    return [(name.lower().encode(), value.encode()) for name, value in headers.items()]


class SecurityHeaders:
    """nosniff, no framing, no referrer and a Content-Security-Policy on every response; and
    `Cache-Control: no-store` where a route has not chosen its own caching (tokens, pages that
    change with every write). Headers are added as encoded pairs: this runs on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.docs_headers = encoded(security_headers(DOCS_PATH))
        self.api_headers = encoded(security_headers(""))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = self.docs_headers if scope["path"] in DOCS_PATHS else self.api_headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                chosen = any(name.lower() == b"cache-control" for name, _ in headers)
                headers += [h for h in added if not (chosen and h[0] == b"cache-control")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HeadAsGet:
    """Answer HEAD for every GET route: the GET's status and headers (Content-Length included),
    no body. uvicorn drops a HEAD response's body too; this also holds in-process."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        scope["method"] = "GET"  # in place: ObserveRequests reads the route routing sets on it
        await self.app(scope, receive, send_without_body)


class CancelOnDisconnect:
    """Stop a GET of the given paths when its client hangs up: a question nobody waits for gives
    back its turn and its database statement (asyncpg cancels it on the server) at once, instead
    of holding them to the end. A GET has no body, so the request's one message is handed on and
    the client's disconnect is watched for alongside the app."""

    def __init__(self, app: ASGIApp, paths: frozenset[str]) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in ("GET", "HEAD")
            or scope["path"] not in self.paths
        ):
            await self.app(scope, receive, send)
            return
        gone = anyio.Event()
        first = await receive()
        if first["type"] == "http.disconnect":
            return
        request: Message | None = first

        async def receive_once() -> Message:
            nonlocal request
            if request is not None:
                message, request = request, None
                return message
            await gone.wait()
            return {"type": "http.disconnect"}

        async with anyio.create_task_group() as tasks:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()
                tasks.cancel_scope.cancel()

            tasks.start_soon(watch)
            await self.app(scope, receive_once, send)
            tasks.cancel_scope.cancel()


def _decodes(raw: bytes) -> bool:
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class RejectUndecodableUrls:
    """400 for a path or query string that is not UTF-8 once percent-decoded (lone surrogates,
    stray bytes), where the server would otherwise turn it into U+FFFD and carry on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not (
            _decodes(scope.get("raw_path") or b"") and _decodes(scope["query_string"])
        ):
            response = problem_response(400, "The URL is not valid UTF-8 once percent-decoded.")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ObserveRequests:
    """The outermost middleware: gives each request its id (the client's X-Request-ID when it
    is short and safe, else a new one), sends it back, and once the answer is sent counts the
    request by route template and exact status, times it, and writes its access line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope["method"] if scope["method"] in COUNTED_METHODS else "other"
        request_id = request_id_from(Headers(scope=scope).get("x-request-id"))
        # Not reset afterwards: a 500 is answered outside this middleware, and still carries it.
        REQUEST_ID.set(request_id)
        # A client that hangs up before any answer (an analytics question cancelled) is counted
        # as 499, as nginx names it: it is not the server's error.
        status, sent = HUNG_UP, 0

        async def send_observed(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except Exception:
            if status == HUNG_UP:
                status = 500  # answered outside this middleware, as a 500 problem
            raise
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            handler = getattr(route, "path_format", None) or UNMATCHED
            HTTP_REQUESTS.labels(method, handler, str(status)).inc()
            HTTP_DURATION.labels(method, handler).observe(seconds)
            client = scope.get("client")
            log_access(
                {
                    "method": method,
                    "handler": handler,
                    "path": scope["path"],
                    "query": scope["query_string"].decode("latin-1"),
                    "status": status,
                    "duration_ms": round(seconds * 1000, 1),
                    "bytes": sent,
                    "client": client[0] if client else None,
                }
            )
