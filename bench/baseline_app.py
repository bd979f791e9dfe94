"""The raw baseline for the pet routes: Starlette, asyncpg and orjson running the same SQL as the
service, with nothing else (no ORM, no validation, no sessions). `uvicorn bench.baseline_app:app`
with DATABASE_URL set."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

PET = "SELECT pet.name, pet.pet_type, pet.id, pet.created_at FROM pet WHERE pet.id = $1"
PAGE = (
    "SELECT pet.name, pet.pet_type, pet.id, pet.created_at FROM pet"
    " ORDER BY pet.id ASC LIMIT $1 OFFSET $2"
)
COUNT = "SELECT count(*) FROM pet"


def json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


async def get_pet(request: Request) -> Response:
    row = await request.app.state.pool.fetchrow(PET, int(request.path_params["pet_id"]))
    return json(dict(row)) if row else json({"detail": "not found"}, 404)


async def list_pets(request: Request) -> Response:
    limit = int(request.query_params.get("limit", 20))
    offset = int(request.query_params.get("offset", 0))
    async with request.app.state.pool.acquire() as connection:
        rows = await connection.fetch(PAGE, limit, offset)
        total = await connection.fetchval(COUNT)
    items = [dict(row) for row in rows]
    return json({"items": items, "total": total, "limit": limit, "offset": offset})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    url = os.environ["DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://")
    app.state.pool = await asyncpg.create_pool(url, min_size=10, max_size=20)
    yield
    await app.state.pool.close()


app = Starlette(
    routes=[Route("/pets", list_pets), Route("/pets/{pet_id:int}", get_pet)], lifespan=lifespan
)
