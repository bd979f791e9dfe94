"""Operator commands: `python cli.py create-user NAME [--password-stdin]`, `report-now`."""

import argparse
import asyncio
import getpass
import sys

from arq.connections import RedisSettings, create_pool
from pydantic import ValidationError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

import crud
from auth import hash_password
from db import create_engine, create_sessionmaker
from models import UserCreate
from settings import REPORT_JOB, Settings, get_settings


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Repeat the password: ") != password:
        raise SystemExit("error: the passwords do not match")
    return password


async def create_user(settings: Settings, account: UserCreate) -> int:
    engine = create_engine(settings, application_name="pets-cli")
    try:
        async with create_sessionmaker(engine)() as session:
            password_hash = await hash_password(account.password)
            user = await crud.add_user_if_missing(session, account.username, password_hash)
    except (OSError, SQLAlchemyError) as error:
        return fail(f"the database is unavailable ({error.__class__.__name__}: {error})")
    finally:
        await engine.dispose()
    if user is None:
        return fail(f"user {account.username!r} already exists (it was left unchanged)")
    print(f"created user {user.username!r} (id {user.id})")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cli.py", description="Operator commands.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-user", help="add a user who may write")
    create.add_argument("username")
    create.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    commands.add_parser("report-now", help="have a running worker print a pet report now")
    return parser.parse_args(argv)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as error:
        return fail(f"invalid configuration:\n{error}")
    if args.command == "report-now":
        return report_now(settings)
    try:
        account = UserCreate(username=args.username, password=read_password(args.password_stdin))
    except ValidationError as error:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in error.errors())
        return fail(problems)
    return asyncio.run(create_user(settings, account))


if __name__ == "__main__":
    sys.exit(main())
