"""The FastAPI app: its lifespan and its routes. The machinery around them lives in modules named
for it: problems.py (errors), openapi.py (the document and docs pages), request_checks.py
(preconditions), deps.py (what a route may ask for)."""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Form, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

import crud
import metrics
import observability
from auth import (
    PlaceholderAdminPassword,
    create_login_guard,
    dummy_hash,
    issue_token,
    keep_provisioning_admin,
    log_in,
    provision_admin,
)
from db import ANALYTICS_SETTINGS, autocommit, create_engine, create_sessionmaker
from deps import (
    AppState,
    Authenticated,
    ClientAddress,
    ConnectionDep,
    ExportConnectionDep,
    ListingConnectionDep,
    LoginGuardDep,
    MetricsConnectionDep,
    NameCacheDep,
    ReadEngineDep,
    RedisDep,
    SessionDep,
    SettingsDep,
)
from errors import NotFound, Unavailable
from middleware import (
    DOCS_OAUTH2_REDIRECT_PATH,
    CancelOnDisconnect,
    HeadAsGet,
    ObserveRequests,
    RejectUndecodableUrls,
    SecurityHeaders,
    outside_headers,
)
from models import (
    DIMENSIONS,
    PASSWORD_MAX_LENGTH,
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
    Readiness,
    Token,
    Username,
)
from openapi import add_docs, error_responses, openapi_with_problems
from problems import add_problem_handlers
from request_checks import (
    CSV,
    ETAG_HEADER,
    NDJSON,
    AuthorizationHeader,
    CheckedRoute,
    EtagList,
    IfMatchVersions,
    MediaType,
    PetId,
    check_query_parameters,
    etag_matches,
    etag_of,
    negotiate,
    require_prometheus_token,
)
from server import LimitRequestBody
from settings import HEARTBEAT_KEY, Settings, load_settings
from turns import Turns

log = logging.getLogger("pets.api")

READY_CHECK_TIMEOUT_SECONDS = 2.0

PET_WRITE_RESPONSES = {
    200: {"headers": ETAG_HEADER},
    **error_responses(401, 404, 412, 415, 422, 503),
}


# --- start-up and shutdown -------------------------------------------------------------------


def open_state(settings: Settings) -> AppState:
    """The pools, turns, caches and clients the app serves with (connections open lazily)."""
    engine = create_engine(settings)
    analytics = create_engine(
        settings,
        "pets-api-metrics",
        settings.METRICS_STATEMENT_TIMEOUT_MS,
        pool_size=settings.METRICS_MAX_CONCURRENT,
        server_settings=ANALYTICS_SETTINGS,
    )
    redis = Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    read_engine = autocommit(engine)
    return AppState(
        settings=settings,
        engine=engine,
        sessionmaker=create_sessionmaker(engine),
        read_engine=read_engine,
        analytics_engine=autocommit(analytics),
        analytics_stream_engine=analytics,
        listing_turns=Turns(
            settings.PETS_LIST_MAX_CONCURRENT,
            settings.PETS_LIST_QUEUE_SECONDS,
            "Too many pet listings are running; retry shortly.",
            "listings_busy",
        ),
        metrics_turns=Turns(
            settings.METRICS_MAX_CONCURRENT,
            settings.METRICS_QUEUE_SECONDS,
            "Too many analytics questions are running; retry shortly, or narrow the question.",
            "analytics_busy",
        ),
        export_turns=Turns(
            settings.METRICS_MAX_EXPORTS,
            settings.METRICS_QUEUE_SECONDS,
            "Too many exports are running; retry shortly.",
            "exports_busy",
        ),
        dimension_names=metrics.NameCache(),
        redis=redis,
        login_guard=create_login_guard(settings, redis, read_engine),
    )


# Each process samples its pools and turns this often, for the gauges a scrape sums.
GAUGE_SECONDS = 2.0


async def keep_recording(state: AppState) -> None:
    while True:
        observability.record_pools(
            {"main": state.engine, "analytics": state.analytics_stream_engine}
        )
        observability.record_turns(
            {
                "analytics": state.metrics_turns.in_use,
                "exports": state.export_turns.in_use,
                "listings": state.listing_turns.in_use,
                "password_checks": state.login_guard.verification_slots.in_use,
            }
        )
        await asyncio.sleep(GAUGE_SECONDS)


async def close_state(state: AppState) -> None:
    await state.redis.aclose()
    await state.engine.dispose()
    await state.analytics_stream_engine.dispose()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings or load_settings()
    state = app.state.app_state = open_state(settings)
    provisioning: asyncio.Task[None] | None = None
    recording = asyncio.create_task(keep_recording(state))
    try:
        # Warm the timing-equaliser hash now rather than on the first unknown-user login.
        await asyncio.to_thread(dummy_hash)
        try:
            await provision_admin(settings, state.sessionmaker)
        except PlaceholderAdminPassword as error:
            log.critical("refusing to start: %s", error)
            raise
        except Exception as error:  # noqa: BLE001 - the API serves reads (and /ready) meanwhile
            log.warning("admin user not provisioned (%s); retrying in the background", error)
            provisioning = asyncio.create_task(
                keep_provisioning_admin(settings, state.sessionmaker)
            )
        yield
    finally:
        for task in (provisioning, recording):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        await close_state(state)


# --- routes ------------------------------------------------------------------------------------

# Routes for operators, outside the OpenAPI document and the API's Accept and query checks
# (Prometheus sends its own Accept).
internal = APIRouter(include_in_schema=False)


@internal.get("/internal/metrics")
async def prometheus_metrics(
    settings: SettingsDep, authorization: AuthorizationHeader = None
) -> Response:
    """Prometheus's scrape: every metric of every API process. 404 without PROMETHEUS_TOKEN,
    as if the path did not exist; 401 without that bearer token."""
    require_prometheus_token(settings, authorization)
    body = observability.exposition()
    return Response(body, media_type=observability.EXPOSITION_MEDIA_TYPE)


router = APIRouter(
    dependencies=[Depends(check_query_parameters), Depends(negotiate)],
    route_class=CheckedRoute,
    # Operations named as their functions: a generated client gets `get_metrics`, not
    # `get_metrics_metrics_get`.
    generate_unique_id_function=lambda route: route.name,
)


@router.post("/auth/token", tags=["auth"], responses=error_responses(401, 422, 429, 503))
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


@router.get("/pets", tags=["pets"], responses=error_responses(422, 503))
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
        **error_responses(404, 422, 503),
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
    if if_none_match is not None and etag_matches(if_none_match, etag):
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
        **error_responses(401, 415, 422, 503),
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
    responses=error_responses(401, 404, 412, 422, 503),
    dependencies=[Authenticated],
)
async def delete_pet(session: SessionDep, pet_id: PetId, versions: IfMatchVersions) -> None:
    """Remove a pet (only if it still has an ETag in If-Match, when given)."""
    await crud.delete_pet(session, pet_id, versions)


def utc_today() -> date:
    """Today in UTC: the day presets end on (a dependency, so tests can fix the clock)."""
    return datetime.now(UTC).date()


@router.get(
    "/metrics",
    tags=["metrics"],
    response_model=MetricsPage,
    response_model_exclude_unset=True,
    responses=error_responses(422, 503),
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


EXPORT_MEDIA_TYPES = {"csv": f"{CSV}; charset=utf-8", "ndjson": NDJSON}


@router.get(
    "/metrics/export",
    tags=["metrics"],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Every row, streamed.",
            "content": {
                CSV: {"schema": {"type": "string"}},
                NDJSON: {"schema": {"type": "string"}},
            },
        },
        **error_responses(422, 503),
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


@router.get("/dimensions/{name}", tags=["metrics"], responses=error_responses(404, 422, 503))
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


@router.get("/ready", tags=["operations"], responses=error_responses(503))
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


# --- the app -----------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; without explicit settings they are read from the environment at start-up."""
    app = FastAPI(
        title="Pets and ad metrics",
        version="1.0.0",
        description="A pet directory (JWT-protected writes) and an ad-metrics analytics API.",
        lifespan=lifespan,
        # A trailing-slash redirect is made by problems.on_http_error, with a relative Location.
        redirect_slashes=False,
        # Served by openapi.add_docs from the image instead of a CDN.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=DOCS_OAUTH2_REDIRECT_PATH,
    )
    app.state.settings = settings  # what the lifespan starts with (None: the environment's)
    app.include_router(router)
    app.include_router(internal)
    add_docs(app)
    app.add_middleware(RejectUndecodableUrls)
    app.add_middleware(LimitRequestBody, settings=settings)
    app.add_middleware(CancelOnDisconnect, paths=frozenset({"/metrics"}))
    app.add_middleware(HeadAsGet)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(ObserveRequests)
    add_problem_handlers(app, outside_headers=outside_headers)
    app.openapi = lambda: openapi_with_problems(app)  # type: ignore[method-assign]
    return app


app = create_app()
