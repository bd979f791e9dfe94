"""The arq worker: the report's exact text, heartbeat, schedule, several workers, outages, and
its Prometheus metrics."""

import asyncio
import dataclasses
import io
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from arq.connections import create_pool
from arq.cron import CronJob
from arq.jobs import Job, JobStatus
from arq.worker import Worker, create_worker
from fastapi import FastAPI
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlmodel.ext.asyncio.session import AsyncSession

import cli
import worker
from alembic import command
from backoff import Backoff
from deps import state_of
from settings import HEARTBEAT_KEY, Settings
from tests.helpers import ROOT, alembic_config_for, flush_redis, redis_url, run_cli, sql
from tests.servers import PrivatePostgres, PrivateRedis, WorkerProcess, unused_port, wait_until

pytestmark = pytest.mark.usefixtures("empty_pet_table")

NOW = datetime(2026, 11, 24, 10, 15, 0, tzinfo=UTC)
REPORT_HEADER = re.compile(r"^==== Pet report at (.+) UTC ====$", re.MULTILINE)

KNOWN_PETS = """
INSERT INTO pet (id, name, pet_type, created_at) VALUES
    (1, 'Rex', 'dog', '2026-01-02 03:04:05+00'),
    (2, 'O''Brien & <Co>', 'cat', '2026-01-02 03:04:06+00'),
    (3, '{{ 7*7 }}', 'guinea pig', '2026-01-02 03:04:07.9+00'),
    (10, 'Zoë', 'cat', '2026-02-03 14:15:16+00')
"""

GOLDEN_REPORT = """\
==== Pet report at 2026-11-24 10:15:00 UTC ====
4 pets in all, by type:
  cat         2
  dog         1
  guinea pig  1

ID  NAME            TYPE        CREATED (UTC)
 1  Rex             dog         2026-01-02 03:04:05
 2  O'Brien & <Co>  cat         2026-01-02 03:04:06
 3  {{ 7*7 }}       guinea pig  2026-01-02 03:04:07
10  Zoë             cat         2026-02-03 14:15:16
==== end of report ====
"""

EMPTY_REPORT = """\
==== Pet report at 2026-11-24 10:15:00 UTC ====
No pets in the directory yet.
==== end of report ====
"""


async def render(app: FastAPI) -> str:
    out = io.StringIO()
    await worker.write_report(state_of(app).engine, worker.load_report_template(), out, NOW)
    return out.getvalue()


async def test_report_text_for_known_pets(app: FastAPI, session: AsyncSession) -> None:
    await sql(session, KNOWN_PETS)
    await session.commit()
    assert await render(app) == GOLDEN_REPORT


async def test_report_for_an_empty_directory_says_so(app: FastAPI) -> None:
    assert await render(app) == EMPTY_REPORT


async def test_report_counts_what_it_lists(
    app: FastAPI, client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    for number in range(250):
        response = await client.post(
            "/pets",
            json={"name": f"pet {number}", "pet_type": ["cat", "dog"][number % 2]},
            headers=auth_headers,
        )
        assert response.status_code == 201
    report = await render(app)
    assert "250 pets in all" in report
    assert "  cat   125\n  dog   125\n" in report
    assert len(re.findall(r"^ *\d+  pet \d+ ", report, re.MULTILINE)) == 250


async def test_heartbeat_logs_its_time_and_records_it_for_ready(
    app: FastAPI, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="pets.worker"):
        ran_at = await worker.heartbeat({"redis": state_of(app).redis})
    stamp = datetime.fromisoformat(ran_at)
    assert stamp.tzinfo is not None
    assert stamp.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - stamp) < timedelta(seconds=5)
    assert [record.getMessage() for record in caplog.records] == [f"heartbeat ran at {ran_at}"]
    assert (await state_of(app).redis.get(HEARTBEAT_KEY)).decode() == ran_at
    ready = (await client.get("/ready")).json()
    assert ready["worker_heartbeat_age_seconds"] in (0, 1, 2)
    await state_of(app).redis.delete(HEARTBEAT_KEY)


async def test_worker_settings_build_a_worker_with_both_schedules(settings: Settings) -> None:
    built = create_worker(worker.worker_settings(settings), handle_signals=False)
    crons = {job.name: job for job in built.cron_jobs}
    assert set(crons) == {"cron:pet_report", "cron:heartbeat"}
    report, beat = crons["cron:pet_report"], crons["cron:heartbeat"]
    assert (report.second, report.microsecond, report.minute, report.hour) == (0, 0, None, None)
    assert report.unique
    assert report.keep_result_s is not None
    assert report.keep_result_s >= 60
    assert report.timeout_s is not None
    assert report.timeout_s < 60
    assert (beat.hour, beat.minute, beat.second) == ({0, 6, 12, 18}, 0, 0)
    assert beat.run_at_startup
    assert beat.unique
    assert beat.timeout_s is not None
    assert beat.timeout_s < 6 * 3600
    assert built.timezone == UTC
    assert 0 < built.health_check_interval <= 30
    assert 0 < built._job_completion_wait < 20
    assert "pet_report" in built.functions


async def test_start_up_report_uses_the_id_arq_gives_that_minute_tick(settings: Settings) -> None:
    report = next(job for job in cron_jobs(settings) if job.name == "cron:pet_report")
    moment = datetime(2026, 11, 24, 10, 15, 42, 123456, tzinfo=UTC)
    report.calculate_next(moment - timedelta(minutes=1))
    assert report.next_run == moment.replace(second=0, microsecond=0)
    tick_ms = int(report.next_run.timestamp() * 1000)
    assert worker.report_tick_job_id(moment) == f"cron:pet_report:{tick_ms}"


@pytest.mark.usefixtures("fresh_redis")
async def test_arq_enqueues_a_minute_tick_under_the_id_the_start_up_report_takes(
    settings: Settings,
) -> None:
    """worker.report_tick_job_id rebuilds the id arq's cron gives a tick: a real arq Worker's
    own cron pass enqueues the report of a past minute under exactly that id, so a change in
    the pinned arq fails here."""
    tick = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
    jobs = [
        dataclasses.replace(job, next_run=tick if job.name == "cron:pet_report" else None)
        for job in cron_jobs(settings)
    ]
    pool = await create_pool(worker.redis_settings(settings))
    arq_worker = create_worker(
        worker.worker_settings(settings),
        burst=True,
        handle_signals=False,
        cron_jobs=jobs,
        redis_pool=pool,
        ctx={"settings": settings},
    )
    try:
        await arq_worker.run_cron(datetime.now(UTC), delay=0.5)
        job = Job(worker.report_tick_job_id(tick + timedelta(seconds=42)), pool)
        assert await job.status() == JobStatus.queued
    finally:
        await arq_worker.close()


async def test_patient_retry_waits_out_the_errors_redis_py_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection error, and one redis-py's connections add to the retried errors, are waited
    out; another error is raised at once."""
    monkeypatch.setattr(worker, "REDIS_BACKOFF", Backoff(first=0.01, cap=0.01))
    retry = worker.PatientRetry()
    retry.update_supported_errors([KeyError])
    failures = [RedisConnectionError("down"), KeyError("added by a connection")]
    seen: list[Exception] = []

    async def command() -> str:
        if failures:
            raise failures.pop(0)
        return "PONG"

    async def on_failure(error: Exception) -> None:
        seen.append(error)

    assert await retry.call_with_retry(command, on_failure) == "PONG"
    assert [type(error) for error in seen] == [RedisConnectionError, KeyError]

    async def broken() -> str:
        raise ValueError("not a connection problem")

    with pytest.raises(ValueError, match="not a connection problem"):
        await retry.call_with_retry(broken, on_failure)


def cron_jobs(settings: Settings) -> list[CronJob]:
    """The worker's schedule, made anew (arq keeps each cron job's next run on its object)."""
    jobs: list[CronJob] = worker.worker_settings(settings)["cron_jobs"]
    return jobs


def without_minute_tick(settings: Settings) -> list[CronJob]:
    """The schedule with the report's minute tick put off, so a run that crosses a minute does
    not add a report to the ones counted."""
    return [
        dataclasses.replace(job, next_run=datetime(2100, 1, 1, tzinfo=UTC))
        if job.name == "cron:pet_report"
        else job
        for job in cron_jobs(settings)
    ]


async def run_burst_worker(settings: Settings) -> Worker:
    """A real arq worker from WorkerSettings that stops once the queue is empty, its minute tick
    put off."""
    burst = create_worker(
        worker.worker_settings(settings),
        burst=True,
        handle_signals=False,
        poll_delay=0.1,
        cron_jobs=without_minute_tick(settings),
        redis_settings=worker.redis_settings(settings),
        ctx={"settings": settings},
    )
    try:
        await burst.async_run()
    finally:
        await burst.close()
    return burst


@pytest.fixture
async def fresh_redis() -> None:
    """An empty queue: no result of an earlier test's report tick turns this one's away."""
    await flush_redis(redis_url())


@pytest.mark.usefixtures("fresh_redis")
async def test_report_now_from_the_cli_reaches_a_worker(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    requested = run_cli(settings, "report-now")
    assert requested.returncode == 0, requested.stderr
    assert "report requested" in requested.stdout
    burst = await run_burst_worker(settings)
    # The start-up report, the start-up heartbeat and the requested report.
    assert (burst.jobs_complete, burst.jobs_failed) == (3, 0)
    assert len(REPORT_HEADER.findall(capsys.readouterr().out)) == 2


@pytest.mark.usefixtures("fresh_redis")
async def test_burst_worker_runs_the_report_and_the_heartbeat(
    settings: Settings,
    app: FastAPI,
    session: AsyncSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await sql(session, KNOWN_PETS)
    await session.commit()
    burst = await run_burst_worker(settings)
    assert (burst.jobs_complete, burst.jobs_failed) == (2, 0)
    printed = capsys.readouterr().out
    assert len(REPORT_HEADER.findall(printed)) == 1
    assert printed.endswith(GOLDEN_REPORT.split("\n", 1)[1])
    assert await state_of(app).redis.get(HEARTBEAT_KEY)
    await state_of(app).redis.delete(HEARTBEAT_KEY)


def worker_env(settings: Settings, **overrides: str) -> dict[str, str]:
    return {
        "DATABASE_URL": settings.DATABASE_URL,
        "REDIS_URL": redis_url(),
        "LOG_LEVEL": "INFO",
        # No fixed host port for the test's workers (two of them would share 9101); the metrics
        # tests give theirs a spare one.
        "WORKER_METRICS_PORT": "0",
        **overrides,
    }


def report_minutes(output: str) -> Counter[str]:
    return Counter(stamp[:16] for stamp in REPORT_HEADER.findall(output))


def only_reports(output: str) -> bool:
    """Every line of STDOUT belongs to a report block."""
    inside = False
    for line in output.splitlines():
        if REPORT_HEADER.match(line):
            inside = True
        elif line == "==== end of report ====":
            inside = False
        elif not inside:
            return False
    return not inside


def arq_check(settings: Settings) -> int:
    """`arq --check worker.WorkerSettings`: the container health check of the worker."""
    arq = str(Path(sys.executable).parent / "arq")
    env = {**os.environ, **worker_env(settings)}
    checked = subprocess.run(
        [arq, "--check", "worker.WorkerSettings"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
    )
    return checked.returncode


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for process in started:
        if process.alive():
            process.process.kill()
            process.process.wait(timeout=10)


@pytest.mark.usefixtures("fresh_redis")
@pytest.mark.slow
async def test_two_worker_processes_print_one_start_up_report(
    settings: Settings, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    started_at = datetime.now(UTC)
    workers += [WorkerProcess(tmp_path, worker_env(settings), name) for name in ("one", "two")]
    for process in workers:
        process.wait_for_output("Starting worker for", stream="stderr")

    def printed() -> str:
        return workers[0].stdout() + workers[1].stdout()

    wait_until(lambda: "==== end of report ====" in printed(), 30, "the start-up report")
    await asyncio.sleep(1)  # the later worker's start-up report has been turned away by now
    assert arq_check(settings) == 0
    exit_codes = [process.stop() for process in workers]
    assert arq_check(settings) == 1
    outputs = [process.stdout() for process in workers]
    minutes = report_minutes("".join(outputs))
    # One report for each minute from the first (the start-up report's, which may be the minute
    # after the test began: a minute may turn while the workers start), each printed once.
    first = datetime.strptime(min(minutes), "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    assert first >= started_at.replace(second=0, microsecond=0)
    assert sorted(minutes) == [f"{m:%Y-%m-%d %H:%M}" for m in minutes_between(first)]
    assert set(minutes.values()) == {1}, minutes
    assert all(only_reports(output) for output in outputs)
    # Each worker's start-up heartbeat runs once, on whichever worker takes it from the queue.
    assert "".join(process.stderr() for process in workers).count("heartbeat ran at") >= 1
    assert exit_codes == [0, 0], [process.stderr() for process in workers]


def minutes_between(start: datetime, end: datetime | None = None) -> list[datetime]:
    """The minutes from `start`'s to `end`'s (now), each as its first instant."""
    first = start.replace(second=0, microsecond=0)
    last = (end or datetime.now(UTC)).replace(second=0, microsecond=0)
    return [first + timedelta(minutes=n) for n in range(int((last - first).seconds // 60) + 1)]


@pytest.mark.usefixtures("fresh_redis")
@pytest.mark.slow
async def test_two_workers_print_one_report_per_tick(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two workers on one Redis, their report tick brought forward to two seconds from now
    (arq's cron takes its next run from the job): the tick is printed once, not once each."""
    if datetime.now(UTC).second > 50:  # no real minute tick while the test runs
        await asyncio.sleep(61 - datetime.now(UTC).second)
    tick = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    running = []
    for _ in range(2):
        jobs = cron_jobs(settings)
        for job in jobs:
            job.next_run = (
                tick if job.name == "cron:pet_report" else datetime(2100, 1, 1, tzinfo=UTC)
            )
        built = create_worker(
            worker.worker_settings(settings), handle_signals=False, poll_delay=0.1, cron_jobs=jobs
        )
        running.append((built, asyncio.create_task(built.async_run())))
    printed: list[str] = []

    def reports() -> int:
        printed.append(capsys.readouterr().out)
        return "".join(printed).count("==== end of report ====")

    try:
        await until(lambda: reports() >= 2, 20, "the start-up report and the tick's")
        await asyncio.sleep(1.5)  # time for a second copy of either, were there one
    finally:
        for built, task in running:
            task.cancel()
            await built.close()
    # The start-up report (one for its minute) and the tick's.
    assert reports() == 2, "".join(printed)
    assert sum(built.jobs_failed for built, _ in running) == 0


@pytest.mark.slow
async def test_worker_rides_out_a_redis_restart(
    settings: Settings, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    redis = PrivateRedis()
    redis.start()
    try:
        workers.append(WorkerProcess(tmp_path, worker_env(settings, REDIS_URL=redis.url)))
        process = workers[0]
        process.wait_for_output("==== end of report ====")
        redis.stop()
        process.wait_for_output("Redis unavailable", stream="stderr")
        await asyncio.sleep(2)
        assert process.alive()
        redis.start()
        process.wait_for_output("Redis is reachable again", stream="stderr")
        private = settings.model_copy(update={"REDIS_URL": redis.url})
        assert await cli.request_report(private)
        process.wait_for_output("==== end of report ====", count=2)
        assert process.stop() == 0
    finally:
        redis.stop()


@pytest.mark.usefixtures("fresh_redis")
@pytest.mark.slow
async def test_worker_rides_out_a_database_outage(
    settings: Settings, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    postgres = PrivatePostgres()
    try:
        postgres.start()
        await asyncio.to_thread(command.upgrade, alembic_config_for(postgres.url()), "head")
        started = time.time()
        workers.append(WorkerProcess(tmp_path, worker_env(settings, DATABASE_URL=postgres.url())))
        process = workers[0]
        process.wait_for_output("No pets in the directory yet.")
        postgres.stop()
        assert await cli.request_report(settings)
        process.wait_for_output("database unavailable", stream="stderr")
        postgres.start()
        process.wait_for_output("database is reachable again", stream="stderr")
        process.wait_for_output("==== end of report ====", count=2)  # the whole second report
        # The start-up report and the requested one; and one more for each minute tick passed.
        ticks = int(time.time() // 60 - started // 60)
        process.wait_for_output("==== end of report ====", count=2 + ticks)
        assert process.stdout().count("No pets in the directory yet.") == 2 + ticks
        assert only_reports(process.stdout())
        assert process.stop() == 0
    finally:
        postgres.remove()


async def until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.mark.usefixtures("fresh_redis")
@pytest.mark.slow
async def test_a_report_that_fails_is_logged_and_the_next_one_runs(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    postgres = PrivatePostgres()
    try:
        await asyncio.to_thread(postgres.start)
        await asyncio.to_thread(command.upgrade, alembic_config_for(postgres.url()), "head")
        private = settings.model_copy(update={"DATABASE_URL": postgres.url()})
        monkeypatch.setattr(worker, "DATABASE_RETRY_SECONDS", 1)  # give up on the database soon
        jobs = cron_jobs(private)
        report_cron = next(job for job in jobs if job.name == "cron:pet_report")
        report_cron.timeout_s = 1.5
        report_cron.next_run = datetime(2100, 1, 1, tzinfo=UTC)  # only the reports it enqueues
        running = create_worker(
            worker.worker_settings(private),
            handle_signals=False,
            poll_delay=0.1,
            cron_jobs=jobs,
            redis_settings=worker.redis_settings(private),
            ctx={"settings": private},
        )
        main = asyncio.create_task(running.async_run())
        printed: list[str] = []

        def reports() -> int:
            printed.append(capsys.readouterr().out)
            return "".join(printed).count("==== end of report ====")

        try:
            await until(lambda: reports() == 1, 20, "the start-up report")

            # A database outage longer than the report's patience: the job fails, logged.
            await asyncio.to_thread(postgres.stop)
            await cli.request_report(private)
            await until(lambda: running.jobs_failed == 1, 20, "the report to fail")
            await asyncio.to_thread(postgres.start)
            await cli.request_report(private)
            await until(lambda: reports() == 2, 20, "the next report")

            # A report that outlives its timeout (the table is locked): cancelled, logged.
            lock = await asyncpg.connect(postgres.url().replace("+asyncpg", ""))
            await lock.execute("BEGIN; LOCK TABLE pet IN ACCESS EXCLUSIVE MODE")
            await running.pool.enqueue_job("cron:pet_report", _job_id="a-tick-that-hangs")
            await until(lambda: running.jobs_failed == 2, 20, "the report to time out")
            await lock.close()
            await running.pool.enqueue_job("cron:pet_report", _job_id="the-next-tick")
            await until(lambda: reports() == 3, 20, "the report after the timeout")
        finally:
            main.cancel()
            await running.close()
        failures = [
            r for r in caplog.records if r.name == "arq.worker" and r.levelno >= logging.ERROR
        ]
        assert len(failures) == 2
        assert "TimeoutError" in failures[1].getMessage()
        assert any("database unavailable" in r.getMessage() for r in caplog.records)
    finally:
        await asyncio.to_thread(postgres.remove)


@pytest.mark.usefixtures("fresh_redis")
@pytest.mark.slow
async def test_a_worker_restarted_within_the_minute_does_not_repeat_the_report(
    settings: Settings, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    if datetime.now(UTC).second > 50:  # the test takes a few seconds within one minute
        await asyncio.sleep(61 - datetime.now(UTC).second)
    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    first = WorkerProcess(tmp_path, worker_env(settings), "first")
    workers.append(first)
    first.wait_for_output("==== end of report ====")
    assert first.stop() == 0
    second = WorkerProcess(tmp_path, worker_env(settings), "second")
    workers.append(second)
    second.wait_for_output("heartbeat ran at", stream="stderr")  # its start-up jobs have run
    await asyncio.sleep(2)
    assert datetime.now(UTC).replace(second=0, microsecond=0) == minute, "the test ran too slow"
    assert second.stdout() == ""
    assert second.alive()


# --- metrics ------------------------------------------------------------------------------------

OUTCOMES = ("ok", "failed", "timed_out")
# A sample by its name and labels, as scraped.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def read_samples(exposition: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def runs(found: Samples, job: str) -> dict[str, float | None]:
    return {
        outcome: value(found, "pets_worker_jobs_total", job=job, outcome=outcome)
        for outcome in OUTCOMES
    }


def exposed(metrics: worker.WorkerMetrics) -> Samples:
    """The samples the worker's registry gives a scrape."""
    return read_samples(generate_latest(metrics.registry).decode())


async def scrape(port: int) -> str:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def listening_ports() -> set[int]:
    """The TCP ports this process listens on: its sockets' inodes looked up in /proc/net."""
    inodes = set()
    for descriptor in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(descriptor)
        except OSError:  # closed since the listing
            continue
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


@asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """worker.startup, and worker.shutdown on leaving, on a ctx as arq gives them."""
    pool = await create_pool(worker.redis_settings(settings))
    ctx: dict[str, Any] = {"settings": settings, "redis": pool}
    try:
        await worker.startup(ctx)
        yield ctx
    finally:
        await worker.shutdown(ctx)
        await pool.flushdb()  # the start-up report it enqueued
        await pool.aclose()


def registered(settings: Settings, name: str) -> worker.Job[Any]:
    """The job function arq runs under `name` (a cron job's), as WorkerSettings registers it."""
    job = next(job for job in cron_jobs(settings) if job.name == name)
    registered: worker.Job[Any] = job.coroutine
    return registered


@pytest.mark.usefixtures("fresh_redis")
async def test_a_running_worker_serves_its_metrics_until_it_shuts_down(
    settings: Settings, session: AsyncSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real arq worker from WorkerSettings on a spare metrics port, its minute tick put off:
    scraped once its start-up report and heartbeat have run, then shut down."""
    await sql(session, KNOWN_PETS)
    await session.commit()
    pets = (await sql(session, "SELECT count(*) FROM pet")).scalar_one()
    port = unused_port()
    private = settings.model_copy(update={"WORKER_METRICS_PORT": port})
    running = create_worker(
        worker.worker_settings(private),
        handle_signals=False,
        poll_delay=0.1,
        cron_jobs=without_minute_tick(private),
        redis_settings=worker.redis_settings(private),
        ctx={"settings": private},
    )
    main = asyncio.create_task(running.async_run())
    try:
        await until(
            lambda: running.jobs_complete + running.jobs_failed >= 2, 20, "the start-up jobs"
        )
        exposition = await scrape(port)
        scraped_at = time.time()
    finally:
        main.cancel()
        await running.close()
    assert (running.jobs_complete, running.jobs_failed) == (2, 0)
    assert port not in listening_ports(), "the metrics server outlived the worker"
    types = {family.name: family.type for family in text_string_to_metric_families(exposition)}
    assert types == {
        "pets_worker_jobs": "counter",
        "pets_worker_job_duration_seconds": "histogram",
        "pets_worker_last_success_timestamp_seconds": "gauge",
        "pets_worker_report_pets": "gauge",
    }
    found = read_samples(exposition)
    assert runs(found, "pet_report") == {"ok": 1, "failed": 0, "timed_out": 0}
    assert runs(found, "heartbeat") == {"ok": 1, "failed": 0, "timed_out": 0}
    assert value(found, "pets_worker_report_pets") == pets == 4
    for job in ("pet_report", "heartbeat"):
        assert value(found, "pets_worker_job_duration_seconds_count", job=job) == 1
        assert value(found, "pets_worker_job_duration_seconds_bucket", job=job, le="60.0") == 1
        assert value(found, "pets_worker_job_duration_seconds_bucket", job=job, le="+Inf") == 1
        succeeded = value(found, "pets_worker_last_success_timestamp_seconds", job=job)
        assert succeeded is not None
        assert scraped_at - 60 < succeeded <= scraped_at
    assert only_reports(capsys.readouterr().out)


class UnreachableDatabase(Exception):
    pass


async def test_a_job_that_raises_is_counted_failed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unreachable(*_: object) -> None:
        raise UnreachableDatabase("gave up on the database")

    monkeypatch.setattr(worker, "wait_for_database", unreachable)
    metrics = worker.WorkerMetrics()
    report = registered(settings, "cron:pet_report")
    with pytest.raises(UnreachableDatabase):
        await report({"metrics": metrics, "engine": None})
    found = exposed(metrics)
    assert runs(found, "pet_report") == {"ok": 0, "failed": 1, "timed_out": 0}
    assert value(found, "pets_worker_job_duration_seconds_count", job="pet_report") == 1
    assert value(found, "pets_worker_last_success_timestamp_seconds", job="pet_report") is None
    assert value(found, "pets_worker_report_pets") is None  # no report yet: not 0 pets


@pytest.mark.parametrize("how", ["arq's timeout (asyncio.wait_for)", "task.cancel()"])
async def test_a_job_cancelled_is_counted_timed_out(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """arq runs a job in a task it awaits through asyncio.wait_for: a timeout cancels that task
    (as a shutdown does), which the job sees as CancelledError, counted and raised again."""
    waiting = asyncio.Event()

    async def forever(*_: object) -> None:
        waiting.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(worker, "wait_for_database", forever)
    metrics = worker.WorkerMetrics()
    report = registered(settings, "cron:pet_report")
    task = asyncio.create_task(report({"metrics": metrics, "engine": None}))
    if how == "task.cancel()":
        await waiting.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(task, 0.2)
    assert task.cancelled()
    found = exposed(metrics)
    assert runs(found, "pet_report") == {"ok": 0, "failed": 0, "timed_out": 1}
    assert value(found, "pets_worker_job_duration_seconds_count", job="pet_report") == 1
    assert value(found, "pets_worker_last_success_timestamp_seconds", job="pet_report") is None


@pytest.mark.usefixtures("fresh_redis")
async def test_port_zero_serves_no_metrics(settings: Settings) -> None:
    before = listening_ports()
    async with started(settings.model_copy(update={"WORKER_METRICS_PORT": 0})) as ctx:
        assert ctx["metrics_server"] is None
        assert listening_ports() == before
    # The same look at the ports sees a worker that does serve them, until it shuts down.
    port = unused_port()
    async with started(settings.model_copy(update={"WORKER_METRICS_PORT": port})):
        assert listening_ports() == before | {port}
        assert runs(read_samples(await scrape(port)), "heartbeat")["ok"] == 0
    assert listening_ports() == before


@pytest.mark.usefixtures("fresh_redis")
async def test_a_taken_metrics_port_is_logged_and_the_worker_runs_without(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # noqa: S104 - where the worker binds
        taken.listen()
        port: int = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="pets.worker"):
            async with started(settings.model_copy(update={"WORKER_METRICS_PORT": port})) as ctx:
                assert ctx["metrics_server"] is None
                assert "report_template" in ctx  # the rest of start-up ran
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith(f"cannot serve metrics on port {port} (")


@pytest.mark.usefixtures("fresh_redis")
@pytest.mark.slow
async def test_a_worker_process_keeps_its_metrics_out_of_prometheus_multiproc_dir(
    settings: Settings, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """`arq worker.WorkerSettings` with PROMETHEUS_MULTIPROC_DIR set (the API's multiprocess
    mode, decided by prometheus-client when it is imported): the worker still serves its own
    samples from memory and writes nothing to that directory."""
    shared = tmp_path / "prometheus-multiproc"
    shared.mkdir()
    port = unused_port()
    env = worker_env(settings, WORKER_METRICS_PORT=str(port), PROMETHEUS_MULTIPROC_DIR=str(shared))
    process = WorkerProcess(tmp_path, env)
    workers.append(process)
    deadline = time.monotonic() + 30
    while True:
        assert process.alive(), process.stderr()
        try:
            found = read_samples(await scrape(port))
        except httpx.TransportError:  # not listening yet
            found = {}
        if runs(found, "heartbeat")["ok"] == 1 and (runs(found, "pet_report")["ok"] or 0) >= 1:
            break
        assert time.monotonic() < deadline, f"no start-up jobs counted: {found}"
        await asyncio.sleep(0.2)
    assert value(found, "pets_worker_report_pets") == 0  # the table is empty
    assert list(shared.iterdir()) == []
    assert process.stop() == 0
    assert only_reports(process.stdout())
