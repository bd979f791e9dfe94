"""Concurrent writers: nothing is lost, the data ends consistent, and races end in 404, not 500."""

import asyncio
from string import ascii_lowercase
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event
from sqlmodel.ext.asyncio.session import AsyncSession

from deps import state_of
from tests.helpers import sql

pytestmark = pytest.mark.usefixtures("empty_pet_table")


async def test_fifty_concurrent_patches_lose_no_field(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    pet = (
        await client.post("/pets", json={"name": "Rex", "pet_type": "dog"}, headers=auth_headers)
    ).json()
    names = [f"name {i}" for i in range(25)]
    types = [f"type {ascii_lowercase[i]}" for i in range(25)]
    bodies = [{"name": name} for name in names] + [{"pet_type": kind} for kind in types]
    responses = await asyncio.gather(
        *(client.patch(f"/pets/{pet['id']}", json=body, headers=auth_headers) for body in bodies)
    )
    assert [r.status_code for r in responses] == [200] * 50
    final = (await client.get(f"/pets/{pet['id']}")).json()
    # Each PATCH changes only its own field: a name patch never writes back an old type, nor the
    # other way round, so both fields hold a patched value, never the original one.
    assert final["name"] in names
    assert final["pet_type"] in types
    assert final["created_at"] == pet["created_at"]


async def test_a_patch_is_one_update_of_only_its_fields(
    app: FastAPI, client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    """No read-modify-write: what makes concurrent PATCHes of different fields safe."""
    pet = (
        await client.post("/pets", json={"name": "Rex", "pet_type": "dog"}, headers=auth_headers)
    ).json()
    statements: list[str] = []
    engine = state_of(app).sessionmaker.kw["bind"].sync_engine

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        response = await client.patch(
            f"/pets/{pet['id']}", json={"pet_type": "wolf"}, headers=auth_headers
        )
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert response.status_code == 200
    touching_pets = [s for s in statements if " pet " in f"{s} " or "pet." in s]
    assert len(touching_pets) == 1, touching_pets
    assert touching_pets[0].startswith("UPDATE pet SET pet_type=")
    assert "name=" not in touching_pets[0]


async def test_fifty_concurrent_creates_all_land(
    client: httpx.AsyncClient, auth_headers: dict[str, str], session: AsyncSession
) -> None:
    responses = await asyncio.gather(
        *(
            client.post("/pets", json={"name": f"pet {i}", "pet_type": "cat"}, headers=auth_headers)
            for i in range(50)
        )
    )
    assert [r.status_code for r in responses] == [201] * 50
    assert len({r.json()["id"] for r in responses}) == 50
    rows = await sql(session, "SELECT count(*), count(DISTINCT name) FROM pet")
    assert tuple(rows.one()) == (50, 50)
    assert (await client.get("/pets")).json()["total"] == 50


async def test_a_delete_racing_a_patch_ends_in_404_or_200(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    for round_number in range(20):
        created = await client.post(
            "/pets", json={"name": f"racer {round_number}", "pet_type": "cat"}, headers=auth_headers
        )
        path = f"/pets/{created.json()['id']}"
        patched, deleted = await asyncio.gather(
            client.patch(path, json={"name": "renamed"}, headers=auth_headers),
            client.delete(path, headers=auth_headers),
        )
        assert patched.status_code in (200, 404), patched.text
        assert deleted.status_code == 204, deleted.text
        assert (await client.get(path)).status_code == 404
