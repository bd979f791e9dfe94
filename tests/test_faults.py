"""Database faults, on a private PostgreSQL cluster this module starts and stops: an outage, a
statement timeout and an exhausted pool are 503 problems with Retry-After, never 500 or a hang,
and the service recovers on its own."""

import asyncio
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from alembic import command
from main import create_app
from tests.helpers import alembic_config_for, client_for, make_settings
from tests.servers import PrivatePostgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        command.upgrade(alembic_config_for(server.url()), "head")
        yield server
    finally:
        server.remove()


@pytest.fixture
async def running(postgres: PrivatePostgres) -> PrivatePostgres:
    """The private server, started again if a test left it stopped."""
    try:
        connection = await asyncpg.connect(postgres.url().replace("+asyncpg", ""), timeout=2)
        await connection.close()
    except OSError:
        await asyncio.to_thread(postgres.start)
    return postgres


async def start_app(postgres: PrivatePostgres, **settings: object) -> AsyncIterator[FastAPI]:
    application = create_app(make_settings(postgres.url(), **settings))
    async with LifespanManager(application):
        yield application


def assert_unavailable(response: httpx.Response) -> str:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) > 0
    detail: str = response.json()["detail"]
    return detail


async def test_outage_is_503_and_the_first_request_after_it_succeeds(
    running: PrivatePostgres,
) -> None:
    async for application in start_app(running, DB_CONNECT_TIMEOUT=2):
        async with client_for(application) as client:
            assert (await client.get("/pets")).status_code == 200  # the pool holds a connection
            await asyncio.to_thread(running.stop)
            assert_unavailable(await client.get("/pets"))
            assert_unavailable(await client.get("/metrics"))
            assert "database" in assert_unavailable(await client.get("/ready"))
            assert (await client.get("/health")).status_code == 200
            await asyncio.to_thread(running.start)
            # The pooled connection died with the server; checkout replaces it unseen.
            assert (await client.get("/pets")).status_code == 200
            assert (await client.get("/ready")).status_code == 200


async def test_a_restart_between_requests_is_invisible(running: PrivatePostgres) -> None:
    async for application in start_app(running):
        async with client_for(application) as client:
            assert (await client.get("/pets")).status_code == 200
            await asyncio.to_thread(running.stop)
            await asyncio.to_thread(running.start)
            # The pooled connection is stale now: checkout sees it closed and replaces it.
            assert (await client.get("/pets")).status_code == 200


async def hold_pet_table_lock(postgres: PrivatePostgres) -> asyncpg.Connection:
    connection = await asyncpg.connect(postgres.url().replace("+asyncpg", ""))
    await connection.execute("BEGIN; LOCK TABLE pet IN ACCESS EXCLUSIVE MODE")
    return connection


async def test_statement_timeout_is_503_and_the_pool_still_works(running: PrivatePostgres) -> None:
    async for application in start_app(running, DB_STATEMENT_TIMEOUT_MS=300):
        async with client_for(application) as client:
            lock = await hold_pet_table_lock(running)
            try:
                detail = assert_unavailable(await client.get("/pets"))
                assert "did not answer in time" in detail
            finally:
                await lock.close()
            assert (await client.get("/pets")).status_code == 200


async def test_an_exhausted_pool_is_503_not_a_hang(running: PrivatePostgres) -> None:
    async for application in start_app(
        running, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=0.5
    ):
        async with client_for(application) as client:
            lock = await hold_pet_table_lock(running)
            try:
                # The first request takes the only connection and waits on the lock.
                waiting = asyncio.create_task(client.get("/pets"))
                await asyncio.sleep(0.3)
                refused = await asyncio.wait_for(client.get("/pets/1"), timeout=10)
                assert "no connection became free" in assert_unavailable(refused)
            finally:
                await lock.close()
            assert (await asyncio.wait_for(waiting, timeout=10)).status_code == 200
            assert (await client.get("/pets")).status_code == 200
