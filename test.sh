#!/usr/bin/env bash
# The one test command: sets up .venv from requirements-dev.txt, then runs ruff, mypy and pytest.
# Needs PostgreSQL and Redis (TEST_POSTGRES_URL / TEST_REDIS_URL; local defaults) and Debian's
# chromium, nodejs and prometheus; extra arguments go to pytest.
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
# Debian's packages some tests drive: chromium renders /docs and /redoc (tests/test_docs.py),
# node checks names against the OpenAPI pattern with ECMA-262's own engine
# (tests/test_name_rule.py), prometheus's promtool checks and unit-tests observability/
# (tests/test_prometheus_config.py). As root (CI) a missing one is installed here; otherwise the
# one command that installs it is named.
need_package() {  # command, Debian package, what needs it
    if ! command -v "$1" > /dev/null && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        echo "==> installing $2 (Debian's package) for $3"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" > /dev/null
    fi
    if ! command -v "$1" > /dev/null; then
        echo "test.sh: $1 is not installed; $3 needs it. Install it with:" >&2
        echo "    apt-get install -y $2" >&2
        exit 1
    fi
}
need_package chromium chromium "the docs pages' test"
need_package node nodejs "the name rule's test"
need_package promtool prometheus "the Prometheus configuration's test"
.venv/bin/pytest "$@"
