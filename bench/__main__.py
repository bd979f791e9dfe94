"""`python -m bench [--quick]`: the service against raw baselines, interleaved, medians of three.

Sets up a scratch database (seed-metrics, 100k pets), runs uvicorn on core 0 and wrk on core 1,
and prints each scenario's figures and its ratio to the baseline measured in the same run. Last,
the workload (bench/workload.py): GET /metrics questions shaped like real use, each timed and
checked against DuckDB; `--workload-only` runs just that, `--database URL` on a seeded database."""

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import asyncpg
import httpx
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ENVIRONMENT", "development")

import metrics  # noqa: E402
from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from bench import workload  # noqa: E402
from metrics_sql import metrics_statement  # noqa: E402
from models import MetricsPart, MetricsPlan, dimension_mask  # noqa: E402

SERVER = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
END = date(2026, 11, 24)


@dataclass
class Result:
    scenario: str
    app: str
    baseline: str
    ratio: float
    target: str
    holds: bool


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextmanager
def scratch_database() -> Iterator[str]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield SERVER.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _admin(sql: str, url: str = SERVER) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def prepare(url: str, days: int, rows_per_day: int, pets: int) -> float:
    """Migrate, add the pets, run seed-metrics; returns seed-metrics' wall time."""
    config = Config(str(ROOT / "alembic.ini"))
    async_url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    config.attributes.update(database_url=async_url, configure_logging=False)
    command.upgrade(config, "head")
    asyncio.run(
        _admin(
            "INSERT INTO pet (name, pet_type) SELECT 'pet ' || g,"
            " (ARRAY['cat', 'dog', 'bird', 'fish', 'guinea pig'])[1 + g % 5]"
            f" FROM generate_series(1, {pets}) g",
            url,
        )
    )
    asyncio.run(_admin("VACUUM ANALYZE pet", url))
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "cli.py", "seed-metrics", "--days", str(days),
         "--rows-per-day", str(rows_per_day), "--end-date", END.isoformat()],
        cwd=ROOT, env={**os.environ, "DATABASE_URL": url}, check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - started


def psql_copy_seconds(url: str) -> float:
    """psql \\copy of the same facts into a bare copy of the table (keys and checks, no foreign
    keys): how fast PostgreSQL itself takes these rows."""
    with tempfile.TemporaryDirectory() as directory:
        csv = Path(directory) / "facts.csv"
        psql = ["psql", url, "-q", "-v", "ON_ERROR_STOP=1", "-c"]
        subprocess.run([*psql, f"\\copy fact_ad_metrics_daily TO '{csv}' CSV"], check=True)
        subprocess.run(
            [*psql, "CREATE TABLE bench_copy (LIKE fact_ad_metrics_daily INCLUDING ALL)"],
            check=True,
        )
        started = time.perf_counter()
        subprocess.run([*psql, f"\\copy bench_copy FROM '{csv}' CSV"], check=True)
        seconds = time.perf_counter() - started
        subprocess.run([*psql, "DROP TABLE bench_copy"], check=True)
    return seconds


@contextmanager
def server(app: str, url: str, port: int) -> Iterator[str]:
    """The service as shipped (python server.py) or a baseline app under plain uvicorn; both
    without an access log."""
    serve = (
        ["server.py"]
        if app == "main:app"
        else ["-m", "uvicorn", app, "--no-access-log", "--log-level", "warning"]
    )
    process = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, *serve, "--port", str(port)],
        cwd=ROOT, env={**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "WARNING"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{base}/pets/1", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=20)


def wrk(url: str, seconds: int) -> float:
    output = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{seconds}s", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    assert match, output
    return float(match[1])


def get(client: httpx.Client, path: str) -> Callable[[], object]:
    return lambda: client.get(path).raise_for_status()


def latency_ms(call: Callable[[], object], times: int) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return median(samples)


def metrics_sql(plan: MetricsPlan) -> str:
    statement, values = metrics_statement(plan)  # the service's own SQL, verbatim
    statement = statement.params(values)
    return str(
        statement.compile(
            dialect=postgresql.dialect(),  # type: ignore[no-untyped-call]
            compile_kwargs={"literal_binds": True},
        )
    )


async def _ids(url: str, table: str, id_column: str, name_column: str, name: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        value: int = await connection.fetchval(
            f"SELECT {id_column} FROM {table} WHERE {name_column} = $1",
            name,
        )
        return value
    finally:
        await connection.close()


# The service's connection settings, so the SQL runs under the same conditions.
SERVER_SETTINGS = {"jit": "off"}


def metrics_query(plan: MetricsPlan) -> tuple[str, list[object]]:
    """The service's statement for `plan` as asyncpg runs it: SQL with $n and its values."""
    statement, values = metrics_statement(plan)
    compiled = statement.compile(dialect=asyncpg_dialect.dialect())  # type: ignore[no-untyped-call]
    expanded = compiled.construct_expanded_state(values)
    return expanded.statement, list(expanded.positional_parameters)


async def sql_ms(url: str, query: tuple[str, list[object]], times: int) -> float:
    sql, parameters = query
    connection = await asyncpg.connect(url, server_settings=SERVER_SETTINGS)
    try:
        await connection.fetch(sql, *parameters)
        samples = []
        for _ in range(times):
            started = time.perf_counter()
            await connection.fetch(sql, *parameters)
            samples.append((time.perf_counter() - started) * 1000)
        return median(samples)
    finally:
        await connection.close()


async def explain(url: str, sql: str) -> str:
    connection = await asyncpg.connect(url, server_settings=SERVER_SETTINGS)
    try:
        rows = await connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")
        return "\n".join(row[0] for row in rows)
    finally:
        await connection.close()


def report_run(kind: str, url: str) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, "-m", "bench.report_run", kind],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(output)
    return result


class Results(list[Result]):
    """Results, each also shown on STDERR as soon as it is measured."""

    def append(self, result: Result) -> None:
        print(f"  {result.scenario}: {result.app} vs {result.baseline}", file=sys.stderr)
        super().append(result)


def seed_scenario(url: str, facts: int, seed_seconds: float, results: Results) -> None:
    """seed-metrics against psql's \\copy of the same facts."""
    copy = psql_copy_seconds(url)
    results.append(Result(
        "seed-metrics (rows/s)", f"{facts / seed_seconds:,.0f}", f"{facts / copy:,.0f}",
        copy / seed_seconds, ">= 0.4", copy / seed_seconds >= 0.4,
    ))  # fmt: skip


def pets_scenarios(args: argparse.Namespace, url: str, results: Results) -> None:
    """The pet routes under wrk, the service and the raw baseline interleaved."""
    rounds, seconds = args.rounds, (3 if args.quick else 8)
    print("pets: wrk, app and baseline interleaved ...", file=sys.stderr)
    pets_by_id = {"app": [], "raw": []}  # type: dict[str, list[float]]
    pets_page = {"app": [], "raw": []}  # type: dict[str, list[float]]
    for _ in range(rounds):
        for kind, app in (("app", "main:app"), ("raw", "bench.baseline_app:app")):
            with server(app, url, 8200 if kind == "app" else 8201) as base:
                wrk(f"{base}/pets/12345", 1)  # warm up
                pets_by_id[kind].append(wrk(f"{base}/pets/12345", seconds))
                pets_page[kind].append(wrk(f"{base}/pets?limit=100", seconds))
    for name, figures in (
        ("GET /pets/{id} (req/s)", pets_by_id),
        ("GET /pets?limit=100 (req/s)", pets_page),
    ):
        app_rps, raw_rps = median(figures["app"]), median(figures["raw"])
        results.append(
            Result(
                name,
                f"{app_rps:,.0f}",
                f"{raw_rps:,.0f}",
                app_rps / raw_rps,
                ">= 0.35",
                app_rps / raw_rps >= 0.35,
            )
        )


def metrics_scenarios(args: argparse.Namespace, url: str, results: Results) -> None:
    """Three GET /metrics questions against the service's own SQL (or a scan of the facts),
    over the data's last 90 days and its whole range."""
    rounds = args.rounds
    first, end = workload.data_days(url)
    print("metrics ...", file=sys.stderr)
    germany = asyncio.run(_ids(url, "dim_region", "region_id", "region_name", "Germany"))
    start = end - timedelta(days=89)
    narrow = MetricsPlan(
        parts=metrics.plan_parts(start, end, ("platform",), ("daily", 0)),  # as the service plans
        set_mask=dimension_mask(["region", "platform"]),
        filters={"region": [germany]},
        excludes={},
        group_by=("platform",),
        sort=None,
        limit=100,
        offset=0,
    )
    times = 5 if args.quick else 15
    with (
        server("main:app", url, 8200) as base,
        httpx.Client(base_url=base, timeout=60) as client,
    ):
        query = f"/metrics?start_date={start}&end_date={end}&region=Germany&group_by=platform"
        app_ms, raw_ms = [], []
        for _ in range(rounds):
            app_ms.append(latency_ms(get(client, query), times))
            raw_ms.append(asyncio.run(sql_ms(url, metrics_query(narrow), times)))
        app_median, raw_median = median(app_ms), median(raw_ms)
        results.append(
            Result(
                "GET /metrics 90 days, 1 region, by platform (ms)",
                f"{app_median:.1f}",
                f"{raw_median:.1f} (same SQL)",
                app_median / raw_median,
                "<= 10 ms",
                app_median <= 10,
            )
        )
        for group in ("platform", "month"):
            scan = MetricsPlan(
                parts=(MetricsPart("facts", int(f"{first:%Y%m%d}"), int(f"{end:%Y%m%d}")),),
                set_mask=dimension_mask([group] if group == "platform" else []),
                filters={},
                excludes={},
                group_by=(group,),
                sort=None,
                limit=100,
                offset=0,
            )
            wide_query = f"/metrics?start_date={first}&end_date={end}&group_by={group}"
            app_wide = median([latency_ms(get(client, wide_query), times) for _ in range(rounds)])
            raw_scan = asyncio.run(sql_ms(url, metrics_query(scan), 1))
            results.append(
                Result(
                    f"GET /metrics whole range by {group} (ms)",
                    f"{app_wide:.1f}",
                    f"{raw_scan:.0f} (scan)",
                    app_wide / 10,
                    "<= 10 ms",
                    app_wide <= 10,
                )
            )
        # One comparison against what it replaces: the same question asked of each period.
        span = f"start_date={start}&end_date={end}&group_by=week&group_by=platform"
        before = f"start_date={start - timedelta(days=90)}&end_date={start - timedelta(days=1)}"
        compared, each = [], []
        for _ in range(rounds):
            compared.append(
                latency_ms(get(client, f"/metrics?{span}&compare=previous_period"), times)
            )
            each.append(
                latency_ms(get(client, f"/metrics?{span}"), times)
                + latency_ms(
                    get(client, f"/metrics?{before}&group_by=week&group_by=platform"), times
                )
            )
        compare_median, each_median = median(compared), median(each)
        results.append(
            Result(
                "GET /metrics 90 days by week x platform, compare=previous_period (ms)",
                f"{compare_median:.1f}",
                f"{each_median:.1f} (2 calls)",
                compare_median / each_median,
                "<= 1.0",
                compare_median <= each_median,
            )
        )
    if not args.quick:
        print(asyncio.run(explain(url, metrics_sql(narrow))), file=sys.stderr)


def report_scenarios(args: argparse.Namespace, url: str, results: Results) -> None:
    """The pet report, as the worker writes it and as the raw baseline does."""
    print("pet report ...", file=sys.stderr)
    app_runs, raw_runs = [], []
    for _ in range(args.rounds):
        app_runs.append(report_run("app", url))
        raw_runs.append(report_run("raw", url))
    app_s = median([r["seconds"] for r in app_runs])
    raw_s = median([r["seconds"] for r in raw_runs])
    growth = max(r["rss_growth_mb"] for r in app_runs)
    results.append(
        Result(
            f"pet report, {args.pets:,} pets (s)",
            f"{app_s:.2f}",
            f"{raw_s:.2f}",
            app_s / raw_s,
            "<= 2",
            app_s / raw_s <= 2,
        )
    )
    results.append(
        Result(
            "pet report peak RSS growth (MB)",
            f"{growth:.1f}",
            "-",
            growth / 50,
            "< 50 MB",
            growth < 50,
        )
    )


# Targets of the workload (they state where the service should get to, not where it is).
WORKLOAD_TARGETS_MS = {"p50": 10.0, "p95": 50.0, "max": 500.0}
WORKLOAD_FASTER_SHARE = 0.9
HEAVIEST_TARGET_SECONDS = 5.0


def workload_scenario(
    args: argparse.Namespace, url: str, results: Results
) -> workload.WorkloadSummary:
    """The workload (bench/workload.py) and the heaviest legal question, as result rows."""
    summary = workload.run_workload(
        url, lambda: server("main:app", url, 8202), args.questions, args.seed, args.json
    )
    figures = summary.figures
    for label, app, duck in (
        ("p50", figures.p50, figures.duckdb_p50),
        ("p95", figures.p95, figures.duckdb_p95),
        ("max", figures.max, figures.duckdb_max),
    ):
        target = WORKLOAD_TARGETS_MS[label]
        results.append(
            Result(
                f"GET /metrics workload, {figures.count} questions: {label} (ms)",
                f"{app:.1f}",
                f"{duck:.1f} (DuckDB)",
                app / duck,
                f"<= {target:.0f} ms",
                app <= target,
            )
        )
    share = figures.faster_share
    results.append(
        Result(
            "GET /metrics workload: faster than DuckDB (share)",
            f"{share:.0%}",
            "-",
            share,
            f">= {WORKLOAD_FASTER_SHARE:.0%}",
            share >= WORKLOAD_FASTER_SHARE,
        )
    )
    agreeing = figures.count - len(summary.disagreements)
    results.append(
        Result(
            "GET /metrics workload: answers as DuckDB's",
            f"{agreeing}/{figures.count}",
            "-",
            agreeing / figures.count,
            "all",
            agreeing == figures.count,
        )
    )
    heaviest = summary.heaviest
    answered = all(status == 200 for status in heaviest.statuses)
    seconds = heaviest.best_seconds
    results.append(
        Result(
            "GET /metrics heaviest legal question (s)",
            f"{seconds:.1f}" if answered else f"{seconds:.1f} ({heaviest.statuses[-1]})",
            f"{heaviest.duckdb_ms / 1000:.2f} (DuckDB)",
            seconds / (heaviest.duckdb_ms / 1000),
            f"<= {HEAVIEST_TARGET_SECONDS:.0f} s",
            answered and seconds <= HEAVIEST_TARGET_SECONDS,
        )
    )
    return summary


def run(args: argparse.Namespace) -> tuple[list[Result], workload.WorkloadSummary]:
    """Every scenario (or only the workload), on a scratch database or the one given."""
    results = Results()
    if args.database:
        url = args.database
        if not args.workload_only:
            print(
                "--database: skipping seed-metrics, the pet routes and the pet report"
                " (they measure or need the scratch database's setup)",
                file=sys.stderr,
            )
            metrics_scenarios(args, url, results)
        return results, workload_scenario(args, url, results)
    days, per_day = (365, 2000) if args.quick else (365, args.facts // 365)
    with scratch_database() as url:
        print(f"setting up: {days * per_day:,} facts, {args.pets:,} pets ...", file=sys.stderr)
        seed_seconds = prepare(url, days, per_day, args.pets)
        if not args.workload_only:
            seed_scenario(url, days * per_day, seed_seconds, results)
            pets_scenarios(args, url, results)
            metrics_scenarios(args, url, results)
            report_scenarios(args, url, results)
        return results, workload_scenario(args, url, results)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="730k facts, short runs (about 2.5 minutes)"
    )
    parser.add_argument("--facts", type=int, default=10_000_000, help="facts for the full run")
    parser.add_argument("--pets", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workload-only", action="store_true", help="run only the workload scenario"
    )
    parser.add_argument(
        "--database",
        metavar="URL",
        help="an existing, seeded database (postgresql://...) instead of a scratch one: no"
        " setup; seed-metrics, the pet routes and the pet report are skipped",
    )
    parser.add_argument(
        "--questions", type=int, default=400, help="questions in the workload (400)"
    )
    parser.add_argument("--seed", type=int, default=1, help="the workload's random seed (1)")
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="write the workload's per-question results"
    )
    args = parser.parse_args()
    if args.questions < 1:
        parser.error("--questions must be at least 1")
    results, summary = run(args)
    width = max(len(r.scenario) for r in results)
    print(f"{'scenario':<{width}}  {'app':>12}  {'baseline':>14}  {'ratio':>6}  target     holds")
    for r in results:
        holds = "yes" if r.holds else "NO"
        print(
            f"{r.scenario:<{width}}  {r.app:>12}  {r.baseline:>14}  {r.ratio:>6.2f}"
            f"  {r.target:<9}  {holds}"
        )
    if summary.disagreements:
        # A wrong answer (or a non-200) is a bug in the service or the harness, not a slow run.
        print(f"\n{len(summary.disagreements)} workload question(s) failed: see above.")
        sys.exit(1)


if __name__ == "__main__":
    main()
