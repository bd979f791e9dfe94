"""The API's Prometheus metrics, and their exposition summed over every uvicorn process.

prometheus-client picks its multiprocess mode when it is first imported, from the environment
variable PROMETHEUS_MULTIPROC_DIR (server.py sets it for the processes it starts); without it,
as in tests that build the app in-process, the metrics live in this process's registry."""

import os
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

MULTIPROCESS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"
EXPOSITION_MEDIA_TYPE = CONTENT_TYPE_LATEST

# --- Prometheus --------------------------------------------------------------------------------

# From 5 ms (a pet by id) to 10 s (the slowest analytics a statement timeout lets through).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "http_requests_total",
    "Requests answered, by method, route template and exact status.",
    ("method", "handler", "status"),
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by method and route template.",
    ("method", "handler"),
    buckets=LATENCY_BUCKETS,
)
REFUSED = Counter(
    "pets_refused_total",
    "Requests turned away on purpose, by the limit that refused them (docs/operations.md).",
    ("reason",),
)
POOL_CONNECTIONS = Gauge(
    "pets_db_pool_connections",
    "Database connections of each pool (main, analytics), by state (in_use, idle, overflow).",
    ("pool", "state"),
    multiprocess_mode="livesum",
)
TURNS_IN_USE = Gauge(
    "pets_turns_in_use",
    "Turns taken of each limited resource (analytics, exports, listings, password checks).",
    ("resource",),
    multiprocess_mode="livesum",
)
METRICS_QUESTIONS = Counter(
    "pets_metrics_questions_total",
    "Parts of analytics questions answered, by where they were read from "
    "(monthly or daily cube, facts by primary-key probes, facts by range scan).",
    ("source",),
)
METRICS_DURATION = Histogram(
    "pets_metrics_question_duration_seconds",
    "Time to answer an analytics question (a page of GET /metrics).",
    buckets=LATENCY_BUCKETS,
)
# Where a route template is not known (no route matched): one value for them all.
UNMATCHED = "unmatched"
# Every limit that refuses requests on purpose (docs/operations.md), each shown from the start.
REFUSAL_REASONS = (
    "analytics_busy", "exports_busy", "listings_busy", "password_checks_busy", "login_throttled",
    "body_too_large", "headers_too_large", "header_timeout", "body_timeout",
    "too_many_connections", "server_busy",
)  # fmt: skip
for _reason in REFUSAL_REASONS:
    REFUSED.labels(_reason)


def refuse(reason: str) -> None:
    assert reason in REFUSAL_REASONS, reason  # a new limit is listed (and documented) first
    REFUSED.labels(reason).inc()


def record_pools(engines: Mapping[str, AsyncEngine]) -> None:
    """Each pool's connections now: in use, idle in the pool, and open beyond its size."""
    for name, engine in engines.items():
        pool = engine.sync_engine.pool
        assert isinstance(pool, QueuePool)
        POOL_CONNECTIONS.labels(name, "in_use").set(pool.checkedout())
        POOL_CONNECTIONS.labels(name, "idle").set(pool.checkedin())
        POOL_CONNECTIONS.labels(name, "overflow").set(max(pool.overflow(), 0))


def record_turns(in_use: Mapping[str, int]) -> None:
    for resource, taken in in_use.items():
        TURNS_IN_USE.labels(resource).set(taken)


def _mark_dead_processes(directory: str) -> None:
    """Forget the live gauges of API processes that are gone (uvicorn restarts a dead worker);
    their counters stay counted."""
    for path in Path(directory).glob("gauge_live*_*.db"):
        suffix = path.stem.rsplit("_", 1)[1]
        if not suffix.isdigit():
            continue  # not one of prometheus-client's
        pid = int(suffix)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
        except PermissionError:
            continue  # alive, someone else's


def exposition() -> bytes:
    """Every metric in Prometheus's text format: over every API process in multiprocess mode,
    else this process's own."""
    directory = os.environ.get(MULTIPROCESS_DIRECTORY)
    if not directory:
        return generate_latest(REGISTRY)
    _mark_dead_processes(directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
