"""`docker stop` under traffic, against a real `python server.py`: SIGTERM refuses new
connections, lets requests under way finish within HTTP_SHUTDOWN_GRACE_SECONDS (a pet whose body
arrives after the signal is still created), cuts a stream still running when the grace ends (so
its client sees it incomplete: no final chunk), and the process exits 0."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT, demo_database, redis_url
from tests.servers import answers, unused_port, wait_until

GRACE_SECONDS = 2
# Every row by day and every dimension: about 10 MB of CSV, more than the sockets hold, so a
# client that stops reading holds the export on the server.
EXPORT = (
    "/metrics/export?start_date=2026-10-01&end_date=2026-11-10&group_by=date&group_by=region"
    "&group_by=age_group&group_by=gender&group_by=platform&group_by=placement"
    "&group_by=device_type"
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    seed = ("--days", "41", "--rows-per-day", "2000", "--end-date", "2026-11-10")
    with demo_database("test_shutdown", *seed) as url:
        yield url


def test_a_stop_under_a_slow_export_finishes_what_it_can_and_exits_0(
    database: str, tmp_path: Path
) -> None:
    port = unused_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ, "DATABASE_URL": database, "REDIS_URL": redis_url(),
        "HTTP_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS), "LOG_FORMAT": "json",
    }  # fmt: skip
    with (tmp_path / "server.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "server.py", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        wait_until(lambda: answers(f"{base}/health"), 30, "server.py")
        stalled = httpx.Client(base_url=base, timeout=30)
        stream = stalled.send(stalled.build_request("GET", EXPORT), stream=True)
        assert stream.status_code == 200
        chunks = stream.iter_bytes()
        first = next(chunks)  # then this client stops reading
        assert first.startswith(b"date,region,")
        token = httpx.post(
            f"{base}/auth/token",
            data={"username": "admin", "password": os.environ["ADMIN_PASSWORD"]},
            timeout=10,
        ).json()["access_token"]
        body = b'{"name": "Late", "pet_type": "cat"}'
        under_way = socket.create_connection(("127.0.0.1", port), timeout=10)
        under_way.sendall(
            b"POST /pets HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        time.sleep(0.2)  # its headers are in: the request is under way

        stopped_at = time.monotonic()
        server.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # new connections are refused
            httpx.get(f"{base}/health", timeout=2)
        under_way.sendall(body[10:])  # the rest of its body, after the signal
        answer = under_way.recv(65536)
        under_way.close()
        assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
        exit_status = server.wait(timeout=GRACE_SECONDS + 5)
        took = time.monotonic() - stopped_at
        assert exit_status == 0
        assert took < GRACE_SECONDS + 2, took
        # The stalled export was cut: its client reads what was sent, then no final chunk.
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in chunks:
                pass
        stream.close()
        stalled.close()
        lines = (tmp_path / "server.log").read_text()
        assert "timeout graceful shutdown exceeded" in lines
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
