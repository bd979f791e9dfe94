"""The async engines (the main pool and the analytics pool) and the session factory."""

from collections.abc import Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)
from sqlmodel.ext.asyncio.session import AsyncSession

from settings import Settings

SessionMaker = async_sessionmaker[AsyncSession]
# Most analytics questions read a few thousand cube rows in a millisecond; starting parallel
# workers for them (at the default parallel_setup_cost of 1000) took 5 ms more. Ten times that
# leaves parallel plans to the questions that read facts.
ANALYTICS_SETTINGS = {"parallel_setup_cost": "10000"}


def create_engine(
    settings: Settings,
    application_name: str = "pets-api",
    statement_timeout_ms: int | None = None,
    pool_size: int | None = None,
    server_settings: Mapping[str, str] | None = None,
) -> AsyncEngine:
    """The service's engine; bulk commands pass statement_timeout_ms=0 (no limit), the
    analytics pool its own timeout, a fixed size (no overflow) and ANALYTICS_SETTINGS."""
    if statement_timeout_ms is None:
        statement_timeout_ms = settings.DB_STATEMENT_TIMEOUT_MS
    engine = create_async_engine(
        settings.DATABASE_URL,
        pool_size=settings.DB_POOL_SIZE if pool_size is None else pool_size,
        max_overflow=settings.DB_MAX_OVERFLOW if pool_size is None else 0,
        pool_timeout=settings.DB_POOL_TIMEOUT,
        connect_args={
            "timeout": settings.DB_CONNECT_TIMEOUT,
            "server_settings": {
                "application_name": application_name,
                "statement_timeout": str(statement_timeout_ms),
                # Compiling a query to machine code costs 100 ms and more; the service's
                # queries are done long before that pays off.
                "jit": "off",
                # A statement whose client is gone (a request cancelled, a connection dropped)
                # stops within half a second instead of running to its end (PostgreSQL 14+).
                "client_connection_check_interval": "500",
                **(server_settings or {}),
            },
        },
    )
    event.listen(engine.sync_engine, "checkout", _replace_if_closed)
    return engine


def _replace_if_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection the server has closed (a restart, an idle timeout) is replaced at
    checkout, so the next request does not fail on it. asyncpg learns of the close from the
    socket, so this costs no round trip, unlike `pool_pre_ping` (which cost a third of the time
    of a request by id)."""
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the server closed this connection")


def create_sessionmaker(engine: AsyncEngine) -> SessionMaker:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    """The same pool for routes that read with one statement: no BEGIN and ROLLBACK round trips
    around it, and no ORM session to build."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")
