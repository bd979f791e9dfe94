"""The cubes and every way a question's range is read: the cubes hold exactly the sums plain SQL
gives; each answer, from whichever sources the planner picks, equals plain SQL over the facts;
every source gives the same answer as every other; and all of this holds after load-metrics
writes days inside a whole month and inside a partial one."""

import asyncio
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel.ext.asyncio.session import AsyncSession

import crud
import metrics
from deps import state_of
from main import utc_today
from models import (
    CUBE_MAX_DIMENSIONS,
    DAY_GROUPS,
    DIMENSIONS,
    MetricsPart,
    MetricsPlan,
    MetricsSource,
    dimension_mask,
)
from settings import Settings
from tests.helpers import (
    ROOT,
    assert_cubes_hold_the_facts_sums,
    checksum,
    cli_environment,
    expected_metrics,
    passes,
    plain_sql,
    run_cli,
    seed_unless_seeded,
    sql,
    write_csv,
)

END = date(2026, 11, 10)
# 75 days: the end of August, all of September and October, ten days of November.
SEASON = ("seed-metrics", "--days", "75", "--rows-per-day", "120", "--end-date", END.isoformat())
LAST_SEEDED: dict[str, Any] = {}

GROUPS = [
    [], ["date"], ["week"], ["month"], ["quarter"], ["year"], ["day_of_week"],
    *([name] for name in DIMENSIONS),
    ["quarter", "region"],  # whole months answer quarters and years
    ["day_of_week", "platform", "gender"],  # days of the week need the days
    ["month", "platform", "device_type"],  # three dimensions: the daily cube
    ["region", "age_group", "placement"],
    ["date", "region", "device_type"],
    ["region", "age_group", "gender", "platform"],  # four: days from the facts
    ["week", "gender", "platform", "placement", "device_type"],
    ["month", *DIMENSIONS],  # every dimension: whole months from the monthly cube's full set
]  # fmt: skip
FILTERS: list[dict[str, list[str]]] = [
    {},
    {"platform": ["instagram"]},
    {"region": ["Germany", "France"], "device_type": ["mobile"]},
    # Four dimensions, the key's first ones: the facts are read by probing their primary key.
    {"region": ["Germany"], "age_group": ["18-24", "25-34"], "gender": ["female"],
     "platform": ["facebook"]},
    # Every gender: no filter at all, so a smaller cube answers.
    {"gender": ["female", "male", "unknown"], "platform": ["facebook"]},
    # Exclusions: on the daily cube's keys, and on facts read by probes.
    {"exclude_region": ["Germany", "France"], "platform": ["facebook"]},
    {"region": ["Germany"], "exclude_age_group": ["18-24"], "gender": ["female"],
     "exclude_platform": ["messenger"]},
]  # fmt: skip
RANGES = [
    (date(2026, 8, 28), END),  # days, two whole months, days
    (date(2026, 9, 1), date(2026, 10, 31)),  # whole months only
    (date(2026, 9, 3), date(2026, 9, 20)),  # inside one month
]


@pytest.fixture
async def season(settings: Settings, session: AsyncSession, app: FastAPI) -> Any:
    """The demo set of SEASON, seeded only when the tables hold something else."""
    await seed_unless_seeded(settings, session, SEASON, LAST_SEEDED)
    state_of(app).dimension_names = metrics.NameCache()
    app.dependency_overrides[utc_today] = lambda: END
    yield
    app.dependency_overrides.pop(utc_today)


@pytest.fixture
async def changed_season(settings: Settings, session: AsyncSession, app: FastAPI) -> Any:
    """Season-like data for a test that changes it anyway: the season unless facts are there
    (an earlier such test's changes); answers are compared with plain SQL on whatever is there."""
    facts = await sql(session, "SELECT count(*) FROM fact_ad_metrics_daily")
    if facts.scalar_one() == 0:
        result = run_cli(settings, *SEASON)
        assert result.returncode == 0, result.stderr
    await session.commit()
    LAST_SEEDED.clear()  # the season is changed
    state_of(app).dimension_names = metrics.NameCache()
    app.dependency_overrides[utc_today] = lambda: END
    yield
    app.dependency_overrides.pop(utc_today)


async def assert_answers_equal_plain_sql(
    client: httpx.AsyncClient,
    session: AsyncSession,
    group_by: list[str],
    filters: dict[str, list[str]],
    start: date,
    end: date,
) -> None:
    params: dict[str, Any] = {
        "start_date": start,
        "end_date": end,
        "group_by": group_by,
        "limit": 1000,
        **filters,
    }
    response = await client.get("/metrics", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = await plain_sql(session, group_by, start, end, filters)
    # Past a page of 1,000 groups, the page is a part of them.
    assert len(body["rows"]) == min(len(expected), 1000)
    assert all(row in expected for row in body["rows"])
    assert body["total_rows"] == len(expected)
    totals = await plain_sql(session, [], start, end, filters)
    assert body["totals"] == (totals[0] if totals else ZERO_TOTALS)


ZERO_TOTALS = {
    "impressions": 0, "clicks": 0, "cost": "0.00", "conversions": 0, "likes": 0,
    "ctr": None, "cpc": None, "cpm": None, "cpa": None, "cvr": None,
}  # fmt: skip


# Every group_by over the range with partial months at both ends, filtered on the daily cube's
# keys and on the facts' (every filter against the facts' answer in the next test); the other
# ranges with every group_by.
QUESTIONS = [
    *((group_by, filters, *RANGES[0]) for group_by in GROUPS for filters in FILTERS[1::2]),
    *((group_by, FILTERS[4], *span) for group_by in GROUPS for span in RANGES[1:]),
]


@pytest.mark.parametrize(("group_by", "filters", "start", "end"), QUESTIONS)
@pytest.mark.usefixtures("season")
async def test_every_question_equals_plain_sql(
    client: httpx.AsyncClient,
    session: AsyncSession,
    group_by: list[str],
    filters: dict[str, list[str]],
    start: date,
    end: date,
) -> None:
    await assert_answers_equal_plain_sql(client, session, group_by, filters, start, end)


async def plan_of(
    session: AsyncSession, group_by: list[str], filters: dict[str, list[str]]
) -> MetricsPlan:
    ids: dict[str, dict[str, list[int]]] = {"": {}, "exclude_": {}}
    for parameter, values in filters.items():
        name = parameter.removeprefix("exclude_")
        found, unknown, _ = await metrics.resolve_names(
            session, metrics.NameCache(), DIMENSIONS[name], values
        )
        assert not unknown
        ids[parameter.removesuffix(name)][name] = found
    used = [p.removeprefix("exclude_") for p in filters]
    mask = dimension_mask([*used, *(g for g in group_by if g in DIMENSIONS)])
    return MetricsPlan(
        parts=(),
        set_mask=mask,
        filters=ids[""],
        excludes=ids["exclude_"],
        group_by=tuple(group_by),
        sort=None,
        limit=1000,
        offset=0,
    )


def whole(source: MetricsSource, probe_depth: int = 0) -> tuple[MetricsPart, ...]:
    """The season's whole range from one source, by days."""
    return (MetricsPart(source, 20260828, 20261110, probe_depth),)


MONTHS = (
    MetricsPart("daily", 20260828, 20260831),
    MetricsPart("monthly", 202609, 202610),
    MetricsPart("facts", 20261101, 20261110),
)


@pytest.mark.parametrize("filters", [FILTERS[0], FILTERS[2], FILTERS[3], FILTERS[6]])
@pytest.mark.parametrize("group_by", GROUPS)
@pytest.mark.usefixtures("season")
async def test_every_source_gives_the_facts_answer(
    session: AsyncSession, group_by: list[str], filters: dict[str, list[str]]
) -> None:
    plan = await plan_of(session, group_by, filters)
    from_facts = await crud.query_metrics(session, replace(plan, parts=whole("facts")))
    assert from_facts.total_rows > 0
    sources = [whole("fact_probes", depth) for depth in (2, 6)]
    small = plan.set_mask.bit_count() <= CUBE_MAX_DIMENSIONS
    if small:
        sources.append(whole("daily"))
    if not set(DAY_GROUPS) & set(group_by):  # a month's row stands for its first day
        head = MetricsPart("daily" if small else "fact_probes", 20260828, 20260831, 2)
        months = MetricsPart("monthly", 202609, 202610)
        sources.append((head, months, MetricsPart("facts", 20261101, 20261110)))
    for parts in sources:
        answer = await crud.query_metrics(session, replace(plan, parts=parts))
        assert answer == from_facts, parts


@pytest.mark.usefixtures("season")
async def test_the_cubes_hold_exactly_the_sums_plain_sql_gives(session: AsyncSession) -> None:
    await assert_cubes_hold_the_facts_sums(session)


def test_the_planner_reads_whole_months_from_the_monthly_cube() -> None:
    days = metrics.plan_parts(date(2026, 8, 28), END, ["platform"], ("daily", 0))
    assert days == (
        MetricsPart("daily", 20260828, 20260831),
        MetricsPart("monthly", 202609, 202610),
        MetricsPart("daily", 20261101, 20261110),
    )
    assert metrics.plan_parts(date(2026, 9, 1), date(2026, 9, 30), [], ("facts", 0)) == (
        MetricsPart("monthly", 202609, 202609),
    )
    assert metrics.plan_parts(date(2026, 9, 2), date(2026, 9, 30), [], ("facts", 0)) == (
        MetricsPart("facts", 20260902, 20260930),
    )
    # Grouped by day or week, a month's row cannot be split: every day is read as days.
    assert metrics.plan_parts(date(2026, 8, 28), END, ["week"], ("daily", 0)) == (
        MetricsPart("daily", 20260828, 20261110),
    )
    assert metrics.split_range(date(2024, 2, 1), date(2024, 2, 29)) == [
        (date(2024, 2, 1), date(2024, 2, 29), True)
    ]
    assert metrics.split_range(date(2025, 12, 31), date(2026, 1, 1)) == [
        (date(2025, 12, 31), date(2026, 1, 1), False)
    ]


@pytest.mark.usefixtures("season")
async def test_ranges_at_the_ends_of_the_calendar_are_answered(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    assert metrics.split_range(date(9999, 12, 1), date(9999, 12, 31)) == [
        (date(9999, 12, 1), date(9999, 12, 31), True)
    ]
    assert metrics.split_range(date(9999, 12, 2), date(9999, 12, 31)) == [
        (date(9999, 12, 2), date(9999, 12, 31), False)
    ]
    assert metrics.split_range(date(1, 1, 1), date(1, 1, 30)) == [
        (date(1, 1, 1), date(1, 1, 30), False)
    ]
    for start, end in (
        (date(9999, 12, 1), date(9999, 12, 31)),
        (date(9997, 1, 2), date(9999, 12, 31)),
        (date(1, 1, 1), date(1, 1, 31)),
        (date(2020, 1, 1), date(2020, 2, 29)),  # a whole leap February, no facts
    ):
        await assert_answers_equal_plain_sql(client, session, ["month"], {}, start, end)


def test_the_planner_reads_days_from_the_smallest_source() -> None:
    sizes = {"region": 20, "age_group": 7, "gender": 3, "platform": 4, "placement": 8,
             "device_type": 4}  # fmt: skip
    three = dimension_mask(["region", "age_group", "placement"])
    assert metrics.day_source({"region": [1]}, sizes, three) == ("daily", 0)
    four = dimension_mask(["region", "age_group", "gender", "platform"])
    assert metrics.day_source({}, sizes, four) == ("facts", 0)
    # One region and two platforms: 42 probes a day down to the platform (every age and
    # gender) cost less than one probe and every fact of the region.
    assert metrics.day_source({"region": [1], "platform": [1, 2]}, sizes, four) == (
        "fact_probes",
        4,
    )
    # One age group, one platform, one device type: probing down to the platform (60 probes a
    # day) and checking the device on what it finds beats probing all 480 combinations.
    filters = {"age_group": [1], "platform": [1], "device_type": [1]}
    assert metrics.day_source(filters, sizes, four | 32) == ("fact_probes", 4)
    # A device type alone would take 20 * 7 * 3 * 4 * 8 probes a day: the range is scanned.
    assert metrics.day_source({"device_type": [1]}, sizes, four | 32) == ("facts", 0)


@pytest.mark.usefixtures("changed_season")
async def test_a_load_inside_the_range_keeps_every_answer_exact(
    settings: Settings, client: httpx.AsyncClient, session: AsyncSession, tmp_path: Path
) -> None:
    lines = [
        "2026-09-15,Germany,18-24,female,facebook,feed,mobile,100000,10,1.50,1,2",  # whole month
        "2026-09-15,Atlantis,18-24,female,facebook,feed,mobile,5000,50,7.25,5,0",  # a new region
        "2026-11-05,France,65+,male,instagram,reels,tablet,7,7,0.07,0,1",  # the partial month
    ]
    path = write_csv(tmp_path, *lines)
    result = run_cli(settings, "load-metrics", str(path))
    assert result.returncode == 0, result.stderr
    for group_by in (
        ["region"],
        ["month", "platform"],
        ["region", "age_group", "gender", "platform"],
    ):
        for filters in FILTERS[:3]:
            await assert_answers_equal_plain_sql(
                client, session, group_by, filters, date(2026, 8, 28), END
            )
    await assert_cubes_hold_the_facts_sums(session)


@pytest.mark.usefixtures("changed_season")
async def test_a_filter_naming_every_value_still_leaves_out_a_value_added_since(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    every = {"gender": ["female", "male", "unknown"]}
    start = date(2026, 8, 28)
    await assert_answers_equal_plain_sql(client, session, ["platform"], every, start, END)
    # A new gender, with a fact, arrives behind the name cache's back.
    await sql(session, "INSERT INTO dim_gender (gender_name) VALUES ('other')")
    await sql(
        session,
        "INSERT INTO fact_ad_metrics_daily SELECT 20260915, r.region_id, a.age_id, g.gender_id,"
        " p.platform_id, pl.placement_id, d.device_type_id, 1000, 10, 1.00, 1, 1"
        " FROM dim_region r, dim_age_group a, dim_gender g, dim_platform p, dim_placement pl,"
        " dim_device_type d WHERE r.region_name = 'Germany' AND a.age_range = '18-24'"
        " AND g.gender_name = 'other' AND p.platform_name = 'facebook'"
        " AND pl.placement_name = 'feed' AND d.device_type_name = 'mobile'",
    )
    await metrics.refresh_cubes(session, [date(2026, 9, 15)])
    await session.commit()
    await assert_answers_equal_plain_sql(client, session, ["platform"], every, start, END)
    await assert_answers_equal_plain_sql(client, session, ["platform"], {}, start, END)


@pytest.mark.usefixtures("changed_season")
async def test_a_load_whose_month_would_overflow_the_cubes_writes_nothing(
    settings: Settings, session: AsyncSession, tmp_path: Path
) -> None:
    largest = 2**63 - 1
    lines = [
        f"2026-09-15,Germany,18-24,female,facebook,feed,mobile,{largest},0,0,0,0",
        f"2026-09-16,Germany,18-24,female,facebook,feed,mobile,{largest},0,0,0,0",
    ]
    path = write_csv(tmp_path, *lines)
    before = await checksum(session)
    result = run_cli(settings, "load-metrics", str(path))
    assert result.returncode == 1
    assert "was not loaded; nothing was written" in result.stderr
    assert "largest 64-bit integer" in result.stderr
    assert await checksum(session) == before


@pytest.mark.usefixtures("changed_season")
async def test_a_seed_keeps_the_facts_of_its_first_and_last_months_outside_its_days(
    settings: Settings, session: AsyncSession, tmp_path: Path
) -> None:
    lines = [
        "2026-08-27,Germany,18-24,female,facebook,feed,mobile,500,5,0.50,1,1",  # the day before
        "2026-11-20,France,18-24,female,facebook,feed,mobile,700,7,0.70,1,1",  # after its end
    ]
    path = write_csv(tmp_path, *lines)
    assert run_cli(settings, "load-metrics", str(path)).returncode == 0
    result = run_cli(settings, *SEASON)  # writes 2026-08-28 to 2026-11-10 again
    assert result.returncode == 0, result.stderr
    facts = await sql(
        session, "SELECT count(*) FROM fact_ad_metrics_daily WHERE date_id IN (20260827, 20261120)"
    )
    assert facts.scalar_one() == 2
    await assert_cubes_hold_the_facts_sums(session)


@pytest.mark.parametrize(
    ("group_by", "conditions"),
    [
        (["region", "platform"], [("cost", ">", "40"), ("ctr", "<", "0.02")]),
        (["month", "device_type"], [("impressions", ">=", "50000")]),
        (["date", "region", "age_group", "gender"], [("cpc", "<=", "0.5"), ("clicks", ">", "0")]),
    ],
)
@pytest.mark.usefixtures("season")
async def test_conditions_equal_plain_sql_filtered_by_them(
    client: httpx.AsyncClient,
    session: AsyncSession,
    group_by: list[str],
    conditions: list[tuple[str, str, str]],
) -> None:
    start = date(2026, 8, 28)
    where = [f"{metric}{op}{number}" for metric, op, number in conditions]
    params: dict[str, Any] = {"start_date": start, "end_date": END, "group_by": group_by}
    params["where"] = where
    body = (await client.get("/metrics", params={**params, "limit": 1000})).json()
    kept = [
        row for row in await plain_sql(session, group_by, start, END, {}) if passes(row, conditions)
    ]
    assert 0 < len(kept) <= 1000
    assert sorted(map(str, body["rows"])) == sorted(map(str, kept))
    assert body["total_rows"] == len(kept)
    assert body["totals"] == expected_metrics(kept)


@pytest.mark.usefixtures("changed_season")
async def test_writers_of_facts_take_turns(
    settings: Settings, session: AsyncSession, tmp_path: Path
) -> None:
    # This session holds the writers' turn, as a load in progress does.
    await crud.take_the_writers_turn(session)
    path = write_csv(tmp_path, "2026-09-20,Germany,18-24,female,facebook,feed,mobile,90,9,0.90,1,1")
    load = await asyncio.create_subprocess_exec(
        sys.executable, "cli.py", "load-metrics", str(path), cwd=ROOT, env=cli_environment(settings)
    )
    with pytest.raises(TimeoutError):  # it waits for the turn
        await asyncio.wait_for(asyncio.shield(load.wait()), 1.5)
    await session.rollback()  # the turn is given back
    assert await asyncio.wait_for(load.wait(), 30) == 0
    await assert_cubes_hold_the_facts_sums(session)
