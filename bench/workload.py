"""The workload scenario: questions shaped like real use of `GET /metrics`, each answered by the
service over HTTP and by DuckDB in-process over the same facts, timed and checked against each
other.

The DuckDB side is written from the API's documentation (docs/metrics.md), not from the
service's code, which this module never imports: the comparison is only worth something if the
two answers are found independently."""

import asyncio
import http.client
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import asyncpg
import duckdb

# --- the workload's distribution ---------------------------------------------------------------


@dataclass(frozen=True)
class Distribution:
    """Relative weights of every choice the question generator makes: a choice's probability is
    its weight over the sum of the weights of its table."""

    range_kind: Mapping[str, int]
    preset: Mapping[str, int]
    dates_kind: Mapping[str, int]
    end: Mapping[str, int]
    filter_count: Mapping[int, int]
    filter_dimension: Mapping[str, int]
    value_count: Mapping[int, int]
    value_case: Mapping[str, int]
    group_count: Mapping[int, int]
    group: Mapping[str, int]
    sort_kind: Mapping[str, int]
    descending: Mapping[bool, int]
    limit: Mapping[int, int]
    page: Mapping[int, int]


DISTRIBUTION = Distribution(
    # How a question gives its range: a preset (ending today, UTC), no range at all (the API's
    # default, last_30d), or explicit dates.
    range_kind={"preset": 25, "default": 5, "dates": 70},
    preset={"last_7d": 20, "last_30d": 30, "last_90d": 20, "this_month": 15, "last_month": 15},
    # Explicit dates: a length in days drawn log-uniformly from 1..1096 ("days": short ranges are
    # the common case, a median near a month), or whole calendar months, their number drawn
    # log-uniformly from 1..36 ("months").
    dates_kind={"days": 75, "months": 25},
    # Where explicit dates end, relative to the data's last day: on it ("the latest N days"),
    # earlier (by 1 day up to where the range would start before the data; up to 90 days for a
    # range longer than the data), or later (by 1..60 days, so partly or wholly past the data).
    # A months range ends with the month holding the last day, 1..11 months earlier, or the
    # month after. Ranges longer than the data always reach outside it.
    end={"last_day": 50, "earlier": 35, "later": 15},
    # Filters: how many (each on a different dimension), which dimensions, how many values each
    # (distinct names from GET /dimensions/{name}), and how a value is spelled.
    filter_count={0: 40, 1: 30, 2: 20, 3: 10},
    filter_dimension={
        "region": 3,
        "platform": 3,
        "device_type": 2,
        "age_group": 2,
        "gender": 2,
        "placement": 2,
    },
    value_count={1: 60, 2: 25, 3: 15},
    value_case={"as_listed": 80, "upper": 10, "lower": 10},
    # group_by: how many values, and which (drawn without repeats, time buckets and dimensions
    # from one table, so they mix).
    group_count={0: 20, 1: 40, 2: 30, 3: 10},
    group={
        "date": 3,
        "week": 2,
        "month": 2,
        "region": 3,
        "platform": 3,
        "device_type": 2,
        "age_group": 2,
        "gender": 2,
        "placement": 2,
    },
    # sort: none (the default order), one of the grouped fields (a metric when nothing is
    # grouped), or one of the ten metrics (uniformly); then the direction.
    sort_kind={"none": 50, "group": 20, "metric": 30},
    descending={False: 50, True: 50},
    # The page: its size, and which page (0 is offset 0; k is offset k * limit).
    limit={100: 70, 10: 10, 50: 10, 1000: 10},
    page={0: 85, 1: 8, 2: 4, 3: 3},
)
# The bounds named above.
LATER_END_MAX_DAYS = 60
EARLIER_LONG_RANGE_MAX_DAYS = 90
MAX_MONTHS = 36

# --- the API's vocabulary, from docs/metrics.md ----------------------------------------------

MAX_SPAN_DAYS = 1096
TIME_GROUPS = ("date", "week", "month")
MEASURES = ("impressions", "clicks", "cost", "conversions", "likes")
RATIOS = ("ctr", "cpc", "cpm", "cpa", "cvr")
METRICS = MEASURES + RATIOS
# Sent (and compared) as decimal strings or numbers: parsed as exact decimals.
DECIMAL_FIELDS = frozenset({"cost", *RATIOS})
DEFAULT_PRESET = "last_30d"
DEFAULT_LIMIT = 100
HTTP_TIMEOUT_SECONDS = 120.0
REPEATS = 3


@dataclass(frozen=True)
class DimensionTable:
    """Where a dimension's names live in the star schema."""

    table: str
    id_column: str
    name_column: str


DIMENSIONS = {
    "region": DimensionTable("dim_region", "region_id", "region_name"),
    "age_group": DimensionTable("dim_age_group", "age_id", "age_range"),
    "gender": DimensionTable("dim_gender", "gender_id", "gender_name"),
    "platform": DimensionTable("dim_platform", "platform_id", "platform_name"),
    "placement": DimensionTable("dim_placement", "placement_id", "placement_name"),
    "device_type": DimensionTable("dim_device_type", "device_type_id", "device_type_name"),
}

# --- questions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One GET /metrics question: explicit dates, a preset, or neither (the default range)."""

    start: date | None = None
    end: date | None = None
    preset: str | None = None
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()
    group_by: tuple[str, ...] = ()
    sort: str | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0

    def params(self) -> list[tuple[str, str]]:
        """The query string's parameters, in the order a person would write them; the defaults
        (limit 100, offset 0) are left out, as a client would."""
        params: list[tuple[str, str]] = []
        if self.start is not None and self.end is not None:
            params += [("start_date", self.start.isoformat()), ("end_date", self.end.isoformat())]
        if self.preset is not None:
            params.append(("preset", self.preset))
        params += [(name, value) for name, values in self.filters for value in values]
        params += [("group_by", group) for group in self.group_by]
        if self.sort is not None:
            params.append(("sort", self.sort))
        if self.limit != DEFAULT_LIMIT:
            params.append(("limit", str(self.limit)))
        if self.offset:
            params.append(("offset", str(self.offset)))
        return params

    def path(self) -> str:
        query = urlencode(self.params())
        return f"/metrics?{query}" if query else "/metrics"

    def date_range(self, today: date) -> tuple[date, date]:
        """The inclusive range asked for, as docs/metrics.md defines the presets."""
        if self.start is not None and self.end is not None:
            return self.start, self.end
        preset = self.preset or DEFAULT_PRESET
        if preset == "this_month":
            return today.replace(day=1), today
        if preset == "last_month":
            last = today.replace(day=1) - timedelta(days=1)
            return last.replace(day=1), last
        days = {"last_7d": 7, "last_30d": 30, "last_90d": 90}[preset]
        return today - timedelta(days=days - 1), today

    def dimensions(self) -> set[str]:
        """The dimensions (not time buckets) this question filters or groups by."""
        return {name for name, _ in self.filters} | {g for g in self.group_by if g in DIMENSIONS}


T = TypeVar("T")


def pick(rng: random.Random, weights: Mapping[T, int]) -> T:
    """One choice from a table of the distribution."""
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def pick_distinct(rng: random.Random, weights: Mapping[T, int], count: int) -> list[T]:
    """`count` different choices from a table, each drawn by weight from those left."""
    left = dict(weights)
    chosen: list[T] = []
    for _ in range(min(count, len(left))):
        choice = pick(rng, left)
        chosen.append(choice)
        del left[choice]
    return chosen


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    """An integer in low..high whose logarithm is uniform: short lengths more often."""
    return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))


def add_months(day: date, months: int) -> date:
    """The first of the month `months` after (or before) `day`'s month."""
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def explicit_range(rng: random.Random, first_day: date, last_day: date) -> tuple[date, date]:
    """Explicit dates, placed relative to the data's last day (see DISTRIBUTION.end)."""
    placement = pick(rng, DISTRIBUTION.end)
    if pick(rng, DISTRIBUTION.dates_kind) == "months":
        months = log_uniform(rng, 1, MAX_MONTHS)
        shift = {"last_day": 0, "earlier": -rng.randint(1, 11), "later": 1}[placement]
        end_month = add_months(last_day, shift)
        end = add_months(end_month, 1) - timedelta(days=1)
        start = add_months(end_month, 1 - months)
        while (end - start).days + 1 > MAX_SPAN_DAYS:  # 36 months can be 1,097 days
            start = add_months(start, 1)
        return start, end
    length = log_uniform(rng, 1, MAX_SPAN_DAYS)
    data_days = (last_day - first_day).days + 1
    if placement == "last_day":
        end = last_day
    elif placement == "earlier":
        room = data_days - length if length < data_days else EARLIER_LONG_RANGE_MAX_DAYS
        end = last_day - timedelta(days=rng.randint(1, max(1, room)))
    else:
        end = last_day + timedelta(days=rng.randint(1, LATER_END_MAX_DAYS))
    return end - timedelta(days=length - 1), end


def spelled(rng: random.Random, name: str) -> str:
    """A name as a person might type it: mostly as listed, sometimes in another case (names
    match case-insensitively)."""
    case = pick(rng, DISTRIBUTION.value_case)
    return name.upper() if case == "upper" else name.lower() if case == "lower" else name


def filter_values(rng: random.Random, names: Sequence[str]) -> tuple[str, ...]:
    """Distinct existing names for one filter, as typed."""
    count = min(len(names), pick(rng, DISTRIBUTION.value_count))
    return tuple(spelled(rng, name) for name in rng.sample(list(names), count))


def generate_question(
    rng: random.Random, values: Mapping[str, Sequence[str]], first_day: date, last_day: date
) -> Question:
    """One question drawn from DISTRIBUTION."""
    start = end = preset = None
    kind = pick(rng, DISTRIBUTION.range_kind)
    if kind == "preset":
        preset = pick(rng, DISTRIBUTION.preset)
    elif kind == "dates":
        start, end = explicit_range(rng, first_day, last_day)
    filter_dimensions = pick_distinct(
        rng, DISTRIBUTION.filter_dimension, pick(rng, DISTRIBUTION.filter_count)
    )
    filters = tuple((name, filter_values(rng, values[name])) for name in filter_dimensions)
    group_by = tuple(pick_distinct(rng, DISTRIBUTION.group, pick(rng, DISTRIBUTION.group_count)))
    sort = None
    sort_kind = pick(rng, DISTRIBUTION.sort_kind)
    if sort_kind != "none":
        fields = group_by if sort_kind == "group" and group_by else METRICS
        descending = pick(rng, DISTRIBUTION.descending)
        sort = ("-" if descending else "") + rng.choice(fields)
    limit = pick(rng, DISTRIBUTION.limit)
    offset = limit * pick(rng, DISTRIBUTION.page)
    return Question(start, end, preset, filters, group_by, sort, limit, offset)


def generate_questions(
    count: int, seed: int, values: Mapping[str, Sequence[str]], first_day: date, last_day: date
) -> list[Question]:
    """`count` questions, the same ones for the same seed, data and dimension values."""
    rng = random.Random(seed)  # noqa: S311 (a reproducible workload, not a secret)
    return [generate_question(rng, values, first_day, last_day) for _ in range(count)]


def heaviest_question(values: Mapping[str, Sequence[str]], last_day: date) -> Question:
    """The most work a legal question can ask for: every group_by value, the longest span
    (ending on the data's last day), three existing names in every filter and the largest page."""
    return Question(
        start=last_day - timedelta(days=MAX_SPAN_DAYS - 1),
        end=last_day,
        filters=tuple((name, tuple(sorted(values[name])[:3])) for name in DIMENSIONS),
        group_by=(*TIME_GROUPS, *DIMENSIONS),
        limit=1000,
    )


# --- the service, over HTTP --------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: bytes
    ms: float


class Client:
    """One keep-alive HTTP/1.1 connection to the service (http.client: little client-side cost
    inside the timings)."""

    def __init__(self, base: str, timeout: float = HTTP_TIMEOUT_SECONDS) -> None:
        parts = urlsplit(base)
        self.base = base
        self.connection = http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout
        )

    def get(self, path: str) -> Reply:
        """GET `path`, timed from sending the request to the last byte of the body. A connection
        the server closed while idle is opened again and the request sent again, untimed."""
        for attempt in (1, 2):
            started = time.perf_counter()
            try:
                self.connection.request("GET", path)
                response = self.connection.getresponse()
                body = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.connection.close()
                if attempt == 2:
                    raise
                continue
            return Reply(response.status, body, (time.perf_counter() - started) * 1000)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.connection.close()


def dimension_values(client: Client) -> dict[str, list[str]]:
    """Every dimension's names, as the API lists them (GET /dimensions/{name})."""
    values = {}
    for name in DIMENSIONS:
        reply = client.get(f"/dimensions/{name}")
        if reply.status != 200:
            raise RuntimeError(f"GET /dimensions/{name}: {reply.status} {reply.body[:500]!r}")
        values[name] = list(json.loads(reply.body)["values"])
    return values


# --- answers, normalised for comparison --------------------------------------------------------

Row = dict[str, Any]


@dataclass
class Answer:
    """A page of groups with the totals and the number of groups, values as exact Python numbers
    (ints, Decimals) and group values as the API's text (ISO dates, names)."""

    rows: list[Row]
    totals: Row
    total_rows: int


def as_decimal(value: object) -> Decimal | None:
    """A JSON decimal string or number (parsed as Decimal) as a Decimal; null stays None."""
    if value is None:
        return None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int | str):
        return Decimal(value)
    raise TypeError(f"not a decimal: {value!r}")


def service_values(values: Mapping[str, Any], groups: Iterable[str]) -> Row:
    """A row (or the totals) from the service's JSON, normalised."""
    row: Row = {group: values[group] for group in groups}
    for metric in METRICS:
        value = values[metric]
        row[metric] = as_decimal(value) if metric in DECIMAL_FIELDS else value
    return row


def service_answer(body: bytes, question: Question) -> tuple[Answer, list[str]]:
    """The service's JSON answer, and what is wrong with its form (keys, limit, offset)."""
    data = json.loads(body, parse_float=Decimal)
    problems = []
    expected = {*question.group_by, *METRICS}
    for index, row in enumerate(data["rows"]):
        if set(row) != expected:
            problems.append(f"row {index} has keys {sorted(row)}, expected {sorted(expected)}")
            break
    if set(data["totals"]) != set(METRICS):
        problems.append(f"totals have keys {sorted(data['totals'])}")
    if (data["limit"], data["offset"]) != (question.limit, question.offset):
        problems.append(f"limit/offset {data['limit']}/{data['offset']} echoed")
    if problems:
        return Answer([], {}, -1), problems
    rows = [service_values(row, question.group_by) for row in data["rows"]]
    return Answer(rows, service_values(data["totals"], ()), data["total_rows"]), []


# --- DuckDB ------------------------------------------------------------------------------------

# Column types as in PostgreSQL: ids and date_id integer, counts bigint, cost numeric(14,2).
FACT_COLUMNS = (
    ("date_id", "INTEGER"), ("region_id", "INTEGER"), ("age_id", "INTEGER"),
    ("gender_id", "INTEGER"), ("platform_id", "INTEGER"), ("placement_id", "INTEGER"),
    ("device_type_id", "INTEGER"), ("impressions", "BIGINT"), ("clicks", "BIGINT"),
    ("cost", "DECIMAL(14,2)"), ("conversions", "BIGINT"), ("likes", "BIGINT"),
)  # fmt: skip
TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "fact_ad_metrics_daily": FACT_COLUMNS,
    "dim_date": (("date_id", "INTEGER"), ("date_value", "DATE")),
    **{
        t.table: ((t.id_column, "INTEGER"), (t.name_column, "VARCHAR")) for t in DIMENSIONS.values()
    },
}


async def export_tables(url: str, directory: Path) -> None:
    """Each table of the star schema as CSV in `directory`, through COPY ... TO STDOUT."""
    connection = await asyncpg.connect(url)
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            for table, columns in TABLES.items():
                await connection.copy_from_table(
                    table,
                    columns=[name for name, _ in columns],
                    output=str(directory / f"{table}.csv"),
                    format="csv",
                )
    finally:
        await connection.close()


def load_duckdb(url: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB database holding the same facts and dimensions as `url`, with
    explicit column types (nothing is inferred; no extension is loaded)."""
    connection = duckdb.connect(
        ":memory:",
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
    )
    with tempfile.TemporaryDirectory(prefix="bench-duckdb-") as name:
        directory = Path(name)
        asyncio.run(export_tables(url, directory))
        for table, columns in TABLES.items():
            definition = ", ".join(f"{column} {kind} NOT NULL" for column, kind in columns)
            connection.execute(f"CREATE TABLE {table} ({definition})")
            path = str(directory / f"{table}.csv").replace("'", "''")
            connection.execute(f"COPY {table} FROM '{path}' (FORMAT csv, HEADER false)")
    return connection


def group_expression(group: str) -> str:
    """The SQL of a group's value: the day, its ISO week's Monday, its month's 1st, a name."""
    if group == "date":
        return "dim_date.date_value"
    if group in ("week", "month"):
        # date_trunc('week') is the ISO week's Monday; it returns a timestamp, so back to DATE.
        return f"CAST(date_trunc('{group}', dim_date.date_value) AS DATE)"
    dimension = DIMENSIONS[group]
    return f"{dimension.table}.{dimension.name_column}"


def ratio_columns(prefix: str = "") -> str:
    """The five ratios of the sums `{prefix}impressions` etc., each as a whole number of
    millionths rounded half up (exactly, in integers: DuckDB divides decimals as doubles), NULL
    where the denominator is 0. Sorting on millionths sorts on the rounded ratio."""

    def millionths(numerator: str, denominator: str, label: str) -> str:
        # round(n / d, 6) * 10^6 = floor((2 * n * 10^6 + d) / (2 * d)) for n, d >= 0.
        d = f"{prefix}{denominator}"
        return f"({numerator} * 2 + {d}) // (2 * nullif({d}, 0)) AS {prefix}{label}"

    cents = f"CAST({prefix}cost * 100 AS HUGEINT)"  # cost/clicks * 10^6 = cents * 10^4 / clicks
    return ", ".join(
        (
            millionths(f"CAST({prefix}clicks AS HUGEINT) * 1000000", "impressions", "ctr"),
            millionths(f"{cents} * 10000", "clicks", "cpc"),
            millionths(f"{cents} * 10000000", "impressions", "cpm"),
            millionths(f"{cents} * 10000", "conversions", "cpa"),
            millionths(f"CAST({prefix}conversions AS HUGEINT) * 1000000", "clicks", "cvr"),
        )
    )


def order_by(question: Question) -> list[str]:
    """The documented order: the sort (nulls last either way), then the time group(s), then the
    other groups as given. The groups make the order total, so the page is well defined."""
    terms = []
    sorted_on = None
    if question.sort is not None:
        sorted_on = question.sort.removeprefix("-")
        direction = "DESC" if question.sort.startswith("-") else "ASC"
        terms.append(f'"{sorted_on}" {direction} NULLS LAST')
    default = [g for g in TIME_GROUPS if g in question.group_by] + [
        g for g in question.group_by if g not in TIME_GROUPS
    ]
    return terms + [f'"{g}" ASC' for g in default if g != sorted_on]


def duckdb_statement(
    question: Question, first: date, last: date, page: tuple[int, int] | None = None
) -> tuple[str, list[object]]:
    """One statement answering `question` over [first, last]: one row per page row (in order),
    each also carrying the totals and the number of groups; a single row of totals, with NULL
    groups, when the page is empty. `page` (limit, offset) replaces the question's."""
    limit, offset = page or (question.limit, question.offset)
    used = [name for name in DIMENSIONS if name in question.dimensions()]
    joins = ["JOIN dim_date ON dim_date.date_id = f.date_id"] + [
        f"JOIN {DIMENSIONS[n].table} ON {DIMENSIONS[n].table}.{DIMENSIONS[n].id_column}"
        f" = f.{DIMENSIONS[n].id_column}"
        for n in used
    ]
    conditions = ["dim_date.date_value BETWEEN ? AND ?"]
    params: list[object] = [first, last]
    for name, values in question.filters:
        column = f"{DIMENSIONS[name].table}.{DIMENSIONS[name].name_column}"
        conditions.append(f"lower({column}) IN ({', '.join('lower(?)' for _ in values)})")
        params += values
    groups = [f'{group_expression(g)} AS "{g}"' for g in question.group_by]
    sums = [f"sum(f.{m}) AS {m}" for m in MEASURES]
    # Grouped by something, empty groups never form; without groups, the sums of no facts form
    # one row, which is no group (an empty match has no rows).
    grouping = (
        f"GROUP BY {', '.join(str(i + 1) for i in range(len(groups)))}"
        if groups
        else "HAVING count(*) > 0"
    )
    order = order_by(question)
    order_sql = f"ORDER BY {', '.join(order)}" if order else ""
    group_columns = ", ".join(f'page."{g}"' for g in question.group_by)
    total_sums = ", ".join(f"coalesce(sum({m}), 0) AS total_{m}" for m in MEASURES)
    sql = f"""
        WITH grouped AS MATERIALIZED (
            SELECT {", ".join([*groups, *sums])}
            FROM fact_ad_metrics_daily f {" ".join(joins)}
            WHERE {" AND ".join(conditions)}
            {grouping}
        ),
        rated AS (SELECT *, {ratio_columns()} FROM grouped),
        page AS (
            SELECT *, row_number() OVER ({order_sql}) AS position
            FROM rated {order_sql} LIMIT ? OFFSET ?
        ),
        sums AS (SELECT count(*) AS total_rows, {total_sums} FROM grouped),
        totals AS (SELECT *, {ratio_columns("total_")} FROM sums)
        SELECT totals.*, page.position{", " + group_columns if group_columns else ""},
            {", ".join(f"page.{m}" for m in METRICS)}
        FROM totals LEFT JOIN page ON TRUE
        ORDER BY page.position
    """
    return sql, [*params, limit, offset]


def duckdb_value(metric: str, value: Any) -> Any:
    """A metric from DuckDB as the API states it: ratios from millionths to 6-place decimals."""
    if metric in RATIOS:
        return None if value is None else Decimal(int(value)).scaleb(-6)
    return int(value) if metric != "cost" else value


def group_text(value: Any) -> Any:
    """A group value as the API's JSON has it: dates in ISO form, names as they are."""
    return value.isoformat() if isinstance(value, date) else value


@dataclass
class Records:
    """A DuckDB result as fetched: column names and rows."""

    names: list[str]
    rows: list[tuple[Any, ...]]


def fetch_duckdb(
    connection: duckdb.DuckDBPyConnection,
    question: Question,
    today: date,
    page: tuple[int, int] | None = None,
) -> Records:
    """DuckDB's result for `question` (presets resolved against `today`): what is timed."""
    first, last = question.date_range(today)
    sql, params = duckdb_statement(question, first, last, page)
    cursor = connection.execute(sql, params)
    return Records([column[0] for column in cursor.description], cursor.fetchall())


def duckdb_answer(question: Question, records: Records) -> Answer:
    """DuckDB's result in the form the service's answer is compared in."""
    named = [dict(zip(records.names, row, strict=True)) for row in records.rows]
    head = named[0]
    totals = {m: duckdb_value(m, head[f"total_{m}"]) for m in METRICS}
    rows = [
        {g: group_text(r[g]) for g in question.group_by}
        | {m: duckdb_value(m, r[m]) for m in METRICS}
        for r in named
        if r["position"] is not None
    ]
    return Answer(rows, totals, int(head["total_rows"]))


def run_duckdb(
    connection: duckdb.DuckDBPyConnection,
    question: Question,
    today: date,
    page: tuple[int, int] | None = None,
) -> Answer:
    """DuckDB's answer to `question`."""
    return duckdb_answer(question, fetch_duckdb(connection, question, today, page))


def duckdb_ms(
    connection: duckdb.DuckDBPyConnection, question: Question, today: date, repeats: int
) -> list[float]:
    """`repeats` timings of DuckDB's statement for `question`, run and fetched (page, totals and
    the number of groups together), in ms."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fetch_duckdb(connection, question, today)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


# --- comparison --------------------------------------------------------------------------------


def frozen(row: Row) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(row.items()))


def compare(
    question: Question,
    service: Answer,
    duck: Answer,
    everything: Callable[[], Answer],
) -> tuple[list[str], bool]:
    """What differs between the two answers, and whether the pages differed only in the order
    of rows tied on the sort (which the API does not fix). Totals and total_rows must be equal;
    pages are equal row for row, except under an explicit sort, where the sort values must
    follow the same sequence and each row must be a real group (checked against every group,
    `everything`), each once."""
    problems = []
    if service.total_rows != duck.total_rows:
        problems.append(f"total_rows {service.total_rows} != DuckDB {duck.total_rows}")
    for metric in METRICS:
        if service.totals[metric] != duck.totals[metric]:
            problems.append(
                f"totals.{metric} {service.totals[metric]} != DuckDB {duck.totals[metric]}"
            )
    if service.rows == duck.rows:
        return problems, False
    if question.sort is None or len(service.rows) != len(duck.rows):
        problems.append(page_difference(service.rows, duck.rows))
        return problems, False
    key = question.sort.removeprefix("-")
    if [r[key] for r in service.rows] != [r[key] for r in duck.rows]:
        problems.append(page_difference(service.rows, duck.rows))
        return problems, False
    groups = {frozen(row) for row in everything().rows}
    seen = {frozen(row) for row in service.rows}
    if len(seen) != len(service.rows) or not seen <= groups:
        problems.append(page_difference(service.rows, duck.rows))
        return problems, False
    return problems, True


def page_difference(service: list[Row], duck: list[Row]) -> str:
    """The first difference between two pages, briefly."""
    if len(service) != len(duck):
        return f"page has {len(service)} rows, DuckDB's {len(duck)}"
    for index, (mine, theirs) in enumerate(zip(service, duck, strict=True)):
        if mine != theirs:
            fields = [k for k in theirs if mine.get(k) != theirs[k]]
            shown = ", ".join(f"{k}: {mine.get(k)} != {theirs[k]}" for k in fields[:4])
            return f"row {index} differs ({shown})"
    return "pages differ"


# --- running it --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One question's figures."""

    index: int
    question: Question
    path: str
    span_days: int
    status: int = 0
    body: bytes = b""
    service_samples: list[float] = field(default_factory=list)
    duckdb_samples: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    tied_order: bool = False
    total_rows: int = -1

    @property
    def service_ms(self) -> float:
        return statistics.median(self.service_samples)

    @property
    def duckdb_ms(self) -> float:
        return statistics.median(self.duckdb_samples)

    @property
    def faster(self) -> bool:
        return self.service_ms < self.duckdb_ms

    @property
    def dimension_class(self) -> str:
        count = len(self.question.dimensions())
        return f"{count}" if count < 4 else "4+"

    @property
    def span_class(self) -> str:
        for bound in (7, 31, 92, 366):
            if self.span_days <= bound:
                return f"<= {bound} d"
        return "> 366 d"


def data_days(url: str) -> tuple[date, date]:
    """The first and last day of dim_date: explicit ranges are placed relative to them."""

    async def read() -> tuple[date, date]:
        connection = await asyncpg.connect(url)
        try:
            row = await connection.fetchrow("SELECT min(date_value), max(date_value) FROM dim_date")
            return row[0], row[1]
        finally:
            await connection.close()

    return asyncio.run(read())


def utc_today() -> date:
    return datetime.now(UTC).date()


def time_service(client: Client, outcomes: list[Outcome], repeats: int) -> None:
    """A warm-up pass over every question (its answer is the one checked), then each question
    `repeats` times in a row, sequentially."""
    for number, outcome in enumerate(outcomes, 1):
        reply = client.get(outcome.path)
        outcome.status, outcome.body = reply.status, reply.body
        if reply.status != 200:
            loud(f"{reply.status} for {client.base}{outcome.path}: {reply.body[:500]!r}")
        progress("service warm-up", number, len(outcomes))
    for number, outcome in enumerate(outcomes, 1):
        for _ in range(repeats):
            reply = client.get(outcome.path)
            outcome.service_samples.append(reply.ms)
            if reply.status != outcome.status:
                message = f"{reply.status} (was {outcome.status}) for {client.base}{outcome.path}"
                outcome.problems.append(message)
                loud(message)
        progress("service timed", number, len(outcomes))


def time_duckdb(
    connection: duckdb.DuckDBPyConnection, outcomes: list[Outcome], today: date, repeats: int
) -> dict[int, Answer]:
    """Each question in DuckDB: once for the answer, then `repeats` timed runs."""
    answers = {}
    for number, outcome in enumerate(outcomes, 1):
        answers[outcome.index] = run_duckdb(connection, outcome.question, today)
        outcome.duckdb_samples = duckdb_ms(connection, outcome.question, today, repeats)
        progress("DuckDB", number, len(outcomes))
    return answers


def check(
    connection: duckdb.DuckDBPyConnection, outcome: Outcome, duck: Answer, today: date
) -> None:
    """Compare the service's answer with DuckDB's; the differences go to `outcome.problems`."""
    if outcome.status != 200:
        outcome.problems.append(f"status {outcome.status}: {outcome.body[:300]!r}")
        return
    service, form = service_answer(outcome.body, outcome.question)
    outcome.total_rows = service.total_rows
    if form:
        outcome.problems += form
        return

    def everything() -> Answer:
        return run_duckdb(connection, outcome.question, today, (max(1, duck.total_rows), 0))

    problems, outcome.tied_order = compare(outcome.question, service, duck, everything)
    outcome.problems += problems


def loud(message: str) -> None:
    print(f"!!! {message}", file=sys.stderr, flush=True)


def progress(stage: str, number: int, total: int) -> None:
    if number % 50 == 0 or number == total:
        print(f"  {stage}: {number}/{total}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile: the smallest value with at least `share` of them at or
    below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


@dataclass
class Figures:
    """Latency figures of a set of questions."""

    count: int
    p50: float
    p95: float
    max: float
    duckdb_p50: float
    duckdb_p95: float
    duckdb_max: float
    faster_share: float

    @classmethod
    def of(cls, outcomes: Sequence[Outcome]) -> "Figures":
        service = [o.service_ms for o in outcomes]
        duck = [o.duckdb_ms for o in outcomes]
        return cls(
            len(outcomes),
            percentile(service, 0.5),
            percentile(service, 0.95),
            max(service),
            percentile(duck, 0.5),
            percentile(duck, 0.95),
            max(duck),
            sum(o.faster for o in outcomes) / len(outcomes),
        )


@dataclass
class Heaviest:
    """The heaviest legal question, over HTTP, and DuckDB's time for it."""

    path: str
    statuses: list[int]
    seconds: list[float]
    duckdb_ms: float
    problems: list[str]

    @property
    def best_seconds(self) -> float:
        return min(self.seconds)


@dataclass
class WorkloadSummary:
    """Everything the workload measured, and what it ran on."""

    figures: Figures
    outcomes: list[Outcome]
    heaviest: Heaviest
    seed: int
    today: date
    first_day: date
    last_day: date

    @property
    def disagreements(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.problems]


def time_heaviest(
    client: Client,
    connection: duckdb.DuckDBPyConnection,
    question: Question,
    today: date,
    runs: int = 2,
) -> Heaviest:
    """The heaviest question `runs` times over HTTP (it may be slow, or 503 on the statement
    timeout: both are reported), then in DuckDB; answers compared when the service gave one."""
    path = question.path()
    statuses, seconds, body = [], [], b""
    for run in range(1, runs + 1):
        reply = client.get(path)
        statuses.append(reply.status)
        seconds.append(reply.ms / 1000)
        body = reply.body if reply.status == 200 else body
        print(f"  heaviest, run {run}: {reply.status} in {reply.ms / 1000:.1f} s", file=sys.stderr)
    duck = run_duckdb(connection, question, today)
    samples = duckdb_ms(connection, question, today, runs)
    outcome = Outcome(0, question, path, 0, 200 if body else statuses[-1], body)
    if body:
        check(connection, outcome, duck, today)
    return Heaviest(path, statuses, seconds, statistics.median(samples), outcome.problems)


def run_workload(
    url: str,
    serve: Callable[[], AbstractContextManager[str]],
    count: int,
    seed: int,
    json_path: Path | None = None,
) -> WorkloadSummary:
    """The whole scenario against the database at `url` (plain postgresql:// form): load DuckDB,
    start the service with `serve`, generate, time and check the questions, and print the
    report. `serve` yields the service's base URL."""
    started = time.perf_counter()
    print("workload: loading the facts into DuckDB ...", file=sys.stderr, flush=True)
    connection = load_duckdb(url)
    first_day, last_day = data_days(url)
    print(
        f"  loaded in {time.perf_counter() - started:.0f} s; data {first_day} .. {last_day}",
        file=sys.stderr,
    )
    with serve() as base:
        client = Client(base)
        try:
            values = dimension_values(client)
            today = utc_today()
            questions = generate_questions(count, seed, values, first_day, last_day)
            outcomes = []
            for index, question in enumerate(questions):
                first, last = question.date_range(today)
                span = (last - first).days + 1
                outcomes.append(Outcome(index, question, question.path(), span))
            print(f"workload: {count} questions (seed {seed}) ...", file=sys.stderr, flush=True)
            time_service(client, outcomes, REPEATS)
            print("workload: the heaviest legal question ...", file=sys.stderr, flush=True)
            heavy = heaviest_question(values, last_day)
            heaviest = time_heaviest(client, connection, heavy, today)
        finally:
            client.close()
    if utc_today() != today:
        loud(f"the UTC date changed during the run: presets were resolved against {today}")
    answers = time_duckdb(connection, outcomes, today, REPEATS)
    for outcome in outcomes:
        check(connection, outcome, answers[outcome.index], today)
    connection.close()
    summary = WorkloadSummary(
        Figures.of(outcomes), outcomes, heaviest, seed, today, first_day, last_day
    )
    print_report(summary, time.perf_counter() - started)
    if json_path is not None:
        write_json(json_path, summary)
    return summary


# --- the report --------------------------------------------------------------------------------


def print_report(summary: WorkloadSummary, seconds: float) -> None:
    """The workload's figures, its slowest questions, its classes and every problem found."""
    figures, outcomes = summary.figures, summary.outcomes
    print(
        f"\nWorkload: {figures.count} questions (seed {summary.seed}), each the median of"
        f" {REPEATS} runs; data {summary.first_day} .. {summary.last_day}, presets end"
        f" {summary.today}"
    )
    print(f"  {'':<10} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    print(f"  {'service':<10} {figures.p50:>9.1f} {figures.p95:>9.1f} {figures.max:>9.1f}")
    print(
        f"  {'DuckDB':<10} {figures.duckdb_p50:>9.1f} {figures.duckdb_p95:>9.1f}"
        f" {figures.duckdb_max:>9.1f}"
    )
    print(f"  service faster than DuckDB on {figures.faster_share:.0%} of the questions")
    agreeing = sum(not o.problems for o in outcomes)
    tied = sum(o.tied_order for o in outcomes)
    print(f"  answers agreeing with DuckDB: {agreeing}/{len(outcomes)}", end="")
    print(f" ({tied} only after allowing for rows tied on the sort)" if tied else "")

    print("\n  10 slowest questions (service ms, DuckDB ms, groups, URL):")
    for o in sorted(outcomes, key=lambda o: o.service_ms, reverse=True)[:10]:
        print(f"  {o.service_ms:>9.1f} {o.duckdb_ms:>8.1f} {o.total_rows:>7}  {o.path}")

    print(f"\n  {'class':<18} {'n':>4} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}", end="")
    print(f" {'DuckDB p50':>10} {'faster':>7}")
    classes: list[tuple[str, Callable[[Outcome], str], list[str]]] = [
        ("dimensions", lambda o: o.dimension_class, ["0", "1", "2", "3", "4+"]),
        ("range", lambda o: o.span_class, ["<= 7 d", "<= 31 d", "<= 92 d", "<= 366 d", "> 366 d"]),
    ]
    for title, class_of, names in classes:
        for name in names:
            members = [o for o in outcomes if class_of(o) == name]
            if not members:
                print(f"  {f'{title} {name}':<18} {0:>4}")
                continue
            f = Figures.of(members)
            print(
                f"  {f'{title} {name}':<18} {f.count:>4} {f.p50:>9.1f} {f.p95:>9.1f}"
                f" {f.max:>9.1f} {f.duckdb_p50:>10.1f} {f.faster_share:>7.0%}"
            )

    heaviest = summary.heaviest
    runs = ", ".join(
        f"{status} in {s:.1f} s"
        for status, s in zip(heaviest.statuses, heaviest.seconds, strict=True)
    )
    print(f"\n  heaviest legal question: {runs}; DuckDB {heaviest.duckdb_ms:.0f} ms")
    print(f"    {heaviest.path}")
    for problem in heaviest.problems:
        print(f"    !!! {problem}")

    if summary.disagreements:
        print(f"\n  !!! {len(summary.disagreements)} question(s) not answered as DuckDB does:")
        for o in summary.disagreements:
            print(f"  !!! {o.path}")
            for problem in o.problems:
                print(f"        {problem}")
    print(f"\n  workload took {seconds:.0f} s")


def write_json(path: Path, summary: WorkloadSummary) -> None:
    """Per-question results, for looking into them later."""
    records = [
        {
            "index": o.index,
            "url": o.path,
            "status": o.status,
            "span_days": o.span_days,
            "dimensions": sorted(o.question.dimensions()),
            "group_by": list(o.question.group_by),
            "total_rows": o.total_rows,
            "service_ms": round(o.service_ms, 3),
            "duckdb_ms": round(o.duckdb_ms, 3),
            "service_samples_ms": [round(s, 3) for s in o.service_samples],
            "duckdb_samples_ms": [round(s, 3) for s in o.duckdb_samples],
            "faster": o.faster,
            "agrees": not o.problems,
            "tied_order": o.tied_order,
            "problems": o.problems,
        }
        for o in summary.outcomes
    ]
    heaviest = summary.heaviest
    document = {
        "seed": summary.seed,
        "today": summary.today.isoformat(),
        "data": [summary.first_day.isoformat(), summary.last_day.isoformat()],
        "repeats": REPEATS,
        "questions": records,
        "heaviest": {
            "url": heaviest.path,
            "statuses": heaviest.statuses,
            "seconds": heaviest.seconds,
            "duckdb_ms": heaviest.duckdb_ms,
            "problems": heaviest.problems,
        },
    }
    path.write_text(json.dumps(document, indent=1) + "\n")
