"""Private servers and processes for tests that make things fail, on spare ports."""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _accepts_connections(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class PrivateRedis:
    """A throw-away redis-server that keeps nothing on disk."""

    def __init__(self) -> None:
        self.port = unused_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: _accepts_connections(self.port), 10, "the private Redis")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or name]
    return found[-1]


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (initdb), run as user postgres when the tests run as root."""

    def __init__(self) -> None:
        self.port = unused_port()
        self.directory = tempfile.mkdtemp(prefix="pets-test-pg-")
        self.data = os.path.join(self.directory, "data")
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run(
            _postgres_bin("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "--no-sync"
        )

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_root else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = os.path.join(self.directory, "server.log")
        self._run(_postgres_bin("pg_ctl"), "-D", self.data, "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        self._run(_postgres_bin("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class WorkerProcess:
    """`arq worker.WorkerSettings` as an operator starts it, STDOUT and STDERR kept apart."""

    def __init__(self, directory: Path, env: dict[str, str], name: str = "worker") -> None:
        self.stdout_path = directory / f"{name}.stdout"
        self.stderr_path = directory / f"{name}.stderr"
        arq = str(Path(sys.executable).parent / "arq")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [arq, "--custom-log-dict", "worker.LOG_CONFIG", "worker.WorkerSettings"],
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=out,
                stderr=err,
            )

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for_output(
        self, text: str, count: int = 1, timeout: float = 30, stream: str = "stdout"
    ) -> None:
        read = self.stdout if stream == "stdout" else self.stderr
        wait_until(
            lambda: read().count(text) >= count or not self.alive(),
            timeout,
            f"{count} x {text!r} on the worker's {stream}",
        )
        assert self.alive(), f"the worker exited:\n{self.stderr()}"

    def stop(self) -> int:
        """SIGTERM, as docker stop sends; returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


@dataclass
class ApiServer:
    port: int
    pid: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def serve_api(database_url: str, redis_url: str, log: Path, **settings: str) -> Iterator[ApiServer]:
    """`python server.py` as the image runs it, on a spare port, with these settings (one
    process: its pid is uvicorn's)."""
    port = unused_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "PYTHONUNBUFFERED": "1",
        **settings,
    }
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "server.py", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=output,
        )
    try:
        wait_until(
            lambda: answers(f"http://127.0.0.1:{port}/health") or process.poll() is not None,
            30,
            "server.py",
        )
        assert process.poll() is None, log.read_text()
        yield ApiServer(port=port, pid=process.pid, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def forget_login_attempts(redis_url: str) -> None:
    """Servers of one test run share its Redis: a test that logs in starts with no attempts
    counted from 127.0.0.1 by another (the fuzzer's wrong logins fill the per-client counter)."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match="pets:login-attempts:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
