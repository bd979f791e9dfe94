"""Heavy analytics against a real uvicorn: a burst of the heaviest legal questions queues on the
analytics pool, the excess is turned away with 503 + Retry-After, and pet reads keep answering."""

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlencode

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from alembic import command
from tests.helpers import ROOT, alembic_config_for, redis_url, scratch_database
from tests.servers import forget_login_attempts, serve_api

# Every group_by over half a year of 2,000 facts a day: a few seconds each on this machine.
HEAVIEST = {
    "start_date": "2026-05-14",
    "end_date": "2026-11-10",
    "group_by": [
        "date", "week", "month", "region", "age_group", "gender", "platform", "placement",
        "device_type",
    ],
    "limit": "1000",
}  # fmt: skip
BURST = 12


@pytest.fixture(scope="module")
def loaded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A small main pool (4) and two analytics turns, so a burst would starve it without them."""
    with scratch_database("test_metrics_load") as url:
        settings = {
            "LOG_LEVEL": "WARNING",
            "DB_POOL_SIZE": "4",
            "DB_MAX_OVERFLOW": "0",
            "DB_POOL_TIMEOUT": "2",
            "METRICS_MAX_CONCURRENT": "2",
            "METRICS_QUEUE_SECONDS": "1",
        }
        env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": redis_url()}
        command.upgrade(alembic_config_for(url), "head")
        seed = [sys.executable, "cli.py", "seed-metrics", "--days", "180", "--rows-per-day"]
        seed += ["2000", "--end-date", "2026-11-10"]
        subprocess.run(seed, cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
        log = tmp_path_factory.mktemp("metrics_load") / "uvicorn.log"
        with serve_api(url, redis_url(), log, **settings) as server:
            forget_login_attempts(redis_url())
            yield server.base, url


@pytest.mark.slow
async def test_a_burst_of_the_heaviest_questions_leaves_pet_reads_fast(
    loaded_server: tuple[str, str],
) -> None:
    async with httpx.AsyncClient(base_url=loaded_server[0], timeout=60) as client:
        token = (
            await client.post(
                "/auth/token", data={"username": "admin", "password": os.environ["ADMIN_PASSWORD"]}
            )
        ).json()["access_token"]
        pet = await client.post(
            "/pets",
            json={"name": "Rex", "pet_type": "dog"},
            headers={"Authorization": f"Bearer {token}"},
        )
        pet_url = pet.headers["location"]
        burst = [asyncio.create_task(client.get("/metrics", params=HEAVIEST)) for _ in range(BURST)]
        await asyncio.sleep(0.2)
        reads: list[tuple[int, float]] = []
        while not all(task.done() for task in burst):
            started = time.monotonic()
            response = await client.get(pet_url)
            reads.append((response.status_code, time.monotonic() - started))
            await asyncio.sleep(0.05)
        answers = [task.result() for task in burst]

    statuses = sorted(answer.status_code for answer in answers)
    slowest = max(seconds for _, seconds in reads)
    print(  # the figures, for pytest -s
        f"{BURST} heaviest questions: {statuses.count(200)} answered, {statuses.count(503)} 503; "
        f"{len(reads)} pet reads meanwhile, slowest {slowest * 1000:.0f} ms"
    )
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2, statuses  # the turns there are were used
    assert all(a.headers.get("retry-after") for a in answers if a.status_code == 503)
    assert len(reads) >= 10
    assert {status for status, _ in reads} == {200}, reads
    assert slowest < 1.0, f"slowest pet read {slowest:.2f} s during the burst"


async def running_metrics_statements(database_url: str) -> int:
    url = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    connection = await asyncpg.connect(url)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'pets-api-metrics' AND state = 'active'"
        )
    finally:
        await connection.close()
    return count


async def test_questions_whose_clients_hang_up_give_back_their_turns_at_once(
    loaded_server: tuple[str, str],
) -> None:
    base, database_url = loaded_server
    port = int(base.rsplit(":", 1)[1])
    query = urlencode(HEAVIEST, doseq=True)
    for _ in range(4):  # two turns taken, two waiting: then every client hangs up
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /metrics?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        writer.close()
    await asyncio.sleep(0.5)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        started = time.monotonic()
        light = await client.get("/metrics", params={"preset": "last_7d"})
        waited = time.monotonic() - started
    assert light.status_code == 200, light.text
    assert waited < 0.9, f"a light question waited {waited:.2f} s behind abandoned ones"
    # PostgreSQL notices a client gone within client_connection_check_interval (0.5 s).
    running = [await running_metrics_statements(database_url)]
    for _ in range(20):
        if running[-1] == 0:
            break
        await asyncio.sleep(0.1)
        running.append(await running_metrics_statements(database_url))
    assert running[-1] == 0, f"abandoned statements ran on: {running}"
