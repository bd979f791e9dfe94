#!/usr/bin/env bash
# The one test command: sets up .venv from requirements-dev.txt, then runs ruff, mypy and pytest.
# Needs PostgreSQL and Redis (TEST_POSTGRES_URL / TEST_REDIS_URL; local defaults) and Debian's
# chromium; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$python" -m venv .venv
fi
stamp=.venv/.requirements.sha256
wanted=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "==> installing requirements-dev.txt"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
    echo "$wanted" > "$stamp"
fi

echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
# tests/test_docs.py renders /docs and /redoc in a real browser: Debian's chromium. As root
# (CI) it is installed here; otherwise the one command that installs it is named.
if ! command -v chromium > /dev/null && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo "==> installing chromium (Debian's package) for the docs pages' test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null
fi
if ! command -v chromium > /dev/null; then
    echo "test.sh: Chromium is not installed; the docs pages' test needs it. Install it with:" >&2
    echo "    apt-get install -y chromium" >&2
    exit 1
fi
.venv/bin/pytest "$@"
