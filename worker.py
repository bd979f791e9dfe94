"""The arq worker: a pet report to STDOUT every minute and a heartbeat every six hours, and
Prometheus metrics of both on a port of its own."""

import asyncio
import dataclasses
import functools
import logging
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO, TypeVar, cast, get_args
from wsgiref.simple_server import WSGIServer

from arq import cron, func
from arq.connections import ArqRedis, RedisSettings
from arq.utils import to_unix_ms
from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
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
from logs import logging_config
from models import PetTypeStats
from settings import HEARTBEAT_KEY, REPORT_JOB, Settings, load_settings, log_format

log = logging.getLogger("pets.worker")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

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
# How a job run ended, as pets_worker_jobs_total counts it.
Outcome = Literal["ok", "failed", "timed_out"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
# Upper bounds (seconds) of pets_worker_job_duration_seconds: from a heartbeat's few
# milliseconds to a report's 50 s timeout.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Every interface: Prometheus scrapes the worker's container from outside it.
METRICS_ADDRESS = "0.0.0.0"  # noqa: S104


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


class WorkerMetrics:
    """The worker's Prometheus samples, kept as plain numbers and read out at each scrape.

    Not prometheus-client's Counter, Gauge and Histogram: the library picks their storage once
    per process from PROMETHEUS_MULTIPROC_DIR (files in that directory, the API's multiprocess
    mode), whatever registry they are in. The worker is one process; a collector of its own
    keeps its exposition that, wherever the variable is set."""

    def __init__(self, jobs: Iterable[str] = ()) -> None:
        # Jobs record on the event loop; scrapes read on the HTTP server's threads.
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, Outcome], int] = {}
        # Per job: runs per bucket of DURATION_BUCKETS, the last one past 60 s (+Inf).
        self._in_bucket: dict[str, list[int]] = {}
        self._seconds: dict[str, float] = {}
        self._last_success: dict[str, float] = {}
        self._report_pets: int | None = None
        for job in jobs:
            self._know(job)
        # Not prometheus_client.REGISTRY: that one also holds the library's process collectors
        # and whatever any imported module registers.
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def _know(self, job: str) -> None:
        """Samples of 0 for a job from the start, so that rate() sees its first run."""
        if job not in self._seconds:
            self._runs.update({(job, outcome): 0 for outcome in OUTCOMES})
            self._in_bucket[job] = [0] * (len(DURATION_BUCKETS) + 1)
            self._seconds[job] = 0.0

    def finished(self, job: str, outcome: Outcome, seconds: float) -> None:
        with self._lock:
            self._know(job)
            self._runs[job, outcome] += 1
            self._in_bucket[job][bisect_left(DURATION_BUCKETS, seconds)] += 1
            self._seconds[job] += seconds
            if outcome == "ok":
                self._last_success[job] = time.time()

    def report_listed(self, pets: int) -> None:
        with self._lock:
            self._report_pets = pets

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            runs = dict(self._runs)
            in_bucket = {job: list(counts) for job, counts in self._in_bucket.items()}
            seconds = dict(self._seconds)
            last_success = dict(self._last_success)
            report_pets = self._report_pets
        jobs = CounterMetricFamily(
            "pets_worker_jobs", "Job runs, by how they ended.", labels=["job", "outcome"]
        )
        for (job, outcome), count in sorted(runs.items()):
            jobs.add_metric([job, outcome], count)
        yield jobs
        durations = HistogramMetricFamily(
            "pets_worker_job_duration_seconds",
            "How long job runs took, however they ended.",
            labels=["job"],
        )
        bounds = [*map(floatToGoString, DURATION_BUCKETS), "+Inf"]
        for job, counts in sorted(in_bucket.items()):
            cumulative = [sum(counts[: index + 1]) for index in range(len(counts))]
            durations.add_metric([job], list(zip(bounds, cumulative, strict=True)), seconds[job])
        yield durations
        successes = GaugeMetricFamily(
            "pets_worker_last_success_timestamp_seconds",
            "Unix time of the job's last successful run.",
            labels=["job"],
        )
        for job, moment in sorted(last_success.items()):
            successes.add_metric([job], moment)
        yield successes
        pets = GaugeMetricFamily("pets_worker_report_pets", "Pets listed by the last report.")
        if report_pets is not None:  # none before the first report: 0 would claim an empty table
            pets.add_metric([], report_pets)
        yield pets


class Job(Protocol[T_co]):
    """A job function as arq takes it (arq.typing.WorkerCoroutine), keeping its result's type."""

    __qualname__: str

    def __call__(self, ctx: dict[str, Any]) -> Coroutine[Any, Any, T_co]: ...


def measured(
    job: Callable[[dict[str, Any]], Awaitable[T]],
    on_success: Callable[[WorkerMetrics, T], None] | None = None,
) -> Job[T]:
    """`job` counted and timed in ctx["metrics"] under its function's name; `on_success` is given
    its result. arq registers this under the job's own name (see worker_settings)."""
    name = job.__name__

    @functools.wraps(job)
    async def run(ctx: dict[str, Any]) -> T:
        metrics: WorkerMetrics = ctx["metrics"]
        started = time.perf_counter()
        try:
            result = await job(ctx)
        except asyncio.CancelledError:
            # arq's timeout cancels the job's task (asyncio.wait_for); so does a shutdown that
            # outlasts job_completion_wait.
            metrics.finished(name, "timed_out", time.perf_counter() - started)
            raise
        except Exception:
            metrics.finished(name, "failed", time.perf_counter() - started)
            raise
        if on_success is not None:
            on_success(metrics, result)
        metrics.finished(name, "ok", time.perf_counter() - started)
        return result

    return run


@dataclasses.dataclass(frozen=True)
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread


def serve_metrics(metrics: WorkerMetrics, port: int) -> MetricsServer | None:
    """Serve `metrics` at http://<host>:<port>/metrics on a thread of its own; None (logged)
    when the port cannot be had: the reports matter more than their metrics."""
    try:
        server, thread = start_http_server(port, addr=METRICS_ADDRESS, registry=metrics.registry)
    except OSError as error:
        log.error("cannot serve metrics on port %d (%s); running without them", port, error)
        return None
    log.info("metrics at http://%s:%d/metrics", METRICS_ADDRESS, port)
    return MetricsServer(server, thread)


async def stop_metrics(served: MetricsServer) -> None:
    # shutdown() waits for the server's next poll (up to 0.5 s): not on the event loop.
    await asyncio.to_thread(served.server.shutdown)
    served.server.server_close()  # shutdown() alone leaves the port bound
    served.thread.join()


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    ctx["metrics"] = WorkerMetrics(jobs=(pet_report.__name__, heartbeat.__name__))
    ctx["metrics_server"] = (
        serve_metrics(ctx["metrics"], settings.WORKER_METRICS_PORT)
        if settings.WORKER_METRICS_PORT
        else None
    )
    ctx["engine"] = create_engine(settings, application_name="pets-worker")
    ctx["report_template"] = load_report_template()
    # The start-up report stands for the current minute's tick, under that tick's job id: if
    # another worker already printed it, this one does not print it again.
    redis: ArqRedis = ctx["redis"]
    await redis.enqueue_job(REPORT_CRON, _job_id=report_tick_job_id(datetime.now(UTC)))


async def shutdown(ctx: dict[str, Any]) -> None:
    served: MetricsServer | None = ctx.pop("metrics_server", None)
    if served is not None:
        await stop_metrics(served)
    if "engine" in ctx:
        await ctx["engine"].dispose()


def worker_settings(settings: Settings) -> dict[str, Any]:
    """What arq runs for these settings (arq drops unknown keys silently: see the tests)."""
    # The jobs as arq runs them, counted and timed; their names are given, not taken from them.
    report = measured(pet_report, WorkerMetrics.report_listed)
    beat = measured(heartbeat)
    return {
        "functions": [func(report, name=REPORT_JOB, timeout=REPORT_TIMEOUT_SECONDS, max_tries=1)],
        "cron_jobs": [
            cron(
                report,
                name=REPORT_CRON,
                second=0,
                microsecond=0,
                unique=True,
                timeout=REPORT_TIMEOUT_SECONDS,
                keep_result=KEEP_RESULT_SECONDS,
            ),
            cron(
                beat,
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
    if name == "LOG_CONFIG":  # `arq --custom-log-dict worker.LOG_CONFIG`: arq's lines too
        settings = load_settings()
        return logging_config(settings.LOG_LEVEL, log_format(settings))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
