"""The FastAPI app: lifespan, routes and the handlers that turn every error into a problem."""

import asyncio
import importlib.resources
import logging
import os
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import UTC, date, datetime
from http import HTTPStatus
from typing import Annotated, Any, Literal
from urllib.parse import unquote_to_bytes, urlencode

import mimeparse
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Form,
    Header,
    Path,
    Query,
    Request,
    Response,
    params,
)
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import StringConstraints, WithJsonSchema
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

import crud
import metrics
import name_rule
from auth import (
    Authenticated,
    ClientAddress,
    LoginGuardDep,
    create_login_guard,
    dummy_hash,
    has_placeholder_password,
    hash_password,
    issue_token,
    log_in,
)
from backoff import Backoff
from db import (
    ANALYTICS_SETTINGS,
    ConnectionDep,
    ExportConnectionDep,
    ListingConnectionDep,
    MetricsConnectionDep,
    ReadEngineDep,
    RedisDep,
    SessionDep,
    SessionMaker,
    SettingsDep,
    autocommit,
    create_engine,
    create_sessionmaker,
    from_state,
)
from errors import (
    BadRequest,
    ErrorItem,
    InvalidParameters,
    NotAcceptable,
    NotFound,
    ServiceError,
    Unavailable,
    UnsupportedMediaType,
    classify_db_error,
    summarise,
)
from middleware import (
    DOCS_OAUTH2_REDIRECT_PATH,
    DOCS_PATH,
    REDOC_PATH,
    CancelOnDisconnect,
    HeadAsGet,
    SecurityHeaders,
    security_headers,
)
from models import (
    DIMENSIONS,
    INT32_MAX,
    PASSWORD_MAX_LENGTH,
    PATTERN_MESSAGES,
    DimensionList,
    DimensionValues,
    Health,
    MetricsExport,
    MetricsPage,
    MetricsQuery,
    PetCreate,
    PetPage,
    PetPublic,
    PetQuery,
    PetRecord,
    PetUpdate,
    Problem,
    ProblemItem,
    Readiness,
    Token,
    Username,
)
from server import LimitRequestBody
from settings import HEARTBEAT_KEY, Settings, configure_logging, load_settings
from turns import Turns

log = logging.getLogger("pets.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
READY_CHECK_TIMEOUT_SECONDS = 2.0

PetId = Annotated[int, Path(ge=1, le=INT32_MAX, description="The pet's id.")]


# --- start-up and shutdown -------------------------------------------------------------------


class PlaceholderAdminPassword(RuntimeError):
    """Outside development, the admin account still opens with the placeholder password."""


async def provision_admin(settings: Settings, sessionmaker: SessionMaker) -> None:
    """Create the configured admin account if it is missing; an existing one is left as it is,
    but outside development it must not still have the placeholder password (an account made
    before ADMIN_PASSWORD was set is never overwritten by it)."""
    async with sessionmaker() as session:
        admin = await crud.get_user_by_username(session, settings.ADMIN_USERNAME)
    if admin is not None:
        if settings.ENVIRONMENT != "development" and await has_placeholder_password(admin):
            raise PlaceholderAdminPassword(
                f"the admin account {admin.username!r} still has the development placeholder"
                " password; give it a real one (e.g. delete the account so that start-up"
                " creates it again with ADMIN_PASSWORD)"
            )
        return
    password_hash = await hash_password(settings.ADMIN_PASSWORD.get_secret_value())
    async with sessionmaker() as session:
        if await crud.add_user_if_missing(session, settings.ADMIN_USERNAME, password_hash):
            log.info("created admin user %r", settings.ADMIN_USERNAME)


def stop_this_process() -> None:
    """Shut down as `docker stop` would: requests under way finish, then the process exits."""
    os.kill(os.getpid(), signal.SIGTERM)


# Waits between attempts to provision the admin account while the database is away.
ADMIN_BACKOFF = Backoff(first=2.0, cap=30.0)


async def keep_provisioning_admin(settings: Settings, sessionmaker: SessionMaker) -> None:
    """Retry with backoff until the database (and its schema) is there. The API is serving by
    then, so an admin account that turns out to have the placeholder password stops it."""

    async def on_retry(error: Exception, _failures: int, delay: float) -> None:
        log.warning("admin user not provisioned yet (%s); retrying in %.0f s", error, delay)

    await asyncio.sleep(1.0)  # the lifespan's own attempt has just failed
    try:
        await ADMIN_BACKOFF.retry(
            lambda: provision_admin(settings, sessionmaker),
            retryable=lambda error: not isinstance(error, PlaceholderAdminPassword),
            on_retry=on_retry,
        )
    except PlaceholderAdminPassword as error:
        log.critical("refusing to serve, stopping: %s", error)
        stop_this_process()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings or load_settings()
    app.state.settings = settings
    configure_logging(settings.LOG_LEVEL)
    engine = create_engine(settings)
    app.state.engine = engine
    app.state.sessionmaker = create_sessionmaker(engine)
    app.state.read_engine = autocommit(engine)
    metrics_engine = create_engine(
        settings,
        "pets-api-metrics",
        settings.METRICS_STATEMENT_TIMEOUT_MS,
        pool_size=settings.METRICS_MAX_CONCURRENT,
        server_settings=ANALYTICS_SETTINGS,
    )
    app.state.metrics_engine = autocommit(metrics_engine)
    app.state.metrics_stream_engine = metrics_engine
    app.state.export_turns = Turns(
        settings.METRICS_MAX_EXPORTS,
        settings.METRICS_QUEUE_SECONDS,
        "Too many exports are running; retry shortly.",
    )
    app.state.metrics_turns = Turns(
        settings.METRICS_MAX_CONCURRENT,
        settings.METRICS_QUEUE_SECONDS,
        "Too many analytics questions are running; retry shortly, or narrow the question.",
    )
    app.state.listing_turns = Turns(
        settings.PETS_LIST_MAX_CONCURRENT,
        settings.PETS_LIST_QUEUE_SECONDS,
        "Too many pet listings are running; retry shortly.",
    )
    app.state.dimension_names = metrics.NameCache()
    app.state.redis = Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    app.state.login_guard = create_login_guard(settings, app.state.redis, app.state.read_engine)
    provisioning: asyncio.Task[None] | None = None
    try:
        # Warm the timing-equaliser hash now rather than on the first unknown-user login.
        await asyncio.to_thread(dummy_hash)
        try:
            await provision_admin(settings, app.state.sessionmaker)
        except PlaceholderAdminPassword as error:
            log.critical("refusing to start: %s", error)
            raise
        except Exception as error:  # noqa: BLE001 - the API serves reads (and /ready) meanwhile
            log.warning("admin user not provisioned (%s); retrying in the background", error)
            provisioning = asyncio.create_task(
                keep_provisioning_admin(settings, app.state.sessionmaker)
            )
        yield
    finally:
        if provisioning is not None:
            provisioning.cancel()
            with suppress(asyncio.CancelledError):
                await provisioning
        await app.state.redis.aclose()
        await engine.dispose()
        await metrics_engine.dispose()


# --- errors ------------------------------------------------------------------------------------


def problem_response(
    status: int,
    detail: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    errors: list[ProblemItem] | None = None,
) -> JSONResponse:
    body = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail, errors=errors)
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def _message(error: Mapping[str, Any]) -> str:
    pattern = error.get("ctx", {}).get("pattern")
    if pattern in PATTERN_MESSAGES:
        return PATTERN_MESSAGES[pattern]
    # A validator's own message says all; pydantic's "Value error, " prefix adds nothing.
    return str(error["msg"]).removeprefix("Value error, ")


async def on_validation_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    items: list[ErrorItem] = [(list(e["loc"]), _message(e)) for e in error.errors()]
    errors = [ProblemItem(loc=loc, msg=msg) for loc, msg in items]
    return problem_response(422, summarise(items), errors=errors)


async def on_service_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ServiceError)
    items = [ProblemItem(loc=loc, msg=msg) for loc, msg in error.items] or None
    return problem_response(error.status, error.detail, headers=error.headers, errors=items)


def _allowed_methods(request: Request) -> str:
    # Starlette names only the first route that matches the path; list every one's methods.
    methods: set[str] = set()
    for route in router.routes:
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods or set()
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
        headers["Allow"] = _allowed_methods(request)
    return problem_response(error.status_code, str(error.detail), headers=headers)


async def on_database_error(request: Request, error: Exception) -> JSONResponse:
    mapped = classify_db_error(error)
    if mapped is None:
        log.exception("unexpected database error on %s %s", request.method, request.url.path)
        return problem_response(500, "An unexpected error occurred.")
    log.warning("database fault on %s %s: %r", request.method, request.url.path, error)
    return await on_service_error(request, mapped)


async def on_unexpected_error(request: Request, _error: Exception) -> JSONResponse:
    # The traceback goes to the log (Starlette re-raises after this), never to the client. This
    # response is sent from outside every middleware, so it carries the security headers itself.
    headers = security_headers(request.url.path)
    return problem_response(500, "An unexpected error occurred.", headers=headers)


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem responses an operation can give."""
    return {
        status: {"model": Problem, "description": HTTPStatus(status).phrase} for status in statuses
    }


def _header(description: str, schema_type: str = "string") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": schema_type}
    if schema_type == "integer":
        schema["minimum"] = 0
    return {"description": description, "schema": schema}


# Every response header a client can get, declared once under components/headers.
RESPONSE_HEADERS = {
    "Cache-Control": _header(
        "no-store, unless the route chooses otherwise (no-cache on a pet, with its ETag)"
    ),
    "Content-Security-Policy": _header("default-src 'none' (the docs pages: 'self' only)"),
    "X-Content-Type-Options": _header("nosniff"),
    "X-Frame-Options": _header("DENY"),
    "Referrer-Policy": _header("no-referrer"),
    "Cross-Origin-Resource-Policy": _header("same-origin"),
    "WWW-Authenticate": _header('Bearer, or Bearer error="invalid_token" for a bad token'),
    "Retry-After": _header("Seconds to wait before retrying", "integer"),
    "Allow": _header("The methods this path answers, HEAD included wherever GET is"),
    "Vary": _header("Accept: the export is CSV or NDJSON by the Accept header"),
    "Content-Disposition": _header('attachment; filename="metrics.csv" (or metrics.ndjson)'),
}
# On every response (middleware.SecurityHeaders).
EVERY_RESPONSE_HEADERS = (
    "Cache-Control",
    "Content-Security-Policy",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "Referrer-Policy",
    "Cross-Origin-Resource-Policy",
)
STATUS_HEADERS = {"401": ("WWW-Authenticate",), "429": ("Retry-After",), "503": ("Retry-After",)}
OPERATION_HEADERS = {("/metrics/export", "get", "200"): ("Vary", "Content-Disposition")}


def _header_refs(names: Iterable[str]) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def openapi_with_problems(app: FastAPI) -> dict[str, Any]:
    """The generated document, with every error response declared as application/problem+json
    and every response header a client can get declared on the responses that carry it."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        problem_ref = {"schema": {"$ref": "#/components/schemas/Problem"}}
        for path, item in schema["paths"].items():
            for method, operation in item.items():
                responses = operation["responses"]
                # Any request can be malformed below the schema: a URL that is not UTF-8, a
                # body that cannot be decoded.
                responses.setdefault("400", {"description": "Bad Request"})
                if "204" not in responses:  # Accept names no type the route sends
                    responses.setdefault("406", {"description": "Not Acceptable"})
                # What server.py answers for any request: too slow, too large, headers too
                # large, past the connection limit.
                for status in (408, 413, 431, 503):
                    responses.setdefault(str(status), {"description": HTTPStatus(status).phrase})
                for status, response in responses.items():
                    if int(status) >= 400:
                        response["content"] = {PROBLEM_MEDIA_TYPE: problem_ref}
                    names = (
                        *STATUS_HEADERS.get(status, ()),
                        *OPERATION_HEADERS.get((path, method, status), ()),
                        *EVERY_RESPONSE_HEADERS,
                    )
                    response["headers"] = {**_header_refs(names), **response.get("headers", {})}
        components = schema.setdefault("components", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components["schemas"].pop(unused, None)
        # What a name may hold, stated once (models.NAME_SCHEMA refers to it).
        components["schemas"]["Name"] = {
            "type": "string",
            "description": name_rule.RULE,
            "pattern": name_rule.json_schema_pattern(),
        }
        components["headers"] = RESPONSE_HEADERS
        # A method a path does not answer: no operation of this document gives it, so it is
        # declared once here.
        components["responses"] = {
            "MethodNotAllowed": {
                "description": "Method Not Allowed: Allow lists the methods the path answers",
                "headers": _header_refs(("Allow", *EVERY_RESPONSE_HEADERS)),
                "content": {PROBLEM_MEDIA_TYPE: problem_ref},
            }
        }
        app.openapi_schema = schema
    return app.openapi_schema


# --- request checks ----------------------------------------------------------------------------


def documented_query_parameters(
    app: FastAPI, path: str, method: str
) -> tuple[frozenset[str], frozenset[str]]:
    """The query parameters the OpenAPI document gives an operation, and those of them that may
    be given more than once (its arrays); read once per app."""
    if not hasattr(app.state, "query_parameters"):
        app.state.query_parameters = {
            (route_path, verb.upper()): (
                frozenset(p["name"] for p in operation.get("parameters", []) if p["in"] == "query"),
                frozenset(
                    p["name"]
                    for p in operation.get("parameters", [])
                    if p["in"] == "query" and p.get("schema", {}).get("type") == "array"
                ),
            )
            for route_path, operations in app.openapi()["paths"].items()
            for verb, operation in operations.items()
        }
    found: tuple[frozenset[str], frozenset[str]] = app.state.query_parameters.get(
        (path, method), (frozenset(), frozenset())
    )
    return found


def _unknown(request: Request, name: str) -> str:
    """What to say of an unknown parameter; a format= on /metrics points to the export."""
    if name == "format" and request.scope["route"].path_format in ELSEWHERE:
        kind = "ndjson" if request.query_params["format"] == "ndjson" else "csv"
        return (
            "unknown parameter: GET /metrics answers JSON only; the same question as"
            f" {kind.upper()}: {export_url(request, kind)}"
        )
    return "unknown parameter"


async def check_query_parameters(request: Request) -> None:
    """Unknown query parameters, and repeats of ones that take a single value (any but an
    array's: not silently "the last one wins"), are 422."""
    route = request.scope["route"]
    known, repeatable = documented_query_parameters(request.app, route.path_format, request.method)
    counts = Counter(name for name, _ in request.query_params.multi_items())
    problems_found: list[ErrorItem] = [
        (["query", name], _unknown(request, name) if name not in known else "given more than once")
        for name, count in sorted(counts.items())
        if name not in known or (count > 1 and name not in repeatable)
    ]
    if problems_found:
        raise InvalidParameters(problems_found)


async def require_json_body(request: Request) -> None:
    """415 for a body that says it is something other than JSON (curl -d sends a form); 400 for
    one that is not UTF-8 (RFC 8259), which the JSON parser would otherwise guess (UTF-16)."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise UnsupportedMediaType(
                f"The body must be JSON (Content-Type: application/json), not {media_type!r}."
            )
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not accepted; send plain JSON."
        )
    try:
        (await request.body()).decode("utf-8")
    except ClientDisconnect:
        return  # gone (or refused as too large): FastAPI meets the same, and answers nobody
    except UnicodeDecodeError:
        raise BadRequest("The body is not UTF-8: JSON must be sent as UTF-8.") from None


class CheckedRoute(APIRoute):
    """A route whose JSON body (if it takes one) passes require_json_body before FastAPI parses
    it: a gzip or Latin-1 body would otherwise be FastAPI's generic 400 "error parsing the
    body", not the 415 or 400 that says what is wrong."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        if self.body_field is None or isinstance(self.body_field.field_info, params.Form):
            return handle

        async def checked(request: Request) -> Response:
            await require_json_body(request)  # reads the body, which FastAPI then reuses
            return await handle(request)

        return checked


JSON = "application/json"
CSV = "text/csv"
NDJSON = "application/x-ndjson"
# What each route can send, the preferred one last (it wins ties); the rest send JSON.
OFFERED_MEDIA_TYPES = {"/metrics/export": (NDJSON, CSV)}
# Where a route's question can be had in other media types: /metrics is JSON only.
ELSEWHERE = {"/metrics": "/metrics/export"}


# A /metrics request's parameters that are not part of its question.
PAGE_PARAMETERS = frozenset({"limit", "offset", "format"})


def export_url(request: Request, kind: str) -> str:
    """The export, as `kind` (csv or ndjson), of the question a /metrics request asks: its
    parameters but the page's, as a relative URL (a forged Host never reaches it)."""
    kept = [(k, v) for k, v in request.query_params.multi_items() if k not in PAGE_PARAMETERS]
    return f"/metrics/export?{urlencode([*kept, ('format', kind)])}"


def _best_match(offered: tuple[str, ...], accept: str) -> str | None:
    try:
        return str(mimeparse.best_match(offered, accept)) or None
    except ValueError:  # an unparseable Accept is ignored, as if absent
        return offered[-1]


async def negotiate(request: Request) -> str:
    """The media type to answer with, by the Accept header's q values: 406 when the client
    accepts none of the route's (naming the export for a /metrics question asked as CSV or
    NDJSON). Errors are always sent as problem+json (RFC 9110 allows it)."""
    route = request.scope["route"]
    offered = OFFERED_MEDIA_TYPES.get(route.path_format, (JSON,))
    # Several Accept lines are one list (RFC 9110 5.3); media types are case-insensitive.
    accept = ", ".join(request.headers.getlist("accept")).lower()
    if not accept or route.status_code == 204:
        return offered[-1]
    if route.path_format in OFFERED_MEDIA_TYPES and "format" in request.query_params:
        return offered[-1]  # format= chooses the type instead (the route reads it)
    chosen = _best_match(offered, accept)
    if chosen is not None:
        return chosen
    detail = f"This resource can be sent as {' or '.join(reversed(offered))} only."
    elsewhere = ELSEWHERE.get(route.path_format)
    wanted = elsewhere and _best_match(OFFERED_MEDIA_TYPES[elsewhere], accept)
    if wanted:
        kind = "ndjson" if wanted == NDJSON else "csv"
        detail += f" The same question as {wanted}: {export_url(request, kind)}"
    raise NotAcceptable(detail)


MediaType = Annotated[str, Depends(negotiate)]

ETAG_LIST_PATTERN = r'^\s*(\*|(W/)?"[^"]*"(\s*,\s*(W/)?"[^"]*")*)\s*$'


def etag_of(pet: PetRecord) -> str:
    """A strong ETag: the pet's id and version, which goes up with every change."""
    return f'"{pet.id}-{pet.version}"'


def versions_named(if_match: str | None, pet_id: int) -> list[int] | None:
    """The versions of this pet an If-Match names; None when there is no condition (absent or
    `*`). Weak or foreign tags never match (strong comparison, RFC 9110 13.1.1)."""
    if if_match is None or if_match.strip() == "*":
        return None
    ours = re.compile(rf'"{pet_id}-(0|[1-9][0-9]{{0,9}})"')  # exactly as etag_of writes it
    tags = (ours.fullmatch(tag.strip()) for tag in if_match.split(","))
    return [version for tag in tags if tag and (version := int(tag[1])) <= INT32_MAX]


def _etag_matches(if_none_match: str, etag: str) -> bool:
    # Weak comparison for If-None-Match (RFC 9110 13.1.2).
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags


# A list of entity tags, or `*`. Stated as a plain string in OpenAPI: "absent" is not a value a
# client can send, so the schema does not offer null.
ETAG_LIST_SCHEMA = {"type": "string", "maxLength": 1000, "pattern": ETAG_LIST_PATTERN}
EtagList = Annotated[
    Annotated[str, StringConstraints(max_length=1000, pattern=ETAG_LIST_PATTERN)] | None,
    WithJsonSchema(ETAG_LIST_SCHEMA),
]
IfMatch = Annotated[
    EtagList,
    Header(description="Only change the pet if its ETag is one of these (else 412); `*`: any."),
]
ETAG_HEADER = {"ETag": {"description": "The pet's version", "schema": {"type": "string"}}}


async def if_match_versions(
    request: Request, pet_id: PetId, if_match: IfMatch = None
) -> list[int] | None:
    # The parameter validates and documents the header; several If-Match lines are one list.
    lines = request.headers.getlist("if-match")
    return versions_named(", ".join(lines) if if_match is not None else None, pet_id)


PET_WRITE_RESPONSES = {
    200: {"headers": ETAG_HEADER},
    **problems(401, 404, 412, 415, 422, 503),
}

# The pet versions a write is conditional on (If-Match); None: unconditional.
IfMatchVersions = Annotated[list[int] | None, Depends(if_match_versions)]


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


# --- routes ------------------------------------------------------------------------------------

router = APIRouter(
    dependencies=[Depends(check_query_parameters), Depends(negotiate)],
    route_class=CheckedRoute,
    # Operations named as their functions: a generated client gets `get_metrics`, not
    # `get_metrics_metrics_get`.
    generate_unique_id_function=lambda route: route.name,
)


@router.post("/auth/token", tags=["auth"], responses=problems(401, 422, 429, 503))
async def issue_access_token(
    guard: LoginGuardDep,
    client: ClientAddress,
    username: Annotated[Username, Form()],
    password: Annotated[str, Form(min_length=1, max_length=PASSWORD_MAX_LENGTH)],
    grant_type: Annotated[Literal["password"] | None, Form()] = None,  # noqa: ARG001 - validated
) -> Token:
    """Exchange a username (case-insensitive) and password (OAuth2 password flow) for a bearer
    token.

    Attempts are limited per username from one client address, per client address and per
    username (429 with Retry-After); a success does not count. 503 with Retry-After when too
    many passwords are being checked at once."""
    user = await log_in(guard, username, password, client)
    return issue_token(user, guard.settings)


@router.get("/pets", tags=["pets"], responses=problems(422, 503))
async def list_pets(db: ListingConnectionDep, query: Annotated[PetQuery, Query()]) -> PetPage:
    """List pets, filtered, sorted and paged (a few listings at a time; 503 when all are busy)."""
    pets, total = await crud.list_pets(db, query)
    return PetPage(items=pets, total=total, limit=query.limit, offset=query.offset)


@router.get(
    "/pets/{pet_id}",
    tags=["pets"],
    response_model=PetPublic,
    responses={
        200: {"headers": ETAG_HEADER},
        304: {
            "description": "Not Modified: the ETag in If-None-Match is current",
            "headers": ETAG_HEADER,
        },
        **problems(404, 422, 503),
    },
)
async def get_pet(
    db: ConnectionDep,
    pet_id: PetId,
    response: Response,
    if_none_match: Annotated[
        EtagList, Header(description="304 with no body if the pet's ETag is one of these.")
    ] = None,
) -> PetRecord | Response:
    """One pet by id, with its ETag."""
    pet = await crud.get_pet(db, pet_id)
    etag = etag_of(pet)
    # no-cache: a cache may keep the pet but must revalidate it (If-None-Match) before use.
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if if_none_match is not None and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    response.headers.update(headers)
    return pet


@router.post(
    "/pets",
    status_code=201,
    tags=["pets"],
    response_model=PetPublic,
    responses={
        201: {
            "headers": {
                "Location": {
                    "description": "Path of the new pet (relative, never built from Host)",
                    "schema": {"type": "string"},
                },
                **ETAG_HEADER,
            }
        },
        **problems(401, 415, 422, 503),
    },
    dependencies=[Authenticated],
)
async def create_pet(
    request: Request,
    response: Response,
    session: SessionDep,
    pet: PetCreate,
) -> PetRecord:
    """Add a pet."""
    created = await crud.create_pet(session, pet)
    path = request.app.url_path_for("get_pet", pet_id=created.id)
    response.headers["Location"] = request.scope.get("root_path", "") + path
    response.headers["ETag"] = etag_of(created)
    return created


@router.put(
    "/pets/{pet_id}",
    tags=["pets"],
    response_model=PetPublic,
    responses=PET_WRITE_RESPONSES,
    dependencies=[Authenticated],
)
async def replace_pet(
    session: SessionDep,
    pet_id: PetId,
    pet: PetCreate,
    response: Response,
    versions: IfMatchVersions,
) -> PetRecord:
    """Replace every field of a pet (only if it still has an ETag in If-Match, when given)."""
    replaced = await crud.replace_pet(session, pet_id, pet, versions)
    response.headers["ETag"] = etag_of(replaced)
    return replaced


@router.patch(
    "/pets/{pet_id}",
    tags=["pets"],
    response_model=PetPublic,
    responses=PET_WRITE_RESPONSES,
    dependencies=[Authenticated],
)
async def patch_pet(
    session: SessionDep,
    pet_id: PetId,
    changes: PetUpdate,
    response: Response,
    versions: IfMatchVersions,
) -> PetRecord:
    """Change some fields of a pet (only if it still has an ETag in If-Match, when given)."""
    patched = await crud.patch_pet(session, pet_id, changes, versions)
    response.headers["ETag"] = etag_of(patched)
    return patched


@router.delete(
    "/pets/{pet_id}",
    status_code=204,
    response_class=Response,
    tags=["pets"],
    responses=problems(401, 404, 412, 422, 503),
    dependencies=[Authenticated],
)
async def delete_pet(session: SessionDep, pet_id: PetId, versions: IfMatchVersions) -> None:
    """Remove a pet (only if it still has an ETag in If-Match, when given)."""
    await crud.delete_pet(session, pet_id, versions)


def utc_today() -> date:
    """Today in UTC: the day presets end on (a dependency, so tests can fix the clock)."""
    return datetime.now(UTC).date()


# The filter-name cache the lifespan keeps (names to ids, reloaded when a name is missing).
NameCacheDep = Annotated[metrics.NameCache, Depends(from_state("dimension_names"))]


@router.get(
    "/metrics",
    tags=["metrics"],
    response_model=MetricsPage,
    response_model_exclude_unset=True,
    responses=problems(422, 503),
)
async def get_metrics(
    db: MetricsConnectionDep,
    names: NameCacheDep,
    settings: SettingsDep,
    query: Annotated[MetricsQuery, Query()],
    today: Annotated[date, Depends(utc_today)],
) -> MetricsPage:
    """Ad metrics summed over a date range, filtered and grouped by dimensions, with ratios: a
    page of rows, as JSON (every row as CSV or NDJSON: GET /metrics/export).

    Money (`cost`, `cpc`, `cpm`, `cpa`) is sent as exact decimal strings. At most
    METRICS_MAX_CONCURRENT questions run at once per process; one more waits briefly, then gets
    503 with Retry-After. With `compare`, each row and the totals also carry the earlier
    period's metrics and the changes. A question that breaks rules gets one 422 listing every
    problem: each unknown filter or exclusion value, the range, a repeated group_by or field,
    a sort or condition on a metric not in the result, an earlier period outside the calendar.
    A `format=` parameter, or an Accept header without JSON, is refused with the URL of the
    same question's export."""
    return await metrics.answer(db, names, query, today, settings.METRICS_MAX_SPAN_DAYS)


EXPORT_MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "ndjson": NDJSON}


@router.get(
    "/metrics/export",
    tags=["metrics"],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Every row, streamed.",
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                NDJSON: {"schema": {"type": "string"}},
            },
        },
        **problems(422, 503),
    },
)
async def export_metrics(
    db: ExportConnectionDep,
    names: NameCacheDep,
    settings: SettingsDep,
    query: Annotated[MetricsExport, Query()],
    today: Annotated[date, Depends(utc_today)],
    media_type: MediaType,
) -> StreamingResponse:
    """Every row of a question, beyond the 1,000-row page of GET /metrics: the same parameters
    (but `limit` and `offset`), the same rules and the same 422s, as CSV or NDJSON (by `format`,
    else by the Accept header; CSV when neither says), streamed from a server-side cursor. At
    most METRICS_MAX_EXPORTS run at once per process; one more waits briefly, then gets 503
    with Retry-After."""
    kind = query.format or ("ndjson" if media_type == NDJSON else "csv")
    plan = await metrics.plan_question(db, names, query, today, settings.METRICS_MAX_SPAN_DAYS)
    lines = metrics.export_lines(db, plan, kind, query.money, query.escape_formulas)
    headers = {
        "Content-Disposition": f'attachment; filename="metrics.{kind}"',
        "Vary": "Accept",  # CSV or NDJSON by Accept (unless format= says)
    }
    return StreamingResponse(lines, media_type=EXPORT_MEDIA_TYPES[kind], headers=headers)


@router.get("/dimensions", tags=["metrics"])
async def list_dimensions() -> DimensionList:
    """The dimensions /metrics filters and groups by."""
    return DimensionList(dimensions=list(DIMENSIONS))


@router.get("/dimensions/{name}", tags=["metrics"], responses=problems(404, 422, 503))
async def get_dimension_values(
    db: ConnectionDep,
    name: Annotated[
        str,
        Path(max_length=50, pattern=r"^[a-z_]+$", json_schema_extra={"enum": list(DIMENSIONS)}),
    ],
) -> DimensionValues:
    """Every known value of one dimension, for building filters."""
    dimension = DIMENSIONS.get(name)
    if dimension is None:
        raise NotFound(f"No dimension {name!r}; known: {', '.join(DIMENSIONS)}.")
    values = await crud.dimension_values(db, dimension)
    return DimensionValues(name=name, values=[value for _, value in values])


@router.get("/health", tags=["operations"])
async def health() -> Health:
    """The process is alive (it checks nothing else)."""
    return Health()


async def _reachable(check: Awaitable[Any]) -> bool:
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT_SECONDS):
            await check
    except Exception as error:  # noqa: BLE001 - any failure means "not ready"
        log.warning("readiness check failed: %r", error)
        return False
    return True


async def _ping_database(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await crud.ping(connection)


HeartbeatState = Literal["recorded", "never", "unreadable"]


async def _last_heartbeat(redis: Redis) -> tuple[HeartbeatState, datetime | None]:
    """Whether the worker's heartbeat is recorded, never recorded or unreadable, and when."""
    recorded = await redis.get(HEARTBEAT_KEY)
    if recorded is None:
        return "never", None
    try:
        at = datetime.fromisoformat(recorded.decode())
    except (UnicodeDecodeError, ValueError):
        log.warning("unreadable worker heartbeat in Redis %s: %r", HEARTBEAT_KEY, recorded[:100])
        return "unreadable", None
    return "recorded", at if at.tzinfo is not None else at.replace(tzinfo=UTC)


@router.get("/ready", tags=["operations"], responses=problems(503))
async def ready(redis: RedisDep, engine: ReadEngineDep) -> Readiness:
    """The database and Redis are reachable (503 naming the one that is not), and when the
    worker's heartbeat last ran."""
    database_ok, redis_ok = await asyncio.gather(
        _reachable(_ping_database(engine)), _reachable(redis.ping())
    )
    down = [name for name, ok in (("database", database_ok), ("redis", redis_ok)) if not ok]
    if down:
        raise Unavailable(f"Not ready: {' and '.join(down)} unreachable.")
    state, heartbeat = await _last_heartbeat(redis)
    age = None if heartbeat is None else int((datetime.now(UTC) - heartbeat).total_seconds())
    return Readiness(
        worker_heartbeat=state, worker_heartbeat_at=heartbeat, worker_heartbeat_age_seconds=age
    )


# --- the docs pages ----------------------------------------------------------------------------

# Swagger UI's and ReDoc's files, as the fastapi-offline package ships them: the pages load
# nothing from outside the image, so they work offline and under a 'self'-only CSP.
DOCS_ASSETS_PATH = "/docs/assets"
DOCS_ASSETS = importlib.resources.files("fastapi_offline") / "static"


class DocsAssets(StaticFiles):
    """The docs pages' scripts and styles; a browser keeps them and revalidates (ETag)."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def docs_pages(app: FastAPI) -> dict[str, bytes]:
    """The three docs pages, built once. Their URLs are fixed (no root_path) so that the inline
    scripts never change: middleware.DOCS_CSP allows exactly those by hash."""
    openapi_url = app.openapi_url or "/openapi.json"
    favicon = f"{DOCS_ASSETS_PATH}/favicon.png"
    swagger = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=DOCS_OAUTH2_REDIRECT_PATH,
        swagger_js_url=f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=favicon,
        # No badge image fetched from the public validator (it could not see this API anyway).
        swagger_ui_parameters={"validatorUrl": None},
    )
    redoc = get_redoc_html(
        openapi_url=openapi_url,
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{DOCS_ASSETS_PATH}/redoc.standalone.js",
        redoc_favicon_url=favicon,
        with_google_fonts=False,
    )
    return {
        DOCS_PATH: bytes(swagger.body),
        DOCS_OAUTH2_REDIRECT_PATH: bytes(get_swagger_ui_oauth2_redirect_html().body),
        REDOC_PATH: bytes(redoc.body),
    }


def add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs (with its OAuth2 redirect page) and ReDoc at /redoc."""
    pages = docs_pages(app)

    def serve(path: str) -> None:
        async def page() -> HTMLResponse:
            return HTMLResponse(pages[path])

        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)

    for path in pages:
        serve(path)
    app.mount(DOCS_ASSETS_PATH, DocsAssets(directory=str(DOCS_ASSETS)), name="docs-assets")


# --- the app -----------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; without explicit settings they are read from the environment at start-up."""
    app = FastAPI(
        title="Pets and ad metrics",
        version="1.0.0",
        description="A pet directory (JWT-protected writes) and an ad-metrics analytics API.",
        lifespan=lifespan,
        # A trailing-slash redirect is made by on_http_error instead, with a relative Location.
        redirect_slashes=False,
        # Served by add_docs from the image instead of a CDN.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=DOCS_OAUTH2_REDIRECT_PATH,
    )
    app.state.settings = settings
    app.include_router(router)
    add_docs(app)
    app.add_middleware(RejectUndecodableUrls)
    app.add_middleware(LimitRequestBody, settings=settings)
    app.add_middleware(CancelOnDisconnect, paths=frozenset({"/metrics"}))
    app.add_middleware(HeadAsGet)
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(sa_exc.SQLAlchemyError, on_database_error)
    app.add_exception_handler(OSError, on_database_error)
    app.add_exception_handler(RedisError, on_database_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    app.openapi = lambda: openapi_with_problems(app)  # type: ignore[method-assign]
    return app


app = create_app()
