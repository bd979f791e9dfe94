"""A flood of wrong-password logins against the real server (uvicorn, a small pool) leaves the
public reads their connections and their CPU, and leaves no connection idle in a transaction."""

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from alembic import command
from tests.helpers import ADMIN_PASSWORD, alembic_config_for, redis_url, scratch_database
from tests.servers import serve_api

LOGINS = 100
# A pool far smaller than the flood: before the fix every login held one of these while its
# password was hashed, and the reads waited for DB_POOL_TIMEOUT or got 503.
SERVER_ENV = {
    "DB_POOL_SIZE": "5",
    "DB_MAX_OVERFLOW": "0",
    "DB_POOL_TIMEOUT": "2",
    # Every login of the flood gets as far as the lookup and the hash (one client sends them all).
    "LOGIN_LIMIT_PER_CLIENT": "1000",
    "LOG_LEVEL": "WARNING",
}
SLOWEST_READ_SECONDS = 1.0


@dataclass
class Server:
    base: str
    database_url: str
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The API served as everywhere (server.py) on a spare port, on a migrated database of its
    own."""
    log = tmp_path_factory.mktemp("login-flood") / "server.log"
    with scratch_database("test_login_flood") as url:
        command.upgrade(alembic_config_for(url), "head")
        with serve_api(url, redis_url(), log, **SERVER_ENV) as served:
            yield Server(served.base, url, log)


@dataclass
class Observed:
    read_statuses: list[int] = field(default_factory=list)
    read_seconds: list[float] = field(default_factory=list)
    idle_in_transaction: list[int] = field(default_factory=list)


def read_pet_until(done: threading.Event, base: str, pet_id: int, seen: Observed) -> None:
    """Read the pet again and again; in a thread of its own, so that the time measured is the
    server's, not this process's event loop busy with sending the flood."""
    with httpx.Client(base_url=base, timeout=10) as http:
        while not done.is_set():
            started = time.perf_counter()
            response = http.get(f"/pets/{pet_id}")
            seen.read_seconds.append(time.perf_counter() - started)
            seen.read_statuses.append(response.status_code)
            time.sleep(0.01)


async def sample_connections_until(
    done: threading.Event, database_url: str, seen: Observed
) -> None:
    """How many of the app's connections are idle inside a transaction, every 20 ms."""
    url = make_url(database_url)
    connection = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database
    )
    try:
        while not done.is_set():
            count = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                " AND application_name = 'pets-api' AND state = 'idle in transaction'",
                url.database,
            )
            seen.idle_in_transaction.append(count)
            await asyncio.sleep(0.02)
    finally:
        await connection.close()


@pytest.mark.slow
async def test_a_login_flood_leaves_pet_reads_fast_and_holds_no_connection(
    server: Server,
) -> None:
    limits = httpx.Limits(max_connections=LOGINS + 10)
    async with httpx.AsyncClient(base_url=server.base, timeout=20, limits=limits) as http:
        token = await http.post(
            "/auth/token", data={"username": "admin", "password": ADMIN_PASSWORD}
        )
        assert token.status_code == 200, token.text
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        pet = await http.post("/pets", json={"name": "Rex", "pet_type": "dog"}, headers=headers)
        assert pet.status_code == 201, pet.text

        seen = Observed()
        done = threading.Event()
        watchers = [
            asyncio.create_task(
                asyncio.to_thread(read_pet_until, done, server.base, pet.json()["id"], seen)
            ),
            asyncio.create_task(sample_connections_until(done, server.database_url, seen)),
        ]
        await asyncio.sleep(0.2)  # both watchers are under way before the flood
        async with asyncio.timeout(25):
            logins = await asyncio.gather(
                *(
                    http.post(
                        "/auth/token", data={"username": f"flood-{n}", "password": "wrong-guess"}
                    )
                    for n in range(LOGINS)
                )
            )
            done.set()
            await asyncio.gather(*watchers)

    statuses = sorted({response.status_code for response in logins})
    slowest = max(seen.read_seconds)
    # The figures, for the README and for a failure's report (`pytest -s` shows them).
    print(
        f"logins {[(s, sum(r.status_code == s for r in logins)) for s in statuses]}; "
        f"{len(seen.read_seconds)} pet reads {sorted(set(seen.read_statuses))}, slowest"
        f" {slowest * 1000:.0f} ms; most connections idle in transaction:"
        f" {max(seen.idle_in_transaction)} ({len(seen.idle_in_transaction)} samples)"
    )
    assert set(statuses) <= {401, 503}, statuses
    assert any(response.status_code == 401 for response in logins), "some passwords were hashed"
    assert len(seen.read_statuses) >= 5, "the reader ran during the flood"
    assert set(seen.read_statuses) == {200}, seen.read_statuses
    assert slowest < SLOWEST_READ_SECONDS, f"slowest pet read took {slowest:.2f} s"
    assert max(seen.idle_in_transaction) == 0
