"""The arq worker: a pet report to STDOUT every minute and a heartbeat every six hours."""

import dataclasses
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar, cast

from arq import cron, func
from arq.connections import ArqRedis, RedisSettings
from arq.utils import to_unix_ms
from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

import crud
from backoff import Backoff
from db import create_engine
from errors import Unavailable, classify_db_error
from models import PetTypeStats
from settings import HEARTBEAT_KEY, REPORT_JOB, Settings, configure_logging, load_settings

log = logging.getLogger("pets.worker")

T = TypeVar("T")

REPORT_CRON = "cron:pet_report"
HEARTBEAT_CRON = "cron:heartbeat"
HEARTBEAT_HOURS = {0, 6, 12, 18}
# A report must end before the next tick; within that budget an absent database is retried.
REPORT_TIMEOUT_SECONDS = 50
DATABASE_RETRY_SECONDS = 40
HEARTBEAT_TIMEOUT_SECONDS = 30
# A tick's result stays in Redis this long. Every worker enqueues each tick under the same job
# id; a worker that does so late, or restarts within the minute, finds the result and does not
# print a second report. (arq keeps no result for cron jobs by default, which allows that.)
KEEP_RESULT_SECONDS = 300
# Waits between attempts while Redis or the database is away.
REDIS_BACKOFF = Backoff(first=1.0, cap=10.0)
DATABASE_BACKOFF = Backoff(first=1.0, cap=10.0)
TEMPLATES = Path(__file__).resolve().parent / "templates"


class PatientRetry(Retry):
    """Retry Redis commands with capped backoff for as long as Redis is away, logging it.

    arq gives up on a lost Redis connection and the process exits; with this, a command waits
    for Redis to return and the worker carries on where it was. It reads one private name of
    redis-py's Retry, `_supported_errors` (the errors worth retrying, which redis-py's
    connections extend through `update_supported_errors`);
    tests/test_worker.py::test_patient_retry_waits_out_the_errors_redis_py_retries fails if the
    pinned redis-py stops keeping it."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(NoBackoff(), retries=-1)  # the waits are REDIS_BACKOFF's

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Callable[[RedisError], Any]
    ) -> T:
        failed = False

        async def on_retry(error: Exception, failures: int, delay: float) -> None:
            nonlocal failed
            failed = True
            await fail(cast(RedisError, error))  # one of _supported_errors
            log.warning("Redis unavailable (%s); retry %d in %.1f s", error, failures, delay)

        result = await REDIS_BACKOFF.retry(
            do, retryable=lambda error: isinstance(error, self._supported_errors), on_retry=on_retry
        )
        if failed:
            log.info("Redis is reachable again")
        return result


def redis_settings(settings: Settings) -> RedisSettings:
    return dataclasses.replace(
        RedisSettings.from_dsn(settings.REDIS_URL),
        conn_timeout=2,
        retry=PatientRetry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, OSError],
    )


def load_report_template() -> Template:
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=False,  # noqa: S701 - plain text for a terminal: nothing to escape
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return environment.get_template("pet_report.txt.j2")


def report_context(stats: list[PetTypeStats], now: datetime) -> dict[str, Any]:
    """Everything the template shows except the pets themselves; widths align the columns."""
    return {
        "generated_at": now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "total": sum(row.count for row in stats),
        "by_type": stats,
        "count_width": max((len(str(row.count)) for row in stats), default=1),
        "id_width": max([len("ID"), *(len(str(row.max_id)) for row in stats)]),
        "name_width": max([len("NAME"), *(row.longest_name for row in stats)]),
        "type_width": max([len("TYPE"), *(len(row.pet_type) for row in stats)]),
    }


async def write_report(engine: AsyncEngine, template: Template, out: TextIO, now: datetime) -> int:
    """Render the report to `out`, streaming the pets; returns how many it listed."""
    # One read-only snapshot, so the counts at the top agree with the lines below them.
    async with engine.connect() as connection:
        await connection.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
        await connection.begin()
        report = report_context(await crud.pet_type_stats(connection), now)
        # Jinja renders synchronously, a batch at a time: an async template would await each row.
        parts = template.module
        try:
            out.write(parts.head(report))  # type: ignore[attr-defined]
            async for batch in crud.stream_pet_batches(connection):
                out.write(parts.pets(batch, report))  # type: ignore[attr-defined]
            out.write(parts.foot(report))  # type: ignore[attr-defined]
        except BaseException:
            out.write("\n==== report interrupted ====\n")
            raise
        finally:
            out.flush()
    total: int = report["total"]
    return total


def database_unavailable(error: Exception) -> bool:
    return isinstance(classify_db_error(error), Unavailable)


async def wait_for_database(engine: AsyncEngine, budget_seconds: float) -> None:
    """Return once the database answers, retrying with backoff for up to `budget_seconds`."""
    failed = False

    async def ping() -> None:
        async with engine.connect() as connection:
            await crud.ping(connection)

    async def on_retry(error: Exception, failures: int, delay: float) -> None:
        nonlocal failed
        failed = True
        log.warning("database unavailable (%r); retry %d in %.0f s", error, failures, delay)

    try:
        await DATABASE_BACKOFF.retry(
            ping, retryable=database_unavailable, on_retry=on_retry, budget_seconds=budget_seconds
        )
    except Exception as error:
        if database_unavailable(error):
            log.warning("database unavailable (%r); giving up on this report", error)
        raise
    if failed:
        log.info("database is reachable again")


async def pet_report(ctx: dict[str, Any]) -> int:
    """Print the pet report to STDOUT; returns how many pets it listed."""
    await wait_for_database(ctx["engine"], DATABASE_RETRY_SECONDS)
    return await write_report(ctx["engine"], ctx["report_template"], sys.stdout, datetime.now(UTC))


async def heartbeat(ctx: dict[str, Any]) -> str:
    """Log that the heartbeat ran, and record when in Redis for GET /ready."""
    ran_at = datetime.now(UTC).isoformat(timespec="seconds")
    redis: ArqRedis = ctx["redis"]
    await redis.set(HEARTBEAT_KEY, ran_at)
    log.info("heartbeat ran at %s", ran_at)
    return ran_at


def report_tick_job_id(moment: datetime) -> str:
    """The id arq's cron gives the report job of the minute holding `moment` (see
    `arq.worker.Worker.run_cron`: name and the tick's Unix milliseconds)."""
    return f"{REPORT_CRON}:{to_unix_ms(moment.replace(second=0, microsecond=0))}"


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    configure_logging(settings.LOG_LEVEL)
    ctx["engine"] = create_engine(settings, application_name="pets-worker")
    ctx["report_template"] = load_report_template()
    # The start-up report stands for the current minute's tick, under that tick's job id: if
    # another worker already printed it, this one does not print it again.
    redis: ArqRedis = ctx["redis"]
    await redis.enqueue_job(REPORT_CRON, _job_id=report_tick_job_id(datetime.now(UTC)))


async def shutdown(ctx: dict[str, Any]) -> None:
    if "engine" in ctx:
        await ctx["engine"].dispose()


def worker_settings(settings: Settings) -> dict[str, Any]:
    """What arq runs for these settings (arq drops unknown keys silently: see the tests)."""
    return {
        "functions": [
            func(pet_report, name=REPORT_JOB, timeout=REPORT_TIMEOUT_SECONDS, max_tries=1)
        ],
        "cron_jobs": [
            cron(
                pet_report,
                name=REPORT_CRON,
                second=0,
                microsecond=0,
                unique=True,
                timeout=REPORT_TIMEOUT_SECONDS,
                keep_result=KEEP_RESULT_SECONDS,
            ),
            cron(
                heartbeat,
                name=HEARTBEAT_CRON,
                hour=HEARTBEAT_HOURS,
                minute=0,
                second=0,
                microsecond=0,
                run_at_startup=True,
                unique=True,
                timeout=HEARTBEAT_TIMEOUT_SECONDS,
                keep_result=KEEP_RESULT_SECONDS,
            ),
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": redis_settings(settings),
        "ctx": {"settings": settings},
        "timezone": UTC,
        # `arq --check worker.WorkerSettings` fails once the worker has not written this long.
        "health_check_interval": 10,
        # On SIGTERM, a running report may finish for this long before it is cancelled.
        "job_completion_wait": 10,
    }


def __getattr__(name: str) -> dict[str, Any]:
    """`arq worker.WorkerSettings` (and `arq --check`) look the settings up when the worker
    starts: that is when the configuration is read, not when this module is imported."""
    if name == "WorkerSettings":
        return worker_settings(load_settings())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
