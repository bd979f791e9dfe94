"""Schema-driven fuzzing: schemathesis against the real app (uvicorn) on a migrated, seeded
database, every operation, a token for the protected ones. For a longer campaign see
docs/reliability.md."""

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT, demo_database, redis_url
from tests.servers import forget_login_attempts, serve_api

CHECKS = ",".join(
    [
        "not_a_server_error",
        "response_schema_conformance",
        "status_code_conformance",
        "content_type_conformance",
        "negative_data_rejection",
        "positive_data_acceptance",
    ]
)
# Bounded and repeatable in the suite; raise both for a campaign.
MAX_EXAMPLES = os.environ.get("FUZZ_MAX_EXAMPLES", "40")
SEED = os.environ.get("FUZZ_SEED", "20261124")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API served as everywhere (server.py) on a spare port, on a database of its own with
    demo data."""
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    with (
        demo_database("test_fuzz", "--days", "60", "--rows-per-day", "100") as url,
        serve_api(url, redis_url(), log, LOG_LEVEL="WARNING") as server,
    ):
        forget_login_attempts(redis_url())
        try:
            yield server.base
        finally:  # the fuzzer's wrong logins are no other test's business
            forget_login_attempts(redis_url())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_schemathesis_finds_nothing(fuzz_server: str) -> None:
    token = httpx.post(
        f"{fuzz_server}/auth/token",
        data={"username": "admin", "password": os.environ["ADMIN_PASSWORD"]},
        timeout=10,
    ).json()["access_token"]
    schemathesis = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
        [
            str(schemathesis), "--config-file", "tests/schemathesis.toml",
            "run", f"{fuzz_server}/openapi.json",
            "--header", f"Authorization: Bearer {token}",
            "--checks", CHECKS,
            "--max-examples", MAX_EXAMPLES,
            "--seed", SEED,
            "--workers", "1",
        ],
        cwd=ROOT,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    operations = len(httpx.get(f"{fuzz_server}/openapi.json").json()["paths"])
    selected = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", output)
    assert selected is not None, output[-3000:]
    assert selected[1] == selected[2] == selected[3], "every operation was tested"
    assert int(selected[3]) >= operations
