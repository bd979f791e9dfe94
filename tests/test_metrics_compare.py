"""compare=previous_period|previous_year: every row and the totals against two plain-SQL answers
(one per period) matched here by the positions of their time buckets, over more than a year of
demo facts; groups found in one period only; sorting and conditions on the changes; errors."""

import csv
import io
import json
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel.ext.asyncio.session import AsyncSession

import metrics
from main import utc_today
from models import METRICS, TIME_GROUPS, MetricsQuery
from settings import Settings
from tests.helpers import (
    MEASURES,
    assert_problem,
    checksum,
    expected_metrics,
    passes,
    plain_sql,
    run_cli,
    sql,
)

END = date(2026, 11, 10)
# 440 days, from 2025-08-28: a year before each range below has facts too.
HISTORY = ("seed-metrics", "--days", "440", "--rows-per-day", "30", "--end-date", END.isoformat())
LAST_SEEDED: dict[str, Any] = {}


@pytest.fixture
async def history(settings: Settings, session: AsyncSession, app: FastAPI) -> Any:
    """The demo set of HISTORY, seeded only when the tables hold something else."""
    if not LAST_SEEDED or await checksum(session) != LAST_SEEDED:
        await sql(session, "TRUNCATE fact_ad_metrics_daily, cube_daily, cube_monthly")
        await session.commit()
        result = run_cli(settings, *HISTORY)
        assert result.returncode == 0, result.stderr
        LAST_SEEDED.clear()
        LAST_SEEDED.update(await checksum(session))
    app.state.dimension_names = metrics.NameCache()
    app.dependency_overrides[utc_today] = lambda: END
    yield
    app.dependency_overrides.pop(utc_today)


pytestmark = pytest.mark.usefixtures("history")


# --- the expected answer, worked out here ------------------------------------------------------


def monday(day: date) -> date:
    return day - timedelta(days=day.weekday())


def months(day: date) -> int:
    return day.year * 12 + day.month - 1


def position(group: str, label: Any, start: date) -> int:
    """The position of a bucket (as plain_sql labels it) among those of a period from `start`."""
    if group == "day_of_week":
        return int(label)
    day = date.fromisoformat(label)
    return {
        "date": (day - start).days,
        "week": (monday(day) - monday(start)).days // 7,
        "month": months(day) - months(start),
        "quarter": months(day) // 3 - months(start) // 3,
        "year": day.year - start.year,
    }[group]


def label(group: str, at: int, start: date) -> Any:
    """The bucket at a position of the period from `start`, as the API labels it."""
    if group == "day_of_week":
        return at
    if group == "date":
        return (start + timedelta(days=at)).isoformat()
    if group == "week":
        return (monday(start) + timedelta(weeks=at)).isoformat()
    first = {"month": months(start), "quarter": months(start) // 3 * 3, "year": start.year * 12}
    month = first[group] + at * {"month": 1, "quarter": 3, "year": 12}[group]
    return date(month // 12, month % 12 + 1, 1).isoformat()


def change(value: Any, previous: Any) -> float | None:
    if value is None or previous is None or Decimal(str(previous)) == 0:
        return None
    before = Decimal(str(previous))
    relative = (Decimal(str(value)) - before) / before
    return float(relative.quantize(Decimal("0.000001"), ROUND_HALF_UP))


def side_by_side(now: dict[str, Any] | None, before: dict[str, Any] | None) -> dict[str, Any]:
    """The metrics of a row and of its match in the earlier period, and their changes."""
    values = {m: None if now is None else now[m] for m in METRICS}
    earlier = {m: None if before is None else before[m] for m in METRICS}
    return {
        **values,
        **{f"previous_{m}": earlier[m] for m in METRICS},
        **{f"change_{m}": change(values[m], earlier[m]) for m in METRICS},
    }


ZERO = expected_metrics([])  # the totals of no rows


async def expected(
    session: AsyncSession,
    group_by: list[str],
    filters: dict[str, list[str]],
    current: tuple[date, date],
    previous: tuple[date, date],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows (in the default order: time buckets, then the other groups) and the totals of a
    comparison, from plain SQL over each period, matched on names and bucket positions."""
    matched: dict[tuple[Any, ...], list[dict[str, Any] | None]] = {}
    for side, (first, last) in enumerate((current, previous)):
        for row in await plain_sql(session, group_by, first, last, filters):
            key = tuple(
                position(g, row[g], first) if g in TIME_GROUPS else row[g] for g in group_by
            )
            matched.setdefault(key, [None, None])[side] = row
    order = sorted(
        matched,
        key=lambda key: [
            key[group_by.index(g)] for g in (*TIME_GROUPS, *group_by) if g in group_by
        ],
    )
    rows = [
        {
            **{
                g: label(g, key[n], current[0]) if g in TIME_GROUPS else key[n]
                for n, g in enumerate(group_by)
            },
            **side_by_side(*matched[key]),
        }
        for key in order
    ]
    totals = [
        (await plain_sql(session, [], *span, filters) or [ZERO])[0] for span in (current, previous)
    ]
    return rows, side_by_side(*totals)


def totals_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The totals of some compared rows, from their sums."""
    sides = [
        expected_metrics(
            [{m: Decimal(str(row[prefix + m] or 0)) for m in MEASURES} for row in rows]
        )
        for prefix in ("", "previous_")
    ]
    return side_by_side(*sides)


# --- answers -----------------------------------------------------------------------------------

A = (date(2026, 10, 1), date(2026, 11, 10))  # whole October from the monthly cube, then days
B = (date(2026, 10, 20), date(2026, 11, 20))  # past the last fact: the earlier period has more
C = (date(2025, 9, 1), date(2025, 9, 30))  # a year before: no facts; before it, four days
PREVIOUS = {
    ("previous_period", A): (date(2026, 8, 21), date(2026, 9, 30)),
    ("previous_year", A): (date(2025, 10, 1), date(2025, 11, 10)),
    ("previous_period", B): (date(2026, 9, 18), date(2026, 10, 19)),
    ("previous_year", B): (date(2025, 10, 20), date(2025, 11, 20)),
    ("previous_period", C): (date(2025, 8, 2), date(2025, 8, 31)),
    ("previous_year", C): (date(2024, 9, 1), date(2024, 9, 30)),
}
GROUPS = [
    [], ["date"], ["week"], ["month"], ["quarter"], ["year"], ["day_of_week"], ["region"],
    ["week", "platform"],
    ["month", "region", "gender", "device_type"],  # four dimensions: days from the facts
    ["day_of_week", "age_group"],
]  # fmt: skip
FILTERS: list[dict[str, list[str]]] = [
    {},
    {"platform": ["facebook"]},
    {"exclude_region": ["Germany"], "device_type": ["mobile"]},
]
COMPARES = ("previous_period", "previous_year")
# Each group_by with both comparisons over A and B, filtered or not in turn; over C, excluding.
QUESTIONS = [
    *((g, FILTERS[n % 2], c, s) for n, g in enumerate(GROUPS) for c in COMPARES for s in (A, B)),
    *((g, FILTERS[2], "previous_period", C) for g in GROUPS[::2]),
    ([], {}, "previous_year", C),
]  # fmt: skip


async def get_metrics(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await client.get("/metrics", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def range_of(span: tuple[date, date]) -> dict[str, str]:
    return {"start_date": span[0].isoformat(), "end_date": span[1].isoformat()}


@pytest.mark.parametrize(("group_by", "filters", "compare", "span"), QUESTIONS)
async def test_every_comparison_equals_plain_sql_over_each_period(
    client: httpx.AsyncClient,
    session: AsyncSession,
    group_by: list[str],
    filters: dict[str, list[str]],
    compare: str,
    span: tuple[date, date],
) -> None:
    body = await get_metrics(
        client, **range_of(span), group_by=group_by, compare=compare, limit=1000, **filters
    )
    rows, totals = await expected(session, group_by, filters, span, PREVIOUS[compare, span])
    assert body["rows"] == rows  # in the default order
    assert body["total_rows"] == len(rows)
    assert body["totals"] == totals


async def test_groups_found_in_one_period_only_have_the_other_side_empty(
    client: httpx.AsyncClient,
) -> None:
    """B's last ten days have no facts, and its earlier period has one more week than it."""
    body = await get_metrics(client, **range_of(B), group_by="week", compare="previous_period")
    weeks = [row["week"] for row in body["rows"]]
    assert weeks == [(date(2026, 10, 19) + timedelta(weeks=n)).isoformat() for n in range(6)]
    last = body["rows"][-1]  # the earlier period's extra week, labelled as the week after B's
    assert last["impressions"] is None
    assert last["change_impressions"] is None
    assert last["previous_impressions"] > 0
    days = await get_metrics(client, **range_of(B), group_by="date", compare="previous_period")
    past = [row for row in days["rows"] if row["date"] > END.isoformat()]
    assert len(past) == 10
    assert all(row["cost"] is None and row["previous_cost"] is not None for row in past)


async def test_sorting_and_conditions_use_the_changes_before_paging(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    group_by = ["week", "region"]
    rows, _ = await expected(session, group_by, {}, A, PREVIOUS["previous_period", A])
    conditions = [("change_cost", ">", "0"), ("previous_clicks", ">=", "10")]
    passing = [row for row in rows if passes(row, conditions)]
    assert 5 < len(passing) < len(rows)
    ranked = sorted(passing, key=lambda row: -row["change_cost"])
    body = await get_metrics(
        client,
        **range_of(A),
        group_by=group_by,
        compare="previous_period",
        where=["change_cost>0", "previous_clicks>=10"],
        sort="-change_cost",
        limit=5,
        offset=2,
    )
    assert [row["change_cost"] for row in body["rows"]] == [r["change_cost"] for r in ranked[2:7]]
    assert body["total_rows"] == len(passing)
    assert body["totals"] == totals_of(passing)
    ascending = await get_metrics(
        client, **range_of(B), group_by="date", compare="previous_period", sort="change_clicks"
    )
    changes = [row["change_clicks"] for row in ascending["rows"]]
    known = [c for c in changes if c is not None]
    assert known == sorted(known)
    assert changes == known + [None] * (len(changes) - len(known))


async def test_fields_choose_the_compared_metrics_in_json_csv_and_exports(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    params = {
        **range_of(A),
        "group_by": "month",
        "compare": "previous_year",
        "fields": ["cost", "ctr"],
    }
    body = await get_metrics(client, **params)
    columns = ["month", "cost", "ctr", "previous_cost", "previous_ctr", "change_cost", "change_ctr"]
    assert [list(row) for row in body["rows"]] == [columns] * 2
    assert list(body["totals"]) == columns[1:]
    rows, _ = await expected(session, ["month"], {}, A, PREVIOUS["previous_year", A])
    assert body["rows"] == [{c: row[c] for c in columns} for row in rows]
    csv_text = (await client.get("/metrics", params={**params, "format": "csv"})).text
    lines = list(csv.reader(io.StringIO(csv_text)))
    assert lines[0] == columns
    assert lines[1] == [str(body["rows"][0][c]) for c in columns]
    ndjson = (await client.get("/metrics/export", params={**params, "format": "ndjson"})).text
    assert [json.loads(line) for line in ndjson.splitlines()] == body["rows"]


def test_the_earlier_periods_are_as_long_or_the_same_dates_a_year_before() -> None:
    assert metrics.previous_range(*A, "previous_period") == PREVIOUS["previous_period", A]
    leap = (date(2028, 2, 28), date(2028, 3, 1))
    assert metrics.previous_range(*leap, "previous_year") == (date(2027, 2, 28), date(2027, 3, 1))
    assert metrics.previous_range(date(2028, 2, 29), date(2028, 2, 29), "previous_year") == (
        date(2027, 2, 28),
        date(2027, 2, 28),
    )


async def test_both_periods_are_read_from_the_cubes_where_they_cover_them(
    session: AsyncSession,
) -> None:
    query = MetricsQuery(
        start_date=date(2026, 9, 15), end_date=date(2026, 11, 10), group_by=["month", "region"],
        compare="previous_year",
    )  # fmt: skip
    plan = await metrics.plan_question(session, metrics.NameCache(), query, END, 1096)
    assert [part.source for part in plan.parts] == ["daily", "monthly", "daily"]
    assert [part.source for part in plan.previous] == ["daily", "monthly", "daily"]
    assert plan.previous[1].first_id == plan.previous[1].last_id == 202510
    assert plan.starts == (date(2026, 9, 15), date(2025, 9, 15))


@pytest.mark.parametrize(
    ("params", "parameter", "words"),
    [
        ({"sort": "change_cost"}, "sort", "'change_cost': it needs compare"),
        ({"where": "previous_cost>1"}, "where", "previous_cost, which needs compare"),
        ({"compare": "previous_week"}, "compare", "previous_period"),
        (
            {"compare": "previous_period", "fields": "cost", "sort": "-change_clicks"},
            "sort",
            "not in the result",
        ),
        (
            {"compare": "previous_period", "start_date": "0001-01-01", "end_date": "0001-01-31"},
            "compare",
            "before 0001-01-01",
        ),
        (
            {"compare": "previous_year", "start_date": "0001-06-01", "end_date": "0001-06-02"},
            "compare",
            "before 0001-01-01",
        ),
        (
            {"compare": "previous_year", "start_date": "9999-06-01", "end_date": "9999-06-02"},
            "compare",
            "ending by 9998-12-31",
        ),
    ],
)
async def test_a_comparison_it_cannot_make_is_422_naming_why(
    client: httpx.AsyncClient, params: dict[str, str], parameter: str, words: str
) -> None:
    body = assert_problem(await client.get("/metrics", params=params), 422)
    assert any(
        error["loc"] == ["query", parameter] and words in error["msg"] for error in body["errors"]
    ), body
