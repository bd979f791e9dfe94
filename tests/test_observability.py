"""What an operator sees, against real processes: Prometheus metrics summed over two uvicorn
processes, every refusal counted by its reason, route templates as labels, the token's 404 and
401, exposition and configuration accepted by promtool, a real Prometheus scraping a real
server; JSON log lines carrying the request id."""

import contextlib
import dataclasses
import json
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message, Receive, Scope, Send

from alembic import command
from deps import state_of
from logs import REQUEST_ID, JsonFormatter, TextFormatter
from middleware import ObserveRequests
from tests.helpers import alembic_config_for, redis_url, scratch_database
from tests.servers import ApiServer, forget_login_attempts, serve_api, unused_port, wait_until
from turns import Turns

TOKEN = "a-token-for-the-tests-only"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with scratch_database("test_observability") as url:
        command.upgrade(alembic_config_for(url), "head")
        yield url


def samples(server: ApiServer) -> Samples:
    """Every sample of a scrape, by name and labels."""
    response = httpx.get(f"{server.base}/internal/metrics", headers=BEARER, timeout=10)
    assert response.status_code == 200, response.text
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def two_processes(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """server.py with two uvicorn processes, JSON logs and a Prometheus token."""
    log = tmp_path_factory.mktemp("two") / "server.log"
    env = {"WEB_CONCURRENCY": "2", "PROMETHEUS_TOKEN": TOKEN, "LOG_FORMAT": "json"}
    with serve_api(database, redis_url(), log, **env) as server:
        yield server


HEALTH = {"method": "GET", "handler": "/health"}


@pytest.mark.slow
def test_requests_are_counted_exactly_over_both_processes(two_processes: ApiServer) -> None:
    before = samples(two_processes)
    with httpx.Client(base_url=two_processes.base, timeout=10) as client:
        for _ in range(60):
            # A new connection each time, so both processes take some.
            response = client.get("/health", headers={"Connection": "close"})
            assert response.status_code == 200
    after = samples(two_processes)
    counted = [
        value(found, "http_requests_total", **HEALTH, status="200") for found in (before, after)
    ]
    assert counted[1] - counted[0] == 60
    timed = [
        value(found, "http_request_duration_seconds_count", **HEALTH) for found in (before, after)
    ]
    assert timed[1] - timed[0] == 60
    lines = [json.loads(line) for line in two_processes.log.read_text().splitlines()]
    access = [line for line in lines if line.get("logger") == "pets.access"]
    assert len([line for line in access if line["path"] == "/health"]) >= 60


@pytest.mark.slow
def test_labels_are_route_templates_and_statuses_exact(two_processes: ApiServer) -> None:
    with httpx.Client(base_url=two_processes.base, timeout=10) as client:
        for pet_id in range(1, 41):
            assert client.get(f"/pets/{pet_id}").status_code == 404
            assert client.get(f"/no/such/{pet_id}").status_code == 404
    found = samples(two_processes)
    handlers = {dict(labels)["handler"] for name, labels in found if name == "http_requests_total"}
    assert "/pets/{pet_id}" in handlers
    assert "unmatched" in handlers
    assert not [h for h in handlers if any(ch.isdigit() for ch in h)], handlers
    pet = {"method": "GET", "handler": "/pets/{pet_id}"}
    assert value(found, "http_requests_total", **pet, status="404") >= 40


@pytest.mark.slow
def test_the_metrics_need_the_token(
    two_processes: ApiServer, database: str, tmp_path: Path
) -> None:
    url = f"{two_processes.base}/internal/metrics"
    assert httpx.get(url, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert httpx.get(url, headers=wrong, timeout=10).status_code == 401
    lower_case = {"Authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive
    assert httpx.get(url, headers=lower_case, timeout=10).status_code == 200
    with serve_api(database, redis_url(), tmp_path / "server.log") as without_token:
        response = httpx.get(f"{without_token.base}/internal/metrics", headers=BEARER, timeout=10)
        assert response.status_code == 404
        assert response.json()["detail"] == "Not Found"
    document = httpx.get(f"{two_processes.base}/openapi.json", timeout=10).json()
    assert "/internal/metrics" not in document["paths"]


@pytest.mark.slow
def test_the_exposition_passes_promtool(two_processes: ApiServer) -> None:
    url = f"{two_processes.base}/internal/metrics"
    exposition = httpx.get(url, headers=BEARER, timeout=10).text
    checked = subprocess.run(
        ["promtool", "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    # promtool warns about counters without _total and the like; it fails on malformed text.
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.slow
def test_the_request_id_comes_back_and_is_in_the_log_lines(two_processes: ApiServer) -> None:
    forget_login_attempts(redis_url())
    sent = {"X-Request-ID": "trace-42.a_b"}
    with httpx.Client(base_url=two_processes.base, timeout=10) as client:
        response = client.get("/health", headers=sent)
        assert response.headers["x-request-id"] == "trace-42.a_b"
        unsafe = client.get("/health", headers={"X-Request-ID": "no spaces allowed"})
        assert unsafe.headers["x-request-id"] != "no spaces allowed"
        assert len(unsafe.headers["x-request-id"]) == 32
        missing = client.get("/pets/999999", headers={"X-Request-ID": "problem-7"})
        assert missing.json()["request_id"] == "problem-7"
    lines: list[dict[str, Any]] = []

    def logged() -> bool:
        lines[:] = [json.loads(line) for line in two_processes.log.read_text().splitlines()]
        return any(line.get("request_id") == "trace-42.a_b" for line in lines)

    wait_until(logged, 5, "the access line")
    mine = [line for line in lines if line.get("request_id") == "trace-42.a_b"]
    access = [line for line in mine if line["logger"] == "pets.access"]
    assert len(access) == 1
    assert {**HEALTH, "path": "/health", "status": 200}.items() <= access[0].items()
    assert access[0]["duration_ms"] >= 0
    assert access[0]["client"] == "127.0.0.1"
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)


# --- refusals, each counted by its reason -------------------------------------------------------


@pytest.fixture(scope="module")
def strict_server(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """One process with small limits, so each can be reached quickly."""
    log = tmp_path_factory.mktemp("strict") / "server.log"
    env = {
        "PROMETHEUS_TOKEN": TOKEN,
        "LOG_FORMAT": "json",
        "HTTP_HEADER_TIMEOUT_SECONDS": "0.5",
        "HTTP_BODY_TIMEOUT_SECONDS": "0.5",
        "HTTP_MAX_CONNECTIONS_PER_CLIENT": "3",
        "LOGIN_LIMIT_PER_USER_AND_CLIENT": "1",
    }
    with serve_api(database, redis_url(), log, **env) as server:
        forget_login_attempts(redis_url())
        try:
            yield server
        finally:
            forget_login_attempts(redis_url())


def raw(server: ApiServer, data: bytes, wait: float = 0.0) -> bytes:
    """Bytes sent on a connection of their own, and what comes back before it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.sendall(data)  # the server may refuse before it has read them all
        if wait:
            time.sleep(wait)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


POST = b"POST /pets HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"


@pytest.mark.slow
def test_each_server_refusal_is_counted_by_its_reason(strict_server: ApiServer) -> None:
    before = samples(strict_server)
    assert raw(strict_server, POST + b"Content-Length: 99999999\r\n\r\n").startswith(
        b"HTTP/1.1 413"
    )
    huge = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    assert raw(strict_server, huge).startswith(b"HTTP/1.1 431")
    assert raw(strict_server, b"GET /health HTTP/1.1\r\nHost: t\r\n", wait=1.0).startswith(
        b"HTTP/1.1 408"
    )
    trickle = POST + b"Content-Length: 10\r\n\r\n{"
    assert raw(strict_server, trickle, wait=1.0).startswith(b"HTTP/1.1 408")
    held = [
        socket.create_connection(("127.0.0.1", strict_server.port), timeout=5) for _ in range(3)
    ]
    try:
        assert raw(strict_server, b"").startswith(b"HTTP/1.1 503")
    finally:
        for connection in held:
            connection.close()
    login = {"username": "admin", "password": "not-the-password"}
    url = f"{strict_server.base}/auth/token"
    assert [httpx.post(url, data=login, timeout=10).status_code for _ in range(2)] == [401, 429]
    after = samples(strict_server)
    for reason in (
        "body_too_large", "headers_too_large", "header_timeout", "body_timeout",
        "too_many_connections", "login_throttled",
    ):  # fmt: skip
        counts = [value(found, "pets_refused_total", reason=reason) for found in (before, after)]
        assert counts[1] - counts[0] >= 1, reason
    lines = [json.loads(line) for line in strict_server.log.read_text().splitlines()]
    throttled = [line for line in lines if line["message"].startswith("refused (login_throttled)")]
    assert throttled
    assert throttled[-1].get("request_id")


@pytest.mark.parametrize(
    ("resource", "path", "reason"),
    [
        ("listing_turns", "/pets", "listings_busy"),
        ("metrics_turns", "/metrics", "analytics_busy"),
        ("export_turns", "/metrics/export", "exports_busy"),
    ],
)
async def test_each_busy_resource_is_counted_by_its_reason(
    app: FastAPI, client: httpx.AsyncClient, resource: str, path: str, reason: str
) -> None:
    state = state_of(app)
    turns = Turns(1, 0.01, "busy for the test", reason)
    setattr(state, resource, turns)
    before = REGISTRY.get_sample_value("pets_refused_total", {"reason": reason}) or 0.0
    async with turns.take():
        response = await client.get(path)
    assert response.status_code == 503
    assert REGISTRY.get_sample_value("pets_refused_total", {"reason": reason}) == before + 1


async def test_a_login_past_the_password_check_slots_is_counted(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    guard = state_of(app).login_guard
    slots = Turns(1, 0.01, "busy for the test", "password_checks_busy")
    state_of(app).login_guard = dataclasses.replace(guard, verification_slots=slots)
    before = (
        REGISTRY.get_sample_value("pets_refused_total", {"reason": "password_checks_busy"}) or 0.0
    )
    try:
        async with slots.take():
            response = await client.post("/auth/token", data={"username": "admin", "password": "x"})
        assert response.status_code == 503
    finally:
        state_of(app).login_guard = guard
    assert (
        REGISTRY.get_sample_value("pets_refused_total", {"reason": "password_checks_busy"})
        == before + 1
    )


# --- a real Prometheus --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_service(two_processes: ApiServer, tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "Debian's prometheus package is needed: apt-get install -y prometheus"
    (tmp_path / "token").write_text(TOKEN)
    port = unused_port()
    (tmp_path / "prometheus.yml").write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "api",
                        "metrics_path": "/internal/metrics",
                        "authorization": {
                            "type": "Bearer",
                            "credentials_file": str(tmp_path / "token"),
                        },
                        "static_configs": [{"targets": [f"127.0.0.1:{two_processes.port}"]}],
                    }
                ],
            }
        )
    )
    process = subprocess.Popen(
        [
            prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        found: list[Any] = []

        def scraped() -> bool:
            try:
                query = {"query": 'http_requests_total{job="api",handler="/health"}'}
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params=query, timeout=2)
            except httpx.HTTPError:
                return False
            found[:] = answer.json().get("data", {}).get("result", [])
            return bool(found)

        wait_until(scraped, 30, "Prometheus to scrape the API")
        assert found[0]["metric"]["status"] == "200"
    finally:
        process.terminate()
        process.wait(timeout=20)


# --- the pieces, in-process -------------------------------------------------------------------


async def test_a_client_that_hangs_up_before_any_answer_is_499_not_a_5xx() -> None:
    """As CancelOnDisconnect leaves it: the app returns having sent nothing."""

    async def gone(_scope: Scope, _receive: Receive, _send: Send) -> None:
        return

    labels = {"method": "GET", "handler": "unmatched", "status": "499"}
    before = REGISTRY.get_sample_value("http_requests_total", labels) or 0.0
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/metrics",
        "query_string": b"",
        "headers": [],
    }

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(_message: Message) -> None:
        raise AssertionError("nothing is sent")

    await ObserveRequests(gone)(scope, receive, send)
    assert REGISTRY.get_sample_value("http_requests_total", labels) == before + 1


def test_a_text_line_cannot_be_split_by_what_a_request_sends() -> None:
    REQUEST_ID.set(None)  # outside a request (an in-process one before may have left its id)
    record = logging.LogRecord(
        "pets.access", logging.INFO, "", 0, "GET %s", ("/pets\n2026 CRITICAL x",), None
    )
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert line.endswith("GET /pets\\x0a2026 CRITICAL x")
    assert json.loads(JsonFormatter().format(record))["message"] == "GET /pets\n2026 CRITICAL x"
