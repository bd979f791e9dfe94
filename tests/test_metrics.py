"""GET /metrics and /dimensions against a hand-made star schema, and seed/load of facts."""

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import date
from decimal import Decimal
from typing import Any, get_args

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel.ext.asyncio.session import AsyncSession

import crud
import metrics
from deps import state_of
from main import utc_today
from models import (
    DIMENSIONS,
    METRICS,
    TIME_GROUPS,
    GroupBy,
    Metric,
    MetricsQuery,
    MetricsSort,
    compared_fields,
)
from tests.helpers import MEASURES, assert_problem, clear_metrics, expected_metrics, passes, sql

TODAY = date(2026, 11, 10)  # a Tuesday
DIMENSION_VALUES = {
    "dim_region": ("region_name", ["North", "South"]),
    "dim_age_group": ("age_range", ["18-24", "25-34"]),
    "dim_gender": ("gender_name", ["female", "male"]),
    "dim_platform": ("platform_name", ["facebook", "instagram"]),
    "dim_placement": ("placement_name", ["feed", "stories"]),
    "dim_device_type": ("device_type_name", ["mobile", "desktop"]),
}
GROUPS = ("region", "age_group", "gender", "platform", "placement", "device_type")
# date, region, age_group, gender, platform, placement, device_type; the five measures.
FACTS = [
    ("2026-10-30", "North", "18-24", "female", "facebook", "feed", "mobile", 1000, 50, "25.00", 5, 10),  # noqa: E501
    ("2026-11-02", "North", "25-34", "male", "instagram", "stories", "desktop", 2000, 40, "30.50", 0, 20),  # noqa: E501
    ("2026-11-03", "South", "18-24", "female", "facebook", "stories", "mobile", 500, 0, "5.25", 0, 0),  # noqa: E501
    ("2026-11-10", "South", "25-34", "male", "facebook", "feed", "mobile", 3000, 90, "60.00", 9, 30),  # noqa: E501
    ("2026-11-10", "North", "18-24", "male", "instagram", "feed", "desktop", 0, 0, "0.00", 0, 1),
]  # fmt: skip


def fact(row: tuple[Any, ...]) -> dict[str, Any]:
    values = dict(zip(("date", *GROUPS, *MEASURES), row, strict=True))
    values["date"] = date.fromisoformat(values["date"])
    values["cost"] = Decimal(values["cost"])
    return values


def bucket(day: date, group: str) -> str | int:
    if group == "week":
        return date.fromordinal(day.toordinal() - day.weekday()).isoformat()
    if group == "month":
        return day.replace(day=1).isoformat()
    if group == "quarter":
        return day.replace(month=(day.month - 1) // 3 * 3 + 1, day=1).isoformat()
    if group == "year":
        return day.replace(month=1, day=1).isoformat()
    if group == "day_of_week":
        return day.isoweekday()
    return day.isoformat()


def expected_rows(group_by: list[str], facts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in the default order (time group, then the others as given)."""
    groups: dict[tuple[str | int, ...], list[dict[str, Any]]] = {}
    for f in facts:
        key = tuple(bucket(f["date"], g) if g in TIME_GROUPS else f[g] for g in group_by)
        groups.setdefault(key, []).append(f)
    ordered = sorted(
        groups, key=lambda key: [key[group_by.index(g)] for g in sorted_groups(group_by)]
    )
    return [
        {**dict(zip(group_by, key, strict=True)), **expected_metrics(groups[key])}
        for key in ordered
    ]


def sorted_groups(group_by: list[str]) -> list[str]:
    time = [g for g in TIME_GROUPS if g in group_by]
    return time + [g for g in group_by if g not in time]


ALL = [fact(row) for row in FACTS]


@pytest.fixture
async def star(app: FastAPI, session: AsyncSession) -> AsyncIterator[None]:
    """The hand-made star schema, today fixed to TODAY, and an empty name cache."""
    await clear_metrics(session)
    for table, (column, names) in DIMENSION_VALUES.items():
        for name in names:
            await sql(session, f"INSERT INTO {table} ({column}) VALUES (:name)", name=name)
    days = sorted({f["date"] for f in ALL})
    await crud.ensure_dates(session, days)
    for f in ALL:
        await sql(
            session,
            (
                "INSERT INTO fact_ad_metrics_daily SELECT"
                " to_char(CAST(:date AS date), 'YYYYMMDD')::int,"
                " (SELECT region_id FROM dim_region WHERE region_name = :region),"
                " (SELECT age_id FROM dim_age_group WHERE age_range = :age_group),"
                " (SELECT gender_id FROM dim_gender WHERE gender_name = :gender),"
                " (SELECT platform_id FROM dim_platform WHERE platform_name = :platform),"
                " (SELECT placement_id FROM dim_placement WHERE placement_name = :placement),"
                " (SELECT device_type_id FROM dim_device_type"
                "  WHERE device_type_name = :device_type),"
                " :impressions, :clicks, :cost, :conversions, :likes"
            ),
            **f,
        )
    await metrics.refresh_cubes(session, days)  # as the loaders do
    await session.commit()
    state_of(app).dimension_names = metrics.NameCache()
    app.dependency_overrides[utc_today] = lambda: TODAY
    yield
    app.dependency_overrides.pop(utc_today)


async def get_metrics(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await client.get("/metrics", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


pytestmark = pytest.mark.usefixtures("star")


# --- answers -------------------------------------------------------------------------------------


async def test_without_groups_one_row_of_totals_over_the_last_30_days(
    client: httpx.AsyncClient,
) -> None:
    body = await get_metrics(client)
    totals = expected_metrics(ALL)
    assert totals == {
        "impressions": 6500, "clicks": 180, "cost": "120.75", "conversions": 14, "likes": 61,
        "ctr": 0.027692, "cpc": "0.670833", "cpm": "18.576923", "cpa": "8.625000", "cvr": 0.077778,
    }  # fmt: skip
    assert body == {"rows": [totals], "totals": totals, "total_rows": 1, "limit": 100, "offset": 0}


@pytest.mark.parametrize(
    "group_by",
    [
        ["date"],
        ["week"],
        ["month"],
        *([g] for g in GROUPS),
        ["quarter"],
        ["year"],
        ["day_of_week"],
        ["platform", "week"],
        ["gender", "region", "date"],
        ["day_of_week", "region", "quarter"],
    ],
)
async def test_each_group_by_sums_its_groups(
    client: httpx.AsyncClient, group_by: list[str]
) -> None:
    body = await get_metrics(client, group_by=group_by)
    assert body["rows"] == expected_rows(group_by, ALL)
    assert body["totals"] == expected_metrics(ALL)
    assert body["total_rows"] == len(body["rows"])


async def test_week_and_month_buckets_start_on_monday_and_the_first(
    client: httpx.AsyncClient,
) -> None:
    weeks = await get_metrics(client, group_by="week")
    assert [row["week"] for row in weeks["rows"]] == ["2026-10-26", "2026-11-02", "2026-11-09"]
    months = await get_metrics(client, group_by="month")
    assert [row["month"] for row in months["rows"]] == ["2026-10-01", "2026-11-01"]


async def test_filters_match_names_case_insensitively_and_repeat(client: httpx.AsyncClient) -> None:
    body = await get_metrics(
        client, region=" NORTH ", platform=["facebook", "Instagram"], group_by="placement"
    )
    north = [f for f in ALL if f["region"] == "North"]
    assert body["rows"] == expected_rows(["placement"], north)
    assert body["totals"] == expected_metrics(north)


async def test_exclusions_leave_out_their_names_and_and_with_the_filters(
    client: httpx.AsyncClient,
) -> None:
    body = await get_metrics(client, exclude_region="north", group_by="platform")
    south = [f for f in ALL if f["region"] == "South"]
    assert body["rows"] == expected_rows(["platform"], south)
    assert body["totals"] == expected_metrics(south)
    both = await get_metrics(
        client, platform="facebook", exclude_placement="Stories", exclude_gender=["male", "MALE"],
        group_by="region",
    )  # fmt: skip
    chosen = [
        f for f in ALL
        if f["platform"] == "facebook" and f["placement"] != "stories" and f["gender"] != "male"
    ]  # fmt: skip
    assert chosen
    assert both["rows"] == expected_rows(["region"], chosen)
    nothing = await get_metrics(client, region="North", exclude_region="North")
    assert (nothing["rows"], nothing["total_rows"]) == ([], 0)


async def test_fields_return_only_the_metrics_named_with_ratios_from_the_sums(
    client: httpx.AsyncClient,
) -> None:
    full = await get_metrics(client, group_by="region")
    body = await get_metrics(client, group_by="region", fields=["ctr", "cost"], sort="-ctr")
    expected = [{"region": r["region"], "ctr": r["ctr"], "cost": r["cost"]} for r in full["rows"]]
    assert body["rows"] == sorted(expected, key=lambda r: -r["ctr"])
    assert [set(row) for row in body["rows"]] == [{"region", "ctr", "cost"}] * 2
    assert body["totals"] == {"ctr": full["totals"]["ctr"], "cost": full["totals"]["cost"]}
    csv_text = (
        await client.get("/metrics/export", params={"group_by": "region", "fields": "cpm"})
    ).text
    assert csv_text.splitlines()[0] == "region,cpm"


@pytest.mark.parametrize(
    ("group_by", "conditions"),
    [
        (["date"], [("cost", ">", "20")]),
        (["date"], [("cost", ">=", "25.00"), ("clicks", "<", "90")]),
        (["region", "platform"], [("ctr", "<", "0.05")]),  # a null ctr passes no condition
        (["placement"], [("impressions", "!=", "1000"), ("likes", "=", "31")]),
        ([], [("cpm", "<=", "5")]),
    ],
)
async def test_conditions_keep_the_groups_that_pass_before_paging(
    client: httpx.AsyncClient, group_by: list[str], conditions: list[tuple[str, str, str]]
) -> None:
    where = [f"{metric}{op}{number}" for metric, op, number in conditions]
    body = await get_metrics(client, group_by=group_by, where=where, limit=1)
    every = expected_rows(group_by, ALL)
    kept = [row for row in every if passes(row, conditions)]
    assert body["rows"] == kept[:1]
    assert body["total_rows"] == len(kept)
    assert body["totals"] == expected_metrics(
        [f for f in ALL if any(all(f[g] == row[g] or bucket(f["date"], g) == row[g]
                                   for g in group_by) for row in kept)]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("params", "dates"),
    [
        ({"preset": "last_7d"}, ["2026-11-10"]),
        ({"preset": "last_30d"}, ["2026-10-30", "2026-11-02", "2026-11-03", "2026-11-10"]),
        ({"preset": "last_90d"}, ["2026-10-30", "2026-11-02", "2026-11-03", "2026-11-10"]),
        ({"preset": "this_month"}, ["2026-11-02", "2026-11-03", "2026-11-10"]),
        ({"preset": "last_month"}, ["2026-10-30"]),
        ({"preset": "yesterday"}, []),
        ({"preset": "last_14d"}, ["2026-10-30", "2026-11-02", "2026-11-03", "2026-11-10"]),
        ({"preset": "this_week"}, ["2026-11-10"]),
        ({"preset": "last_week"}, ["2026-11-02", "2026-11-03"]),
        ({"preset": "this_quarter"}, ["2026-10-30", "2026-11-02", "2026-11-03", "2026-11-10"]),
        ({"preset": "last_quarter"}, []),
        ({"preset": "this_year"}, ["2026-10-30", "2026-11-02", "2026-11-03", "2026-11-10"]),
        ({"preset": "last_year"}, []),
        ({"start_date": "2026-11-02", "end_date": "2026-11-03"}, ["2026-11-02", "2026-11-03"]),
        ({"start_date": "2026-10-31", "end_date": "2026-11-01"}, []),
    ],
)
async def test_presets_and_inclusive_ranges_pick_their_days(
    client: httpx.AsyncClient, params: dict[str, str], dates: list[str]
) -> None:
    body = await get_metrics(client, group_by="date", **params)
    assert [row["date"] for row in body["rows"]] == dates
    assert body["totals"] == expected_metrics([f for f in ALL if f["date"].isoformat() in dates])


# Worked out by hand from a calendar: a Tuesday, a New Year's Day (a Thursday), a leap March.
PRESET_RANGES = {
    "2026-11-10": {
        "yesterday": ("2026-11-09", "2026-11-09"), "last_14d": ("2026-10-28", "2026-11-10"),
        "this_week": ("2026-11-09", "2026-11-10"), "last_week": ("2026-11-02", "2026-11-08"),
        "this_month": ("2026-11-01", "2026-11-10"), "last_month": ("2026-10-01", "2026-10-31"),
        "this_quarter": ("2026-10-01", "2026-11-10"), "last_quarter": ("2026-07-01", "2026-09-30"),
        "this_year": ("2026-01-01", "2026-11-10"), "last_year": ("2025-01-01", "2025-12-31"),
    },
    "2026-01-01": {
        "yesterday": ("2025-12-31", "2025-12-31"), "last_7d": ("2025-12-26", "2026-01-01"),
        "this_week": ("2025-12-29", "2026-01-01"), "last_week": ("2025-12-22", "2025-12-28"),
        "this_month": ("2026-01-01", "2026-01-01"), "last_month": ("2025-12-01", "2025-12-31"),
        "this_quarter": ("2026-01-01", "2026-01-01"), "last_quarter": ("2025-10-01", "2025-12-31"),
        "this_year": ("2026-01-01", "2026-01-01"), "last_year": ("2025-01-01", "2025-12-31"),
    },
    "2024-03-01": {
        "last_14d": ("2024-02-17", "2024-03-01"), "last_30d": ("2024-02-01", "2024-03-01"),
        "last_month": ("2024-02-01", "2024-02-29"), "last_quarter": ("2023-10-01", "2023-12-31"),
        "last_90d": ("2023-12-03", "2024-03-01"),
    },
}  # fmt: skip


@pytest.mark.parametrize("today", PRESET_RANGES)
def test_every_preset_spans_the_days_a_calendar_gives(today: str) -> None:
    for preset, (first, last) in PRESET_RANGES[today].items():
        query = MetricsQuery.model_validate({"preset": preset})
        expected = (date.fromisoformat(first), date.fromisoformat(last))
        assert metrics.date_range(query, date.fromisoformat(today)) == expected, preset


async def test_an_empty_match_is_200_with_no_rows_and_zero_totals(
    client: httpx.AsyncClient,
) -> None:
    for group_by in ([], ["region"]):
        body = await get_metrics(
            client, start_date="2025-01-01", end_date="2025-01-31", group_by=group_by
        )
        assert body["rows"] == []
        assert body["total_rows"] == 0
        assert body["totals"] == expected_metrics([])


async def test_sort_by_metric_descending_and_by_group(client: httpx.AsyncClient) -> None:
    by_cost = await get_metrics(client, group_by="region", sort="-cost")
    assert [row["region"] for row in by_cost["rows"]] == ["South", "North"]
    by_name = await get_metrics(client, group_by="region", sort="-region")
    assert [row["region"] for row in by_name["rows"]] == ["South", "North"]
    by_clicks = await get_metrics(client, group_by="date", sort="clicks")
    assert [row["clicks"] for row in by_clicks["rows"]] == [0, 40, 50, 90]


@pytest.mark.parametrize("sort", ["ctr", "-ctr"])
async def test_null_ratios_sort_last_both_ways(client: httpx.AsyncClient, sort: str) -> None:
    body = await get_metrics(client, group_by=["date", "platform"], sort=sort)
    ctrs = [row["ctr"] for row in body["rows"]]
    assert ctrs[-1] is None
    assert None not in ctrs[:-1]
    assert ctrs[:-1] == sorted(ctrs[:-1], reverse=sort.startswith("-"))


async def test_paging_keeps_totals_and_count_of_the_whole_set(client: httpx.AsyncClient) -> None:
    everything = expected_rows(["date"], ALL)
    body = await get_metrics(client, group_by="date", limit=2, offset=1)
    assert body["rows"] == everything[1:3]
    assert (body["total_rows"], body["limit"], body["offset"]) == (4, 2, 1)
    assert body["totals"] == expected_metrics(ALL)
    past_the_end = await get_metrics(client, group_by="date", offset=10)
    assert past_the_end["rows"] == []
    assert past_the_end["total_rows"] == 4


async def test_an_export_is_csv_or_ndjson_by_format_or_accept(client: httpx.AsyncClient) -> None:
    expected = (
        "region,impressions,clicks,cost,conversions,likes,ctr,cpc,cpm,cpa,cvr\n"
        "North,3000,90,55.50,5,31,0.030000,0.616667,18.500000,11.100000,0.055556\n"
        "South,3500,90,65.25,9,30,0.025714,0.725000,18.642857,7.250000,0.100000\n"
    )
    params = {"group_by": "region"}
    by_default = await client.get("/metrics/export", params=params)
    by_format = await client.get("/metrics/export", params={**params, "format": "csv"})
    by_accept = await client.get("/metrics/export", params=params, headers={"Accept": "text/csv"})
    for response in (by_default, by_format, by_accept):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "text/csv; charset=utf-8"
        assert response.headers["content-disposition"] == 'attachment; filename="metrics.csv"'
        assert response.headers["vary"] == "Accept"
        assert response.text == expected
    ndjson_accept = {"Accept": "application/x-ndjson"}
    by_accept = await client.get("/metrics/export", params=params, headers=ndjson_accept)
    by_format = await client.get("/metrics/export", params={**params, "format": "ndjson"})
    # format= wins over Accept when both are given.
    both = await client.get(
        "/metrics/export", params={**params, "format": "ndjson"}, headers={"Accept": "text/csv"}
    )
    for response in (by_accept, by_format, both):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/x-ndjson"
        assert response.headers["content-disposition"] == 'attachment; filename="metrics.ndjson"'
        assert [json.loads(line)["region"] for line in response.text.splitlines()] == [
            "North",
            "South",
        ]
    for accept in ("application/x-ndjson", "application/json"):  # not read beside format=
        csv_wins = await client.get(
            "/metrics/export", params={**params, "format": "csv"}, headers={"Accept": accept}
        )
        assert csv_wins.status_code == 200
        assert csv_wins.text == expected


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("text/csv", "text/csv"),
        ("application/x-ndjson", "application/x-ndjson"),
        ("text/*", "text/csv"),
        ("*/*", "text/csv"),
        ("application/x-ndjson, text/csv", "text/csv"),  # a tie: CSV
        ("text/csv;q=0.5, application/x-ndjson", "application/x-ndjson"),
        ("application/json", 406),
        ("text/csv;q=0, application/x-ndjson;q=0", 406),
    ],
)
async def test_an_export_negotiates_by_q_values(
    client: httpx.AsyncClient, accept: str, expected: str | int
) -> None:
    response = await client.get("/metrics/export", headers={"Accept": accept})
    if isinstance(expected, int):
        problem = assert_problem(response, expected)
        assert problem["detail"] == (
            "This resource can be sent as text/csv or application/x-ndjson only."
        )
    else:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith(expected)


@pytest.mark.parametrize(
    ("params", "accept", "status", "pointer"),
    [
        ({"format": "csv"}, None, 422, "/metrics/export?group_by=region&format=csv"),
        ({"format": "ndjson"}, None, 422, "/metrics/export?group_by=region&format=ndjson"),
        ({"format": "json"}, None, 422, "/metrics/export?group_by=region&format=csv"),
        ({}, "text/csv", 406, "/metrics/export?group_by=region&format=csv"),
        ({}, "application/x-ndjson", 406, "/metrics/export?group_by=region&format=ndjson"),
        ({"limit": "5"}, "text/csv", 406, "/metrics/export?group_by=region&format=csv"),
    ],
)
async def test_metrics_answers_json_only_and_points_to_the_export(
    client: httpx.AsyncClient,
    params: dict[str, str],
    accept: str | None,
    status: int,
    pointer: str,
) -> None:
    headers = {"Accept": accept} if accept else {}
    response = await client.get(
        "/metrics", params={"group_by": "region", **params}, headers=headers
    )
    problem = assert_problem(response, status)
    assert problem["detail"].endswith(pointer), problem
    followed = await client.get(pointer)
    assert followed.status_code == 200
    assert followed.text.splitlines()[0].startswith(("region,", '{"region"'))


async def test_csv_leaves_null_ratios_empty(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/metrics/export", params={"preset": "last_7d", "group_by": "platform"}
    )
    assert response.text.splitlines()[2] == "instagram,0,0,0.00,0,1,,,,,"


async def test_facts_that_cost_nothing_are_zeros_and_ratios_without_denominator_null(
    client: httpx.AsyncClient,
) -> None:
    """docs/metrics.md: a sum over facts is a number, 0 when they hold zeros; `null` is for a
    ratio without denominator (and, with compare, for a period without the group)."""
    body = await get_metrics(client, preset="yesterday", group_by="device_type")
    assert body["rows"] == []
    today = await get_metrics(
        client, start_date="2026-11-10", end_date="2026-11-10", group_by="device_type"
    )
    desktop = next(row for row in today["rows"] if row["device_type"] == "desktop")
    assert (desktop["impressions"], desktop["cost"], desktop["likes"]) == (0, "0.00", 1)
    assert (desktop["ctr"], desktop["cpm"]) == (None, None)


async def test_time_groups_order_rows_in_a_fixed_order_and_columns_as_given(
    client: httpx.AsyncClient,
) -> None:
    """day_of_week given first still sorts after date; an export's columns keep the given
    order."""
    params: dict[str, Any] = {"start_date": "2026-10-26", "end_date": "2026-11-10"}
    params |= {"group_by": ["day_of_week", "date"], "fields": "impressions"}
    body = await get_metrics(client, **params)
    assert [(row["date"], row["day_of_week"]) for row in body["rows"]] == [
        ("2026-10-30", 5),
        ("2026-11-02", 1),
        ("2026-11-03", 2),
        ("2026-11-10", 2),
    ]
    export = await client.get("/metrics/export", params=params)
    assert export.text.splitlines()[:2] == ["day_of_week,date,impressions", "5,2026-10-30,1000"]


async def test_ratios_round_half_away_from_zero(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    """1 click in 128 impressions is 0.0078125: 0.007813 (half away from zero); 2 cents over
    them is a cpm of 0.15625, kept whole."""
    day = date(2026, 11, 5)
    await crud.ensure_dates(session, [day])
    await sql(
        session,
        "INSERT INTO fact_ad_metrics_daily SELECT 20261105, r.region_id, a.age_id, g.gender_id,"
        " p.platform_id, pl.placement_id, d.device_type_id, 128, 1, 0.02, 0, 0"
        " FROM dim_region r, dim_age_group a, dim_gender g, dim_platform p, dim_placement pl,"
        " dim_device_type d WHERE r.region_name = 'North' AND a.age_range = '18-24'"
        " AND g.gender_name = 'female' AND p.platform_name = 'facebook'"
        " AND pl.placement_name = 'feed' AND d.device_type_name = 'mobile'",
    )
    await metrics.refresh_cubes(session, [day])
    await session.commit()
    [row] = (await get_metrics(client, start_date="2026-11-05", end_date="2026-11-05"))["rows"]
    assert (row["ctr"], row["cpc"], row["cpm"]) == (0.007813, "0.020000", "0.156250")


# --- rejections ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "loc", "words"),
    [
        ({"start_date": "2026-11-05", "end_date": "2026-11-01"}, "end_date", "after end_date"),
        ({"start_date": "2020-01-01", "end_date": "2026-01-01"}, "end_date", "more than 1096 days"),
        (
            {"start_date": "2026-02-30", "end_date": "2026-03-01"},
            "start_date",
            "day value is outside",
        ),
        ({"start_date": "2026-11-01"}, "end_date", "go together"),
        ({"end_date": "2026-11-01"}, "start_date", "go together"),
        (
            {"preset": "last_7d", "start_date": "2026-11-01", "end_date": "2026-11-02"},
            "preset",
            "not both",
        ),
        ({"preset": "last_8d"}, "preset", "last_7d"),
        ({"region": "Atlantis"}, "region", "unknown region 'Atlantis'; allowed: North, South"),
        ({"exclude_region": "Atlantis"}, "exclude_region", "unknown region 'Atlantis'; allowed"),
        ({"fields": "cost", "sort": "-cpc"}, "sort", "allowed: cost"),
        ({"fields": "cost", "where": "cpc>1"}, "where", "which fields leaves out"),
        ({"fields": ["cost", "ctr", "cost"]}, "fields", "repeated fields value(s): cost"),
        ({"fields": "spend"}, "fields", "impressions"),
        ({"where": "cost>>1"}, "where", "should match pattern"),
        ({"where": "spend>1"}, "where", "should match pattern"),
        ({"where": "ctr<1e-3"}, "where", "should match pattern"),
        ({"group_by": "colour"}, "group_by", "device_type"),
        ({"group_by": ["date", "region", "date"]}, "group_by", "repeated group_by value(s): date"),
        ({"sort": "region"}, "sort", "not in the result"),
        ({"group_by": "region", "sort": "-platform"}, "sort", "allowed: region, impressions"),
        ({"sort": "impressions desc"}, "sort", "impressions"),
        ({"limit": 0}, "limit", "greater than or equal to 1"),
        ({"limit": 1001}, "limit", "less than or equal to 1000"),
        ({"offset": -1}, "offset", "greater than or equal to 0"),
        ({"region": ["North"] * 101}, "region", "at most 100 items"),
        ({"platform": "face\x00book"}, "platform", "control characters"),
        ({"platform": ""}, "platform", "at least 1 character"),
        ({"format": "xml"}, "format", "GET /metrics answers JSON only"),
        ({"colour": "red"}, "colour", "unknown parameter"),
        ({"limit": ["5", "6"]}, "limit", "given more than once"),
    ],
)
async def test_bad_parameters_are_422_naming_them(
    client: httpx.AsyncClient, params: dict[str, Any], loc: str, words: str
) -> None:
    response = await client.get("/metrics", params=params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    errors = response.json()["errors"]
    matching = [e["msg"] for e in errors if e["loc"][:2] == ["query", loc]]
    assert matching, errors
    assert any(words in message for message in matching), matching


async def test_unknown_filter_values_are_all_named(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics", params={"region": ["North", "Mars"], "gender": "other"})
    errors = {e["loc"][1]: e["msg"] for e in response.json()["errors"]}
    assert errors == {
        "region": "unknown region 'Mars'; allowed: North, South",
        "gender": "unknown gender 'other'; allowed: female, male",
    }


async def test_the_readme_example_names_the_unknown_region_and_the_sort_in_one_422(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/metrics?region=Atlantis&group_by=platform&sort=region")
    assert response.status_code == 422, response.text
    problem = response.json()
    assert [e["loc"] for e in problem["errors"]] == [["query", "region"], ["query", "sort"]]
    assert "Atlantis" in problem["errors"][0]["msg"]
    assert "not in the result" in problem["errors"][1]["msg"]
    assert "query.region: " in problem["detail"]
    assert "query.sort: " in problem["detail"]


async def test_every_problem_of_a_question_is_listed_at_once(client: httpx.AsyncClient) -> None:
    params = {
        "region": "Atlantis",
        "platform": ["facebook", "myspace"],
        "start_date": "2026-11-05",
        "end_date": "2026-11-01",
        "group_by": ["date", "date"],
        "sort": "-gender",
    }
    response = await client.get("/metrics", params=params)
    assert response.status_code == 422, response.text
    errors = [(e["loc"][1], e["msg"]) for e in response.json()["errors"]]
    assert errors == [
        ("end_date", "start_date 2026-11-05 is after end_date 2026-11-01"),
        ("region", "unknown region 'Atlantis'; allowed: North, South"),
        ("platform", "unknown platform 'myspace'; allowed: facebook, instagram"),
        ("group_by", "repeated group_by value(s): date"),
        (
            "sort",
            "cannot sort on 'gender': it is not in the result; allowed: date, "
            "impressions, clicks, cost, conversions, likes, ctr, cpc, cpm, cpa, cvr",
        ),
    ]
    assert response.json()["detail"].endswith("(and 2 more)")


async def test_a_range_too_long_is_named_with_the_unknown_names(
    client: httpx.AsyncClient,
) -> None:
    params = {"start_date": "2020-01-01", "end_date": "2026-01-01", "gender": "other"}
    response = await client.get("/metrics", params=params)
    assert [e["loc"][1] for e in response.json()["errors"]] == ["end_date", "gender"]


async def test_a_dimension_value_added_later_is_found(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    assert (await client.get("/metrics", params={"region": "East"})).status_code == 422
    await sql(session, "INSERT INTO dim_region (region_name) VALUES ('East')")
    await session.commit()
    body = await get_metrics(client, region="east")
    assert body["rows"] == []
    assert body["totals"] == expected_metrics([])


def test_group_by_and_sort_values_are_the_dimensions_and_metrics() -> None:
    """The Literal types that validate and document them list exactly these, no more."""
    groups = (*TIME_GROUPS, *DIMENSIONS)
    assert get_args(GroupBy) == groups
    assert get_args(Metric) == METRICS
    assert set(get_args(MetricsSort)) == {
        f"{sign}{name}" for sign in ("", "-") for name in (*groups, *compared_fields(METRICS))
    }


# --- dimensions -------------------------------------------------------------------------------


async def test_dimensions_list_and_values(client: httpx.AsyncClient) -> None:
    assert (await client.get("/dimensions")).json() == {"dimensions": list(GROUPS)}
    for group, (_, names) in zip(GROUPS, DIMENSION_VALUES.values(), strict=True):
        response = await client.get(f"/dimensions/{group}")
        assert response.json() == {"name": group, "values": sorted(names)}


async def test_unknown_dimension_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/dimensions/colour")
    assert response.status_code == 404
    assert "region" in response.json()["detail"]


# --- exports ----------------------------------------------------------------------------------


async def test_an_export_streams_every_row_as_csv_or_ndjson(client: httpx.AsyncClient) -> None:
    params = {"group_by": ["date", "region"], "sort": "-cost", "fields": ["cost", "ctr"]}
    page = await get_metrics(client, **params)
    csv_answer = await client.get("/metrics/export", params=params)
    assert csv_answer.status_code == 200, csv_answer.text
    assert csv_answer.headers["content-type"] == "text/csv; charset=utf-8"
    lines = list(csv.reader(io.StringIO(csv_answer.text)))
    assert lines[0] == ["date", "region", "cost", "ctr"]
    assert [line[:3] for line in lines[1:]] == [
        [r["date"], r["region"], r["cost"]] for r in page["rows"]
    ]
    assert len(lines) - 1 == page["total_rows"]
    ndjson = await client.get("/metrics/export", params={**params, "format": "ndjson"})
    assert ndjson.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line) for line in ndjson.text.splitlines()] == page["rows"]


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"region": "Atlantis"}, "region"),
        ({"limit": "5"}, "limit"),
        ({"format": "json"}, "format"),
        ({"where": "cpc>1", "fields": "cost"}, "where"),
    ],
)
async def test_an_export_refuses_what_a_question_refuses(
    client: httpx.AsyncClient, params: dict[str, str], loc: str
) -> None:
    response = await client.get("/metrics/export", params=params)
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["errors"]] == [["query", loc]]
