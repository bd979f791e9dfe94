"""Alembic builds exactly the schema the models describe, walks down and up again, and
`alembic check` finds nothing to generate; plus pytest-alembic's built-in tests."""

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from pytest_alembic.config import Config as PytestAlembicConfig
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from tests.helpers import (
    ROOT,
    alembic_config_for,
    assert_cubes_hold_the_facts_sums,
    scratch_database,
    sql,
)


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
    with scratch_database("test_scratch") as url:
        yield url


# pytest-alembic: single head, upgrade, up/down consistency, models match the DDL. Each runs
# on a scratch database through the async engine below (its runner hands env.py a connection).
from pytest_alembic.tests import (  # noqa: E402
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)

__all__ = [
    "test_model_definitions_match_ddl",
    "test_single_head_revision",
    "test_up_down_consistency",
    "test_upgrade",
]


@pytest.fixture
def alembic_config() -> PytestAlembicConfig:
    return PytestAlembicConfig(config_options={"file": os.path.join(ROOT, "alembic.ini")})


@pytest.fixture
def alembic_engine(scratch_database_url: str) -> AsyncEngine:
    # No pool: each migration step runs in an event loop of its own, and a pooled connection
    # would outlive the loop it was opened in.
    return create_async_engine(scratch_database_url, poolclass=NullPool)


def test_alembic_check_finds_nothing_to_generate(database_url: str) -> None:
    alembic = os.path.join(os.path.dirname(sys.executable), "alembic")
    result = subprocess.run(
        [alembic, "check"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No new upgrade operations detected." in result.stdout + result.stderr


def test_downgrade_to_base_and_upgrade_again(scratch_database_url: str) -> None:
    config = alembic_config_for(scratch_database_url)
    command.upgrade(config, "head")
    assert asyncio.run(_inspect(scratch_database_url, _tables)) == set(SQLModel.metadata.tables)
    command.downgrade(config, "base")
    assert asyncio.run(_inspect(scratch_database_url, _tables)) == set()
    command.upgrade(config, "head")
    assert asyncio.run(_inspect(scratch_database_url, _differences)) == []


FEW_FACTS = [
    "INSERT INTO dim_region (region_name) VALUES ('North'), ('South')",
    "INSERT INTO dim_age_group (age_range) VALUES ('18-24'), ('25-34')",
    "INSERT INTO dim_gender (gender_name) VALUES ('female')",
    "INSERT INTO dim_platform (platform_name) VALUES ('facebook'), ('instagram')",
    "INSERT INTO dim_placement (placement_name) VALUES ('feed')",
    "INSERT INTO dim_device_type (device_type_name) VALUES ('mobile'), ('desktop')",
    "INSERT INTO dim_date VALUES (20260130, '2026-01-30'), (20260131, '2026-01-31'),"
    " (20260201, '2026-02-01')",
    "INSERT INTO fact_ad_metrics_daily SELECT d.date_id, r.region_id, a.age_id, g.gender_id,"
    " p.platform_id, pl.placement_id, dt.device_type_id, 100 * r.region_id + d.date_id % 7,"
    " 10 + a.age_id, 1.25 * p.platform_id, dt.device_type_id, 2 FROM dim_date d, dim_region r,"
    " dim_age_group a, dim_gender g, dim_platform p, dim_placement pl, dim_device_type dt",
]


async def _run_sql(url: str, statements: list[str]) -> None:
    engine = create_async_engine(url)
    try:
        async with AsyncSession(engine) as session:
            for statement in statements:
                await sql(session, statement)
            await session.commit()
    finally:
        await engine.dispose()


async def _check_cubes(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with AsyncSession(engine) as session:
            assert (await sql(session, "SELECT count(*) FROM cube_monthly")).scalar_one() > 0
            await assert_cubes_hold_the_facts_sums(session)
    finally:
        await engine.dispose()


def test_the_cube_migration_sums_the_facts_loaded_before_it(scratch_database_url: str) -> None:
    config = alembic_config_for(scratch_database_url)
    command.upgrade(config, "0005")
    asyncio.run(_run_sql(scratch_database_url, FEW_FACTS))
    command.upgrade(config, "0006")
    asyncio.run(_check_cubes(scratch_database_url))
