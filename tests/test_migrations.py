"""Alembic builds exactly the schema the models describe, and walks down and up again."""

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from tests.conftest import _admin_execute, alembic_config, database_url_for


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, SQLModel.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names()) - {"alembic_version"}


async def _inspect(url: str, check: Any) -> Any:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(check)
    finally:
        await engine.dispose()


async def test_migrated_schema_matches_the_models(database_url: str) -> None:
    assert await _inspect(database_url, _differences) == []


@pytest.fixture
def scratch_database_url() -> Iterator[str]:
    name = f"test_scratch_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    try:
        yield database_url_for(name)
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_downgrade_to_base_and_upgrade_again(scratch_database_url: str) -> None:
    config = alembic_config(scratch_database_url)
    command.upgrade(config, "head")
    assert asyncio.run(_inspect(scratch_database_url, _tables)) == set(SQLModel.metadata.tables)
    command.downgrade(config, "base")
    assert asyncio.run(_inspect(scratch_database_url, _tables)) == set()
    command.upgrade(config, "head")
    assert asyncio.run(_inspect(scratch_database_url, _differences)) == []
