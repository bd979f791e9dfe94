"""Helpers the tests share: the servers the suite runs against, scratch databases, settings,
clients, the CLI, SQL on a session, and the expected answers the tests compare with."""

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import Result, TextClause, text
from sqlalchemy.engine import make_url
from sqlmodel.ext.asyncio.session import AsyncSession

from alembic.config import Config
from settings import Settings

# The servers the suite runs against; each run makes (and drops) its own database there, and
# takes an empty Redis database (by number) for itself.
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_SERVER_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = "admin-password-for-tests"
JWT_SECRET = "test-secret-that-is-long-enough-for-hs256"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBLEM = "application/problem+json"


def redis_url() -> str:
    """The Redis database this run has claimed (tests/conftest.py)."""
    return os.environ["REDIS_URL"]


async def flush_redis(url: str) -> None:
    client = Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


def alembic_config_for(database_url: str) -> Config:
    config = Config(os.path.join(ROOT, "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


async def admin_execute(sql: str) -> None:
    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def database_url_for(name: str) -> str:
    url = make_url(POSTGRES_URL).set(drivername="postgresql+asyncpg", database=name)
    return url.render_as_string(hide_password=False)


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new, empty database with a random name (its URL), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    asyncio.run(admin_execute(f'CREATE DATABASE "{name}"'))
    try:
        yield database_url_for(name)
    finally:
        asyncio.run(admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def demo_database(prefix: str, *seed_arguments: str) -> Iterator[str]:
    """A scratch database migrated to head and seeded by `seed-metrics` with these arguments,
    for a real server of a test's own (its URL)."""
    from alembic import command

    with scratch_database(prefix) as url:
        command.upgrade(alembic_config_for(url), "head")
        env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": redis_url()}
        seed = [sys.executable, "cli.py", "seed-metrics", *seed_arguments]
        subprocess.run(seed, cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
        yield url


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "ENVIRONMENT": "test",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url(),
        "JWT_SECRET": JWT_SECRET,
        "ADMIN_USERNAME": ADMIN_USERNAME,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
    }
    values.update(overrides)
    return Settings.model_validate(values)


def client_for(application: FastAPI, **options: object) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=application, **options)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def cli_environment(settings: Settings) -> dict[str, str]:
    """The environment of `python cli.py ...` against the test database and Redis."""
    return {**os.environ, "DATABASE_URL": settings.DATABASE_URL, "REDIS_URL": settings.REDIS_URL}


def run_cli(settings: Settings, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`python cli.py ...` against the test database and Redis."""
    env = cli_environment(settings)
    return subprocess.run(
        [sys.executable, "cli.py", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )


async def sql(session: AsyncSession, statement: str | TextClause, **values: Any) -> Result[Any]:
    """Run SQL written for a test on the session (SQLModel's `exec` is typed for models only)."""
    clause = text(statement) if isinstance(statement, str) else statement
    if values:
        clause = clause.bindparams(**values)
    result: Result[Any] = await session.exec(clause)  # type: ignore[call-overload]
    return result


# --- pets -------------------------------------------------------------------------------------


async def create(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> Any:
    response = await client.post("/pets", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


async def pet_count(session: AsyncSession) -> int:
    count: int = (await sql(session, "SELECT count(*) FROM pet")).scalar_one()
    return count


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["type"]
    assert body["detail"]
    return body


# --- ad metrics -------------------------------------------------------------------------------

MEASURES = ("impressions", "clicks", "cost", "conversions", "likes")
DIMENSION_TABLES = (
    "dim_region",
    "dim_age_group",
    "dim_gender",
    "dim_platform",
    "dim_placement",
    "dim_device_type",
)
CUBE_TABLES = ("cube_daily", "cube_monthly")


def rounded(numerator: Decimal, denominator: Decimal) -> Decimal | None:
    if denominator == 0:
        return None
    return (numerator / denominator).quantize(Decimal("0.000001"), ROUND_HALF_UP)


def ratio(numerator: Decimal, denominator: Decimal) -> float | None:
    value = rounded(numerator, denominator)
    return None if value is None else float(value)


def money(numerator: Decimal, denominator: Decimal) -> str | None:
    """A cost ratio as the API sends it: an exact decimal string with 6 places."""
    value = rounded(numerator, denominator)
    return None if value is None else f"{value:f}"


def expected_metrics(facts: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of some facts (dicts with the five measures), worked out here rather than in
    SQL, as the API sends them."""
    s = {m: sum((Decimal(f[m]) for f in facts), Decimal(0)) for m in MEASURES}
    return {
        "impressions": int(s["impressions"]),
        "clicks": int(s["clicks"]),
        "cost": f"{s['cost'].quantize(Decimal('0.01')):f}",
        "conversions": int(s["conversions"]),
        "likes": int(s["likes"]),
        "ctr": ratio(s["clicks"], s["impressions"]),
        "cpc": money(s["cost"], s["clicks"]),
        "cpm": money(s["cost"] * 1000, s["impressions"]),
        "cpa": money(s["cost"], s["conversions"]),
        "cvr": ratio(s["conversions"], s["clicks"]),
    }


async def clear_metrics(session: AsyncSession) -> None:
    """Empty the star schema and its cubes."""
    tables = ", ".join(["fact_ad_metrics_daily", *CUBE_TABLES, "dim_date", *DIMENSION_TABLES])
    await sql(session, f"TRUNCATE {tables} RESTART IDENTITY")
    await session.commit()


CHECKSUM = """
SELECT count(*) AS facts,
       md5(string_agg(f::text, ';' ORDER BY date_id, region_id, age_id, gender_id, platform_id,
                                            placement_id, device_type_id)) AS facts_md5,
       (SELECT string_agg(region_name, ',' ORDER BY region_id) FROM dim_region) AS regions,
       (SELECT string_agg(platform_name, ',' ORDER BY platform_id) FROM dim_platform) AS platforms,
       (SELECT count(*) FROM dim_date) AS days
FROM fact_ad_metrics_daily f
"""


async def checksum(session: AsyncSession) -> dict[str, Any]:
    result = await sql(session, CHECKSUM)
    await session.commit()
    return dict(result.mappings().one())


async def seed_unless_seeded(
    settings: Settings, session: AsyncSession, seed: Sequence[str], last_seeded: dict[str, Any]
) -> None:
    """Run the `seed` command on empty facts unless the tables still hold what it seeded last
    (`last_seeded`: their checksum then, kept by the caller across tests)."""
    if not last_seeded or await checksum(session) != last_seeded:
        await sql(session, "TRUNCATE fact_ad_metrics_daily, cube_daily, cube_monthly")
        await session.commit()
        result = run_cli(settings, *seed)
        assert result.returncode == 0, result.stderr
        last_seeded.clear()
        last_seeded.update(await checksum(session))


# The same question, worked out the plain way: join every dimension to every fact, then group.
GROUP_SQL = {
    "date": "d.date_value",
    "week": "CAST(date_trunc('week', d.date_value) AS date)",
    "quarter": "make_date(extract(year FROM d.date_value)::int,"
    " (extract(quarter FROM d.date_value)::int - 1) * 3 + 1, 1)",
    "year": "make_date(extract(year FROM d.date_value)::int, 1, 1)",
    "day_of_week": "extract(isodow FROM d.date_value)::int",
    "month": "CAST(date_trunc('month', d.date_value) AS date)",
    "region": "r.region_name",
    "age_group": "a.age_range",
    "gender": "g.gender_name",
    "platform": "p.platform_name",
    "placement": "pl.placement_name",
    "device_type": "dt.device_type_name",
}
PLAIN_JOIN = """
FROM fact_ad_metrics_daily f
JOIN dim_date d ON d.date_id = f.date_id
JOIN dim_region r ON r.region_id = f.region_id
JOIN dim_age_group a ON a.age_id = f.age_id
JOIN dim_gender g ON g.gender_id = f.gender_id
JOIN dim_platform p ON p.platform_id = f.platform_id
JOIN dim_placement pl ON pl.placement_id = f.placement_id
JOIN dim_device_type dt ON dt.device_type_id = f.device_type_id
WHERE d.date_value BETWEEN :start AND :end
"""


async def plain_sql(
    session: AsyncSession,
    group_by: Sequence[str],
    start: date,
    end: date,
    filters: Mapping[str, Sequence[str]],
) -> list[dict[str, Any]]:
    """The rows of a question (names of its filters by dimension, or by exclude_<dimension>),
    worked out in plain SQL."""
    columns = [f"{GROUP_SQL[g]} AS {g}" for g in group_by]
    sums = [f"sum(f.{m}) AS {m}" for m in ("impressions", "clicks", "cost", "conversions", "likes")]
    grouping = f" GROUP BY {', '.join(GROUP_SQL[g] for g in group_by)}" if group_by else ""
    where = "".join(
        f" AND NOT {GROUP_SQL[name.removeprefix('exclude_')]} = ANY(:{name})"
        if name.startswith("exclude_")
        else f" AND {GROUP_SQL[name]} = ANY(:{name})"
        for name in filters
    )
    statement = text(f"SELECT {', '.join(columns + sums)} {PLAIN_JOIN}{where}{grouping}")
    statement = statement.bindparams(
        start=start, end=end, **{k: list(v) for k, v in filters.items()}
    )
    result = await sql(session, statement)
    rows = []
    for record in result.mappings():
        if record["impressions"] is None:
            continue
        groups = {
            g: str(record[g]) if g in ("date", "week", "month", "quarter", "year") else record[g]
            for g in group_by
        }
        facts = [
            {
                m: Decimal(record[m])
                for m in ("impressions", "clicks", "cost", "conversions", "likes")
            }
        ]
        rows.append({**groups, **expected_metrics(facts)})
    return rows


async def assert_cubes_hold_the_facts_sums(session: AsyncSession) -> None:
    """Every row of both cubes equals the facts' sums for its set, worked out in plain SQL (a set
    of dimensions is a bit mask over the fact's key columns; its ids fill k1, k2, ... in order)."""
    columns = ["region_id", "age_id", "gender_id", "platform_id", "placement_id", "device_type_id"]
    sums = "sum(impressions), sum(clicks), sum(cost) * 100, sum(conversions), sum(likes)"
    for table, period, period_sql, key_count, most in (
        ("cube_daily", "date_id", "date_id", 3, 3),
        ("cube_monthly", "month_id", "date_id / 100", 6, 6),
    ):
        selects = []
        for mask in range(64):
            kept = [c for bit, c in enumerate(columns) if mask >> bit & 1]
            if len(kept) <= most:
                keys = ", ".join([str(mask), period_sql, *kept, *["0"] * (key_count - len(kept))])
                grouped = ", ".join([period_sql, *kept])
                selects.append(
                    f"SELECT {keys}, {sums} FROM fact_ad_metrics_daily GROUP BY {grouped}"
                )
        expected = " UNION ALL ".join(selects)
        cube_keys = ", ".join(["set_id", period, *(f"k{n + 1}" for n in range(key_count))])
        actual = (
            f"SELECT {cube_keys}, impressions, clicks, cost_cents, conversions, likes FROM {table}"
        )
        for first, second in ((expected, actual), (actual, expected)):
            differ = await sql(session, f"SELECT count(*) FROM ({first} EXCEPT ALL ({second})) d")
            assert differ.scalar_one() == 0, table


# A load-metrics file.
HEADER = "date,region,age_group,gender,platform,placement,device_type,impressions,clicks,cost,conversions,likes\n"  # noqa: E501


def write_csv(tmp_path: Path, *lines: str, header: str = HEADER) -> Path:
    path = tmp_path / "metrics.csv"
    path.write_text(header + "".join(f"{line}\n" for line in lines))
    return path


def passes(row: dict[str, Any], conditions: list[tuple[str, str, str]]) -> bool:
    """A row as the API sends it against (metric, operator, number) conditions, in decimals."""
    compare = {">": Decimal.__gt__, ">=": Decimal.__ge__, "<": Decimal.__lt__,
               "<=": Decimal.__le__, "=": Decimal.__eq__, "!=": Decimal.__ne__}  # fmt: skip
    return all(
        row[metric] is not None and compare[op](Decimal(str(row[metric])), Decimal(number))
        for metric, op, number in conditions
    )
