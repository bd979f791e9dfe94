"""GET /metrics/export on the server as shipped: a million rows stream in flat memory, and no
more exports run at once than METRICS_MAX_EXPORTS."""

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from alembic import command
from models import DIMENSIONS
from tests.helpers import ROOT, alembic_config_for, redis_url, scratch_database
from tests.servers import ApiServer, serve_api

# 40 days of 25,000 distinct combinations: grouped by date and every dimension, a million rows.
DAYS, PER_DAY = 40, 25_000
EVERY_ROW = {"start_date": "2026-10-02", "end_date": "2026-11-10",
             "group_by": ["date", *DIMENSIONS]}  # fmt: skip


@pytest.fixture(scope="module")
def export_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with scratch_database("test_metrics_export") as url:
        env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": redis_url()}
        command.upgrade(alembic_config_for(url), "head")
        seed = [sys.executable, "cli.py", "seed-metrics", "--days", str(DAYS)]
        seed += ["--rows-per-day", str(PER_DAY), "--end-date", "2026-11-10"]
        subprocess.run(seed, cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
        log = tmp_path_factory.mktemp("export") / "uvicorn.log"
        settings = {
            "LOG_LEVEL": "WARNING",
            "METRICS_MAX_EXPORTS": "1",
            "METRICS_QUEUE_SECONDS": "0.5",
        }
        with serve_api(url, redis_url(), log, **settings) as server:
            yield server


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_million_rows_stream_in_flat_memory(export_server: ApiServer) -> None:
    base = f"http://127.0.0.1:{export_server.port}"
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        # The totals of the same days, from the cubes at once.
        days = {key: EVERY_ROW[key] for key in ("start_date", "end_date")}
        total = (await client.get("/metrics", params=days)).json()["totals"]
        before = rss_mb(export_server.pid)
        peak, lines, impressions = before, 0, 0
        async with client.stream("GET", "/metrics/export", params=EVERY_ROW) as response:
            assert response.status_code == 200
            header, rest, checked = None, b"", 0
            async for chunk in response.aiter_bytes():  # read as bytes: the client keeps up
                *whole, rest = (rest + chunk).split(b"\n")
                if header is None and whole:
                    header = whole.pop(0).decode().split(",")
                    column = header.index("impressions")
                lines += len(whole)
                # demo names hold no commas
                impressions += sum(int(line.split(b",", column + 1)[column]) for line in whole)
                if lines - checked >= 50_000:
                    peak, checked = max(peak, rss_mb(export_server.pid)), lines
            assert rest == b""  # the last line ends with a newline
    print(f"export: {lines:,} rows, RSS {before:.0f} MB before, {peak:.0f} MB at most")
    assert lines == DAYS * PER_DAY  # every combination of every day is a group
    assert impressions == total["impressions"]
    assert peak - before < 50, f"the server grew by {peak - before:.0f} MB"


@pytest.mark.slow
async def test_one_export_more_than_allowed_is_503_and_the_first_is_whole(
    export_server: ApiServer,
) -> None:
    base = f"http://127.0.0.1:{export_server.port}"
    small = {"preset": "last_7d", "group_by": ["date", "region"]}
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        async with client.stream("GET", "/metrics/export", params=EVERY_ROW) as running:
            assert running.status_code == 200
            chunks = running.aiter_bytes()  # kept: a dropped iterator closes the stream
            await anext(chunks)  # the first export streams, holding its turn
            second = await client.get("/metrics/export", params=small)
            assert second.status_code == 503
            assert second.headers["retry-after"]
            assert second.headers["content-type"] == "application/problem+json"
        # Hung up on, the first gives its turn back as soon as the server notices.
        for _ in range(50):
            again = await client.get("/metrics/export", params=small)
            if again.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert again.status_code == 200
