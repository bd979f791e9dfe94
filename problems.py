"""Problem responses (RFC 9457), the one shape of every error: built here once, sent by the app's
exception handlers and by the server's own answers (408, 413, 431, 503) before any app runs."""

import logging
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from redis.exceptions import RedisError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount
from starlette.types import Send

from errors import RETRY_AFTER_SECONDS, ErrorItem, ServiceError, classify_db_error, summarise
from logs import REQUEST_ID
from models import PATTERN_MESSAGES, Problem, ProblemItem
from observability import refuse

log = logging.getLogger("pets.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
RawHeaders = list[tuple[bytes, bytes]]


def problem_body(
    status: int, detail: str | None = None, errors: list[ProblemItem] | None = None
) -> bytes:
    """A problem document: the status's phrase as its title, the detail, any failed checks."""
    problem = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        errors=errors,
        request_id=REQUEST_ID.get(),
    )
    return problem.model_dump_json(exclude_none=True).encode()


def problem_response(
    status: int,
    detail: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    errors: list[ProblemItem] | None = None,
) -> Response:
    return Response(
        problem_body(status, detail, errors),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def _raw_headers(status: int, body: bytes, extra: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """The headers of a problem the server sends itself: the connection is closed after it
    (the rest of the request is never read)."""
    headers = [
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    if status == 503:
        headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
    headers.append((b"connection", b"close"))
    return headers


async def send_problem(
    send: Send, status: int, detail: str, extra: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """A problem as ASGI messages, from a middleware or a server-side app."""
    body = problem_body(status, detail)
    headers = _raw_headers(status, body, extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def problem_bytes(status: int, detail: str, extra: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 problem response, for a protocol that answers before any app runs."""
    body = problem_body(status, detail)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()]
    lines += [name + b": " + value + b"\r\n" for name, value in _raw_headers(status, body, extra)]
    return b"".join([*lines, b"\r\n", body])


# --- the app's exception handlers --------------------------------------------------------------


def _message(error: Mapping[str, Any]) -> str:
    pattern = error.get("ctx", {}).get("pattern")
    if pattern in PATTERN_MESSAGES:
        return PATTERN_MESSAGES[pattern]
    # A validator's own message says all; pydantic's "Value error, " prefix adds nothing.
    return str(error["msg"]).removeprefix("Value error, ")


async def on_validation_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    items: list[ErrorItem] = [(list(e["loc"]), _message(e)) for e in error.errors()]
    errors = [ProblemItem(loc=loc, msg=msg) for loc, msg in items]
    return problem_response(422, summarise(items), errors=errors)


async def on_service_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, ServiceError)
    if error.reason is not None:
        refuse(error.reason)
        log.info("refused (%s): %s", error.reason, error.detail)
    items = [ProblemItem(loc=loc, msg=msg) for loc, msg in error.items] or None
    return problem_response(error.status, error.detail, headers=error.headers, errors=items)


# The methods any route here answers (HEAD comes with GET).
METHODS = ("DELETE", "GET", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str:
    """Every method the request's path answers: each method is tried against the app's routes
    (the API's, included as a router, the docs pages and the document), as routing would match
    it; static files answer GET and HEAD."""
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Mount):  # by path: routing has moved the scope into the mount
            if request.url.path.startswith(f"{route.path}/"):
                methods |= {"GET", "HEAD"}
            continue
        tried = ((method, {**request.scope, "method": method}) for method in METHODS)
        methods |= {method for method, scope in tried if route.matches(scope)[0] == Match.FULL}
    if "GET" in methods:
        methods.add("HEAD")  # answered by middleware.HeadAsGet
    return ", ".join(sorted(methods))


def _slash_redirect(request: Request) -> str | None:
    """The same path with its trailing slash added or removed, if a route answers that: a
    relative URL, so a forged Host header never reaches the Location."""
    path = request.url.path
    other = path[:-1] if path.endswith("/") else f"{path}/"
    if path == "/" or other.startswith("//"):
        return None
    scope = {**request.scope, "path": other}
    if not any(route.matches(scope)[0] != Match.NONE for route in request.app.routes):
        return None
    return f"{other}?{request.url.query}" if request.url.query else other


async def on_http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, StarletteHTTPException)
    headers = dict(error.headers or {})
    if error.status_code == 404 and (location := _slash_redirect(request)) is not None:
        return RedirectResponse(location, status_code=307)
    if error.status_code == 405:
        headers["Allow"] = allowed_methods(request)
    return problem_response(error.status_code, str(error.detail), headers=headers)


async def on_database_error(request: Request, error: Exception) -> Response:
    mapped = classify_db_error(error)
    if mapped is None:
        log.exception("unexpected database error on %s %s", request.method, request.url.path)
        return problem_response(500, "An unexpected error occurred.")
    log.warning("database fault on %s %s: %r", request.method, request.url.path, error)
    return await on_service_error(request, mapped)


def add_problem_handlers(app: FastAPI, outside_headers: Callable[[str], dict[str, str]]) -> None:
    """Every error the app raises answered as a problem. A 500 is sent from outside every
    middleware, so it carries `outside_headers(path)` (the security headers) itself."""

    async def on_unexpected_error(request: Request, _error: Exception) -> Response:
        # The traceback goes to the log (Starlette re-raises after this), never to the client.
        headers = outside_headers(request.url.path)
        return problem_response(500, "An unexpected error occurred.", headers=headers)

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(sa_exc.SQLAlchemyError, on_database_error)
    app.add_exception_handler(OSError, on_database_error)
    app.add_exception_handler(RedisError, on_database_error)
    app.add_exception_handler(Exception, on_unexpected_error)
