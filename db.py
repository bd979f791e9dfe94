"""The async engine, the session factory and the per-request session dependency."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from settings import Settings

SessionMaker = async_sessionmaker[AsyncSession]


def create_engine(
    settings: Settings,
    application_name: str = "pets-api",
    statement_timeout_ms: int | None = None,
) -> AsyncEngine:
    """The service's engine; bulk commands pass statement_timeout_ms=0 (no limit)."""
    if statement_timeout_ms is None:
        statement_timeout_ms = settings.DB_STATEMENT_TIMEOUT_MS
    return create_async_engine(
        settings.DATABASE_URL,
        pool_size=settings.DB_POOL_SIZE,
        max_overflow=settings.DB_MAX_OVERFLOW,
        pool_timeout=settings.DB_POOL_TIMEOUT,
        # A connection dropped by a database restart is replaced instead of failing a request.
        pool_pre_ping=True,
        connect_args={
            "timeout": settings.DB_CONNECT_TIMEOUT,
            "server_settings": {
                "application_name": application_name,
                "statement_timeout": str(statement_timeout_ms),
            },
        },
    )


def create_sessionmaker(engine: AsyncEngine) -> SessionMaker:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessionmaker: SessionMaker = request.app.state.sessionmaker
    async with sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]
