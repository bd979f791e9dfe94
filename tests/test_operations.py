"""Health and readiness."""

from datetime import UTC, datetime, timedelta

import httpx
from fastapi import FastAPI

from deps import state_of
from settings import HEARTBEAT_KEY


async def test_health_answers_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ready_when_database_and_redis_answer(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await state_of(app).redis.delete(HEARTBEAT_KEY)
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "database": "ok",
        "redis": "ok",
        "worker_heartbeat": "never",
        "worker_heartbeat_at": None,
        "worker_heartbeat_age_seconds": None,
    }


async def test_ready_shows_the_age_of_the_worker_heartbeat(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    ran_at = (datetime.now(UTC) - timedelta(hours=2)).replace(microsecond=0)
    await state_of(app).redis.set(HEARTBEAT_KEY, ran_at.isoformat())
    try:
        body = (await client.get("/ready")).json()
    finally:
        await state_of(app).redis.delete(HEARTBEAT_KEY)
    assert datetime.fromisoformat(body["worker_heartbeat_at"].replace("Z", "+00:00")) == ran_at
    assert 7200 <= body["worker_heartbeat_age_seconds"] < 7260
