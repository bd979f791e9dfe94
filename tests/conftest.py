"""Shared fixtures: a fresh, migrated database per run, the app with its lifespan, clients."""

import asyncio
import os
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlmodel.ext.asyncio.session import AsyncSession

from alembic import command
from alembic.config import Config
from main import create_app
from settings import Settings

# The servers the suite runs against; each run makes (and drops) its own database there, and
# takes an empty Redis database (by number) for itself.
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_SERVER_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = "admin-password-for-tests"
JWT_SECRET = "test-secret-that-is-long-enough-for-hs256"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Modules that read settings at import (worker.WorkerSettings) and the processes tests start
# see a test configuration, never the service's production defaults.
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
            if await client.dbsize() == 0:
                await client.set("pets:test-run", "claimed", ex=3600)
                return url
        finally:
            await client.aclose()
    raise RuntimeError(f"no empty database (1-15) on the Redis server at {REDIS_SERVER_URL}")


async def flush_redis(url: str) -> None:
    client = Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


CLAIMED_REDIS = pytest.StashKey[str]()


def redis_url() -> str:
    return os.environ["REDIS_URL"]


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


def alembic_config_for(database_url: str) -> Config:
    config = Config(os.path.join(ROOT, "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


async def _admin_execute(sql: str) -> None:
    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def database_url_for(name: str) -> str:
    url = make_url(POSTGRES_URL).set(drivername="postgresql+asyncpg", database=name)
    return url.render_as_string(hide_password=False)


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new, empty database with a random name (its URL), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    try:
        yield database_url_for(name)
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database made for this run, migrated to head by Alembic, dropped afterwards."""
    with scratch_database("test_pets") as url:
        command.upgrade(alembic_config_for(url), "head")
        yield url


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "ENVIRONMENT": "test",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url(),
        "JWT_SECRET": JWT_SECRET,
        "ADMIN_USERNAME": ADMIN_USERNAME,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
    }
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with LifespanManager(application):
        yield application


def client_for(application: FastAPI, **options: object) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=application, **options)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def forget_failed_logins(app: FastAPI) -> None:
    """Each test starts with no login attempts counted against it (they would lead to 429s)."""
    keys = [key async for key in app.state.redis.scan_iter(match="pets:login-attempts:*")]
    if keys:
        await app.state.redis.delete(*keys)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    await forget_failed_logins(app)
    async with client_for(app) as http:
        yield http


@pytest.fixture
async def session(app: FastAPI) -> AsyncIterator[AsyncSession]:
    async with app.state.sessionmaker() as db_session:
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
    await session.exec(text("TRUNCATE pet RESTART IDENTITY"))  # type: ignore[call-overload]
    await session.commit()


def run_cli(settings: Settings, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`python cli.py ...` against the test database and Redis."""
    env = {**os.environ, "DATABASE_URL": settings.DATABASE_URL, "REDIS_URL": settings.REDIS_URL}
    return subprocess.run(
        [sys.executable, "cli.py", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )
