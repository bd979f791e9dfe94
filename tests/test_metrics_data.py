"""seed-metrics and load-metrics: deterministic, idempotent, all-or-nothing; and on seeded data,
every /metrics answer equals the same sums worked out directly in SQL."""

import csv
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
from fastapi import FastAPI
from sqlmodel.ext.asyncio.session import AsyncSession

import metrics
from deps import state_of
from main import utc_today
from metrics_data import COMBINATIONS, DEMO_VALUES
from settings import Settings
from tests.helpers import (
    HEADER,
    ROOT,
    checksum,
    clear_metrics,
    cli_environment,
    plain_sql,
    run_cli,
    sql,
    write_csv,
)

END = date(2026, 11, 10)
SEED_ARGS = ("seed-metrics", "--days", "20", "--rows-per-day", "300", "--end-date", END.isoformat())


@pytest.fixture
async def empty_metrics(session: AsyncSession, app: FastAPI) -> AsyncIterator[None]:
    await clear_metrics(session)
    state_of(app).dimension_names = metrics.NameCache()
    app.dependency_overrides[utc_today] = lambda: END
    yield
    app.dependency_overrides.pop(utc_today)


# The checksum of the last seeding by `seeded`, so its tests seed once, not once each.
LAST_SEEDED: dict[str, Any] = {}


@pytest.fixture
async def seeded(settings: Settings, session: AsyncSession, app: FastAPI) -> None:
    """The demo set of SEED_ARGS, seeded only when the tables hold something else."""
    if not LAST_SEEDED or await checksum(session) != LAST_SEEDED:
        await clear_metrics(session)
        cli_ok(settings, *SEED_ARGS)
        LAST_SEEDED.update(await checksum(session))
    state_of(app).dimension_names = metrics.NameCache()


def cli_ok(settings: Settings, *args: str) -> str:
    result = run_cli(settings, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


@pytest.mark.usefixtures("empty_metrics")
@pytest.mark.slow
async def test_seed_is_deterministic_idempotent_and_plausible(
    settings: Settings, session: AsyncSession
) -> None:
    cli_ok(settings, *SEED_ARGS)
    first = await checksum(session)
    assert first["facts"] == 20 * 300
    assert first["days"] == 20
    assert first["regions"] == ",".join(DEMO_VALUES["region"])
    assert first["platforms"] == "facebook,instagram,messenger,audience_network"

    cli_ok(settings, *SEED_ARGS)
    assert await checksum(session) == first

    assert "nothing to do" in cli_ok(settings, *SEED_ARGS, "--seed", "2", "--if-empty")
    assert await checksum(session) == first
    cli_ok(settings, *SEED_ARGS, "--seed", "2")
    other = await checksum(session)
    assert other["facts"] == first["facts"]
    assert other["facts_md5"] != first["facts_md5"]

    implausible = await sql(
        session,
        "SELECT count(*) FROM fact_ad_metrics_daily"
        " WHERE clicks > impressions OR conversions > clicks",
    )
    assert implausible.scalar_one() == 0
    span = await sql(session, "SELECT min(date_id), max(date_id) FROM fact_ad_metrics_daily")
    assert tuple(span.one()) == (20261022, 20261110)


@pytest.mark.usefixtures("empty_metrics")
def test_seed_rejects_sizes_out_of_range(settings: Settings) -> None:
    for args in (("--days", "0"), ("--rows-per-day", str(COMBINATIONS + 1))):
        result = run_cli(settings, "seed-metrics", *args)
        assert result.returncode == 2
        assert args[0] in result.stderr


@pytest.mark.parametrize(
    "group_by",
    [
        [],
        ["date"],
        ["week"],
        ["month"],
        ["region"],
        ["age_group"],
        ["gender"],
        ["platform"],
        ["placement"],
        ["device_type"],
        ["month", "platform", "device_type"],
    ],
)
@pytest.mark.parametrize("platform", ["", "instagram"])
@pytest.mark.usefixtures("seeded")
async def test_answers_on_seeded_data_equal_plain_sql(
    session: AsyncSession,
    client: httpx.AsyncClient,
    group_by: list[str],
    platform: str,
) -> None:
    start, end = date(2026, 10, 25), date(2026, 11, 8)
    params: dict[str, Any] = {
        "start_date": start,
        "end_date": end,
        "group_by": group_by,
        "limit": 1000,
    }
    if platform:
        params["platform"] = platform
    response = await client.get("/metrics", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    chosen = {"platform": [platform]} if platform else {}
    expected = await plain_sql(session, group_by, start, end, chosen)
    key = lambda row: [str(row[g]) for g in group_by]  # noqa: E731
    assert sorted(body["rows"], key=key) == sorted(expected, key=key)
    assert body["total_rows"] == len(expected)
    assert body["totals"] == (await plain_sql(session, [], start, end, chosen))[0]


# --- load-metrics ------------------------------------------------------------------------------


@pytest.mark.usefixtures("empty_metrics")
@pytest.mark.slow
async def test_load_upserts_facts_and_creates_new_values(
    settings: Settings, session: AsyncSession, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    cli_ok(settings, *SEED_ARGS)
    before = await checksum(session)
    rows = [
        "2026-11-10,Atlantis,18-24,female,facebook,feed,mobile,100,10,1.50,1,2",
        "2026-11-10,germany,18-24,female,FACEBOOK,feed,mobile,200,20,3.00,2,4",
        "2026-12-25,Germany,65+,unknown,messenger,search,connected_tv,0,0,0,0,0",
    ]
    output = cli_ok(settings, "load-metrics", str(write_csv(tmp_path, *rows)))
    assert "3 facts inserted or updated" in output
    loaded = await checksum(session)
    assert loaded["facts"] in (before["facts"] + 2, before["facts"] + 3)
    assert loaded["regions"] == before["regions"] + ",Atlantis"
    assert loaded["days"] == before["days"] + 1

    atlantis = (
        await client.get("/metrics", params={"region": "atlantis", "preset": "last_7d"})
    ).json()
    assert atlantis["totals"]["impressions"] == 100

    changed = [rows[0].replace(",100,10,1.50,", ",150,15,2.25,")]
    cli_ok(settings, "load-metrics", str(write_csv(tmp_path, *changed)))
    assert (await checksum(session))["facts"] == loaded["facts"]
    atlantis = (
        await client.get("/metrics", params={"region": "Atlantis", "preset": "last_7d"})
    ).json()
    assert (atlantis["totals"]["impressions"], atlantis["totals"]["cost"]) == (150, "2.25")


BAD_LINES = {
    3: "2026-02-30,North,18-24,female,facebook,feed,mobile,1,0,0,0,0",
    4: "2026-11-10,North,18-24,female,facebook,feed,mobile,-1,0,0,0,0",
    5: "2026-11-10,North,18-24,female,facebook,feed,mobile,1,0,1.005,0,0",
    6: "2026-11-10,North,18-24,female,facebook,feed,mobile,1,0,0,0",
    7: "2026-11-10,Nor\x01th,18-24,female,facebook,feed,mobile,1,0,0,0,0",
    8: "2026-11-10, ,18-24,female,facebook,feed,mobile,1,0,0,0,0",
    9: "2026-11-10,North,18-24,female,facebook,feed,mobile,99999999999999999999,0,0,0,0",
}


@pytest.mark.usefixtures("empty_metrics")
async def test_a_malformed_file_is_rejected_whole_with_line_numbers(
    settings: Settings, session: AsyncSession, tmp_path: Path
) -> None:
    cli_ok(settings, *SEED_ARGS)
    before = await checksum(session)
    good = "2026-11-10,Atlantis,18-24,female,facebook,feed,mobile,100,10,1.50,1,2"
    path = write_csv(tmp_path, good, *BAD_LINES.values())
    result = run_cli(settings, "load-metrics", str(path))
    assert result.returncode == 1
    assert "nothing was written" in result.stderr
    for number in BAD_LINES:
        assert f"line {number}: " in result.stderr
    assert "line 2:" not in result.stderr
    assert await checksum(session) == before


@pytest.mark.usefixtures("empty_metrics")
async def test_a_key_given_twice_is_rejected_naming_both_lines(
    settings: Settings, session: AsyncSession, tmp_path: Path
) -> None:
    cli_ok(settings, *SEED_ARGS)
    before = await checksum(session)
    line = "2026-11-10,Atlantis,18-24,female,facebook,feed,mobile,100,10,1.50,1,2"
    path = write_csv(
        tmp_path, line, line.replace("Atlantis", "Lemuria"), line.replace("Atlantis", "ATLANTIS")
    )
    result = run_cli(settings, "load-metrics", str(path))
    assert result.returncode == 1
    assert "line 2: same date and dimensions as line(s) 4" in result.stderr
    assert await checksum(session) == before


@pytest.mark.usefixtures("empty_metrics")
async def test_malformed_lines_and_a_key_given_twice_are_reported_in_one_run(
    settings: Settings, session: AsyncSession, tmp_path: Path
) -> None:
    cli_ok(settings, *SEED_ARGS)
    before = await checksum(session)
    line = "2026-11-10,Atlantis,18-24,female,facebook,feed,mobile,100,10,1.50,1,2"
    path = write_csv(tmp_path, line, BAD_LINES[3], line.replace("100,", "7,"), BAD_LINES[6])
    result = run_cli(settings, "load-metrics", str(path))
    assert result.returncode == 1
    assert "nothing was written" in result.stderr
    assert "line 3: date: " in result.stderr
    assert "line 5: expected 12 fields, found 11" in result.stderr
    assert "line 2: same date and dimensions as line(s) 4" in result.stderr
    assert await checksum(session) == before


@pytest.mark.parametrize(
    "content",
    [
        "",
        "date,region\n2026-11-10,North\n",
        HEADER.replace("likes", "shares")
        + "2026-11-10,North,18-24,female,facebook,feed,mobile,1,0,0,0,0\n",
    ],
)
@pytest.mark.usefixtures("empty_metrics")
async def test_a_file_without_the_right_header_is_rejected(
    settings: Settings, session: AsyncSession, tmp_path: Path, content: str
) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(content)
    result = run_cli(settings, "load-metrics", str(path))
    assert result.returncode == 1
    assert "line 1: the header must be" in result.stderr
    assert (await checksum(session))["facts"] == 0


# --- cubes (tests/test_cubes.py has the rest) ---------------------------------------------------


@pytest.mark.usefixtures("empty_metrics")
async def test_loads_keep_the_cubes_in_step(
    settings: Settings, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    cli_ok(settings, *SEED_ARGS)
    before = (
        await client.get("/metrics", params={"preset": "last_7d", "group_by": "platform"})
    ).json()
    line = "2026-11-10,Atlantis,18-24,female,facebook,feed,mobile,100000,10,1.50,1,2"
    cli_ok(settings, "load-metrics", str(write_csv(tmp_path, line)))
    after = (
        await client.get("/metrics", params={"preset": "last_7d", "group_by": "platform"})
    ).json()
    facebook = next(row["impressions"] for row in before["rows"] if row["platform"] == "facebook")
    assert [row["impressions"] for row in after["rows"] if row["platform"] == "facebook"] == [
        facebook + 100000
    ]


@pytest.mark.usefixtures("empty_metrics")
async def test_money_is_exact_in_json_and_csv_at_any_size(
    settings: Settings, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    # 151 facts at the column's largest cost: 150999999999998.49, past a double's precision.
    days = [date(2026, 1, 1) + timedelta(days=n) for n in range(151)]
    lines = [
        f"{day},North,18-24,female,facebook,feed,mobile,7,3,999999999999.99,1,0" for day in days
    ]
    cli_ok(settings, "load-metrics", str(write_csv(tmp_path, *lines)))
    params = {"start_date": "2026-01-01", "end_date": "2026-12-31"}
    body = (await client.get("/metrics", params=params)).json()
    totals = body["totals"]
    assert totals["cost"] == "150999999999998.49"
    assert Decimal(totals["cpc"]) == (Decimal("150999999999998.49") / 453).quantize(Decimal("1E-6"))
    assert totals["cpa"] == "999999999999.990000"
    assert isinstance(totals["ctr"], float)
    csv_text = (await client.get("/metrics/export", params=params)).text
    assert csv_text.splitlines()[1].startswith("1057,453,150999999999998.49,151,0,")
    ndjson = (await client.get("/metrics/export", params={**params, "format": "ndjson"})).json()
    assert ndjson == totals  # the one row is the totals
    micros = (await client.get("/metrics/export", params={**params, "money": "micros"})).text
    header, line = micros.splitlines()
    assert header.split(",")[:4] == ["impressions", "clicks", "cost_micros", "conversions"]
    cost_micros = line.split(",")[2]
    assert cost_micros == "150999999999998490000"
    schema = (await client.get("/openapi.json")).json()["components"]["schemas"]
    for model, field in (("MetricsRow", "cost"), ("MetricTotals", "previous_cost")):
        cost = schema[model]["properties"][field]["anyOf"][0]
        assert (cost["type"], cost["format"]) == ("string", "decimal")


@pytest.mark.usefixtures("seeded")
async def test_duckdb_reads_exports_exactly_as_docs_metrics_md_says(
    client: httpx.AsyncClient, session: AsyncSession, tmp_path: Path
) -> None:
    """The recipes of docs/metrics.md: money=micros as BIGINT, decimal CSV with DECIMAL types,
    NDJSON with its money read as DECIMAL; each sum of cost equals the facts' own."""
    start, end = END - timedelta(days=19), END
    facts = await sql(
        session,
        "SELECT sum(cost) AS cost, sum(cpc) AS cpc FROM (SELECT sum(f.cost) AS cost,"
        " round(sum(f.cost) / nullif(sum(f.clicks), 0), 6) AS cpc FROM fact_ad_metrics_daily f"
        " JOIN dim_region r USING (region_id) WHERE f.date_id BETWEEN :first AND :last"
        " GROUP BY f.date_id, r.region_name) AS g",
        first=int(start.strftime("%Y%m%d")),
        last=int(end.strftime("%Y%m%d")),
    )
    expected_cost, expected_cpc = tuple(facts.one())
    question: dict[str, Any] = {"start_date": start.isoformat(), "end_date": end.isoformat()}
    question |= {"group_by": ["date", "region"], "fields": ["cost", "cpc"]}
    files: dict[str, Path] = {}
    for name, extra in {
        "micros.csv": {"money": "micros"},
        "decimal.csv": {},
        "rows.ndjson": {"format": "ndjson"},
    }.items():
        response = await client.get("/metrics/export", params={**question, **extra})
        assert response.status_code == 200, response.text
        files[name] = tmp_path / name
        files[name].write_bytes(response.content)
    duck = duckdb.connect(":memory:")
    micros = duck.sql(
        f"SELECT typeof(cost_micros), sum(cost_micros), sum(cpc_micros)"
        f" FROM read_csv('{files['micros.csv']}') GROUP BY 1"
    ).fetchall()
    assert micros == [("BIGINT", int(expected_cost * 10**6), int(expected_cpc * 10**6))]
    decimal_csv = duck.sql(
        f"SELECT sum(cost), sum(cpc) FROM read_csv('{files['decimal.csv']}',"
        " types={'cost': 'DECIMAL(18,2)', 'cpc': 'DECIMAL(24,6)'})"
    ).fetchone()
    assert decimal_csv == (expected_cost, expected_cpc)
    ndjson = duck.sql(
        f"SELECT sum(cost::DECIMAL(18,2)), sum(cpc::DECIMAL(24,6))"
        f" FROM read_json('{files['rows.ndjson']}')"
    ).fetchone()
    assert ndjson == (expected_cost, expected_cpc)


@pytest.mark.usefixtures("empty_metrics")
async def test_csv_cells_a_spreadsheet_would_run_as_formulas_are_neutralised(
    settings: Settings, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    names = ['=HYPERLINK("http://x.example","y")', "@SUM(1+1)", "+1+2", "-3", "Plain"]
    lines = [
        f'2026-11-10,"{name.replace(chr(34), chr(34) * 2)}",18-24,female,facebook,feed,mobile,1,0,0,0,0'  # noqa: E501
        for name in names
    ]
    cli_ok(settings, "load-metrics", str(write_csv(tmp_path, *lines)))
    question = {"preset": "last_7d", "group_by": "region"}
    response = await client.get("/metrics/export", params=question)
    regions = [row[0] for row in csv.reader(io.StringIO(response.text))][1:]
    assert sorted(regions) == sorted([f"'{name}" for name in names[:4]] + ["Plain"])
    json_rows = (await client.get("/metrics", params=question)).json()["rows"]
    assert sorted(row["region"] for row in json_rows) == sorted(names)  # JSON is left as it is
    # As they are, when asked; NDJSON never changes a name.
    raw = await client.get("/metrics/export", params={**question, "escape_formulas": "false"})
    assert sorted(row[0] for row in csv.reader(io.StringIO(raw.text)) if row[0] != "region") == (
        sorted(names)
    )
    ndjson = await client.get("/metrics/export", params={**question, "format": "ndjson"})
    assert sorted(json.loads(line)["region"] for line in ndjson.text.splitlines()) == sorted(names)


@pytest.mark.usefixtures("empty_metrics")
async def test_load_reads_standard_input_and_keeps_the_first_spelling_of_a_new_name(
    settings: Settings, session: AsyncSession
) -> None:
    spellings = ["Middle-earth", "MIDDLE-EARTH", "middle-earth", "Middle-Earth", "mIDDLE-eARTH"]
    genders = ["female", "male", "unknown", "other", "any"]
    lines = [
        f"2026-11-10,{name},18-24,{gender},facebook,feed,mobile,10,1,0.50,0,0"
        for name, gender in zip(spellings, genders, strict=True)
    ]
    result = run_cli(settings, "load-metrics", "-", stdin=HEADER + "".join(f"{x}\n" for x in lines))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "load-metrics: 5 facts inserted or updated from standard input\n"
    regions = await sql(session, "SELECT region_name FROM dim_region")
    assert [row[0] for row in regions] == ["Middle-earth"]
    await session.commit()


@pytest.mark.usefixtures("empty_metrics")
def test_load_counts_one_fact_in_the_singular(settings: Settings, tmp_path: Path) -> None:
    line = "2026-11-10,North,18-24,female,facebook,feed,mobile,1,0,0,0,0"
    output = cli_ok(settings, "load-metrics", str(write_csv(tmp_path, line)))
    assert "load-metrics: 1 fact inserted or updated from " in output
    assert output.count("load-metrics:") == 1  # one summary, not a second on STDERR


@pytest.mark.usefixtures("empty_metrics")
@pytest.mark.parametrize("signal_sent", [signal.SIGTERM, signal.SIGKILL])
def test_a_load_from_standard_input_killed_leaves_no_copy_of_it(
    settings: Settings, tmp_path: Path, signal_sent: signal.Signals
) -> None:
    """Standard input is kept in a temporary file with no name: nothing stays after a kill,
    here while it is still being read (half a file sent, the pipe still open)."""
    spool = tmp_path / "tmp"
    spool.mkdir()
    env = {**cli_environment(settings), "TMPDIR": str(spool)}
    line = "2026-11-10,North,18-24,female,facebook,feed,mobile,1,0,0,0,0\n"
    process = subprocess.Popen(
        [sys.executable, "cli.py", "load-metrics", "-"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdin is not None
    process.stdin.write((HEADER + line * 20_000).encode())
    process.stdin.flush()
    time.sleep(1.0)  # it has started, and is copying what it was given
    assert process.poll() is None
    process.send_signal(signal_sent)
    process.wait(timeout=10)
    process.stdin.close()
    assert list(spool.iterdir()) == []


@pytest.mark.usefixtures("empty_metrics")
def test_load_from_standard_input_rejects_a_malformed_file_naming_it(settings: Settings) -> None:
    result = run_cli(settings, "load-metrics", "-", stdin="date,region\n")
    assert result.returncode == 1
    assert result.stderr.startswith("error: standard input was not loaded; nothing was written:")


@pytest.mark.usefixtures("empty_metrics")
async def test_the_first_and_last_days_of_the_calendar_are_stored_as_dates(
    settings: Settings, session: AsyncSession, tmp_path: Path
) -> None:
    lines = [
        f"{day},North,18-24,female,facebook,feed,mobile,1,0,0,0,0"
        for day in ("0001-01-01", "9999-12-31")
    ]
    cli_ok(settings, "load-metrics", str(write_csv(tmp_path, *lines)))
    stored = await sql(session, "SELECT date_id, date_value::text FROM dim_date ORDER BY date_id")
    assert [tuple(row) for row in stored] == [(10101, "0001-01-01"), (99991231, "9999-12-31")]
