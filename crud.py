"""Every query of the service, as plain async functions over a session or a connection: SQL
only, nothing stateful."""

import io
import operator
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import date
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Executable,
    Result,
    Row,
    bindparam,
    exists,
    func,
    text,
)
from sqlalchemy import select as core_select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import AddConstraint, DropConstraint
from sqlmodel import col, delete, update
from sqlmodel.ext.asyncio.session import AsyncSession

from errors import NotFound, PreconditionFailed
from metrics_sql import FACT, metrics_statement
from models import (
    CUBE_DAILY,
    CUBE_MONTHLY,
    Dimension,
    MetricsPage,
    MetricsPlan,
    MetricsRow,
    MetricTotals,
    Pet,
    PetCreate,
    PetPublic,
    PetQuery,
    PetRecord,
    PetTypeStats,
    PetUpdate,
    User,
    date_id_of,
    table_of,
)

# Reads run on a session or, for single-statement routes, on a bare connection.
Executor = AsyncSession | AsyncConnection


async def _run(
    db: Executor, statement: Executable, params: dict[str, Any] | None = None
) -> Result[Any]:
    """Execute a Core statement (SQLModel's `exec` is typed for model queries only)."""
    if isinstance(db, AsyncConnection):
        return await db.execute(statement, params)
    result: Result[Any] = await db.exec(statement, params=params)  # type: ignore[call-overload]
    return result


PETS = table_of(Pet)
# Pets are read as plain rows validated straight into PetPublic: no ORM objects to build.
PET_ROWS = core_select(PETS.c.name, PETS.c.pet_type, PETS.c.id, PETS.c.created_at)
# A single pet comes with its version, for its ETag.
PET_RECORD = (*PET_ROWS.selected_columns, PETS.c.version)
# Built once: the hottest query should not be rebuilt (and its cache key recomputed) per call.
PET_BY_ID = core_select(*PET_RECORD).where(PETS.c.id == bindparam("pet_id"))


def _pet_filters(query: PetQuery) -> list[ColumnElement[bool]]:
    filters: list[ColumnElement[bool]] = []
    if query.pet_type is not None:
        filters.append(PETS.c.pet_type == query.pet_type)
    if query.name is not None:
        filters.append(PETS.c.name.icontains(query.name, autoescape=True))
    return filters


async def list_pets(db: Executor, query: PetQuery) -> tuple[list[PetPublic], int]:
    """One page of pets matching the query, and how many match in all."""
    filters = _pet_filters(query)
    column = PETS.c[query.sort.removeprefix("-")]
    order = column.desc() if query.sort.startswith("-") else column.asc()
    page = await _run(
        db,
        PET_ROWS.where(*filters)
        .order_by(order, PETS.c.id.asc())
        .limit(query.limit)
        .offset(query.offset),
    )
    pets = [PetPublic.model_validate(row) for row in page.mappings()]
    total = await _run(db, core_select(func.count()).select_from(PETS).where(*filters))
    return pets, total.scalar_one()


def _not_found(pet_id: int) -> NotFound:
    return NotFound(f"Pet {pet_id} does not exist.")


async def get_pet(db: Executor, pet_id: int) -> PetRecord:
    row = (await _run(db, PET_BY_ID, {"pet_id": pet_id})).mappings().one_or_none()
    if row is None:
        raise _not_found(pet_id)
    return PetRecord.model_validate(row)


async def create_pet(session: AsyncSession, data: PetCreate) -> PetRecord:
    result = await _run(session, insert(PETS).values(**data.model_dump()).returning(*PET_RECORD))
    pet = PetRecord.model_validate(result.mappings().one())
    await session.commit()
    return pet


async def _missing_or_changed(
    db: Executor, pet_id: int, versions: Sequence[int] | None
) -> NotFound | PreconditionFailed:
    """Why a write found no row: the pet is gone (404), or it no longer has a version the
    client's If-Match named (412)."""
    exists_now = (await _run(db, PET_BY_ID, {"pet_id": pet_id})).first() is not None
    if versions is None or not exists_now:
        return _not_found(pet_id)
    return PreconditionFailed(
        f"Pet {pet_id} has changed since the ETag in If-Match: GET it again, then retry."
    )


async def _update_pet(
    session: AsyncSession, pet_id: int, changes: dict[str, Any], versions: Sequence[int] | None
) -> PetRecord:
    # One UPDATE ... RETURNING: no read-modify-write window for concurrent writers; the version
    # condition (If-Match) is part of the same statement.
    statement = (
        update(PETS)
        .where(PETS.c.id == pet_id)
        .values(**changes, version=PETS.c.version + 1)
        .returning(*PET_RECORD)
    )
    if versions is not None:
        statement = statement.where(PETS.c.version.in_(versions))
    row = (await _run(session, statement)).mappings().one_or_none()
    if row is None:
        raise await _missing_or_changed(session, pet_id, versions)
    await session.commit()
    return PetRecord.model_validate(row)


async def replace_pet(
    session: AsyncSession, pet_id: int, data: PetCreate, versions: Sequence[int] | None = None
) -> PetRecord:
    """Replace a pet; with `versions` (from If-Match), only if it still has one of them."""
    return await _update_pet(session, pet_id, data.model_dump(), versions)


async def patch_pet(
    session: AsyncSession, pet_id: int, data: PetUpdate, versions: Sequence[int] | None = None
) -> PetRecord:
    changes = data.model_dump(exclude_unset=True)
    if not changes:
        pet = await get_pet(session, pet_id)
        if versions is not None and pet.version not in versions:
            raise await _missing_or_changed(session, pet_id, versions)
        return pet
    return await _update_pet(session, pet_id, changes, versions)


async def delete_pet(
    session: AsyncSession, pet_id: int, versions: Sequence[int] | None = None
) -> None:
    statement = delete(PETS).where(PETS.c.id == pet_id).returning(PETS.c.id)
    if versions is not None:
        statement = statement.where(PETS.c.version.in_(versions))
    if (await _run(session, statement)).scalar_one_or_none() is None:
        raise await _missing_or_changed(session, pet_id, versions)
    await session.commit()


async def pet_type_stats(db: Executor) -> list[PetTypeStats]:
    """Count, largest id and longest name per pet type, ordered by type."""
    result = await _run(
        db,
        core_select(
            PETS.c.pet_type,
            func.count().label("count"),
            func.max(PETS.c.id).label("max_id"),
            func.max(func.char_length(PETS.c.name)).label("longest_name"),
        )
        .group_by(PETS.c.pet_type)
        .order_by(PETS.c.pet_type),
    )
    return [PetTypeStats.model_validate(row) for row in result.mappings()]


# (id, name, pet_type, created): created is the UTC time as text, "YYYY-MM-DD HH:MM:SS".
PetRow = Row[int, str, str, str]


async def stream_pet_batches(db: AsyncConnection) -> AsyncIterator[Sequence[PetRow]]:
    """Every pet by id, in batches through a server-side cursor (memory stays flat)."""
    # The database writes the timestamp as text: cheaper than a datetime per row in Python.
    created = func.to_char(func.timezone("UTC", PETS.c.created_at), "YYYY-MM-DD HH24:MI:SS")
    result = await db.stream(
        core_select(PETS.c.id, PETS.c.name, PETS.c.pet_type, created.label("created"))
        .order_by(PETS.c.id)
        .execution_options(yield_per=5000)
    )
    # A partition at a time: stepping the async result row by row costs a greenlet switch each.
    async for partition in result.partitions():
        yield partition


async def ping(db: Executor) -> None:
    """A round trip to the database; raises when it cannot be reached."""
    await _run(db, text("SELECT 1"))


async def get_user(session: AsyncSession, user_id: int) -> User | None:
    return await session.get(User, user_id)


USERS = table_of(User)


async def get_user_by_username(db: Executor, username: str) -> User | None:
    """The user of that (lower-cased) name; on a bare connection too, so that a login can give
    its connection back before it hashes the password."""
    result = await _run(db, core_select(USERS).where(USERS.c.username == username))
    row = result.mappings().one_or_none()
    return None if row is None else User.model_validate(row)


async def add_user_if_missing(
    session: AsyncSession, username: str, password_hash: str
) -> User | None:
    """Insert a user; None when the name is taken (an existing user is never overwritten)."""
    result = await session.exec(
        insert(User)
        .values(username=username, password_hash=password_hash)
        .on_conflict_do_nothing(index_elements=[col(User.username)])
        .returning(User)
    )
    user: User | None = result.scalar_one_or_none()
    await session.commit()
    return user


# --- ad metrics --------------------------------------------------------------------------------


async def dimension_values(db: Executor, dimension: Dimension) -> list[tuple[int, str]]:
    """Every (id, name) of a dimension, by name."""
    table = table_of(dimension.table)
    name = table.c[dimension.name_column]
    statement = core_select(table.c[dimension.id_column].label("id"), name.label("name"))
    result = await _run(db, statement.order_by(name))
    return [(row["id"], row["name"]) for row in result.mappings()]


async def query_metrics(db: Executor, plan: MetricsPlan) -> MetricsPage:
    result = await _run(db, *metrics_statement(plan))
    records = result.mappings().all()
    first = records[0]
    totals = MetricTotals.model_validate({m: first[f"total_{m}"] for m in plan.fields})
    rows = [
        MetricsRow.model_validate({key: record[key] for key in (*plan.group_by, *plan.fields)})
        for record in records
        if record["position"] is not None
    ]
    return MetricsPage(
        rows=rows,
        totals=totals,
        total_rows=first["total_rows"],
        limit=plan.limit,
        offset=plan.offset,
    )


async def stream_metrics_rows(
    db: AsyncConnection, plan: MetricsPlan
) -> AsyncIterator[list[tuple[Any, ...]]]:
    """Every grouped row of `plan`, in order, as tuples of its groups then its fields, in batches
    through a server-side cursor (memory stays flat); `db` must not be in autocommit mode, as a
    cursor lives in a transaction."""
    statement, values = metrics_statement(plan, every_row=True)
    result = await db.stream(statement.execution_options(yield_per=5000), values)
    keys = list(result.keys())
    positions = [keys.index(column) for column in (*plan.group_by, *plan.fields)]
    pick = operator.itemgetter(*positions)  # of one position: the value, not a tuple
    async for partition in result.partitions():
        if len(positions) > 1:
            yield [pick(row) for row in partition]
        else:
            yield [(pick(row),) for row in partition]


async def ensure_dimension_values(
    session: AsyncSession, dimension: Dimension, names: Iterable[str]
) -> dict[str, int]:
    """Casefolded name → id for every name given, adding the ones the dimension lacks (a name
    that differs from an existing one only in case is that one)."""
    ids: dict[str, int] = {}
    for row_id, name in await dimension_values(session, dimension):
        ids.setdefault(name.casefold(), row_id)
    missing: dict[str, str] = {}
    for name in names:
        if name.casefold() not in ids:
            missing.setdefault(name.casefold(), name)
    if not missing:
        return ids
    table = table_of(dimension.table)
    rows = [{dimension.name_column: name} for name in missing.values()]
    await _run(session, insert(table).values(rows).on_conflict_do_nothing())
    return await ensure_dimension_values(session, dimension, ())


async def ensure_dates(session: AsyncSession, days: Iterable[date]) -> None:
    """Add the `dim_date` rows of these days that are missing. The dates are made from the ids
    in SQL: asyncpg sends 0001-01-01 and 9999-12-31 as -infinity and infinity."""
    statement = text(
        "INSERT INTO dim_date (date_id, date_value)"
        " SELECT id, make_date(id / 10000, id / 100 % 100, id % 100)"
        " FROM unnest(CAST(:ids AS integer[])) AS id"
        " ON CONFLICT DO NOTHING"
    )
    await _run(session, statement.bindparams(ids=sorted({date_id_of(d) for d in days})))


async def has_facts(session: AsyncSession) -> bool:
    result = await _run(session, core_select(exists().select_from(FACT)))
    return bool(result.scalar())


async def delete_facts(session: AsyncSession, first_id: int, last_id: int) -> None:
    """Remove the facts of a date_id range: TRUNCATE when that is all of them (instant)."""
    outside = await _run(
        session,
        core_select(exists().where(~FACT.c.date_id.between(first_id, last_id))),
    )
    if outside.scalar():
        await _run(session, FACT.delete().where(FACT.c.date_id.between(first_id, last_id)))
    else:
        await _run(session, text("TRUNCATE fact_ad_metrics_daily"))


# Any number: the key of the advisory lock that writers of facts take in turn.
FACT_WRITERS_LOCK = 20261202


async def take_the_writers_turn(session: AsyncSession) -> None:
    """Wait until no other transaction writes facts, then hold that turn to this transaction's
    end: each rewrites whole months of the cubes from the facts it reads, so two at once would
    each miss the other's facts."""
    await _run(
        session, text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=FACT_WRITERS_LOCK)
    )


@asynccontextmanager
async def foreign_keys_checked_once(session: AsyncSession) -> AsyncIterator[None]:
    """For bulk loads: drop the fact's foreign keys, load, then add them back, which checks every
    row in one join per key instead of one lookup per key and row (about 13 times faster). It all
    happens in the caller's transaction: nobody sees the table without its keys, and a failed
    load rolls the drop back too."""
    for key in FACT.foreign_key_constraints:
        await _run(session, DropConstraint(key))
    yield
    for key in FACT.foreign_key_constraints:
        await _run(session, AddConstraint(key))


async def after_bulk_load(session: AsyncSession) -> None:
    """Fresh planner statistics, and BRIN summaries for the pages just written (until then a
    date range query reads those pages whatever their dates)."""
    for table in (FACT, CUBE_DAILY, CUBE_MONTHLY):
        await _run(session, text(f"ANALYZE {table.name}"))
    await _run(
        session, text("SELECT brin_summarize_new_values('ix_fact_ad_metrics_daily_date_id_brin')")
    )


# The facts as the cubes are summed from: the keys, then the measures with cost in cents.
FACT_CELLS = (
    "SELECT date_id, region_id, age_id, gender_id, platform_id, placement_id, device_type_id,"
    " impressions, clicks, (cost * 100)::bigint, conversions, likes FROM fact_ad_metrics_daily"
    " WHERE date_id BETWEEN $1 AND $2"
)
FACT_CELL_TYPES = (">i4",) * 7 + (">i8",) * 5


async def _driver(session: AsyncSession) -> Any:
    """The asyncpg connection under the session, in its transaction (for COPY)."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    assert raw.driver_connection is not None
    return raw.driver_connection


async def read_fact_cells(session: AsyncSession, first_id: int, last_id: int) -> bytes:
    """The facts of a date_id range as a binary COPY of FACT_CELLS (types FACT_CELL_TYPES)."""
    chunks: list[bytes] = []

    async def keep(chunk: bytes) -> None:
        chunks.append(chunk)

    driver = await _driver(session)
    await driver.copy_from_query(FACT_CELLS, first_id, last_id, output=keep, format="binary")
    return b"".join(chunks)


async def replace_cube_rows(
    session: AsyncSession, month: int, daily: bytes, monthly: bytes
) -> None:
    """Replace the cubes' rows of a month (a month_id) by these binary COPYs."""
    days = CUBE_DAILY.c.date_id.between(month * 100 + 1, month * 100 + 31)
    await _run(session, CUBE_DAILY.delete().where(days))
    await _run(session, CUBE_MONTHLY.delete().where(CUBE_MONTHLY.c.month_id == month))
    await copy_binary(session, "cube_daily", daily)
    await copy_binary(session, "cube_monthly", monthly)


async def copy_binary(
    session: AsyncSession, table: str, data: bytes, columns: Sequence[str] | None = None
) -> None:
    """A binary COPY into `table`, on the session's connection and transaction."""
    driver = await _driver(session)
    await driver.copy_to_table(
        table, source=io.BytesIO(data), columns=None if columns is None else list(columns),
        format="binary",
    )  # fmt: skip


async def copy_csv_lines(
    session: AsyncSession, table: str, columns: Sequence[str], source: AsyncIterable[bytes]
) -> None:
    """PostgreSQL COPY of CSV lines into `table`, on the session's connection and transaction."""
    driver = await _driver(session)
    await driver.copy_to_table(table, source=source, columns=list(columns), format="csv")


# Bulk upsert through a staging table; the fact's columns are fixed, so the SQL is written out.
CREATE_STAGING = """
CREATE TEMPORARY TABLE staged_facts ON COMMIT DROP AS
SELECT 0 AS line, date_id, region_id, age_id, gender_id, platform_id, placement_id,
       device_type_id, impressions, clicks, cost, conversions, likes
FROM fact_ad_metrics_daily WITH NO DATA
"""
STAGING_COLUMNS = ("line", *FACT.c.keys())
REPEATED_KEYS = """
SELECT array_agg(line ORDER BY line) AS lines, count(*) OVER () AS repeated FROM staged_facts
GROUP BY date_id, region_id, age_id, gender_id, platform_id, placement_id, device_type_id
HAVING count(*) > 1 ORDER BY min(line) LIMIT :limit
"""
UPSERT_STAGED = """
INSERT INTO fact_ad_metrics_daily
SELECT date_id, region_id, age_id, gender_id, platform_id, placement_id, device_type_id,
       impressions, clicks, cost, conversions, likes
FROM staged_facts
ON CONFLICT (date_id, region_id, age_id, gender_id, platform_id, placement_id, device_type_id)
DO UPDATE SET impressions = EXCLUDED.impressions, clicks = EXCLUDED.clicks,
              cost = EXCLUDED.cost, conversions = EXCLUDED.conversions, likes = EXCLUDED.likes
"""


async def stage_facts(
    session: AsyncSession, source: AsyncIterable[bytes], listed: int = 50
) -> tuple[list[list[int]], int]:
    """Copy facts from CSV lines (a line number, then the fact's columns) into a staging table
    of this transaction. Returns the line numbers of each key given more than once (the first
    `listed` such keys) and how many keys were."""
    await _run(session, text(CREATE_STAGING))
    await copy_csv_lines(session, "staged_facts", STAGING_COLUMNS, source)
    repeated = (await _run(session, text(REPEATED_KEYS).bindparams(limit=listed))).all()
    return [list(row.lines) for row in repeated], (repeated[0].repeated if repeated else 0)


async def upsert_staged_facts(session: AsyncSession) -> int:
    """Upsert the staged facts (see stage_facts); returns how many facts were written."""
    written = await _run(session, text(UPSERT_STAGED))
    return int(written.rowcount)  # type: ignore[attr-defined]
