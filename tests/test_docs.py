"""The API's documentation: Swagger UI and ReDoc render in a real (headless) browser with no
network but this machine, under the docs CSP; the OpenAPI document declares every header."""

import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from alembic import command
from tests.helpers import alembic_config_for, redis_url, scratch_database
from tests.servers import ApiServer, serve_api

CHROMIUM_INSTALL = "apt-get install -y chromium"


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    log = tmp_path_factory.mktemp("docs") / "server.log"
    with scratch_database("test_docs") as url:
        command.upgrade(alembic_config_for(url), "head")
        with serve_api(url, redis_url(), log, LOG_LEVEL="WARNING") as server:
            yield server


def rendered_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, as headless Chromium sees it. Every host name but
    127.0.0.1 fails to resolve, so a page that still reached for a CDN would come out blank."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(f"Chromium is needed for the docs pages' test; install it: {CHROMIUM_INSTALL}")
    result = subprocess.run(
        [
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", "--disable-background-networking", "--disable-sync",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=20000",
            "--dump-dom", url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_swagger_ui_renders_every_operation_offline(docs_server: ApiServer, tmp_path: Path) -> None:
    dom = rendered_dom(f"{docs_server.base}/docs", tmp_path)
    schema = httpx.get(f"{docs_server.base}/openapi.json", timeout=10).json()
    operations = Counter(path for path, item in schema["paths"].items() for _ in item)
    assert Counter(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom)) == (
        operations
    ), dom[-3000:]
    assert 'class="btn authorize' in dom  # the OAuth2 password flow, to /auth/token


def test_redoc_renders_every_operation_offline(docs_server: ApiServer, tmp_path: Path) -> None:
    dom = rendered_dom(f"{docs_server.base}/redoc", tmp_path)
    assert "Pets and ad metrics" in dom, dom[-3000:]
    for path in ("/auth/token", "/pets/{pet_id}", "/metrics"):
        assert path in dom, path


EVERY_RESPONSE = {
    "Cache-Control",
    "Content-Security-Policy",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "Referrer-Policy",
    "Cross-Origin-Resource-Policy",
}


async def test_openapi_declares_every_response_header(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    shared = schema["components"]["headers"]

    def headers_of(response: dict[str, Any]) -> set[str]:
        declared = response.get("headers", {})
        for header in declared.values():
            if "$ref" in header:
                assert header["$ref"].removeprefix("#/components/headers/") in shared
        return set(declared)

    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "503" in responses, (path, method)  # the connection limit, on any request
            for status, response in responses.items():
                where = (path, method, status)
                assert headers_of(response) >= EVERY_RESPONSE, where
                if status == "401":
                    assert "WWW-Authenticate" in headers_of(response), where
                if status in ("429", "503"):
                    assert "Retry-After" in headers_of(response), where
    assert "429" in schema["paths"]["/auth/token"]["post"]["responses"]
    export = schema["paths"]["/metrics/export"]["get"]["responses"]["200"]
    assert headers_of(export) >= {"Vary", "Content-Disposition"}
    assert {"Location", "ETag"} <= headers_of(schema["paths"]["/pets"]["post"]["responses"]["201"])
    assert "ETag" in headers_of(schema["paths"]["/pets/{pet_id}"]["get"]["responses"]["304"])
    assert "Allow" in headers_of(schema["components"]["responses"]["MethodNotAllowed"])


async def test_the_declared_headers_are_the_ones_sent(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    shared = set(schema["components"]["headers"])
    responses = [
        await client.get("/pets"),
        await client.post("/pets", json={"name": "Rex", "pet_type": "dog"}),
        await client.put("/pets"),
        await client.get("/metrics/export", params={"preset": "last_7d"}),
    ]
    sent = {name.title() for response in responses for name in response.headers}
    expected = {
        "Www-Authenticate",
        "Allow",
        "Vary",
        "Content-Disposition",
        *(name.title() for name in EVERY_RESPONSE),
    }
    assert expected <= sent
    assert expected <= {name.title() for name in shared}
