"""What a route may ask for: the typed application state the lifespan fills, and every
`Annotated[..., Depends(...)]` alias over it (settings, Redis, sessions, the connections that
wait for a turn, the login guard, the signed-in user)."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.security import OAuth2PasswordBearer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from auth import LoginGuard, user_of_token
from db import SessionMaker
from metrics import NameCache
from models import User
from settings import Settings
from turns import Turns


@dataclass
class AppState:
    """What the lifespan opens, and closes at shutdown; one per app."""

    settings: Settings
    # The main pool: sessions (transactions) for writes and logins' user look-ups.
    engine: AsyncEngine
    sessionmaker: SessionMaker
    # The main pool without transactions, for routes that read with one statement.
    read_engine: AsyncEngine
    # The analytics pool (its own connections, statement timeout and planner settings), without
    # transactions for questions, and with them for the server-side cursors of exports.
    analytics_engine: AsyncEngine
    analytics_stream_engine: AsyncEngine
    listing_turns: Turns
    metrics_turns: Turns
    export_turns: Turns
    dimension_names: NameCache
    redis: Redis
    login_guard: LoginGuard


def state_of(app: FastAPI) -> AppState:
    """The app's state, once its lifespan has started."""
    state: AppState = app.state.app_state
    return state


def app_state(request: Request) -> AppState:
    return state_of(request.app)


AppStateDep = Annotated[AppState, Depends(app_state)]


def settings(state: AppStateDep) -> Settings:
    return state.settings


def redis(state: AppStateDep) -> Redis:
    return state.redis


def read_engine(state: AppStateDep) -> AsyncEngine:
    return state.read_engine


def dimension_names(state: AppStateDep) -> NameCache:
    return state.dimension_names


def login_guard(state: AppStateDep) -> LoginGuard:
    return state.login_guard


def client_address(request: Request) -> str:
    # What uvicorn says the peer is (it decides whether proxy headers may change that).
    return request.client.host if request.client else "unknown"


SettingsDep = Annotated[Settings, Depends(settings)]
RedisDep = Annotated[Redis, Depends(redis)]
ReadEngineDep = Annotated[AsyncEngine, Depends(read_engine)]
NameCacheDep = Annotated[NameCache, Depends(dimension_names)]
LoginGuardDep = Annotated[LoginGuard, Depends(login_guard)]
ClientAddress = Annotated[str, Depends(client_address)]


async def get_session(state: AppStateDep) -> AsyncIterator[AsyncSession]:
    async with state.sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def get_connection(state: AppStateDep) -> AsyncIterator[AsyncConnection]:
    async with state.read_engine.connect() as connection:
        yield connection


ConnectionDep = Annotated[AsyncConnection, Depends(get_connection)]


async def get_listing_connection(state: AppStateDep) -> AsyncIterator[AsyncConnection]:
    """A connection of the main pool for a pet listing, once one of PETS_LIST_MAX_CONCURRENT
    turns is free: a name search scans the table, so a flood of them must not take the pool
    (or every core) from reads by id, logins and writes."""
    async with state.listing_turns.take(), state.read_engine.connect() as connection:
        yield connection


ListingConnectionDep = Annotated[AsyncConnection, Depends(get_listing_connection)]


async def get_metrics_connection(state: AppStateDep) -> AsyncIterator[AsyncConnection]:
    """A connection of the analytics pool, once one of its METRICS_MAX_CONCURRENT turns is free
    (503 after METRICS_QUEUE_SECONDS): heavy questions queue here, not in the main pool."""
    async with state.metrics_turns.take(), state.analytics_engine.connect() as connection:
        yield connection


MetricsConnectionDep = Annotated[AsyncConnection, Depends(get_metrics_connection)]


async def get_export_connection(state: AppStateDep) -> AsyncIterator[AsyncConnection]:
    """A connection of the analytics pool, in a transaction (a server-side cursor needs one),
    for an export: one of METRICS_MAX_EXPORTS export turns and an analytics turn, held until the
    last row is sent (a dependency's exit runs after its streamed response)."""
    async with (
        state.export_turns.take(),
        state.metrics_turns.take(),
        state.analytics_stream_engine.connect() as connection,
    ):
        yield connection


ExportConnectionDep = Annotated[AsyncConnection, Depends(get_export_connection)]


# auto_error=False: a missing token is answered by our own 401 problem, not FastAPI's.
bearer_scheme = OAuth2PasswordBearer(tokenUrl="auth/token", auto_error=False)


async def current_user(
    settings: SettingsDep,
    session: SessionDep,
    token: Annotated[str | None, Depends(bearer_scheme)],
) -> User:
    return await user_of_token(session, token, settings)


# For a route that needs a signed-in user but not the user itself (in its `dependencies`).
Authenticated = Depends(current_user)
