"""The analytics statement builder: a plan in, one SQL statement and its bind values out."""

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    CTE,
    BindParameter,
    ColumnElement,
    Date,
    FromClause,
    Integer,
    Label,
    Numeric,
    Select,
    Table,
    UnaryExpression,
    and_,
    bindparam,
    cast,
    func,
    literal,
    true,
    union_all,
)
from sqlalchemy import select as core_select
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import TypeEngine

from models import (
    CUBE_DAILY,
    CUBE_MONTHLY,
    DIMENSIONS,
    MEASURES,
    METRICS,
    TIME_GROUPS,
    FactAdMetricsDaily,
    MetricsPlan,
    MetricsSource,
    PartSource,
    date_id_of,
    dimensions_of,
    table_of,
)

FACT = table_of(FactAdMetricsDaily)

# --- bind parameters ---------------------------------------------------------------------------

# One instance each: a Bind is made per value on every run, and these carry no state.
_INTEGER = Integer()
_INTEGER_ARRAY = postgresql.ARRAY(Integer)
_NUMERIC = Numeric()


@dataclass(frozen=True, slots=True)
class Bind:
    """A value the statement is run with. The builder places it with `param()` and _values
    keys it by `name`; both get the Bind from the functions and constants here, so a
    placeholder and its value cannot drift apart."""

    name: str
    sql_type: TypeEngine[Any] = _INTEGER
    expanding: bool = False  # a list bound as one placeholder per item, for IN

    def param(self) -> BindParameter[Any]:
        return bindparam(self.name, type_=self.sql_type, expanding=self.expanding)


# A part is numbered across the range's parts and then the earlier period's.
def first_id(part: int) -> Bind:
    return Bind(f"first_{part}")


def last_id(part: int) -> Bind:
    return Bind(f"last_{part}")


def days(part: int) -> Bind:
    """Every date_id of a part read by probing the facts' primary key."""
    return Bind(f"days_{part}", _INTEGER_ARRAY)


def ids(dimension: str) -> Bind:
    """The ids a dimension is filtered to."""
    return Bind(f"{dimension}_ids", expanding=True)


def excluded_ids(dimension: str) -> Bind:
    """The ids a dimension must not have."""
    return Bind(f"exclude_{dimension}_ids", expanding=True)


def condition(number: int) -> Bind:
    """The number the plan's condition of that position compares with."""
    return Bind(f"condition_{number}", _NUMERIC)


# A day of the earlier period plus these is the day of the range it is compared with.
SHIFT_YEARS, SHIFT_DAYS = Bind("shift_years"), Bind("shift_days")
LIMIT, OFFSET = Bind("limit"), Bind("offset")


# --- the statement -----------------------------------------------------------------------------


def _ratio_values(sums: Mapping[str, ColumnElement[Any]]) -> dict[str, ColumnElement[Any]]:
    """Ratios of sums, rounded to 6 places; NULL where the denominator is 0."""

    def ratio(numerator: str, denominator: str, scale: int = 1) -> ColumnElement[Any]:
        top = sums[numerator] * scale if scale != 1 else sums[numerator]
        return func.round(cast(top, Numeric) / func.nullif(sums[denominator], 0), 6)

    return {
        "ctr": ratio("clicks", "impressions"),
        "cpc": ratio("cost", "clicks"),
        "cpm": ratio("cost", "impressions", 1000),
        "cpa": ratio("cost", "conversions"),
        "cvr": ratio("conversions", "clicks"),
    }


def _change(value: ColumnElement[Any], previous: ColumnElement[Any]) -> ColumnElement[Any]:
    """(value - previous) / previous, rounded to 6 places; NULL where either is NULL or the
    previous is 0."""
    return func.round(cast(value - previous, Numeric) / func.nullif(previous, 0), 6)


def metrics_statement(
    plan: MetricsPlan, every_row: bool = False
) -> tuple[Select[Any], dict[str, Any]]:
    """The statement that answers `plan` (its page with the totals, or `every_row` in order),
    and the values to run it with."""
    shape = _MetricsShape(
        tuple((part.source, part.probe_depth) for part in plan.parts),
        tuple((part.source, part.probe_depth) for part in plan.previous),
        plan.set_mask,
        plan.group_by,
        plan.sort,
        tuple(sorted(plan.filters)),
        tuple(sorted(plan.excludes)),
        tuple((metric, comparison) for metric, comparison, _ in plan.conditions),
        every_row,
    )
    return _metrics_statement(shape), _values(plan)


def _values(plan: MetricsPlan) -> dict[str, Any]:
    """The value of every bind of the statement of `plan`, by name."""
    bound: list[tuple[Bind, Any]] = [(LIMIT, plan.limit), (OFFSET, plan.offset)]
    bound += [(ids(name), values) for name, values in plan.filters.items()]
    bound += [(excluded_ids(name), values) for name, values in plan.excludes.items()]
    bound += [(condition(n), number) for n, (_, _, number) in enumerate(plan.conditions)]
    if plan.previous:
        bound += zip((SHIFT_YEARS, SHIFT_DAYS), plan.shift, strict=True)
    for number, part in enumerate((*plan.parts, *plan.previous)):
        bound += [(first_id(number), part.first_id), (last_id(number), part.last_id)]
        if part.source == "fact_probes":
            bound.append((days(number), date_ids_between(part.first_id, part.last_id)))
    return {bind.name: value for bind, value in bound}


def date_ids_between(first_id: int, last_id: int) -> list[int]:
    """Every date_id from one to the other."""
    first, last = day_of(first_id), day_of(last_id)
    return [date_id_of(first + timedelta(days=n)) for n in range((last - first).days + 1)]


def day_of(date_id: int) -> date:
    return date(date_id // 10000, date_id // 100 % 100, date_id % 100)


@dataclass(frozen=True)
class _MetricsShape:
    """What a metrics statement depends on besides its values: one statement is built per shape."""

    sources: tuple[PartSource, ...]
    previous: tuple[PartSource, ...]  # of the earlier period, when comparing
    set_mask: int
    group_by: tuple[str, ...]
    sort: str | None
    filters: tuple[str, ...]
    excludes: tuple[str, ...]
    conditions: tuple[tuple[str, str], ...]  # (metric, operator); the numbers are bound
    every_row: bool = False  # every grouped row, in order, for an export; else the page


TIMES = frozenset(TIME_GROUPS)
CUBES: dict[MetricsSource, Table] = {"daily": CUBE_DAILY, "monthly": CUBE_MONTHLY}
# The primary key of the facts after date_id: the order its probes walk.
FACT_KEY_ORDER = [column.name for column in FACT.primary_key.columns][1:]


def _part(shape: _MetricsShape, number: int, source: PartSource, time_grouped: bool) -> Select[Any]:
    """One part of a range, as rows of (date_id when grouped by time), the ids of the dimensions
    grouped by and the measures. A monthly row stands for the first day of its month."""
    source_name, depth = source
    used = dimensions_of(shape.set_mask)  # filtered or grouped by
    grouped = [name for name in used if name in shape.group_by]
    first, last = first_id(number).param(), last_id(number).param()
    if source_name in CUBES:
        cube = CUBES[source_name]
        period = cube.c.date_id if source_name == "daily" else cube.c.month_id
        keys = {name: cube.c[f"k{n + 1}"] for n, name in enumerate(used)}
        conditions = [cube.c.set_id == literal(shape.set_mask), period.between(first, last)]
        day = period if source_name == "daily" else period * 100 + 1
        measures = [cube.c[m] for m in MEASURES if m != "cost"]
        cost = (cube.c.cost_cents * literal(Decimal("0.01"))).label("cost")
        sums = [*measures[:2], cost, *measures[2:]]
        selected: list[ColumnElement[Any]] = [day.label("date_id")] if time_grouped else []
        selected += [keys[name].label(DIMENSIONS[name].id_column) for name in grouped]
        conditions += [keys[name].in_(ids(name).param()) for name in shape.filters]
        conditions += [keys[name].not_in(excluded_ids(name).param()) for name in shape.excludes]
        return core_select(*selected, *sums).where(*conditions)
    selected = [FACT.c.date_id] if time_grouped else []
    selected += [FACT.c[DIMENSIONS[name].id_column] for name in grouped]
    conditions = [
        FACT.c[DIMENSIONS[name].id_column].in_(ids(name).param()) for name in shape.filters
    ]
    conditions += [
        FACT.c[DIMENSIONS[name].id_column].not_in(excluded_ids(name).param())
        for name in shape.excludes
    ]
    if source_name == "facts":
        conditions.append(FACT.c.date_id.between(first, last))
    else:
        # date_id = ANY(days) and each of the key's first `depth` columns given as an array
        # (all of a dimension's ids when it is not filtered) make the primary key probe each
        # combination instead of reading every fact of the range; deeper filters are checked
        # on the facts found.
        conditions.append(FACT.c.date_id == func.any(days(number).param()))
        filtered = {DIMENSIONS[name].id_column for name in shape.filters}
        for key in FACT_KEY_ORDER[:depth]:
            if key not in filtered:
                dimension = next(d for d in DIMENSIONS.values() if d.id_column == key)
                every = core_select(table_of(dimension.table).c[key]).scalar_subquery()
                conditions.append(FACT.c[key] == func.any(func.array(every)))
    return core_select(*selected, *(FACT.c[m] for m in MEASURES)).where(*conditions)


def _isodow(day: ColumnElement[Any]) -> ColumnElement[int]:
    return cast(func.extract("isodow", day), Integer)


def _bucket(group: str, day: ColumnElement[Any]) -> ColumnElement[Any]:
    """The time bucket of a day: the day, its Monday, the first day of its month, quarter or
    year, or its ISO day of the week (1 Monday to 7 Sunday)."""
    if group == "date":
        return day
    if group == "day_of_week":
        return _isodow(day)
    return cast(func.date_trunc(group, day), Date)


def _grouped(shape: _MetricsShape, period: int) -> CTE:
    """The grouped rows of the range (period 0) or of the earlier period (1): the groups' names
    and time buckets, the sums and the ratios. A day of the earlier period is bucketed as the
    day of the range it is compared with (shift_years and shift_days later), but keeps its own
    day of the week when that is the only time group: Mondays stay Mondays.

    Each part of the period is read from its source (see _part), the parts are summed together
    on their ids, and only that result is joined to the small dimension tables for names and
    to calendar buckets, then summed again by those."""
    time_grouped = any(group in TIME_GROUPS for group in shape.group_by)
    offset = len(shape.sources) if period else 0
    sources = shape.previous if period else shape.sources
    parts = [
        _part(shape, offset + number, source, time_grouped) for number, source in enumerate(sources)
    ]
    united = (parts[0] if len(parts) == 1 else union_all(*parts)).subquery(f"parts_{period}")
    id_columns = [DIMENSIONS[name].id_column for name in shape.group_by if name in DIMENSIONS]
    keys = [united.c[key] for key in (["date_id"] if time_grouped else []) + id_columns]
    by_ids = (
        core_select(*keys, *(func.sum(united.c[m]).label(m) for m in MEASURES))
        .group_by(*keys)
        .cte(f"by_ids_{period}")
    )

    source: FromClause = by_ids
    if time_grouped:
        date_id = by_ids.c.date_id
        day = func.make_date(date_id // 10000, date_id // 100 % 100, date_id % 100, type_=Date)
    groups: list[Label[Any]] = []
    for group in shape.group_by:
        if group in TIME_GROUPS:
            own_weekday = group == "day_of_week" and len(set(shape.group_by) & TIMES) == 1
            if period and not own_weekday:
                shift = func.make_interval(SHIFT_YEARS.param(), 0, 0, SHIFT_DAYS.param())
                carried = cast(day + shift, Date)
                groups.append(_bucket(group, carried).label(group))
            else:
                groups.append(_bucket(group, day).label(group))
        else:
            dimension = DIMENSIONS[group]
            table = table_of(dimension.table)
            source = source.join(
                table, table.c[dimension.id_column] == by_ids.c[dimension.id_column]
            )
            groups.append(table.c[dimension.name_column].label(group))
    sums = {m: func.sum(by_ids.c[m]) for m in MEASURES}
    metrics = {**sums, **_ratio_values(sums)}
    return (
        core_select(*groups, *(value.label(m) for m, value in metrics.items()))
        .select_from(source)
        .group_by(*groups)
        # Without groups the sums form one row even when nothing matched; drop it then.
        .having(func.count(by_ids.c.impressions) > 0)
        .cte(f"grouped_{period}")
    )


def _compared(shape: _MetricsShape) -> CTE:
    """The range's grouped rows beside the earlier period's, matched on their names and time
    buckets, with each metric's change; a group found in one period only has NULLs for the
    other. Without groups the one row is the totals, so a period without facts counts as
    zeros there, as in the totals."""
    now, before = _grouped(shape, 0), _grouped(shape, 1)
    matched = [now.c[group] == before.c[group] for group in shape.group_by]
    joined = now.outerjoin(before, and_(*matched) if matched else true(), full=True)
    current, previous = (
        (_zero_filled(now), _zero_filled(before))
        if not shape.group_by
        else ({m: now.c[m] for m in METRICS}, {m: before.c[m] for m in METRICS})
    )
    return (
        core_select(
            *(func.coalesce(now.c[g], before.c[g]).label(g) for g in shape.group_by),
            *(current[m].label(m) for m in METRICS),
            *(previous[m].label(f"previous_{m}") for m in METRICS),
            *(_change(current[m], previous[m]).label(f"change_{m}") for m in METRICS),
        )
        .select_from(joined)
        .cte("compared")
    )


def _zero_filled(grouped: CTE) -> dict[str, ColumnElement[Any]]:
    """A period's metrics with its sums 0 where it has no row."""
    sums = {m: func.coalesce(grouped.c[m], 0) for m in MEASURES}
    return {**sums, **_ratio_values(sums)}


# Building the statement costs more than running it on a cube; its values are bound per run.
@lru_cache(maxsize=512)
def _metrics_statement(shape: _MetricsShape) -> Select[Any]:
    """One statement: the page of groups, and on every row the totals and the number of groups
    (or, for an export, every row in order)."""
    grouped = _compared(shape) if shape.previous else _grouped(shape, 0)
    if shape.conditions:  # like HAVING: on the grouped rows, before the page and the totals
        grouped = core_select(grouped).where(*_conditions(shape, grouped)).cte("passing")
    order = _metrics_order(shape, grouped)
    if shape.every_row:
        return core_select(grouped).order_by(*order)
    page = (
        core_select(grouped, func.row_number().over(order_by=order).label("position"))
        .order_by(*order)
        .limit(LIMIT.param())
        .offset(OFFSET.param())
        .cte("page")
    )
    totals = _totals(grouped, compared=bool(shape.previous)).cte("totals")
    return (
        core_select(totals, page)
        .select_from(totals.outerjoin(page, true()))
        .order_by(page.c.position)
    )


def _totals(grouped: CTE, compared: bool) -> Select[Any]:
    """The number of rows and the metrics of their sums (with those of the earlier period and
    the changes, when comparing), as total_<metric>."""
    sums = {m: func.coalesce(func.sum(grouped.c[m]), 0) for m in MEASURES}
    totals = {**sums, **_ratio_values(sums)}
    if compared:
        earlier = {m: func.coalesce(func.sum(grouped.c[f"previous_{m}"]), 0) for m in MEASURES}
        previous = {**earlier, **_ratio_values(earlier)}
        totals |= {f"previous_{m}": previous[m] for m in METRICS}
        totals |= {f"change_{m}": _change(totals[m], previous[m]) for m in METRICS}
    return core_select(
        func.count().label("total_rows"),
        *(value.label(f"total_{name}") for name, value in totals.items()),
    )


COMPARISONS = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "=": operator.eq,
    "!=": operator.ne,
}  # fmt: skip


def _conditions(shape: _MetricsShape, grouped: CTE) -> list[ColumnElement[bool]]:
    return [
        COMPARISONS[comparison](grouped.c[metric], condition(n).param())
        for n, (metric, comparison) in enumerate(shape.conditions)
    ]


def _metrics_order(shape: _MetricsShape, grouped: CTE) -> list[UnaryExpression[Any]]:
    """The requested sort first; then time groups, then the others as given (a stable order)."""
    default = [g for g in TIME_GROUPS if g in shape.group_by] + [
        g for g in shape.group_by if g not in TIME_GROUPS
    ]
    order: list[UnaryExpression[Any]] = []
    if shape.sort is not None:
        column = grouped.c[shape.sort.removeprefix("-")]
        order.append((column.desc() if shape.sort.startswith("-") else column.asc()).nulls_last())
    return order + [grouped.c[g].asc() for g in default if g != (shape.sort or "").lstrip("-")]
