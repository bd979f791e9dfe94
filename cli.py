"""Operator commands: create-user, report-now, seed-metrics and load-metrics (`--help` for each)."""

import argparse
import asyncio
import getpass
import sys
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
from models import DIMENSIONS, MetricsCsvRow, UserCreate, date_id_of
from settings import REPORT_JOB, Settings, get_settings

T = TypeVar("T")

# From this many rows on, load-metrics checks foreign keys once for the whole load rather than
# per row (see crud.foreign_keys_checked_once); below it, re-checking a large table costs more.
BULK_ROWS = 100_000


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


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


# --- users -------------------------------------------------------------------------------------


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
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
        self.stream.write(f"{start}{self.what}: {self.done:,} rows\n")


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


def not_loaded(path: Path, problems: list[str], count: int) -> int:
    """Report a rejected file: the first MAX_LISTED_ERRORS problems, and how many more."""
    listed = problems[:MAX_LISTED_ERRORS]
    more = count - len(listed)
    listing = "\n".join(listed) + (f"\n... and {more} more" if more > 0 else "")
    return fail(f"{path} was not loaded; nothing was written:\n{listing}")


def load_metrics(settings: Settings, path: Path) -> int:
    """Upsert facts from a CSV file. Every problem of the file is reported at once, malformed
    lines and keys given twice, and then nothing is written."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            check = check_metrics_csv(file)
    except (OSError, UnicodeDecodeError) as error:
        return fail(f"cannot read {path}: {error}")
    if check.errors and not check.rows:  # no line to compare with another
        return not_loaded(path, check.errors, check.error_count)

    async def work(session: AsyncSession) -> int:
        # Run on a malformed file too, to find its repeated keys; rolled back then.
        ids = {
            name: await crud.ensure_dimension_values(session, DIMENSIONS[name], names)
            for name, names in check.names.items()
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
                f"line {ns[0]}: same date and dimensions as line(s) {ns[1:]}" for ns in repeated
            ]
            return not_loaded(path, check.errors + twice, check.error_count + repeated_count)
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
        print(f"load-metrics: {written:,} facts inserted or updated from {path}")
        return 0

    try:
        return asyncio.run(in_session(settings, work))
    except (OSError, SQLAlchemyError) as error:
        if check.errors:  # what the file shows without the database
            not_loaded(path, check.errors, check.error_count)
            return fail(f"{database_unavailable(error)}; keys given twice were not looked for")
        return fail(database_unavailable(error))


# --- the command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cli.py", description="Operator commands.")
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create-user", help="add a user who may write")
    create.add_argument("username")
    create.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
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
    load.add_argument("file", type=Path)

    args = parser.parse_args(argv)
    if args.command == "seed-metrics":
        if not 1 <= args.days <= 100_000:
            parser.error("--days must be between 1 and 100000")
        if not 1 <= args.rows_per_day <= COMBINATIONS:
            parser.error(f"--rows-per-day must be between 1 and {COMBINATIONS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as error:
        return fail(f"invalid configuration:\n{error}")
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
    return load_metrics(settings, args.file)


if __name__ == "__main__":
    sys.exit(main())
