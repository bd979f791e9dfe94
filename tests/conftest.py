"""Shared fixtures: a fresh, migrated database per run, the app with its lifespan, clients."""

import asyncio
import os
import random
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy.engine import make_url
from sqlmodel.ext.asyncio.session import AsyncSession

from alembic import command
from deps import state_of
from main import create_app
from settings import Settings
from tests.helpers import (
    ADMIN_PASSWORD,
    ADMIN_USERNAME,
    JWT_SECRET,
    POSTGRES_URL,
    REDIS_SERVER_URL,
    alembic_config_for,
    client_for,
    flush_redis,
    make_settings,
    scratch_database,
    sql,
)

# The processes tests start (the API, the worker, the CLI) see a test configuration, never the
# service's production defaults.
os.environ.update(
    {"ENVIRONMENT": "test", "JWT_SECRET": JWT_SECRET, "ADMIN_PASSWORD": ADMIN_PASSWORD}
)
# Nor a developer's own .env (README: cp .env.example .env) in this process; tests/test_settings.py
# checks how the entry points read it.
Settings.model_config["env_file"] = None


async def _check_postgres() -> None:
    connection = await asyncpg.connect(POSTGRES_URL, timeout=5)
    await connection.close()


async def _check_redis() -> None:
    client = Redis.from_url(REDIS_SERVER_URL, socket_connect_timeout=5)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def _claim_empty_redis_database() -> str:
    """The URL of a numbered Redis database with no keys, for this run alone."""
    for number in random.sample(range(1, 16), 15):
        url = make_url(REDIS_SERVER_URL).set(database=str(number)).render_as_string(False)
        client = Redis.from_url(url)
        try:
            # Claimed atomically: parallel test processes never share a database.
            if await client.dbsize() == 0 and await client.set(
                "pets:test-run", "claimed", ex=3600, nx=True
            ):
                return url
        finally:
            await client.aclose()
    raise RuntimeError(f"no empty database (1-15) on the Redis server at {REDIS_SERVER_URL}")


CLAIMED_REDIS = pytest.StashKey[str]()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once, naming the server, when PostgreSQL or Redis cannot be reached."""
    missing = []
    for name, url, check in (
        ("PostgreSQL", POSTGRES_URL, _check_postgres),
        ("Redis", REDIS_SERVER_URL, _check_redis),
    ):
        try:
            asyncio.run(check())
        except Exception as error:  # noqa: BLE001 - reported to the user below
            missing.append(f"{name} is not reachable at {url} ({error!r})")
    if missing:
        pytest.exit(
            "Cannot run the tests:\n  "
            + "\n  ".join(missing)
            + "\nStart the server(s), or point TEST_POSTGRES_URL / TEST_REDIS_URL at running ones.",
            returncode=3,
        )
    session.config.stash[CLAIMED_REDIS] = os.environ["REDIS_URL"] = asyncio.run(
        _claim_empty_redis_database()
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    claimed = session.config.stash.get(CLAIMED_REDIS, None)
    if claimed is not None:
        asyncio.run(flush_redis(claimed))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first, then the others by their number of tests: the two processes
    take files as they finish one, so a long file handed out last would leave one waiting."""
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    slow = {
        name for name, tests in files.items() if any(t.get_closest_marker("slow") for t in tests)
    }
    ordered = sorted(files, key=lambda name: (name not in slow, -len(files[name])))
    items[:] = [item for name in ordered for item in files[name]]


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database made for this run, migrated to head by Alembic, dropped afterwards."""
    with scratch_database("test_pets") as url:
        command.upgrade(alembic_config_for(url), "head")
        yield url


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with LifespanManager(application):
        yield application


async def forget_failed_logins(app: FastAPI) -> None:
    """Each test starts with no login attempts counted against it (they would lead to 429s)."""
    keys = [key async for key in state_of(app).redis.scan_iter(match="pets:login-attempts:*")]
    if keys:
        await state_of(app).redis.delete(*keys)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    await forget_failed_logins(app)
    async with client_for(app) as http:
        yield http


@pytest.fixture
async def session(app: FastAPI) -> AsyncIterator[AsyncSession]:
    async with state_of(app).sessionmaker() as db_session:
        yield db_session


@pytest.fixture(scope="session")
async def auth_headers(app: FastAPI) -> dict[str, str]:
    async with client_for(app) as http:
        response = await http.post(
            "/auth/token", data={"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD}
        )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


@pytest.fixture
async def empty_pet_table(session: AsyncSession) -> None:
    await sql(session, "TRUNCATE pet RESTART IDENTITY")
    await session.commit()
