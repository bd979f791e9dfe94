"""A new user's first run: every entry point reads the .env beside the code whatever the current
directory, and invalid settings end it with one line saying which file or setting to change."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from settings import Settings
from tests.helpers import ROOT

BIN = Path(sys.executable).parent
# The entry points as the README runs them, each reading its settings before anything else.
ENTRY_POINTS = {
    "api": [sys.executable, "server.py", "--port", "0"],
    "worker": [str(BIN / "arq"), "--custom-log-dict", "worker.LOG_CONFIG", "worker.WorkerSettings"],
    "cli": [sys.executable, "cli.py", "report-now"],
    "migrations": [str(BIN / "alembic"), "upgrade", "head"],
}
NO_ENV_FILE = (
    "settings: JWT_SECRET still has its development placeholder; copy .env.example to .env"
    " (cp .env.example .env) for local development, or set JWT_SECRET\n"
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's code, without the checkout's .env (a developer may have one)."""
    copy = tmp_path / "project"
    copy.mkdir()
    for path in Path(ROOT).iterdir():
        if path.suffix == ".py" or path.name in ("alembic.ini", ".env.example"):
            shutil.copy(path, copy)
    for folder in ("alembic", "templates"):
        shutil.copytree(
            Path(ROOT, folder), copy / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    return copy


def new_shell() -> dict[str, str]:
    """A new user's shell: none of the service's settings exported (conftest sets some)."""
    return {name: value for name, value in os.environ.items() if name not in Settings.model_fields}


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=new_shell(), capture_output=True, text=True, timeout=60, check=False
    )


def env_example() -> str:
    return Path(ROOT, ".env.example").read_text()


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_without_env_file_each_entry_point_says_what_to_do_in_one_line(
    project: Path, entry_point: str
) -> None:
    result = run(ENTRY_POINTS[entry_point], project)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", NO_ENV_FILE)


def test_invalid_env_file_is_named_in_the_message(project: Path) -> None:
    (project / ".env").write_text("ENVIRONMENT=production\nLOG_LEVEL=loud\n")
    result = run(ENTRY_POINTS["cli"], project)
    assert result.returncode == 1
    assert result.stderr == (
        "settings: LOG_LEVEL: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'; change"
        f" LOG_LEVEL in {project / '.env'} (or in the environment, which takes precedence)\n"
    )


@pytest.fixture
def elsewhere(project: Path, tmp_path: Path, database_url: str) -> Path:
    """The copy given a .env made from .env.example, and a directory that is not the project."""
    # The one edit a user might make: the database (here, the test run's own).
    (project / ".env").write_text(
        re.sub(r"^DATABASE_URL=.*$", f"DATABASE_URL={database_url}", env_example(), flags=re.M)
    )
    other = tmp_path / "elsewhere"
    other.mkdir()
    return other


def test_env_example_is_read_from_the_project_directory_whatever_the_cwd(
    project: Path, elsewhere: Path
) -> None:
    result = run(
        [sys.executable, str(project / "cli.py"), "wait-for-db", "--timeout", "20"], elsewhere
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "wait-for-db: the database answers\n"


def test_alembic_finds_the_project_from_another_directory(project: Path, elsewhere: Path) -> None:
    result = run([str(BIN / "alembic"), "-c", str(project / "alembic.ini"), "current"], elsewhere)
    assert result.returncode == 0, result.stderr


def test_env_example_holds_the_local_development_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=Path(ROOT, ".env.example"))
    assert settings.ENVIRONMENT == "development"
    assert settings.DATABASE_URL == "postgresql+asyncpg://postgres@127.0.0.1:5432/pets"
    assert settings.REDIS_URL == "redis://127.0.0.1:6379/0"
    lines = env_example().splitlines()
    assignments = [number for number, line in enumerate(lines) if re.match(r"^[A-Z_]+=", line)]
    assert len(assignments) >= 4
    # Each setting says what it is for, on the line above.
    assert all(lines[number - 1].startswith("# ") for number in assignments)
    assert "Development only" in env_example()
