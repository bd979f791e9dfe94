"""Alembic environment: async migrations on SQLModel.metadata, URL from settings."""

import asyncio
from logging.config import fileConfig

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlmodel import SQLModel

import models  # noqa: F401 - registers every table on SQLModel.metadata
from alembic import context
from settings import load_settings

config = context.config
# A caller that hands over its own connection (tests, pytest-alembic) keeps its own logging too.
programmatic = "connection" in config.attributes or not config.attributes.get(
    "configure_logging", True
)
if config.config_file_name is not None and not programmatic:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = SQLModel.metadata


def database_url() -> str:
    # Tests and tools pass the URL in; otherwise it is the service's own DATABASE_URL.
    url = config.attributes.get("database_url")
    return str(url) if url else load_settings().DATABASE_URL


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations(engine: AsyncEngine, owned: bool) -> None:
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        if owned:
            await engine.dispose()


def run_migrations_online() -> None:
    """On the caller's connection or engine when one is given, else on DATABASE_URL."""
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        do_run_migrations(given)
    elif isinstance(given, AsyncEngine):
        asyncio.run(run_async_migrations(given, owned=False))
    else:
        asyncio.run(run_async_migrations(create_async_engine(database_url()), owned=True))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
