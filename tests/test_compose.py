"""The shipping files, checked without a Docker engine: the compose file's structure, hadolint on
the Dockerfile, and each compose command run as stated against the local servers."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import worker
from settings import Settings
from tests.helpers import ROOT, redis_url, scratch_database
from tests.servers import WorkerProcess, wait_until

COMPOSE = yaml.safe_load(Path(ROOT, "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DOCKERFILE = Path(ROOT, "Dockerfile").read_text()
LONG_RUNNING = ("db", "redis", "api", "worker")
VARIABLE = re.compile(r"\$\{(\w+):-([^}]*)\}")


def resolve(value: str) -> str:
    """A compose value with every ${NAME:-default} at its default (no .env, no shell vars)."""
    return VARIABLE.sub(lambda match: match.group(2), value).replace("$$", "$")


def environment(service: str) -> dict[str, str]:
    return {name: resolve(str(value)) for name, value in SERVICES[service]["environment"].items()}


def test_services_and_their_images() -> None:
    assert set(SERVICES) == {"db", "redis", "migrate", "api", "worker", "prometheus"}
    assert SERVICES["db"]["image"].startswith("postgres:15")
    assert SERVICES["redis"]["image"].startswith("redis:7")
    images = {SERVICES[name]["image"] for name in ("migrate", "api", "worker")}
    assert len(images) == 1, "api, worker and migrate run one image"
    assert all(SERVICES[name]["build"] == "." for name in ("migrate", "api", "worker"))


def test_database_keeps_its_data_in_a_named_volume() -> None:
    assert "pgdata:/var/lib/postgresql/data" in SERVICES["db"]["volumes"]
    assert "pgdata" in COMPOSE["volumes"]


def test_every_long_running_service_has_a_healthcheck_and_restarts() -> None:
    checks = {name: " ".join(SERVICES[name]["healthcheck"]["test"]) for name in LONG_RUNNING}
    assert "pg_isready" in checks["db"]
    assert "redis-cli ping" in checks["redis"]
    assert "/health" in checks["api"]
    assert "arq --check worker.WorkerSettings" in checks["worker"]
    assert all(SERVICES[name]["restart"] == "unless-stopped" for name in LONG_RUNNING)
    assert SERVICES["migrate"]["restart"] == "no"


def test_api_and_worker_start_after_healthy_servers_and_the_migration() -> None:
    for name in ("api", "worker"):
        assert SERVICES[name]["depends_on"] == {
            "db": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }
    assert SERVICES["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    migration = SERVICES["migrate"]["command"][-1]
    assert "alembic upgrade head" in migration
    assert "seed-metrics --if-empty" in migration


def test_commands_ports_and_shutdown_grace() -> None:
    assert SERVICES["api"]["command"][:2] == ["python", "server.py"]
    assert SERVICES["api"]["ports"] == ["${API_PORT:-8000}:8000"]
    assert SERVICES["worker"]["command"] == [
        "arq", "--custom-log-dict", "worker.LOG_CONFIG", "worker.WorkerSettings"
    ]  # fmt: skip
    api_grace = int(SERVICES["api"]["stop_grace_period"].removesuffix("s"))
    assert api_grace > Settings().HTTP_SHUTDOWN_GRACE_SECONDS
    grace = int(SERVICES["worker"]["stop_grace_period"].removesuffix("s"))
    assert grace > worker.worker_settings(Settings())["job_completion_wait"]


def test_configuration_has_working_development_defaults() -> None:
    for name in ("migrate", "api", "worker"):
        settings = Settings.model_validate(environment(name))
        assert settings.ENVIRONMENT == "development"
        assert settings.REDIS_URL == "redis://redis:6379/0"
        assert settings.WEB_CONCURRENCY == 2
    database = SERVICES["db"]["environment"]
    url = environment("api")["DATABASE_URL"]
    user, password, name = (
        resolve(database[k]) for k in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB")
    )
    assert url == f"postgresql+asyncpg://{user}:{password}@db:5432/{name}"


def readme_section(title: str) -> str:
    readme = Path(ROOT, "README.md").read_text()
    return readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_only_documented_knobs_come_from_the_host() -> None:
    text = Path(ROOT, "docker-compose.yml").read_text()
    interpolated = set(re.findall(r"\$\{(\w+)", text))
    # A URL exported for local work (README: Without Docker) must not reach a container.
    assert not interpolated & {"DATABASE_URL", "REDIS_URL"}
    assert "WEB_CONCURRENCY" in interpolated
    configuration = Path(ROOT, "docs", "configuration.md").read_text()
    undocumented = {name for name in interpolated if f"`{name}`" not in configuration}
    assert not undocumented


def test_database_health_is_checked_over_tcp_and_migrate_waits_for_it() -> None:
    # The image's init-time server answers on the Unix socket only.
    assert "pg_isready -h 127.0.0.1 " in SERVICES["db"]["healthcheck"]["test"][1]
    migration = SERVICES["migrate"]["command"][-1]
    assert migration.startswith("python cli.py wait-for-db --timeout 60 && alembic upgrade head")


@pytest.mark.slow
def test_wait_for_db_gives_up_after_its_timeout() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = closed.getsockname()[1]
    env = {"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/pets"}
    started = time.monotonic()
    try:
        result = run([sys.executable, "cli.py", "wait-for-db", "--timeout", "2"], env)
    finally:
        closed.close()
    assert result.returncode == 1
    assert result.stderr.startswith("error: the database did not answer within 2 s (")
    assert 2 <= time.monotonic() - started < 20


def seed_arguments(command: str) -> list[str]:
    return command.split("seed-metrics", 1)[1].split("\n", 1)[0].split()


def test_compose_and_the_local_path_seed_the_same_demo_size() -> None:
    composed = seed_arguments(SERVICES["migrate"]["command"][-1])
    local = seed_arguments(readme_section("Without Docker"))
    assert composed == local == ["--if-empty", "--days", "1100", "--rows-per-day", "300"]
    assert "330,000" in readme_section("The two commands")


# --- the image ---------------------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "warning", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_non_root_with_exec_form_cmd() -> None:
    assert len(re.findall(r"^FROM python:3\.11-slim", DOCKERFILE, re.MULTILINE)) == 2
    assert re.search(r"^USER (?!root|0)\S+", DOCKERFILE, re.MULTILINE)
    assert re.search(r'^CMD \["python", "server.py"', DOCKERFILE, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\"", DOCKERFILE, re.MULTILINE)
    assert "--no-cache-dir -r /tmp/requirements.txt" in DOCKERFILE


def test_image_gets_every_module_the_app_imports() -> None:
    one_line = DOCKERFILE.replace("\\\n", " ")  # continuation lines joined
    copied = set(re.search(r"^COPY (main\.py .*) \./$", one_line, re.MULTILINE)[1].split())  # type: ignore[index]
    modules = {path.name for path in Path(ROOT).glob("*.py")}
    assert modules <= copied
    ignored = Path(ROOT, ".dockerignore").read_text().split()
    assert all(f"!{name}" in ignored for name in copied)


# --- each command, run as compose states it --------------------------------------------------


@pytest.fixture
def stack_database() -> Iterator[str]:
    with scratch_database("test_compose") as url:
        yield url


def local_environment(service: str, database_url: str) -> dict[str, str]:
    """The service's environment from the compose file, with db and redis pointed at the local
    servers (and a database of this test's own)."""
    return {**environment(service), "DATABASE_URL": database_url, "REDIS_URL": redis_url()}


def with_venv(env: dict[str, str]) -> dict[str, str]:
    """The environment of a container: the image's tools (here, the venv's) on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=ROOT,
        env=with_venv(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def curl_block(path: str, heading: str) -> str:
    """The first sh block under a heading of a Markdown file, as a new user would paste it."""
    text = Path(ROOT, path).read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


def readme_curl_block() -> str:
    """The README's "Use it" and "Watching it" examples, then the metrics page's one per
    feature."""
    readme = curl_block("README.md", "Use it") + curl_block("README.md", "Watching it")
    return readme + curl_block("docs/metrics.md", "Examples")


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_stack_runs_as_compose_states_it(stack_database: str, tmp_path: Path) -> None:
    migrate = run(SERVICES["migrate"]["command"], local_environment("migrate", stack_database))
    assert migrate.returncode == 0, migrate.stderr
    assert "seed-metrics: 330,000 rows" in migrate.stderr + migrate.stdout
    again = run(SERVICES["migrate"]["command"], local_environment("migrate", stack_database))
    assert again.returncode == 0
    assert "nothing to do" in again.stdout

    assert port_is_free(8000), "the api command binds port 8000, which is taken here"
    api_log = tmp_path / "api.log"
    with api_log.open("w") as log:
        api = subprocess.Popen(
            SERVICES["api"]["command"],
            cwd=ROOT,
            env=with_venv(local_environment("api", stack_database)),
            stdout=log,  # the access lines
            stderr=log,
        )
    stack_worker = WorkerProcess(tmp_path, local_environment("worker", stack_database))
    try:
        wait_until(lambda: not port_is_free(8000) or api.poll() is not None, 30, "the api")
        health = httpx.get("http://127.0.0.1:8000/health", timeout=5)
        assert health.status_code == 200
        token = httpx.post(
            "http://127.0.0.1:8000/auth/token",
            data={"username": "admin", "password": "admin"},
            timeout=10,
        )
        assert token.status_code == 200, token.text
        metrics = httpx.get("http://127.0.0.1:8000/metrics?group_by=platform", timeout=10).json()
        assert metrics["total_rows"] == 4
        assert metrics["totals"]["impressions"] > 0
        api_check = run(SERVICES["api"]["healthcheck"]["test"][1:], {})
        assert api_check.returncode == 0, api_check.stderr
        readme = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", readme_curl_block()],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert readme.returncode == 0, readme.stderr

        stack_worker.wait_for_output("==== end of report ====")
        worker_check = run(
            SERVICES["worker"]["healthcheck"]["test"][1:],
            local_environment("worker", stack_database),
        )
        assert worker_check.returncode == 0, worker_check.stderr
    finally:
        api.terminate()
        api_exit = api.wait(timeout=20)
        worker_exit = stack_worker.stop()
    logged = [json.loads(line) for line in api_log.read_text().splitlines()]  # JSON, every one
    statuses = [
        (line["method"], f"{line['path']}?{line['query']}" if line["query"] else line["path"],
         str(line["status"]))
        for line in logged
        if line["logger"] == "pets.access"
    ]  # fmt: skip
    assert not [s for s in statuses if s[2].startswith("5")], statuses
    unauthorized = [(method, path) for method, path, status in statuses if status == "401"]
    assert unauthorized == [("DELETE", "/pets/2")], "only the README's deliberate 401"
    refused = [(method, path) for method, path, status in statuses if status == "422"]
    deliberate = [
        ("POST", "/pets"),
        ("GET", "/metrics?region=Atlantis&group_by=platform&sort=region"),
    ]
    assert refused == deliberate, "only the README's deliberate 422s"
    # server.py ends a graceful shutdown with status 0 (HTTP_SHUTDOWN_GRACE_SECONDS).
    assert api_exit == 0
    assert "Finished server process" in api_log.read_text()
    assert worker_exit == 0
