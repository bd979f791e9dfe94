"""Operator commands: create-user, report-now, seed-metrics, load-metrics, wait-for-db (--help)."""

import argparse
import asyncio
import getpass
import io
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import BinaryIO, TextIO, TypeVar

from arq.connections import RedisSettings, create_pool
from pydantic import ValidationError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel.ext.asyncio.session import AsyncSession

import crud
import metrics
from backoff import Backoff
from cube import CubeOverflow
from db import create_engine, create_sessionmaker
from errors import ServiceError
from metrics_data import (
    COMBINATIONS,
    MAX_LISTED_ERRORS,
    check_metrics_csv,
    read_metrics_csv,
)
from models import PASSWORD_MIN_LENGTH, MetricsCsvRow, UserCreate
from settings import REPORT_JOB, Settings, load_settings

T = TypeVar("T")


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


def outage_message(error: BaseException) -> str:
    return f"the database is unavailable ({error.__class__.__name__}: {error})"


def run_in_session(settings: Settings, work: Callable[[AsyncSession], Awaitable[int]]) -> int:
    try:
        return asyncio.run(in_session(settings, work))
    except (OSError, SQLAlchemyError) as error:
        return fail(outage_message(error))


# How often wait-for-db asks: soon at first (a container's database is often seconds away).
WAIT_FOR_DB_BACKOFF = Backoff(first=0.25, cap=2.0)
DATABASE_ERRORS = (OSError, SQLAlchemyError, ServiceError)


async def wait_until_database_answers(settings: Settings, seconds: float) -> str | None:
    """None once a `SELECT 1` succeeds; the last error when `seconds` pass first."""
    engine = create_engine(settings, application_name="pets-cli", pool_size=1)

    async def ping() -> None:
        async with engine.connect() as connection:
            await crud.ping(connection)

    async def quietly(error: Exception, failures: int, delay: float) -> None:
        pass

    try:
        await WAIT_FOR_DB_BACKOFF.retry(
            ping,
            retryable=lambda error: isinstance(error, DATABASE_ERRORS),
            on_retry=quietly,
            budget_seconds=seconds,
        )
    except DATABASE_ERRORS as error:
        return f"{error.__class__.__name__}: {error}".splitlines()[0]
    finally:
        await engine.dispose()
    return None


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

    # Imported here: auth brings in FastAPI, which the other commands do not need (it adds a
    # third of a second to each).
    from auth import hash_password

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
    progress = Progress("seed-metrics", days * rows_per_day)
    await metrics.seed_facts(session, days, rows_per_day, seed, end, progress.advance)
    progress.finish()
    return 0


def not_loaded(name: str, problems: list[tuple[int, str]], count: int) -> int:
    """Report a rejected file: its first MAX_LISTED_ERRORS problems in line order (line 0: the
    file's as a whole), and how many more."""
    listed = [
        f"line {number}: {problem}" if number else problem
        for number, problem in sorted(problems)[:MAX_LISTED_ERRORS]
    ]
    more = count - len(listed)
    listing = "\n".join(listed) + (f"\n... and {more} more" if more > 0 else "")
    return fail(f"{name} was not loaded; nothing was written:\n{listing}")


def load_metrics(settings: Settings, source: str) -> int:
    """Upsert facts from a CSV file, or from standard input for `-`."""
    if source != "-":
        try:
            file = Path(source).open("rb")  # noqa: SIM115 - closed below, once it is open
        except OSError as error:
            return fail(f"cannot read {source}: {error}")
        with file:
            return load_metrics_file(settings, file, source)
    # The file is read twice (checked whole, then loaded), so standard input is kept meanwhile,
    # in a temporary file that has no name: however the command ends, nothing is left behind.
    with tempfile.TemporaryFile(prefix="load-metrics-") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool)
        return load_metrics_file(settings, spool, "standard input")


@contextmanager
def read_from_start(file: BinaryIO) -> Iterator[TextIO]:
    """The file from its first byte, as text, left open for another pass."""
    file.seek(0)
    text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")
    try:
        yield text
    finally:
        text.detach()


def load_metrics_file(settings: Settings, file: BinaryIO, name: str) -> int:
    """Upsert facts from a CSV file. Every problem of the file is reported at once, malformed
    lines and keys given twice, and then nothing is written."""
    try:
        with read_from_start(file) as text:
            check = check_metrics_csv(text)
    except (OSError, UnicodeDecodeError) as error:
        return fail(f"cannot read {name}: {error}")
    if check.errors and not check.rows:  # no line to compare with another
        return not_loaded(name, check.errors, check.error_count)

    def rows() -> Iterator[tuple[int, MetricsCsvRow]]:
        with read_from_start(file) as text:
            for number, row in read_metrics_csv(text):
                if isinstance(row, MetricsCsvRow):  # malformed lines are in check.errors
                    yield number, row

    async def work(session: AsyncSession) -> int:
        progress = Progress("load-metrics", check.rows)
        try:
            loaded = await metrics.load_facts(session, check, rows, progress.advance)
        except CubeOverflow as error:  # rolled back with the session
            progress.stop()
            return not_loaded(name, [(0, str(error))], 1)
        if check.errors or loaded.repeated:
            progress.stop()
            twice = [
                (ns[0], f"same date and dimensions as line(s) {', '.join(map(str, ns[1:]))}")
                for ns in loaded.repeated
            ]
            return not_loaded(name, check.errors + twice, check.error_count + loaded.repeated_count)
        progress.stop()  # one summary, on STDOUT
        print(f"load-metrics: {count(loaded.written, 'fact')} inserted or updated from {name}")
        return 0

    try:
        return asyncio.run(in_session(settings, work))
    except (OSError, SQLAlchemyError) as error:
        if check.errors:  # what the file shows without the database
            not_loaded(name, check.errors, check.error_count)
            return fail(f"{outage_message(error)}; keys given twice were not looked for")
        return fail(outage_message(error))


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
