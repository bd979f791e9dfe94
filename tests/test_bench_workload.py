"""The workload benchmark's own logic (bench/workload.py): its questions are legal and the same
for a seed, its DuckDB answers follow docs/metrics.md on a few hand-made facts, its ratios round
half up exactly, and its page comparison tells rows tied on the sort from wrong rows."""

import dataclasses
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

import duckdb
import pytest

import metrics
from bench import workload
from bench.workload import Answer, Question
from metrics_data import DEMO_VALUES
from models import MetricsQuery

FIRST_DAY, LAST_DAY = date(2025, 11, 25), date(2026, 11, 24)
TODAY = date(2026, 12, 2)
VALUES = {name: list(values) for name, values in DEMO_VALUES.items()}


def as_query(question: Question) -> MetricsQuery:
    """The question as the service reads its query string."""
    params: dict[str, list[str]] = {}
    for name, value in question.params():
        params.setdefault(name, []).append(value)
    listed = {*workload.DIMENSIONS, "group_by"}
    return MetricsQuery.model_validate(
        {name: values if name in listed else values[0] for name, values in params.items()}
    )


def test_questions_are_legal_varied_and_reproducible() -> None:
    questions = workload.generate_questions(400, 1, VALUES, FIRST_DAY, LAST_DAY)
    assert questions == workload.generate_questions(400, 1, VALUES, FIRST_DAY, LAST_DAY)
    assert questions != workload.generate_questions(400, 2, VALUES, FIRST_DAY, LAST_DAY)
    for question in questions:
        assert metrics.rule_problems(as_query(question), TODAY, workload.MAX_SPAN_DAYS) == []
    spans = [(q.date_range(TODAY)[1] - q.date_range(TODAY)[0]).days + 1 for q in questions]
    assert min(spans) == 1
    assert max(spans) > 366
    assert sorted(spans)[len(spans) // 2] <= 92  # skewed to shorter ranges
    assert 0.2 < sum(q.start is None for q in questions) / len(questions) < 0.4
    assert any(q.start is not None and q.start < FIRST_DAY for q in questions)
    assert any(q.end is not None and q.end > LAST_DAY for q in questions)
    assert any(q.start is not None and q.start.day == 1 for q in questions)
    assert {len(q.dimensions()) for q in questions} >= {0, 1, 2, 3, 4}
    assert {q.limit for q in questions} == {10, 50, 100, 1000}
    assert any(q.offset for q in questions)
    assert any(value.isupper() for q in questions for _, values in q.filters for value in values)


def test_the_heaviest_question_is_legal() -> None:
    heaviest = workload.heaviest_question(VALUES, LAST_DAY)
    query = as_query(heaviest)
    assert metrics.rule_problems(query, TODAY, workload.MAX_SPAN_DAYS) == []
    assert len(query.group_by) == 9
    first, last = heaviest.date_range(TODAY)
    assert (last - first).days + 1 == workload.MAX_SPAN_DAYS
    assert all(len(values) == 3 for _, values in heaviest.filters)


@pytest.fixture(scope="module")
def facts() -> duckdb.DuckDBPyConnection:
    """A small star schema in DuckDB: two regions, one value of each other dimension, four
    days from Sunday 2026-11-01 (one fact with no impressions, one with no clicks)."""
    connection = duckdb.connect(":memory:")
    for table, columns in workload.TABLES.items():
        definition = ", ".join(f"{column} {kind}" for column, kind in columns)
        connection.execute(f"CREATE TABLE {table} ({definition})")
    for day in range(4):
        value = date(2026, 11, 1) + timedelta(days=day)
        connection.execute("INSERT INTO dim_date VALUES (?, ?)", [int(f"{value:%Y%m%d}"), value])
    connection.execute("INSERT INTO dim_region VALUES (1, 'North'), (2, 'South')")
    for dimension in ("age_group", "gender", "platform", "placement", "device_type"):
        connection.execute(f"INSERT INTO {workload.DIMENSIONS[dimension].table} VALUES (1, 'x')")
    connection.execute(
        "INSERT INTO fact_ad_metrics_daily VALUES"
        " (20261101, 1, 1, 1, 1, 1, 1, 1000, 50, 25.00, 5, 10),"
        " (20261102, 1, 1, 1, 1, 1, 1, 2000, 40, 30.50, 0, 20),"
        " (20261103, 2, 1, 1, 1, 1, 1, 500, 0, 5.25, 0, 0),"
        " (20261104, 2, 1, 1, 1, 1, 1, 0, 0, 0.00, 0, 1)"
    )
    return connection


def test_duckdb_answers_as_documented(facts: duckdb.DuckDBPyConnection) -> None:
    week = workload.run_duckdb(
        facts, Question(date(2026, 11, 1), date(2026, 11, 4), group_by=("week",)), TODAY
    )
    assert [row["week"] for row in week.rows] == ["2026-10-26", "2026-11-02"]  # Mondays
    assert week.total_rows == 2
    assert week.totals["impressions"] == 3500
    assert week.totals["cost"] == Decimal("60.75")
    assert week.totals["ctr"] == Decimal("0.025714")  # 90 / 3500
    assert week.totals["cpm"] == Decimal("17.357143")  # 60.75 * 1000 / 3500
    assert week.rows[1]["cpa"] is None  # no conversions that week

    south = workload.run_duckdb(
        facts,
        Question(
            date(2026, 11, 1), date(2026, 11, 4), filters=(("region", ("SOUTH",)),), sort="-ctr"
        ),
        TODAY,
    )
    assert south.total_rows == 1
    assert south.rows[0]["impressions"] == 500
    assert south.rows[0]["ctr"] == 0
    assert south.rows[0]["cpc"] is None

    by_date = Question(date(2026, 11, 1), date(2026, 11, 4), group_by=("date",), sort="ctr")
    ordered = workload.run_duckdb(facts, by_date, TODAY)
    assert [row["date"] for row in ordered.rows][-1] == "2026-11-04"  # null ctr last
    page = workload.run_duckdb(facts, dataclasses.replace(by_date, limit=1, offset=1), TODAY)
    assert page.rows == ordered.rows[1:2]
    assert page.total_rows == 4

    empty = workload.run_duckdb(facts, Question(date(2027, 1, 1), date(2027, 1, 2)), TODAY)
    assert (empty.rows, empty.total_rows, empty.totals["cost"]) == ([], 0, 0)
    assert empty.totals["ctr"] is None


@pytest.mark.parametrize(
    ("numerator", "denominator"),
    [(1, 3), (2, 3), (1, 8_000_000), (5, 10_000_000), (1, 2_000_000), (999_999_999_999, 7)],
)
def test_exact_ratios_round_half_up(numerator: int, denominator: int) -> None:
    connection = duckdb.connect(":memory:")
    sql = f"SELECT {workload.ratio_columns()} FROM (SELECT ? AS impressions, ? AS clicks,"
    sql += " 0::DECIMAL(38,2) AS cost, 0 AS conversions)"
    ctr = connection.execute(sql, [denominator, numerator]).fetchone()
    assert ctr is not None
    expected = (Decimal(numerator) / Decimal(denominator)).quantize(
        Decimal("0.000001"), ROUND_HALF_UP
    )
    assert workload.duckdb_value("ctr", ctr[0]) == expected


def rows(*values: tuple[str, int]) -> list[dict[str, object]]:
    return [{"region": region, "likes": likes} for region, likes in values]


def test_rows_tied_on_the_sort_may_come_in_either_order() -> None:
    question = Question(group_by=("region",), sort="-likes", limit=2)
    every = Answer(rows(("a", 5), ("b", 3), ("c", 3)), {}, 3)
    totals = dict.fromkeys(workload.METRICS, 0)
    duck = Answer(rows(("a", 5), ("b", 3)), totals, 3)
    tied = Answer(rows(("a", 5), ("c", 3)), totals, 3)
    assert workload.compare(question, tied, duck, lambda: every) == ([], True)
    wrong = Answer(rows(("a", 5), ("c", 4)), totals, 3)
    problems, _ = workload.compare(question, wrong, duck, lambda: every)
    assert problems
    unsorted = Question(group_by=("region",), limit=2)
    problems, _ = workload.compare(unsorted, tied, duck, lambda: every)
    assert problems
