"""How the API is served (server.py): a real `python server.py` on a spare port with short
timeouts, raw sockets for the slow and oversized clients; and the body limit in-process."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from alembic import command
from server import BoundedHttpToolsProtocol
from settings import Settings
from tests.helpers import (
    ADMIN_PASSWORD,
    ADMIN_USERNAME,
    alembic_config_for,
    redis_url,
    scratch_database,
)
from tests.servers import ApiServer, answers, serve_api

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
# What a loaded two-core machine may add to a timeout before a close is seen.
SLACK = 3.0
MB = 1024 * 1024


Served = ApiServer


@pytest.fixture(scope="module")
def served_database() -> Iterator[str]:
    with scratch_database("test_server") as url:
        command.upgrade(alembic_config_for(url), "head")
        yield url


@pytest.fixture(scope="module")
def server(served_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serve_api(
        served_database,
        redis_url(),
        log,
        HTTP_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
        HTTP_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT),
    ) as served:
        yield served


def _token(base: str) -> str:
    form = {"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD}
    response = httpx.post(f"{base}/auth/token", data=form, timeout=10)
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


@pytest.fixture(scope="module")
def pet_id(server: Served) -> int:
    headers = {"Authorization": f"Bearer {_token(server.base)}"}
    pet = {"name": "Rex", "pet_type": "dog"}
    response = httpx.post(f"{server.base}/pets", json=pet, headers=headers, timeout=10)
    assert response.status_code == 201, response.text
    created: int = response.json()["id"]
    return created


# --- raw HTTP over asyncio streams ---------------------------------------------------------------


async def connect(
    server: Served, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection, from one of the loopback addresses (127.0.0.0/8 is all this machine)."""
    return await asyncio.open_connection("127.0.0.1", server.port, local_addr=(source, 0))


async def read_until_closed(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed);
    TimeoutError when it is still open after `within` seconds."""
    received = b""
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def problem_of(response: bytes) -> dict[str, object]:
    head, body = response.split(b"\r\n\r\n", 1)
    assert b"content-type: application/problem+json" in head.lower()
    assert b"connection: close" in head.lower()
    problem: dict[str, object] = json.loads(body)
    assert problem["status"] == status_of(response)
    assert problem["type"] == "about:blank"
    return problem


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response on a connection that stays open: its status and body."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return status_of(head), await reader.readexactly(length)


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *headers]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


PET_HEADERS = ("Content-Type: application/json",)
JSON = {"Content-Type": "application/json"}


async def trickle(writer: asyncio.StreamWriter, interval: float) -> None:
    """One byte of body every `interval` seconds until the server hangs up."""
    with suppress(ConnectionError):
        for _ in range(100):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(interval)


# --- slow clients --------------------------------------------------------------------------------


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    server: Served,
) -> None:
    reader, writer = await connect(server)
    started = time.monotonic()
    received = await read_until_closed(reader, HEADER_TIMEOUT + SLACK)
    elapsed = time.monotonic() - started
    writer.close()
    assert received == b"", "nothing was asked, so nothing is answered"
    assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + SLACK


async def test_half_sent_headers_get_408_and_the_connection_is_closed(server: Served) -> None:
    reader, writer = await connect(server)
    writer.write(b"GET /health HTTP/1.1\r\nHost: test\r\n")
    started = time.monotonic()
    received = await read_until_closed(reader, HEADER_TIMEOUT + SLACK)
    elapsed = time.monotonic() - started
    writer.close()
    assert status_of(received) == 408
    assert "headers" in str(problem_of(received)["detail"])
    assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + SLACK


async def test_a_body_trickled_at_a_byte_per_0_3_s_gets_408_and_the_connection_is_closed(
    server: Served,
) -> None:
    reader, writer = await connect(server)
    writer.write(request("POST", "/pets", *PET_HEADERS, "Content-Length: 100"))
    started = time.monotonic()
    sender = asyncio.create_task(trickle(writer, 0.3))
    received = await read_until_closed(reader, BODY_TIMEOUT + SLACK)
    elapsed = time.monotonic() - started
    sender.cancel()
    writer.close()
    assert status_of(received) == 408
    assert "body" in str(problem_of(received)["detail"])
    assert BODY_TIMEOUT * 0.8 <= elapsed < BODY_TIMEOUT + SLACK


async def _slow_client(server: Served, kind: int, source: str = "127.0.0.1") -> float:
    """One of three slow clients (silent, half the headers, a trickled body); the seconds from
    its connecting until the server closed it."""
    reader, writer = await connect(server, source)
    started = time.monotonic()
    sender = None
    if kind == 1:
        writer.write(b"GET /health HTTP/1.1\r\nHost: test\r\nAccept: */*\r\n")
    elif kind == 2:
        writer.write(request("POST", "/pets", *PET_HEADERS, "Content-Length: 100"))
        sender = asyncio.create_task(trickle(writer, 0.3))
    try:
        await read_until_closed(reader, HEADER_TIMEOUT + BODY_TIMEOUT + 2 * SLACK)
        return time.monotonic() - started
    finally:
        if sender is not None:
            sender.cancel()
        writer.close()


async def test_200_slow_clients_are_all_cut_off_while_pet_reads_stay_fast(
    server: Served, pet_id: int
) -> None:
    started = time.monotonic()
    # From four addresses other than the reader's, within the per-address connection limit.
    sources = [f"127.0.0.{2 + i % 4}" for i in range(200)]
    slow = asyncio.gather(*(_slow_client(server, i % 3, sources[i]) for i in range(200)))
    latencies: list[float] = []
    try:
        async with httpx.AsyncClient(base_url=server.base, timeout=5) as http:
            while not slow.done():
                before = time.monotonic()
                response = await http.get(f"/pets/{pet_id}")
                latencies.append(time.monotonic() - before)
                assert response.status_code == 200, response.text
                await asyncio.sleep(0.05)
        held = await slow
    finally:
        slow.cancel()
    total = time.monotonic() - started
    print(  # the figures, for pytest -s
        f"200 slow clients: longest held {max(held):.2f} s, all closed after {total:.2f} s; "
        f"{len(latencies)} pet reads meanwhile, slowest {max(latencies) * 1000:.0f} ms"
    )
    assert max(held) < max(HEADER_TIMEOUT, BODY_TIMEOUT) + SLACK
    assert len(latencies) >= 5
    assert max(latencies) < 1.0


# --- oversized requests --------------------------------------------------------------------------


async def test_a_64_kb_header_is_431_and_the_connection_is_closed(server: Served) -> None:
    reader, writer = await connect(server)
    writer.write(request("GET", "/health", "X-Padding: " + "a" * 64 * 1024))
    received = await read_until_closed(reader, SLACK)
    writer.close()
    assert status_of(received) == 431
    problem_of(received)
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nx-content-type-options: nosniff" in head  # the protocol's answers too
    assert b"\r\ncontent-security-policy: default-src 'none'" in head


async def test_a_content_length_of_64_mb_is_413_before_the_body_is_sent(server: Served) -> None:
    reader, writer = await connect(server)
    writer.write(request("POST", "/pets", *PET_HEADERS, f"Content-Length: {64 * MB}"))
    started = time.monotonic()
    received = await read_until_closed(reader, SLACK)
    writer.close()
    assert status_of(received) == 413
    assert "16384 bytes" in str(problem_of(received)["detail"])
    assert time.monotonic() - started < 1.0, "answered without waiting for any body"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_a_chunked_body_over_the_limit_is_413(server: Served) -> None:
    reader, writer = await connect(server)
    writer.write(request("POST", "/pets", *PET_HEADERS, "Transfer-Encoding: chunked"))
    for _ in range(6):  # 24 kB, never finished: the answer cannot wait for the end
        writer.write(chunk(b" " * 4096))
    received = await read_until_closed(reader, SLACK)
    writer.close()
    assert status_of(received) == 413
    problem_of(received)


async def test_trailers_past_the_header_limit_close_the_connection(server: Served) -> None:
    reader, writer = await connect(server)
    writer.write(request("POST", "/pets", *PET_HEADERS, "Transfer-Encoding: chunked"))
    # 20 kB of trailers, which httptools would hand on one by one, in one write: the server
    # hangs up once past the limit, and a later write of ours would fail with a broken pipe.
    trailers = b"".join(f"X-Trailer-{n}: {'a' * 1000}\r\n".encode() for n in range(20))
    writer.write(chunk(b"{}") + b"0\r\n" + trailers)
    with suppress(ConnectionError):
        await writer.drain()
    received = await read_until_closed(reader, SLACK)
    writer.close()
    assert status_of(received) == 431
    assert "trailers" in str(problem_of(received)["detail"])


def memory_kb(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith(f"{field}:"))
    return int(line.split()[1])


def reset_peak_memory(pid: int) -> None:
    """Start VmHWM afresh (Linux 4.0+): the start-up's argon2 warm-up alone peaks at 64 MB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def _upload_64_mb(server: Served, chunked: bool) -> None:
    """POST /pets with a 64 MB body, streamed (one 64 kB block sent over and over) until the
    server hangs up."""
    block = b" " * 65536
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {64 * MB}"
    _, writer = await connect(server)
    try:
        writer.write(request("POST", "/pets", *PET_HEADERS, framing))
        for _ in range(64 * MB // len(block)):
            writer.write(chunk(block) if chunked else block)
            await writer.drain()
    except ConnectionError:
        pass  # the server answered and hung up
    finally:
        writer.close()


async def test_eight_64_mb_uploads_leave_the_server_memory_flat(server: Served) -> None:
    before = memory_kb(server.pid, "VmRSS")
    reset_peak_memory(server.pid)
    async with asyncio.timeout(60):
        await asyncio.gather(*(_upload_64_mb(server, chunked=i % 2 == 1) for i in range(8)))
    peak = memory_kb(server.pid, "VmHWM")
    after = memory_kb(server.pid, "VmRSS")
    print(f"RSS before {before // 1024} MB, peak {peak // 1024} MB, after {after // 1024} MB")
    assert peak - before < 50 * 1024
    assert answers(f"{server.base}/health")


# --- what still works ----------------------------------------------------------------------------


async def test_keep_alive_serves_two_requests_on_one_connection(server: Served) -> None:
    reader, writer = await connect(server)
    for _ in range(2):
        writer.write(request("GET", "/health"))
        assert await read_response(reader) == (200, b'{"status":"ok"}')
    writer.close()


async def test_pipelined_requests_are_answered_in_order(server: Served, pet_id: int) -> None:
    reader, writer = await connect(server)
    writer.write(request("GET", f"/pets/{pet_id}") + request("GET", "/health"))
    status, body = await read_response(reader)
    assert status == 200
    assert json.loads(body)["id"] == pet_id
    assert await read_response(reader) == (200, b'{"status":"ok"}')
    writer.close()


async def test_headers_sent_in_parts_within_the_timeout_are_served(server: Served) -> None:
    reader, writer = await connect(server)
    for part in (b"GET /hea", b"lth HTTP/1.1\r\nHo", b"st: test\r\n", b"\r\n"):
        writer.write(part)
        await asyncio.sleep(HEADER_TIMEOUT / 8)
    assert await read_response(reader) == (200, b'{"status":"ok"}')
    writer.close()


def test_a_normal_post_with_a_body_passes(server: Served) -> None:
    headers = {"Authorization": f"Bearer {_token(server.base)}"}
    pet = {"name": "Bella", "pet_type": "cat"}
    response = httpx.post(f"{server.base}/pets", json=pet, headers=headers, timeout=10)
    assert response.status_code == 201, response.text


# --- the client address --------------------------------------------------------------------------

FORWARDED_FOR = [f"203.0.113.{n}" for n in (7, 8, 9)]


def _access_log_clients(served: Served) -> list[str]:
    """The client address of each `GET /health` access line (JSON), in order."""
    for forwarded in FORWARDED_FOR:
        response = httpx.get(
            f"{served.base}/health", headers={"X-Forwarded-For": forwarded}, timeout=5
        )
        assert response.status_code == 200
    lines = [json.loads(line) for line in served.log.read_text().splitlines()]
    health = [line for line in lines if line.get("logger") == "pets.access"]
    health = [line for line in health if line["path"] == "/health"]
    return [line["client"] for line in health[-len(FORWARDED_FOR) :]]


def test_a_rotated_x_forwarded_for_does_not_change_the_client_address(server: Served) -> None:
    assert _access_log_clients(server) == ["127.0.0.1"] * len(FORWARDED_FOR)


def test_x_forwarded_for_is_believed_from_a_configured_proxy(
    served_database: str, tmp_path: Path
) -> None:
    proxied_log = tmp_path / "proxied.log"
    with serve_api(
        served_database, redis_url(), proxied_log, FORWARDED_ALLOW_IPS="127.0.0.1"
    ) as proxied:
        assert _access_log_clients(proxied) == FORWARDED_FOR


# --- the body limit in-process (httpx.ASGITransport) ---------------------------------------------


async def test_in_process_content_length_over_the_limit_is_413_problem(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    body = b" " * (settings.HTTP_MAX_BODY_BYTES + 1)
    response = await client.post("/pets", content=body, headers=JSON)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {
        "type": "about:blank",
        "title": "Request Entity Too Large",
        "status": 413,
        "detail": f"The request body is larger than {settings.HTTP_MAX_BODY_BYTES} bytes.",
        "request_id": response.headers["x-request-id"],
    }


async def test_in_process_chunked_body_over_the_limit_is_413_without_reading_the_rest(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(64):
            sent += 1
            yield b" " * 4096

    response = await client.post("/pets", content=body(), headers=JSON)
    assert response.status_code == 413
    assert response.json()["status"] == 413
    assert sent * 4096 <= settings.HTTP_MAX_BODY_BYTES + 4096, "reading stopped at the limit"


async def test_in_process_body_at_the_limit_passes(
    client: httpx.AsyncClient, settings: Settings, auth_headers: dict[str, str]
) -> None:
    pet = json.dumps({"name": "Max", "pet_type": "dog"}).encode()
    body = pet.ljust(settings.HTTP_MAX_BODY_BYTES)
    response = await client.post("/pets", content=body, headers={**auth_headers, **JSON})
    assert response.status_code == 201, response.text


# --- the protocol's deadlines, in-process --------------------------------------------------------


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        addresses = {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}
        return addresses.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def read_body(_scope: Scope, receive: Receive, _send: Send) -> None:
    while (await receive())["type"] == "http.request":
        pass  # the client goes away before the body is complete


def connection() -> tuple[BoundedHttpToolsProtocol, ServerState]:
    state = ServerState()
    config = Config(app=read_body, log_config=None, lifespan="off")
    protocol = BoundedHttpToolsProtocol(config, state, {})
    protocol.connection_made(RecordingTransport())
    return protocol, state


# uvicorn's own methods the protocol overrides: each must still be uvicorn's, or the override
# is never called (test_half_sent_headers_get_408... and the 503 tests show the effect).
OVERRIDDEN = {
    "connection_made", "connection_lost", "data_received", "handle_websocket_upgrade",
    "send_400_response", "on_message_begin", "on_header", "on_headers_complete", "on_body",
    "on_message_complete", "_start_asgi_task",
}  # fmt: skip


async def test_uvicorn_still_calls_what_the_bounded_protocol_overrides() -> None:
    assert {
        name
        for name, value in vars(BoundedHttpToolsProtocol).items()
        if callable(value) and hasattr(HttpToolsProtocol, name) and name != "__init__"
    } == OVERRIDDEN
    assert set(vars(HttpToolsProtocol)) >= OVERRIDDEN, OVERRIDDEN - set(vars(HttpToolsProtocol))
    # Past limit_concurrency uvicorn hands _start_asgi_task its plain-text app; the 503 sent is
    # the problem that replaces it.
    state = ServerState()
    config = Config(app=read_body, log_config=None, lifespan="off", limit_concurrency=1)
    protocol = BoundedHttpToolsProtocol(config, state, {})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"GET /pets HTTP/1.1\r\nHost: test\r\n\r\n")
    await asyncio.gather(*state.tasks)
    head, _, body = transport.written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"content-type: application/problem+json" in head.lower()
    assert json.loads(body)["detail"] == "The server is at its connection limit; retry shortly."
    protocol.connection_lost(None)


async def test_a_lost_connection_leaves_no_deadline_behind() -> None:
    waiting, _ = connection()
    first = waiting.header_deadline
    assert first is not None, "armed on connecting"
    waiting.data_received(b"GET / HTTP/1.1\r\nHost: test\r\n")
    assert waiting.header_deadline is first, "a deadline is never extended"
    waiting.connection_lost(None)
    assert first.cancelled()
    assert waiting.header_deadline is None

    uploading, state = connection()
    uploading.data_received(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nab")
    body = uploading.body_deadline
    assert body is not None
    assert uploading.header_deadline is None
    uploading.connection_lost(None)
    assert body.cancelled()
    assert uploading.body_deadline is None
    await asyncio.gather(*state.tasks)


async def test_a_request_that_arrives_whole_sets_no_deadline() -> None:
    protocol, state = connection()
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\n{}")
    assert protocol.header_deadline is None
    assert protocol.body_deadline is None
    protocol.connection_lost(None)
    await asyncio.gather(*state.tasks)


async def test_one_address_cannot_take_every_connection(server: Served, pet_id: int) -> None:
    held = []
    try:
        for _ in range(100):  # the per-address limit (HTTP_MAX_CONNECTIONS_PER_CLIENT)
            held.append(await connect(server, "127.0.0.9"))
        reader, writer = await connect(server, "127.0.0.9")
        refused = await read_until_closed(reader, SLACK)
        writer.close()
        assert status_of(refused) == 503
        assert b"\r\nretry-after: " in refused.lower()
        assert "Too many connections" in str(problem_of(refused)["detail"])
        async with httpx.AsyncClient(base_url=server.base, timeout=5) as http:
            assert (await http.get(f"/pets/{pet_id}")).status_code == 200  # everyone else
    finally:
        for _, writer in held:
            writer.close()


async def test_past_the_connection_limit_the_answer_is_a_503_problem(
    served_database: str, tmp_path: Path
) -> None:
    with serve_api(
        served_database, redis_url(), tmp_path / "small.log", HTTP_MAX_CONCURRENCY="3"
    ) as small:
        held = [await connect(small, f"127.0.0.{10 + n}") for n in range(3)]
        try:
            reader, writer = await connect(small)
            writer.write(request("GET", "/health"))
            received = await read_until_closed(reader, SLACK)
            writer.close()
        finally:
            for _, other in held:
                other.close()
    assert status_of(received) == 503
    assert b"\r\nretry-after: " in received.lower()
    assert b"\r\nx-content-type-options: nosniff" in received.lower()
    assert "connection limit" in str(problem_of(received)["detail"])
