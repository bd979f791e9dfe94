"""compare=previous_period|previous_year: every row and the totals against plain SQL over each
period by day, each day of the earlier period carried here onto its day of the range, over more
than a year of demo facts; groups found in one period only; several time groups; 29 February;
the calendar's ends; sorting and conditions on the changes; errors."""

import csv
import io
import json
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel.ext.asyncio.session import AsyncSession

import metrics
from deps import state_of
from main import utc_today
from models import METRICS, TIME_GROUPS, MetricsComparison, MetricsQuery
from settings import Settings
from tests.helpers import (
    MEASURES,
    assert_problem,
    expected_metrics,
    passes,
    plain_sql,
    run_cli,
    seed_unless_seeded,
    write_csv,
)

END = date(2026, 11, 10)
# 440 days, from 2025-08-28: a year before each range below has facts too.
HISTORY = ("seed-metrics", "--days", "440", "--rows-per-day", "30", "--end-date", END.isoformat())
LAST_SEEDED: dict[str, Any] = {}


@pytest.fixture
async def history(settings: Settings, session: AsyncSession, app: FastAPI) -> Any:
    """The demo set of HISTORY, seeded only when the tables hold something else."""
    await seed_unless_seeded(settings, session, HISTORY, LAST_SEEDED)
    state_of(app).dimension_names = metrics.NameCache()
    app.dependency_overrides[utc_today] = lambda: END
    yield
    app.dependency_overrides.pop(utc_today)


pytestmark = pytest.mark.usefixtures("history")


# --- the expected answer, worked out here ------------------------------------------------------


def earlier(current: tuple[date, date], compare: str) -> tuple[date, date]:
    """The earlier period, as docs/metrics.md defines it."""
    first, last = current
    if compare == "previous_period":
        days = (last - first).days + 1
        return first - timedelta(days=days), first - timedelta(days=1)

    if (first.month, first.day) == (2, 29):  # no 29 February a year earlier
        start = date(first.year - 1, 3, 1)
    else:
        start = first.replace(year=first.year - 1)
    if (last + timedelta(days=1)).day == 1:  # a month's last day: that month's, a year earlier
        following = date(last.year - 1 + last.month // 12, last.month % 12 + 1, 1)
        return start, following - timedelta(days=1)
    return start, last.replace(year=last.year - 1)


def carried(day: date, compare: str, current: tuple[date, date]) -> date:
    """The day of the range a day of the earlier period is compared with."""
    if compare == "previous_period":
        return day + timedelta(days=(current[1] - current[0]).days + 1)
    if (day.month, day.day) == (2, 29):
        return date(day.year + 1, 2, 28)
    return day.replace(year=day.year + 1)


def bucket(group: str, day: date, own: date, group_by: list[str]) -> Any:
    """A time bucket as the API labels it, of the day `day` (a day of the earlier period: the
    day it is carried onto), with the day of the week of `own` when that is the only time
    group."""
    if group == "day_of_week":
        alone = [g for g in group_by if g in TIME_GROUPS] == ["day_of_week"]
        return (own if alone else day).isoweekday()
    start = {
        "date": day,
        "week": day - timedelta(days=day.weekday()),
        "month": day.replace(day=1),
        "quarter": day.replace(month=(day.month - 1) // 3 * 3 + 1, day=1),
        "year": day.replace(month=1, day=1),
    }[group]
    return start.isoformat()


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
    compare: str,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows (in the default order: time buckets, then the other groups) and the totals of a
    comparison: plain SQL's rows of each period by day, each day of the earlier period carried
    onto its day of the range, bucketed and summed here, and matched on names and buckets."""
    dimensions = [g for g in group_by if g not in TIME_GROUPS]
    previous = earlier(current, compare)
    matched: dict[tuple[Any, ...], list[list[dict[str, Any]]]] = {}
    for side, (first, last) in enumerate((current, previous)):
        for row in await plain_sql(session, ["date", *dimensions], first, last, filters):
            own = date.fromisoformat(row["date"])
            day = carried(own, compare, current) if side else own
            key = tuple(
                bucket(g, day, own, group_by) if g in TIME_GROUPS else row[g] for g in group_by
            )
            matched.setdefault(key, [[], []])[side].append(row)
    sort_by = [g for g in (*TIME_GROUPS, *dimensions) if g in group_by]
    order = sorted(matched, key=lambda key: [key[group_by.index(g)] for g in sort_by])
    rows = [
        {
            **dict(zip(group_by, key, strict=True)),
            **side_by_side(*(expected_metrics(days) if days else None for days in matched[key])),
        }
        for key in order
    ]
    totals = [
        (await plain_sql(session, [], *span, filters) or [ZERO])[0] for span in (current, previous)
    ]
    if not group_by:  # the one row is the totals (docs/metrics.md), a side without facts zeros
        return [side_by_side(*totals)] if rows else [], side_by_side(*totals)
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
B = (date(2026, 10, 20), date(2026, 11, 20))  # its last ten days have no facts, their match has
C = (date(2025, 9, 1), date(2025, 9, 30))  # a year before: no facts; before it, four days
PREVIOUS: dict[tuple[MetricsComparison, tuple[date, date]], tuple[date, date]] = {
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
# Each group_by with both comparisons over A, with the previous period over B, filtered or not
# in turn; over C, excluding.
QUESTIONS = [
    *((g, FILTERS[n % 2], c, A) for n, g in enumerate(GROUPS) for c in COMPARES),
    *((g, FILTERS[n % 2], "previous_period", B) for n, g in enumerate(GROUPS)),
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
    rows, totals = await expected(session, group_by, filters, span, compare)
    assert body["rows"] == rows  # in the default order
    assert body["total_rows"] == len(rows)
    assert body["totals"] == totals


async def test_groups_found_in_one_period_only_have_the_other_side_empty(
    client: httpx.AsyncClient,
) -> None:
    """B's last ten days have no facts; the ten days 32 days before them have."""
    body = await get_metrics(client, **range_of(B), group_by="week", compare="previous_period")
    weeks = [row["week"] for row in body["rows"]]
    assert weeks == [(date(2026, 10, 19) + timedelta(weeks=n)).isoformat() for n in range(5)]
    last = body["rows"][-1]  # 16 to 20 November, compared with 15 to 19 October
    assert last["impressions"] is None
    assert last["change_impressions"] is None
    assert last["previous_impressions"] > 0
    days = await get_metrics(client, **range_of(B), group_by="date", compare="previous_period")
    past = [row for row in days["rows"] if row["date"] > END.isoformat()]
    assert len(past) == 10
    assert all(row["cost"] is None and row["previous_cost"] is not None for row in past)


@pytest.mark.parametrize(
    ("span", "compare", "empty"),
    [
        ((date(2026, 11, 11), date(2026, 11, 20)), "previous_period", "now"),  # after the facts
        (C, "previous_year", "before"),  # a year before C: no facts
    ],
)
async def test_one_row_without_groups_says_what_the_totals_say(
    client: httpx.AsyncClient, span: tuple[date, date], compare: str, empty: str
) -> None:
    """Without group_by the one row is the totals: a period with no facts is zeros in both."""
    body = await get_metrics(client, **range_of(span), compare=compare)
    [row] = body["rows"]
    assert row == body["totals"]
    side = "impressions" if empty == "now" else "previous_impressions"
    assert row[side] == 0
    assert row["change_impressions"] == (-1.0 if empty == "now" else None)


@pytest.mark.parametrize("compare", COMPARES)
@pytest.mark.parametrize(
    "group_by",
    [
        ["date", "day_of_week"],
        ["date", "week"],
        ["date", "month"],
        ["week", "month"],
        ["week", "day_of_week"],
    ],
)
async def test_several_time_groups_label_each_row_consistently(
    client: httpx.AsyncClient, session: AsyncSession, group_by: list[str], compare: str
) -> None:
    span = (date(2026, 10, 30), date(2026, 11, 5))  # across a month's end and a week's
    body = await get_metrics(client, **range_of(span), group_by=group_by, compare=compare)
    rows, totals = await expected(session, group_by, {}, span, compare)
    assert body["rows"] == rows
    assert body["totals"] == totals
    assert all(row["previous_cost"] is not None for row in body["rows"])  # each day has a match
    if "date" in group_by:  # one row a day, its other buckets those of its date
        assert len(body["rows"]) == 7
        for row in body["rows"]:
            day = date.fromisoformat(row["date"])
            assert all(row[g] == bucket(g, day, day, group_by) for g in group_by)


async def test_sorting_and_conditions_use_the_changes_before_paging(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    group_by = ["week", "region"]
    rows, _ = await expected(session, group_by, {}, A, "previous_period")
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
    rows, _ = await expected(session, ["month"], {}, A, "previous_year")
    assert body["rows"] == [{c: row[c] for c in columns} for row in rows]
    csv_text = (await client.get("/metrics/export", params=params)).text
    lines = list(csv.reader(io.StringIO(csv_text)))
    assert lines[0] == columns
    assert lines[1] == [str(body["rows"][0][c]) for c in columns]
    # A negative change is a number, written as it is (only names are guarded in CSV).
    assert any(cell.startswith("-") for line in lines[1:] for cell in line[5:])
    ndjson = (await client.get("/metrics/export", params={**params, "format": "ndjson"})).text
    assert [json.loads(line) for line in ndjson.splitlines()] == body["rows"]


def test_the_earlier_periods_are_as_long_or_the_same_dates_a_year_before() -> None:
    for compare, span in PREVIOUS:
        assert metrics.previous_range(*span, compare) == PREVIOUS[compare, span]
        assert earlier(span, compare) == PREVIOUS[compare, span]
    leap = (date(2028, 2, 28), date(2028, 3, 1))
    assert metrics.previous_range(*leap, "previous_year") == (date(2027, 2, 28), date(2027, 3, 1))
    day = (date(2028, 2, 29), date(2028, 3, 2))
    assert metrics.previous_range(*day, "previous_year") == (date(2027, 3, 1), date(2027, 3, 2))
    february = (date(2029, 2, 1), date(2029, 2, 28))  # a whole month: the whole one before
    assert metrics.previous_range(*february, "previous_year") == (
        date(2028, 2, 1),
        date(2028, 2, 29),
    )
    assert metrics.comparison_shift(*A, "previous_period") == (0, 41)
    assert metrics.comparison_shift(*A, "previous_year") == (1, 0)


@pytest.mark.parametrize(
    ("compare", "previous"),
    [("previous_year", ["daily", "monthly", "daily"]), ("previous_period", ["daily"])],
)
async def test_both_periods_are_read_from_the_cubes_where_they_cover_them(
    session: AsyncSession, compare: str, previous: list[str]
) -> None:
    """A month a year earlier is the same month; carried 57 days later, it spans two."""
    query = MetricsQuery.model_validate(
        {"start_date": "2026-09-15", "end_date": "2026-11-10", "group_by": ["month", "region"],
         "compare": compare}
    )  # fmt: skip
    plan = await metrics.plan_question(session, metrics.NameCache(), query, END, 1096)
    assert [part.source for part in plan.parts] == ["daily", "monthly", "daily"]
    assert [part.source for part in plan.previous] == previous


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
    ],
)
async def test_a_comparison_it_cannot_make_is_422_naming_why(
    client: httpx.AsyncClient, params: dict[str, str], parameter: str, words: str
) -> None:
    body = assert_problem(await client.get("/metrics", params=params), 422)
    assert any(
        error["loc"] == ["query", parameter] and words in error["msg"] for error in body["errors"]
    ), body


@pytest.mark.parametrize("group_by", [[], ["date"], ["week"], ["year"], ["day_of_week"]])
@pytest.mark.parametrize(
    ("start", "end"), [("0001-01-11", "0001-01-20"), ("9999-12-20", "9999-12-31")]
)
async def test_comparisons_at_the_ends_of_the_calendar_are_answered(
    client: httpx.AsyncClient, group_by: list[str], start: str, end: str
) -> None:
    params = {"start_date": start, "end_date": end, "group_by": group_by}
    body = await get_metrics(client, **params, compare="previous_period")
    assert body["rows"] == []
    export = await client.get("/metrics/export", params={**params, "compare": "previous_period"})
    assert export.status_code == 200
    assert export.text.count("\n") == 1  # the header alone


async def test_a_year_earlier_counts_29_february_with_28_february(
    settings: Settings, client: httpx.AsyncClient, session: AsyncSession, tmp_path: Path
) -> None:
    """Runs last: it adds facts to the history (the fixture seeds it again for any later test)."""
    days = ["2023-02-28", "2024-02-28", "2024-02-29", "2024-03-01", "2025-02-28", "2025-03-01"]
    lines = [
        f"{day},Germany,18-24,female,facebook,feed,mobile,{n + 10},{n + 1},{n}.25,1,0"
        for n, day in enumerate(days)
    ]
    result = run_cli(settings, "load-metrics", str(write_csv(tmp_path, *lines)))
    assert result.returncode == 0, result.stderr
    app_span = (date(2025, 2, 1), date(2025, 3, 1))
    body = await get_metrics(client, **range_of(app_span), group_by="date", compare="previous_year")
    by_day = {row["date"]: row for row in body["rows"]}
    assert by_day["2025-02-28"]["previous_impressions"] == 11 + 12  # 28 and 29 February 2024
    assert by_day["2025-03-01"]["previous_impressions"] == 13
    rows, totals = await expected(session, ["date"], {}, app_span, "previous_year")
    assert body["rows"] == rows
    assert body["totals"] == totals
    leap = await get_metrics(
        client, start_date="2024-02-28", end_date="2024-03-01", group_by="date",
        compare="previous_year",
    )  # fmt: skip
    assert [row["date"] for row in leap["rows"]] == ["2024-02-28", "2024-02-29", "2024-03-01"]
    assert leap["rows"][0]["previous_impressions"] == 10
    assert leap["rows"][1]["previous_impressions"] is None  # no 29 February a year earlier
    alone = await get_metrics(
        client, start_date="2024-02-29", end_date="2024-02-29", compare="previous_year"
    )  # no day a year earlier: an empty earlier period
    assert alone["totals"]["impressions"] == 12
    assert alone["totals"]["previous_impressions"] == 0
    assert alone["totals"]["change_impressions"] is None
    for first in ("2024-02-29", "2025-02-28"):  # every row is a day of the range
        span = (date.fromisoformat(first), date.fromisoformat(first) + timedelta(days=1))
        days_body = await get_metrics(
            client, **range_of(span), group_by="date", compare="previous_year"
        )
        rows, totals = await expected(session, ["date"], {}, span, "previous_year")
        assert days_body["rows"] == rows
        assert days_body["totals"] == totals
        assert all(first <= row["date"] <= span[1].isoformat() for row in rows)
