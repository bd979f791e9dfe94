"""The ad-metrics use cases: answering a question (its range and rules, filter names to ids, the
table that answers it, the page, CSV rows) and loading facts (the one pipeline of seed-metrics
and load-metrics)."""

import asyncio
import csv
import io
import json
import time
from calendar import monthrange
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
)
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from itertools import groupby
from typing import Any, Literal

import numpy as np
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel.ext.asyncio.session import AsyncSession

import crud
import cube
from errors import ErrorItem, InvalidParameters
from metrics_data import (
    DEMO_VALUES,
    FACT_COLUMNS,
    MAX_LISTED_ERRORS,
    CsvCheck,
    demo_combinations,
    demo_day,
    staging_line,
)
from models import (
    COMPARED,
    CONDITION_OPERATORS,
    CUBE_MAX_DIMENSIONS,
    DAY_GROUPS,
    DIMENSIONS,
    MEASURES,
    METRICS,
    MONEY_METRICS,
    TIME_GROUPS,
    Dimension,
    MetricsComparison,
    MetricsCsvRow,
    MetricsPage,
    MetricsPart,
    MetricsPlan,
    MetricsQuery,
    MetricsQuestion,
    PartSource,
    cents_text,
    compared_fields,
    date_id_of,
    decimal_text,
    dimension_mask,
    float_or_none,
)
from observability import METRICS_DURATION, METRICS_QUESTIONS

# An unknown filter value's error lists the known ones when there are at most this many.
MAX_LISTED_VALUES = 30
# From this many rows on, a load checks foreign keys once for the whole load rather than per row
# (see crud.foreign_keys_checked_once); below it, re-checking a large table costs more.
BULK_ROWS = 100_000

# --- the range and the rules between parameters ------------------------------------------------


def _quarter_start(day: date) -> date:
    return day.replace(month=(day.month - 1) // 3 * 3 + 1, day=1)


def _month_before(day: date) -> date:
    """The first day of the month before `day`'s."""
    return (day.replace(day=1) - timedelta(days=1)).replace(day=1)


def _days_ending(count: int) -> Callable[[date], tuple[date, date]]:
    return lambda today: (today - timedelta(days=count - 1), today)


# Each preset's range, inclusive, from today (UTC). Weeks start on Monday, as ISO's do.
PRESETS: dict[str, Callable[[date], tuple[date, date]]] = {
    "yesterday": lambda today: (today - timedelta(days=1), today - timedelta(days=1)),
    "last_7d": _days_ending(7),
    "last_14d": _days_ending(14),
    "last_30d": _days_ending(30),
    "last_90d": _days_ending(90),
    "this_week": lambda today: (today - timedelta(days=today.weekday()), today),
    "last_week": lambda today: (
        today - timedelta(days=today.weekday() + 7),
        today - timedelta(days=today.weekday() + 1),
    ),
    "this_month": lambda today: (today.replace(day=1), today),
    "last_month": lambda today: (_month_before(today), today.replace(day=1) - timedelta(days=1)),
    "this_quarter": lambda today: (_quarter_start(today), today),
    "last_quarter": lambda today: (
        _quarter_start(_quarter_start(today) - timedelta(days=1)),
        _quarter_start(today) - timedelta(days=1),
    ),
    "this_year": lambda today: (today.replace(month=1, day=1), today),
    "last_year": lambda today: (date(today.year - 1, 1, 1), date(today.year - 1, 12, 31)),
}


def date_range(query: MetricsQuestion, today: date) -> tuple[date, date]:
    """The inclusive range asked for: the dates, else the preset (default last_30d)."""
    if query.start_date is not None and query.end_date is not None:
        return query.start_date, query.end_date
    return PRESETS[query.preset or "last_30d"](today)


def previous_range(start: date, end: date, compare: MetricsComparison) -> tuple[date, date]:
    """The earlier period of a comparison: as many days just before the range, or the same
    dates a year earlier (a range ending on a month's last day ends on that month's last day,
    so whole months stay whole; one starting on 29 February starts on 1 March, as 29 February
    has no day a year earlier; only a range of 29 February alone has none). OverflowError
    before 0001-01-01."""
    if compare == "previous_period":
        return start - timedelta(days=(end - start).days + 1), start - timedelta(days=1)
    if start.year == date.min.year:
        raise OverflowError("date value out of range")
    if (start.month, start.day) == (2, 29):
        first = date(start.year - 1, 3, 1)
    else:
        first = start.replace(year=start.year - 1)
    if end.day == monthrange(end.year, end.month)[1]:
        last = date(end.year - 1, end.month, monthrange(end.year - 1, end.month)[1])
    else:
        last = end.replace(year=end.year - 1)  # not 29 February: that is a month's last day
    return first, last


def comparison_shift(start: date, end: date, compare: MetricsComparison) -> tuple[int, int]:
    """(years, days) that carry a day of the earlier period onto the day of the range it is
    compared with: as many days later as the range is long, or a year later (PostgreSQL's
    date + interval '1 year' takes 29 February to 28 February)."""
    return (0, (end - start).days + 1) if compare == "previous_period" else (1, 0)


def returned_fields(query: MetricsQuestion) -> tuple[str, ...]:
    """The metrics a question returns: those of fields=, in their order, else all of them; with
    compare, then their previous values and their changes."""
    fields = tuple(dict.fromkeys(query.fields)) or METRICS
    return compared_fields(fields) if query.compare else fields


def _needs_compare(name: str, query: MetricsQuestion) -> bool:
    """Whether a metric named by sort or where is a previous value or change with no compare."""
    return name.startswith(COMPARED) and not query.compare


def rule_problems(query: MetricsQuestion, today: date, max_span_days: int) -> list[ErrorItem]:
    """Each rule between the parameters that the question breaks, as (loc, message)."""
    problems: list[ErrorItem] = []
    start, end = query.start_date, query.end_date
    if (start is None) != (end is None):
        missing = "end_date" if end is None else "start_date"
        problems.append(
            (["query", missing], "start_date and end_date go together (or use a preset)")
        )
    elif start is not None and end is not None and start > end:
        problems.append((["query", "end_date"], f"start_date {start} is after end_date {end}"))
    if query.preset is not None and (start is not None or end is not None):
        problems.append(
            (["query", "preset"], "give either preset or start_date/end_date, not both")
        )
    if not problems:
        first, last = date_range(query, today)
        if (last - first).days + 1 > max_span_days:
            problems.append(
                (["query", "end_date"], f"the range spans more than {max_span_days} days")
            )
        problems += _comparison_problems(query, first, last)
    repeated = sorted({group for group in query.group_by if query.group_by.count(group) > 1})
    if repeated:
        problems.append(
            (["query", "group_by"], f"repeated group_by value(s): {', '.join(repeated)}")
        )
    repeated_fields = sorted({name for name in query.fields if query.fields.count(name) > 1})
    if repeated_fields:
        problems.append(
            (["query", "fields"], f"repeated fields value(s): {', '.join(repeated_fields)}")
        )
    returned = returned_fields(query)
    for text in query.where:
        metric = parse_condition(text)[0]
        if metric not in returned:
            why = "needs compare" if _needs_compare(metric, query) else "fields leaves out; add it"
            problems.append((["query", "where"], f"{text!r} is on {metric}, which {why}"))
    allowed = [*dict.fromkeys(query.group_by), *returned]
    sorted_on = (query.sort or "").removeprefix("-")
    if query.sort is not None and sorted_on not in allowed:
        why = "it needs compare" if _needs_compare(sorted_on, query) else "it is not in the result"
        problems.append(
            (
                ["query", "sort"],
                f"cannot sort on {sorted_on!r}: {why}; allowed: {', '.join(allowed)}",
            )
        )
    return problems


def _comparison_problems(query: MetricsQuestion, start: date, end: date) -> list[ErrorItem]:
    """The earlier period of a comparison must lie in the calendar."""
    if query.compare is None:
        return []
    try:
        previous_range(start, end, query.compare)
    except OverflowError:
        return [(["query", "compare"], f"the {query.compare} would start before 0001-01-01")]
    return []


# Problems of a question are listed in the order of its parameters.
PARAMETER_ORDER = {name: index for index, name in enumerate(MetricsQuery.model_fields)}


def in_parameter_order(items: list[ErrorItem]) -> list[ErrorItem]:
    def position(item: ErrorItem) -> int:
        loc = item[0]  # ["query", parameter]
        return PARAMETER_ORDER.get(str(loc[1]), 0) if len(loc) > 1 else 0

    return sorted(items, key=position)


# --- filter names to ids -----------------------------------------------------------------------


@dataclass
class DimensionNames:
    """One dimension's names as the cache holds them."""

    loaded_at: float
    names: list[str]
    ids_by_key: dict[str, list[int]]


@dataclass
class NameCache:
    """Dimension names to ids, matched case-insensitively. A dimension is reloaded when a name is
    not found (new values appear without a restart) or when its entry is older than `max_age`."""

    max_age: float = 300.0
    entries: dict[str, DimensionNames] = field(default_factory=dict)


async def _load_names(db: crud.Executor, cache: NameCache, dimension: Dimension) -> DimensionNames:
    rows = await crud.dimension_values(db, dimension)
    ids_by_key: dict[str, list[int]] = {}
    for row_id, name in rows:
        ids_by_key.setdefault(name.casefold(), []).append(row_id)
    entry = DimensionNames(time.monotonic(), [name for _, name in rows], ids_by_key)
    cache.entries[dimension.name] = entry
    return entry


async def resolve_names(
    db: crud.Executor, cache: NameCache, dimension: Dimension, names: Iterable[str]
) -> tuple[list[int], list[str], list[str]]:
    """The ids of `names`, the names that do not exist, and every known name."""
    wanted = list(names)
    entry = cache.entries.get(dimension.name)
    stale = entry is None or time.monotonic() - entry.loaded_at > cache.max_age
    if entry is None or stale or any(n.casefold() not in entry.ids_by_key for n in wanted):
        entry = await _load_names(db, cache, dimension)
    ids = [i for name in wanted for i in entry.ids_by_key.get(name.casefold(), [])]
    unknown = [name for name in wanted if name.casefold() not in entry.ids_by_key]
    return sorted(set(ids)), unknown, entry.names


def name_filters(query: MetricsQuestion, prefix: str = "") -> dict[str, list[str]]:
    """The name filters that were given (prefix "exclude_": the exclusions), by dimension."""
    return {
        name: getattr(query, prefix + name) for name in DIMENSIONS if getattr(query, prefix + name)
    }


async def filter_ids(
    db: crud.Executor, cache: NameCache, query: MetricsQuestion, prefix: str = ""
) -> tuple[dict[str, list[int]], list[ErrorItem]]:
    """Ids of the filter names (or, prefix "exclude_", of the exclusions), and a problem naming
    each dimension's unknown ones (with the known ones, when few)."""
    ids: dict[str, list[int]] = {}
    problems: list[ErrorItem] = []
    for name, values in name_filters(query, prefix).items():
        found, unknown, known = await resolve_names(db, cache, DIMENSIONS[name], values)
        if unknown:
            allowed = (
                f"allowed: {', '.join(known)}"
                if len(known) <= MAX_LISTED_VALUES
                else f"see GET /dimensions/{name}"
            )
            listed = ", ".join(repr(value) for value in unknown)
            problems.append((["query", prefix + name], f"unknown {name} {listed}; {allowed}"))
        ids[name] = found
    return ids, problems


def parse_condition(text: str) -> tuple[str, str, Decimal]:
    """(metric, operator, number) of a condition the schema has checked (CONDITION_PATTERN)."""
    for operator in CONDITION_OPERATORS:
        metric, found, number = text.partition(operator)
        if found:
            return metric, operator, Decimal(number)
    raise ValueError(text)  # the schema let through no other


async def narrowing(
    db: crud.Executor, cache: NameCache, filters: dict[str, list[int]]
) -> dict[str, list[int]]:
    """The filters that narrow the question. One that names every value of its dimension (as the
    database holds them now, not as cached) is no filter: without it a smaller cube answers."""
    kept: dict[str, list[int]] = {}
    for name, ids in filters.items():
        if _names_all(cache.entries[name], ids):
            fresh = await _load_names(db, cache, DIMENSIONS[name])  # a value may have been added
            if _names_all(fresh, ids):
                continue
        kept[name] = ids
    return kept


def _names_all(entry: DimensionNames, ids: Collection[int]) -> bool:
    return {i for found in entry.ids_by_key.values() for i in found} <= set(ids)


# --- the answer --------------------------------------------------------------------------------


# What reading the facts costs, in units of one fact read by a range scan (measured on 10M facts
# here: 90 ns a fact scanned, 1.1 µs a primary-key probe, 100 ns a key entry visited after one).
# A day is assumed to hold FACTS_PER_DAY facts, the size the service is built for.
PROBE_COST = 12.0
VISIT_COST = 1.1
FACTS_PER_DAY = 27_398


def month_id_of(day: date) -> int:
    return day.year * 100 + day.month


def day_of_month(month_id: int, day: int) -> date:
    """A day of a month_id's month; month_id + 1 past December is the next January."""
    year, month = divmod(month_id, 100)
    if month == 13:
        year, month = year + 1, 1
    return date(year, month, day)


def split_range(start: date, end: date) -> list[tuple[date, date, bool]]:
    """The range as (first, last, whole_months): the days before the first whole month, the
    whole months, the days after them; or all of it as days when it holds no whole month."""
    first_whole = start if start.day == 1 else _next_month(start)
    last_whole = end if end.day == monthrange(end.year, end.month)[1] else _month_before_end(end)
    if first_whole is None or last_whole is None or first_whole > last_whole:
        return [(start, end, False)]
    pieces = [(start, first_whole - timedelta(days=1), False)] if start < first_whole else []
    pieces.append((first_whole, last_whole, True))
    if last_whole < end:
        pieces.append((last_whole + timedelta(days=1), end, False))
    return pieces


def _next_month(day: date) -> date | None:
    """The first day of the month after `day`'s (None past the calendar's end)."""
    if day.year == date.max.year and day.month == 12:
        return None
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def _month_before_end(day: date) -> date | None:
    """The last day of the month before `day`'s (None before the calendar's start)."""
    if day.year == date.min.year and day.month == 1:
        return None
    return day.replace(day=1) - timedelta(days=1)


def day_source(filters: Mapping[str, list[int]], sizes: Mapping[str, int], mask: int) -> PartSource:
    """Where days are read from: the daily cube when it holds the question's dimensions; else the
    facts, by a range scan or by probing the primary key down to the depth that costs least.

    Probing to depth d enumerates every combination of the key's first d dimensions (a filter's
    ids, or all of a dimension's) and visits the facts under each, checking deeper filters."""
    if mask.bit_count() <= CUBE_MAX_DIMENSIONS:
        return "daily", 0
    best: PartSource = ("facts", 0)
    if not filters:
        return best
    order = list(DIMENSIONS)  # the facts' primary key after date_id
    cheapest = float(FACTS_PER_DAY)
    probes, share = 1.0, 1.0
    for depth, name in enumerate(order, start=1):
        if name in filters:
            probes *= len(filters[name])
            share *= len(filters[name]) / max(sizes[name], 1)
            cost = probes * PROBE_COST + FACTS_PER_DAY * share * VISIT_COST
            if cost < cheapest:
                best, cheapest = ("fact_probes", depth), cost
        else:
            probes *= sizes[name]
    return best


def plan_parts(
    start: date,
    end: date,
    group_by: Collection[str],
    days_from: PartSource,
    whole_months: bool = True,
) -> tuple[MetricsPart, ...]:
    """Where each part of the range is read from: whole months from the monthly cube (unless the
    question is grouped by date, week or day of the week, or not `whole_months`), the other
    days from `days_from`."""
    source, depth = days_from
    if set(DAY_GROUPS) & set(group_by) or not whole_months:
        return (MetricsPart(source, date_id_of(start), date_id_of(end), depth),)
    return tuple(
        MetricsPart("monthly", month_id_of(first), month_id_of(last))
        if whole
        else MetricsPart(source, date_id_of(first), date_id_of(last), depth)
        for first, last, whole in split_range(start, end)
    )


async def plan_question(
    db: crud.Executor,
    cache: NameCache,
    query: MetricsQuestion,
    today: date,
    max_span_days: int,
    page: tuple[int, int] = (0, 0),
) -> MetricsPlan:
    """The plan of a question (`page`: its limit and offset); one 422 (InvalidParameters)
    listing every problem when it breaks rules or names unknown values."""
    problems = rule_problems(query, today, max_span_days)
    filters, unknown = await filter_ids(db, cache, query)
    excludes, unknown_excluded = await filter_ids(db, cache, query, "exclude_")
    if problems or unknown or unknown_excluded:
        raise InvalidParameters(in_parameter_order([*problems, *unknown, *unknown_excluded]))
    start, end = date_range(query, today)
    filters = await narrowing(db, cache, filters)
    used = [*filters, *excludes, *(g for g in query.group_by if g in DIMENSIONS)]
    mask = dimension_mask(used)
    sizes = {name: len(entry.names) for name, entry in cache.entries.items()}
    if mask.bit_count() > CUBE_MAX_DIMENSIONS and filters:  # the probes' cost needs every size
        for name in DIMENSIONS:
            if name not in sizes:
                sizes[name] = len((await resolve_names(db, cache, DIMENSIONS[name], []))[2])
    days_from = day_source(filters, sizes, mask)
    grouped = set(query.group_by)
    previous: tuple[MetricsPart, ...] = ()
    shift = (0, 0)
    if query.compare is not None:
        first, last = previous_range(start, end, query.compare)
        shift = comparison_shift(start, end, query.compare)
        # Carried some days later, a month of the earlier period can span two of the range's:
        # grouped by time, it is read by days. A year later, a month is the same month.
        by_days = query.compare == "previous_period" and bool(set(TIME_GROUPS) & grouped)
        previous = plan_parts(first, last, query.group_by, days_from, whole_months=not by_days)
    return MetricsPlan(
        parts=plan_parts(start, end, query.group_by, days_from),
        previous=previous,
        shift=shift,
        set_mask=mask,
        filters=filters,
        excludes=excludes,
        conditions=tuple(parse_condition(text) for text in query.where),
        fields=returned_fields(query),
        group_by=tuple(query.group_by),
        sort=query.sort,
        limit=page[0],
        offset=page[1],
    )


async def answer(
    db: crud.Executor, cache: NameCache, query: MetricsQuery, today: date, max_span_days: int
) -> MetricsPage:
    """The page of groups, the totals and the number of groups a question asks for (counted by
    where each part of it was read from, and timed, for operators)."""
    page = (query.limit, query.offset)
    with METRICS_DURATION.time():
        plan = await plan_question(db, cache, query, today, max_span_days, page)
        answered = await crud.query_metrics(db, plan)
    count_sources(plan)
    return answered


def count_sources(plan: MetricsPlan) -> None:
    """For operators: where each part of a question, its earlier period's too, was read from."""
    for part in (*plan.parts, *plan.previous):
        METRICS_QUESTIONS.labels(part.source).inc()


# --- exports ------------------------------------------------------------------------------------

# A cell a spreadsheet would run as a formula (OWASP's CSV injection rule).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
ExportFormat = Literal["csv", "ndjson"]
Money = Literal["decimal", "micros"]
Cell = Callable[[Any], Any]
COMPACT = (",", ":")  # JSON without spaces


def is_money(column: str) -> bool:
    return column.removeprefix("previous_") in MONEY_METRICS


def export_columns(plan: MetricsPlan, money: Money) -> list[str]:
    """The header of an export: the groups, then the metrics (money=micros: `cost_micros`...)."""
    micros = money == "micros"
    return [*plan.group_by, *(f"{m}_micros" if micros and is_money(m) else m for m in plan.fields)]


def guarded_name(value: str) -> str:
    """A name as a CSV cell: one a spreadsheet would take for a formula (a dimension named
    `=HYPERLINK(...)`) gets a leading `'`, so it stays text."""
    return f"'{value}" if value.startswith(FORMULA_STARTS) else value


def _micros(value: Decimal | None) -> int | None:
    return None if value is None else int(value.scaleb(6))  # at most 6 places: exact


def _isoformat(value: date | int | None) -> str | int | None:
    return value.isoformat() if isinstance(value, date) else value  # day_of_week is a number


def _cell(column: str, kind: ExportFormat, money: Money, escape_formulas: bool) -> Cell | None:
    """How a column's database value is written (None: as it is). CSV writes dates, integers
    and decimals as their text; NDJSON writes each as GET /metrics does in JSON."""
    metric = column.removeprefix("previous_")
    if column in DIMENSIONS:
        return guarded_name if kind == "csv" and escape_formulas else None
    if column in TIME_GROUPS:
        return _isoformat if kind == "ndjson" else None
    if metric in MONEY_METRICS:
        if money == "micros":
            return _micros
        if kind == "ndjson":
            return cents_text if metric == "cost" else decimal_text
        return None
    if metric in MEASURES:  # sums of bigints are numeric in PostgreSQL: integral decimals
        return int if kind == "ndjson" else None
    return float_or_none if kind == "ndjson" else None  # the other ratios, and the changes


def _converted(cells: list[Cell | None]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """A row with each value written as its column says (None stays None)."""
    pairs = [(n, cell) for n, cell in enumerate(cells) if cell is not None]

    def convert(row: tuple[Any, ...]) -> tuple[Any, ...]:
        values = list(row)
        for n, cell in pairs:
            if values[n] is not None:
                values[n] = cell(values[n])
        return tuple(values)

    return convert


async def export_lines(
    db: AsyncConnection,
    plan: MetricsPlan,
    kind: ExportFormat,
    money: Money = "decimal",
    escape_formulas: bool = True,
) -> AsyncIterator[str]:
    """Every row of a question, as CSV (a header first) or NDJSON, read through a server-side
    cursor a batch at a time, so memory holds one batch whatever the number of rows."""
    count_sources(plan)
    columns = export_columns(plan, money)
    cells = [_cell(c, kind, money, escape_formulas) for c in (*plan.group_by, *plan.fields)]
    convert = _converted(cells) if any(cells) else None
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # None is an empty cell
    if kind == "csv":
        writer.writerow(columns)
    async for batch in crud.stream_metrics_rows(db, plan):
        rows = batch if convert is None else [convert(row) for row in batch]
        if kind == "csv":
            writer.writerows(rows)
        else:
            for row in rows:
                buffer.write(json.dumps(dict(zip(columns, row, strict=True)), separators=COMPACT))
                buffer.write("\n")
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


# --- loading facts -----------------------------------------------------------------------------

# Told how many more rows have been written, for a progress display.
RowsWritten = Callable[[int], None]


async def write_facts(
    session: AsyncSession,
    days: Collection[date],
    write: Callable[[], Awaitable[int]],
    bulk: bool,
    writes_cubes: bool = False,
) -> int:
    """The one way facts are written: the days in `dim_date`, the facts `write` writes (for a bulk
    load with the foreign keys checked once), the cubes of those days' months summed again (by
    `write` itself when `writes_cubes`, from the rows it writes) and fresh planner statistics,
    committed together. Returns what `write` returns (facts written)."""
    await crud.take_the_writers_turn(session)  # before any facts are read (a no-op if held)
    await crud.ensure_dates(session, days)
    if bulk:
        async with crud.foreign_keys_checked_once(session):
            written = await write()
    else:
        written = await write()
    if not writes_cubes:
        await refresh_cubes(session, days)
    await crud.after_bulk_load(session)
    await session.commit()
    return written


# A month's facts as the cubes are summed from them: a binary COPY of crud.FACT_CELLS, or
# columns (date_id, the dimension ids, the measures with cost in cents).
MonthFacts = tuple[int, bytes | list[cube.Array]]


async def _read_months(session: AsyncSession, days: Collection[date]) -> AsyncIterator[MonthFacts]:
    """The facts of the months of these days, a month at a time (memory holds one month)."""
    for month in sorted({month_id_of(day) for day in days}):
        yield month, await crud.read_fact_cells(session, month * 100 + 1, month * 100 + 31)


async def replace_cubes(session: AsyncSession, months: AsyncIterable[MonthFacts]) -> None:
    """Replace the cubes' rows of each month by the sums of its facts. Each month is summed in a
    thread while the next one is read or written, so the database and the summing overlap."""
    summing: tuple[int, asyncio.Task[tuple[bytes, bytes]]] | None = None
    try:
        async for month, facts in months:
            if summing is not None:
                await _replace_cube_rows(session, *summing)
                summing = None
            if isinstance(facts, bytes):
                task = asyncio.to_thread(cube.cube_copies, facts, crud.FACT_CELL_TYPES)
            else:
                task = asyncio.to_thread(cube.cube_copies_of, facts)
            summing = (month, asyncio.create_task(task))
        if summing is not None:
            await _replace_cube_rows(session, *summing)
            summing = None
    finally:
        if summing is not None:  # a failure elsewhere: the sum in flight is not left dangling
            await asyncio.gather(summing[1], return_exceptions=True)


async def refresh_cubes(session: AsyncSession, days: Collection[date]) -> None:
    """Sum the cubes' rows of the months of these days again from the facts."""
    await replace_cubes(session, _read_months(session, days))


async def _replace_cube_rows(
    session: AsyncSession, month: int, summing: asyncio.Task[tuple[bytes, bytes]]
) -> None:
    daily, monthly = await summing
    await crud.replace_cube_rows(session, month, daily, monthly)


async def dimension_ids(
    session: AsyncSession, names: Mapping[str, Iterable[str]]
) -> dict[str, dict[str, int]]:
    """Per dimension, casefolded name -> id, adding the names the dimension lacks."""
    return {
        dimension: await crud.ensure_dimension_values(session, DIMENSIONS[dimension], values)
        for dimension, values in names.items()
    }


# The fact's columns (FACT_COLUMNS) as a binary COPY writes them.
FACT_FIELDS = (*(">i4",) * (1 + len(DIMENSIONS)), ">i8", ">i8", cube.CENTS, ">i8", ">i8")


async def seed_facts(
    session: AsyncSession, days: int, rows_per_day: int, seed: int, end: date, progress: RowsWritten
) -> int:
    """The demo dimensions and `days` days of demo facts ending `end`, replacing those days'
    facts; returns how many facts were written."""
    await crud.take_the_writers_turn(session)  # before its days' facts are deleted
    by_name = await dimension_ids(session, DEMO_VALUES)
    ids = {
        name: [by_name[name][value.casefold()] for value in values]
        for name, values in DEMO_VALUES.items()
    }
    combinations = demo_combinations(ids)
    first = end - timedelta(days=days - 1)
    all_days = [first + timedelta(days=offset) for offset in range(days)]
    await crud.delete_facts(session, date_id_of(first), date_id_of(end))

    async def months() -> AsyncIterator[MonthFacts]:
        """Each month's facts, loaded (one binary COPY a month) and handed on to be summed."""
        for month, month_days in groupby(all_days, key=month_id_of):
            columns = [demo_day(day, rows_per_day, seed, combinations) for day in month_days]
            month_facts = [np.concatenate(column) for column in zip(*columns, strict=True)]
            del columns  # memory holds a month of facts, once
            await crud.copy_binary(
                session,
                "fact_ad_metrics_daily",
                cube.write_copy(month_facts, FACT_FIELDS),
                FACT_COLUMNS,
            )
            progress(len(month_facts[0]))
            last_day = day_of_month(month + 1, 1) - timedelta(days=1)
            if first <= day_of_month(month, 1) and last_day <= end:
                yield month, month_facts
            else:  # the month has days the seed does not write, and may have facts on them
                yield month, await crud.read_fact_cells(session, month * 100 + 1, month * 100 + 31)

    async def write() -> int:
        await replace_cubes(session, months())
        return days * rows_per_day

    return await write_facts(session, all_days, write, bulk=True, writes_cubes=True)


@dataclass
class Loaded:
    """What a load-metrics run did: facts written, or the keys the file gives more than once (the
    line numbers of the first MAX_LISTED_ERRORS, and how many there are), and then nothing."""

    written: int = 0
    repeated: list[list[int]] = field(default_factory=list)
    repeated_count: int = 0


async def load_facts(
    session: AsyncSession,
    check: CsvCheck,
    rows: Callable[[], Iterable[tuple[int, MetricsCsvRow]]],
    progress: RowsWritten,
) -> Loaded:
    """Upsert the checked rows of a file (`rows` reads them again), adding the dimension values
    they name (each as first spelled in the file). Nothing is written when the file has errors
    (`check.errors`) or gives a key twice; the staging runs on a malformed file too, so that one
    run reports both."""
    await crud.take_the_writers_turn(session)  # before the facts are staged against
    ids = await dimension_ids(
        session, {dimension: names.values() for dimension, names in check.names.items()}
    )

    async def lines() -> AsyncIterable[bytes]:
        for number, row in rows():
            yield staging_line(number, row, ids).encode()
            progress(1)

    repeated, repeated_count = await crud.stage_facts(session, lines(), MAX_LISTED_ERRORS)
    if check.errors or repeated:
        await session.rollback()
        return Loaded(repeated=repeated, repeated_count=repeated_count)
    written = await write_facts(
        session,
        check.dates,
        lambda: crud.upsert_staged_facts(session),
        bulk=check.rows >= BULK_ROWS,
    )
    return Loaded(written=written)
