"""Operator commands: create-user, report-now, seed-metrics, load-metrics, wait-for-db (--help)."""

import argparse
import asyncio
import getpass
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TextIO, TypeVar

from arq.connections import RedisSettings, create_pool
from pydantic import ValidationError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel.ext.asyncio.session import AsyncSession

import crud
from auth import hash_password
from db import create_engine, create_sessionmaker
from errors import ServiceError
from metrics_data import (
    COMBINATIONS,
    DEMO_VALUES,
    FACT_COLUMNS,
    MAX_LISTED_ERRORS,
    check_metrics_csv,
    demo_combinations,
    demo_day,
    read_metrics_csv,
    staging_line,
)
from models import DIMENSIONS, PASSWORD_MIN_LENGTH, MetricsCsvRow, UserCreate, date_id_of
from settings import REPORT_JOB, Settings, load_settings

T = TypeVar("T")

# From this many rows on, load-metrics checks foreign keys once for the whole load rather than
# per row (see crud.foreign_keys_checked_once); below it, re-checking a large table costs more.
BULK_ROWS = 100_000


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def count(number: int, noun: str) -> str:
    """`1 fact`, `2 facts`, `1,000 facts`."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


async def in_session(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    # Bulk statements may run for minutes: no statement timeout for operator commands.
    engine = create_engine(settings, application_name="pets-cli", statement_timeout_ms=0)
    try:
        async with create_sessionmaker(engine)() as session:
            return await work(session)
    finally:
        await engine.dispose()


def database_unavailable(error: BaseException) -> str:
    return f"the database is unavailable ({error.__class__.__name__}: {error})"


def run_in_session(settings: Settings, work: Callable[[AsyncSession], Awaitable[int]]) -> int:
    try:
        return asyncio.run(in_session(settings, work))
    except (OSError, SQLAlchemyError) as error:
        return fail(database_unavailable(error))


async def wait_until_database_answers(settings: Settings, seconds: float) -> str | None:
    """None once a `SELECT 1` succeeds; the last error when `seconds` pass first."""
    deadline = time.monotonic() + seconds
    delay = 0.25
    engine = create_engine(settings, application_name="pets-cli", pool_size=1)
    try:
        while True:
            try:
                async with engine.connect() as connection:
                    await crud.ping(connection)
                return None
            except (OSError, SQLAlchemyError, ServiceError) as error:
                last = f"{error.__class__.__name__}: {error}".splitlines()[0]
            left = deadline - time.monotonic()
            if left <= 0:
                return last
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)
    finally:
        await engine.dispose()


def wait_for_db(settings: Settings, timeout: float) -> int:
    """Exit 0 as soon as the database answers, 1 after `timeout` seconds of failed attempts (a
    container's database may be up before it accepts connections)."""
    error = asyncio.run(wait_until_database_answers(settings, timeout))
    if error is not None:
        return fail(f"the database did not answer within {timeout:g} s ({error})")
    print("wait-for-db: the database answers")
    return 0


# --- users -------------------------------------------------------------------------------------


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise SystemExit("error: no terminal to ask for the password; use --password-stdin")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Repeat the password: ") != password:
        raise SystemExit("error: the passwords do not match")
    return password


def create_user(settings: Settings, username: str, password_stdin: bool) -> int:
    try:
        account = UserCreate(username=username, password=read_password(password_stdin))
    except ValidationError as error:
        return fail("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in error.errors()))

    async def work(session: AsyncSession) -> int:
        password_hash = await hash_password(account.password)
        user = await crud.add_user_if_missing(session, account.username, password_hash)
        if user is None:
            return fail(f"user {account.username!r} already exists (it was left unchanged)")
        print(f"created user {user.username!r} (id {user.id})")
        return 0

    return run_in_session(settings, work)


# --- the worker --------------------------------------------------------------------------------


async def request_report(settings: Settings) -> str:
    """Enqueue a report for the next free worker; returns the job id."""
    redis = await create_pool(RedisSettings.from_dsn(settings.REDIS_URL))
    try:
        job = await redis.enqueue_job(REPORT_JOB)
    finally:
        await redis.aclose()
    assert job is not None  # only a job id given by the caller can already exist
    return job.job_id


def report_now(settings: Settings) -> int:
    try:
        job_id = asyncio.run(request_report(settings))
    except (OSError, RedisError) as error:
        return fail(f"Redis is unavailable ({error.__class__.__name__}: {error})")
    print(f"report requested (job {job_id}); a worker prints it to its STDOUT")
    return 0


# --- ad metrics --------------------------------------------------------------------------------


class Progress:
    """A rows-done counter on STDERR: redrawn in place on a terminal, one line at the end else."""

    def __init__(self, what: str, total: int, stream: TextIO = sys.stderr) -> None:
        self.what, self.total, self.done, self.stream = what, total, 0, stream

    def advance(self, rows: int) -> None:
        self.done += rows
        if self.stream.isatty():
            percent = 100 * self.done // max(self.total, 1)
            line = f"\r{self.what}: {self.done:,} / {self.total:,} rows ({percent}%)"
            self.stream.write(line)
            self.stream.flush()

    def stop(self) -> None:
        """End a line redrawn in place, without a total (the work was abandoned)."""
        if self.stream.isatty():
            self.stream.write("\n")

    def finish(self) -> None:
        start = "\r" if self.stream.isatty() else ""
        self.stream.write(f"{start}{self.what}: {count(self.done, 'row')}\n")


async def seed_metrics(
    session: AsyncSession, days: int, rows_per_day: int, seed: int, end: date, if_empty: bool
) -> int:
    """Demo dimensions and `days` days of facts ending `end`, replacing the facts of those days."""
    if if_empty and await crud.has_facts(session):
        print("seed-metrics: facts exist already; nothing to do")
        return 0
    ids = {}
    for name, values in DEMO_VALUES.items():
        by_name = await crud.ensure_dimension_values(session, DIMENSIONS[name], values)
        ids[name] = [by_name[value.casefold()] for value in values]
    combinations = demo_combinations(ids)
    first = end - timedelta(days=days - 1)
    all_days = [first + timedelta(days=offset) for offset in range(days)]
    await crud.ensure_dates(session, all_days)
    await crud.delete_facts(session, date_id_of(first), date_id_of(end))
    progress = Progress("seed-metrics", days * rows_per_day)

    async def lines() -> AsyncIterator[bytes]:
        for day in all_days:
            yield demo_day(day, rows_per_day, seed, combinations).encode()
            progress.advance(rows_per_day)

    async with crud.foreign_keys_checked_once(session):
        await crud.copy_rows(session, "fact_ad_metrics_daily", FACT_COLUMNS, lines())
    await crud.refresh_rollups(session, date_id_of(first), date_id_of(end))
    await crud.after_bulk_load(session)
    await session.commit()
    progress.finish()
    return 0


def not_loaded(name: str, problems: list[str], count: int) -> int:
    """Report a rejected file: the first MAX_LISTED_ERRORS problems, and how many more."""
    listed = problems[:MAX_LISTED_ERRORS]
    more = count - len(listed)
    listing = "\n".join(listed) + (f"\n... and {more} more" if more > 0 else "")
    return fail(f"{name} was not loaded; nothing was written:\n{listing}")


def load_metrics(settings: Settings, source: str) -> int:
    """Upsert facts from a CSV file, or from standard input for `-`."""
    if source != "-":
        return load_metrics_file(settings, Path(source), source)
    # The file is read twice (checked whole, then loaded), so standard input is kept meanwhile.
    with tempfile.TemporaryDirectory(prefix="load-metrics-") as folder:
        path = Path(folder, "stdin.csv")
        with path.open("wb") as copy:
            shutil.copyfileobj(sys.stdin.buffer, copy)
        return load_metrics_file(settings, path, "standard input")


def load_metrics_file(settings: Settings, path: Path, name: str) -> int:
    """Upsert facts from a CSV file. Every problem of the file is reported at once, malformed
    lines and keys given twice, and then nothing is written."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            check = check_metrics_csv(file)
    except (OSError, UnicodeDecodeError) as error:
        return fail(f"cannot read {name}: {error}")
    if check.errors and not check.rows:  # no line to compare with another
        return not_loaded(name, check.errors, check.error_count)

    async def work(session: AsyncSession) -> int:
        # Run on a malformed file too, to find its repeated keys; rolled back then. Each new
        # name is added as first spelled in the file (`names` keeps first spellings).
        ids = {
            dimension: await crud.ensure_dimension_values(
                session, DIMENSIONS[dimension], names.values()
            )
            for dimension, names in check.names.items()
        }
        await crud.ensure_dates(session, check.dates)
        progress = Progress("load-metrics", check.rows)

        async def lines() -> AsyncIterator[bytes]:
            with path.open(encoding="utf-8-sig", newline="") as file:
                for number, row in read_metrics_csv(file):
                    if isinstance(row, MetricsCsvRow):  # malformed lines are in check.errors
                        yield staging_line(number, row, ids).encode()
                        progress.advance(1)

        repeated, repeated_count = await crud.stage_facts(session, lines(), MAX_LISTED_ERRORS)
        if check.errors or repeated:
            await session.rollback()
            progress.stop()
            twice = [
                f"line {ns[0]}: same date and dimensions as line(s) {', '.join(map(str, ns[1:]))}"
                for ns in repeated
            ]
            return not_loaded(name, check.errors + twice, check.error_count + repeated_count)
        if check.rows >= BULK_ROWS:
            async with crud.foreign_keys_checked_once(session):
                written = await crud.upsert_staged_facts(session)
        else:
            written = await crud.upsert_staged_facts(session)
        if check.dates:
            first, last = date_id_of(min(check.dates)), date_id_of(max(check.dates))
            await crud.refresh_rollups(session, first, last)
        await crud.after_bulk_load(session)
        await session.commit()
        progress.finish()
        print(f"load-metrics: {count(written, 'fact')} inserted or updated from {name}")
        return 0

    try:
        return asyncio.run(in_session(settings, work))
    except (OSError, SQLAlchemyError) as error:
        if check.errors:  # what the file shows without the database
            not_loaded(name, check.errors, check.error_count)
            return fail(f"{database_unavailable(error)}; keys given twice were not looked for")
        return fail(database_unavailable(error))


# --- the command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cli.py", description="Operator commands.")
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser(
        "create-user",
        help="add a user who may write",
        description=(
            f"Add a user who may write. The password needs {PASSWORD_MIN_LENGTH} characters or"
            " more; it is asked for twice, or read from one line of standard input."
        ),
    )
    create.add_argument("username", help="the login name (case-insensitive: stored lower-cased)")
    create.add_argument(
        "--password-stdin",
        action="store_true",
        help=f"read the password ({PASSWORD_MIN_LENGTH}+ characters) from standard input",
    )

    commands.add_parser("report-now", help="have a running worker print a pet report now")

    seed = commands.add_parser("seed-metrics", help="generate deterministic demo ad metrics")
    seed.add_argument("--days", type=int, default=365, help="how many days (default 365)")
    seed.add_argument(
        "--rows-per-day",
        type=int,
        default=2000,
        help=f"facts per day, 1..{COMBINATIONS} (default 2000)",
    )
    seed.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    seed.add_argument(
        "--end-date",
        type=date.fromisoformat,
        default=None,
        help="last day, YYYY-MM-DD (default today, UTC)",
    )
    seed.add_argument(
        "--if-empty", action="store_true", help="do nothing when the fact table has rows"
    )

    load = commands.add_parser("load-metrics", help="upsert facts from a CSV file")
    load.add_argument("file", help="the CSV file, or - to read it from standard input")

    wait = commands.add_parser("wait-for-db", help="wait until the database accepts connections")
    wait.add_argument(
        "--timeout", type=float, default=60.0, help="give up after this many seconds (default 60)"
    )

    args = parser.parse_args(argv)
    if args.command == "seed-metrics":
        if not 1 <= args.days <= 100_000:
            parser.error("--days must be between 1 and 100000")
        if not 1 <= args.rows_per_day <= COMBINATIONS:
            parser.error(f"--rows-per-day must be between 1 and {COMBINATIONS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings()
    if args.command == "create-user":
        return create_user(settings, args.username, args.password_stdin)
    if args.command == "report-now":
        return report_now(settings)
    if args.command == "seed-metrics":
        end = args.end_date or datetime.now(UTC).date()
        return run_in_session(
            settings,
            lambda session: seed_metrics(
                session, args.days, args.rows_per_day, args.seed, end, args.if_empty
            ),
        )
    if args.command == "wait-for-db":
        return wait_for_db(settings, args.timeout)
    return load_metrics(settings, args.file)


if __name__ == "__main__":
    sys.exit(main())
