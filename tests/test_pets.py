"""The pet directory: CRUD, validation, filters, sorting and paging."""

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlmodel.ext.asyncio.session import AsyncSession

from tests.helpers import assert_problem, create, pet_count

pytestmark = pytest.mark.usefixtures("empty_pet_table")


# --- create ----------------------------------------------------------------------------------


async def test_create_returns_201_with_location_and_normalised_fields(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    before = datetime.now(UTC)
    response = await client.post(
        "/pets", json={"name": "  Rex  ", "pet_type": " Guinea Pig "}, headers=auth_headers
    )
    assert response.status_code == 201, response.text
    pet = response.json()
    assert pet["name"] == "Rex"
    assert pet["pet_type"] == "guinea pig"
    assert response.headers["location"] == f"/pets/{pet['id']}"
    created = datetime.fromisoformat(pet["created_at"])
    assert created.tzinfo is not None
    assert before - timedelta(seconds=5) < created < datetime.now(UTC) + timedelta(seconds=5)
    fetched = await client.get(response.headers["location"])
    assert fetched.json() == pet


async def test_json_with_a_charset_or_a_json_suffix_is_accepted(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        response = await client.post(
            "/pets",
            content=b'{"name": "Rex", "pet_type": "dog"}',
            headers={**auth_headers, "Content-Type": content_type},
        )
        assert response.status_code == 201, response.text


async def test_create_keeps_unicode_and_punctuation_in_names(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    pet = await create(client, auth_headers, name="O'Brien & <Co> 🐈 Ünal", pet_type="cat")
    assert pet["name"] == "O'Brien & <Co> 🐈 Ünal"


async def test_create_needs_a_token_and_writes_nothing(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    response = await client.post("/pets", json={"name": "Rex", "pet_type": "dog"})
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    assert await pet_count(session) == 0


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"pet_type": "dog"}, ["body", "name"]),
        ({"name": "Rex"}, ["body", "pet_type"]),
        ({"name": "", "pet_type": "dog"}, ["body", "name"]),
        ({"name": "   ", "pet_type": "dog"}, ["body", "name"]),
        ({"name": "x" * 101, "pet_type": "dog"}, ["body", "name"]),
        ({"name": "Re\x00x", "pet_type": "dog"}, ["body", "name"]),
        ({"name": "Re\nx", "pet_type": "dog"}, ["body", "name"]),
        ({"name": "Re\x1bx", "pet_type": "dog"}, ["body", "name"]),
        ({"name": "Re\x85x", "pet_type": "dog"}, ["body", "name"]),
        ({"name": None, "pet_type": "dog"}, ["body", "name"]),
        ({"name": 42, "pet_type": "dog"}, ["body", "name"]),
        ({"name": "Rex", "pet_type": ""}, ["body", "pet_type"]),
        ({"name": "Rex", "pet_type": "d0g"}, ["body", "pet_type"]),
        ({"name": "Rex", "pet_type": "-dog"}, ["body", "pet_type"]),
        ({"name": "Rex", "pet_type": "cat\tdog"}, ["body", "pet_type"]),
        ({"name": "Rex", "pet_type": "a" * 31}, ["body", "pet_type"]),
        ({"name": "Rex", "pet_type": "dog", "colour": "red"}, ["body", "colour"]),
        ({"name": "Rex", "pet_type": "dog", "id": 7}, ["body", "id"]),
        (
            {"name": "Rex", "pet_type": "dog", "created_at": "2020-01-01T00:00:00Z"},
            ["body", "created_at"],
        ),
    ],
)
async def test_create_rejects_invalid_body_with_a_problem_naming_the_field(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    session: AsyncSession,
    body: dict[str, Any],
    loc: list[str],
) -> None:
    response = await client.post("/pets", json=body, headers=auth_headers)
    problem = assert_problem(response, 422)
    assert loc in [error["loc"] for error in problem["errors"]]
    assert all(error["msg"] for error in problem["errors"])
    assert await pet_count(session) == 0


async def test_create_accepts_the_longest_valid_values(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    pet = await create(client, auth_headers, name="n" * 100, pet_type="a" * 30)
    assert (len(pet["name"]), len(pet["pet_type"])) == (100, 30)


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b'{"name": "Rex", "pet_type": ', "application/json", 422),
        (b"not json at all", "application/json", 422),
        (b'{"name": "Rex\\ud800", "pet_type": "dog"}', "application/json", 422),
        (b"[]", "application/json", 422),
        (b"\xff\xfe{}", "application/json", 400),
        (b'{"name": "\xff", "pet_type": "dog"}', "application/json", 400),
        (b"name=Rex&pet_type=dog", "application/x-www-form-urlencoded", 415),
        (b'{"name": "Rex", "pet_type": "dog"}', "text/plain", 415),
    ],
)
async def test_create_rejects_malformed_payloads(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    session: AsyncSession,
    content: bytes,
    content_type: str,
    status: int,
) -> None:
    headers = {**auth_headers, "Content-Type": content_type}
    response = await client.post("/pets", content=content, headers=headers)
    assert_problem(response, status)
    assert await pet_count(session) == 0


# --- read --------------------------------------------------------------------------------------


async def test_get_missing_pet_is_404_problem(client: httpx.AsyncClient) -> None:
    problem = assert_problem(await client.get("/pets/999"), 404)
    assert "999" in problem["detail"]


@pytest.mark.parametrize("pet_id", ["0", "-1", "2147483648", "9223372036854775808", "abc", "1.5"])
async def test_get_rejects_ids_outside_the_column_range(
    client: httpx.AsyncClient, pet_id: str
) -> None:
    problem = assert_problem(await client.get(f"/pets/{pet_id}"), 422)
    assert problem["errors"][0]["loc"] == ["path", "pet_id"]


async def test_get_largest_possible_id_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/pets/2147483647"), 404)


async def test_list_pages_with_total(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    ids = [
        (await create(client, auth_headers, name=f"pet {i}", pet_type="cat"))["id"]
        for i in range(5)
    ]
    page = (await client.get("/pets", params={"limit": 2, "offset": 1})).json()
    assert page["total"] == 5
    assert (page["limit"], page["offset"]) == (2, 1)
    assert [pet["id"] for pet in page["items"]] == ids[1:3]
    past_end = (await client.get("/pets", params={"offset": 10})).json()
    assert past_end["items"] == []
    assert past_end["total"] == 5


async def test_list_defaults_to_twenty_by_id(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    for i in range(21):
        await create(client, auth_headers, name=f"pet {i}", pet_type="cat")
    page = (await client.get("/pets")).json()
    assert (page["limit"], page["offset"], page["total"]) == (20, 0, 21)
    assert [pet["id"] for pet in page["items"]] == list(range(1, 21))


async def test_list_filters_by_type_and_name_case_insensitively(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    await create(client, auth_headers, name="Rex", pet_type="dog")
    await create(client, auth_headers, name="T-Rex", pet_type="Lizard")
    await create(client, auth_headers, name="Felix", pet_type="cat")
    by_type = (await client.get("/pets", params={"pet_type": " LIZARD "})).json()
    assert [pet["name"] for pet in by_type["items"]] == ["T-Rex"]
    by_name = (await client.get("/pets", params={"name": "rEx"})).json()
    assert [pet["name"] for pet in by_name["items"]] == ["Rex", "T-Rex"]
    both = (await client.get("/pets", params={"name": "rex", "pet_type": "dog"})).json()
    assert [pet["name"] for pet in both["items"]] == ["Rex"]
    assert both["total"] == 1


async def test_list_name_filter_treats_wildcards_literally(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    await create(client, auth_headers, name="100% cat", pet_type="cat")
    await create(client, auth_headers, name="1000 cats", pet_type="cat")
    await create(client, auth_headers, name="snake_case", pet_type="snake")
    await create(client, auth_headers, name="snakeXcase", pet_type="snake")
    percent = (await client.get("/pets", params={"name": "0%"})).json()
    assert [pet["name"] for pet in percent["items"]] == ["100% cat"]
    underscore = (await client.get("/pets", params={"name": "e_c"})).json()
    assert [pet["name"] for pet in underscore["items"]] == ["snake_case"]


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("id", ["b", "a", "c"]),
        ("-id", ["c", "a", "b"]),
        ("name", ["a", "b", "c"]),
        ("-name", ["c", "b", "a"]),
        ("pet_type", ["c", "a", "b"]),
        ("-pet_type", ["b", "a", "c"]),
        ("created_at", ["b", "a", "c"]),
        ("-created_at", ["c", "a", "b"]),
    ],
)
async def test_list_sorts_by_each_field(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    sort: str,
    expected: list[str],
) -> None:
    await create(client, auth_headers, name="b", pet_type="zebra")
    await create(client, auth_headers, name="a", pet_type="dog")
    await create(client, auth_headers, name="c", pet_type="cat")
    page = (await client.get("/pets", params={"sort": sort})).json()
    assert [pet["name"] for pet in page["items"]] == expected


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"limit": 0}, ["query", "limit"]),
        ({"limit": 101}, ["query", "limit"]),
        ({"limit": "ten"}, ["query", "limit"]),
        ({"offset": -1}, ["query", "offset"]),
        ({"offset": 2**31}, ["query", "offset"]),
        ({"offset": 2**63}, ["query", "offset"]),
        ({"sort": "colour"}, ["query", "sort"]),
        ({"sort": "--id"}, ["query", "sort"]),
        ({"pet_type": "c4t"}, ["query", "pet_type"]),
        ({"name": "a\x00b"}, ["query", "name"]),
        ({"name": "x" * 101}, ["query", "name"]),
        ({"colour": "red"}, ["query", "colour"]),
    ],
)
async def test_list_rejects_bad_query_parameters(
    client: httpx.AsyncClient, params: dict[str, Any], loc: list[str]
) -> None:
    problem = assert_problem(await client.get("/pets", params=params), 422)
    assert loc in [error["loc"] for error in problem["errors"]]


# --- replace, patch, delete --------------------------------------------------------------------


async def test_put_replaces_every_field_and_keeps_id_and_created_at(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    response = await client.put(
        f"/pets/{pet['id']}", json={"name": "Tom", "pet_type": "CAT"}, headers=auth_headers
    )
    assert response.status_code == 200, response.text
    assert response.json() == {**pet, "name": "Tom", "pet_type": "cat"}
    assert (await client.get(f"/pets/{pet['id']}")).json() == response.json()


async def test_put_needs_every_field(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    response = await client.put(f"/pets/{pet['id']}", json={"name": "Tom"}, headers=auth_headers)
    problem = assert_problem(response, 422)
    assert ["body", "pet_type"] in [error["loc"] for error in problem["errors"]]
    assert (await client.get(f"/pets/{pet['id']}")).json() == pet


async def test_put_missing_pet_is_404(
    client: httpx.AsyncClient, auth_headers: dict[str, str], session: AsyncSession
) -> None:
    response = await client.put(
        "/pets/5", json={"name": "Tom", "pet_type": "cat"}, headers=auth_headers
    )
    assert_problem(response, 404)
    assert await pet_count(session) == 0


async def test_patch_changes_only_the_given_fields(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    response = await client.patch(
        f"/pets/{pet['id']}", json={"name": " Max "}, headers=auth_headers
    )
    assert response.status_code == 200, response.text
    assert response.json() == {**pet, "name": "Max"}
    response = await client.patch(
        f"/pets/{pet['id']}", json={"pet_type": "Wolf"}, headers=auth_headers
    )
    assert response.json() == {**pet, "name": "Max", "pet_type": "wolf"}


async def test_patch_with_empty_body_changes_nothing(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    response = await client.patch(f"/pets/{pet['id']}", json={}, headers=auth_headers)
    assert response.status_code == 200
    assert response.json() == pet


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"name": None}, ["body", "name"]),
        ({"pet_type": None}, ["body", "pet_type"]),
        ({"name": ""}, ["body", "name"]),
        ({"pet_type": "d0g"}, ["body", "pet_type"]),
        ({"colour": "red"}, ["body", "colour"]),
        ({"id": 99}, ["body", "id"]),
        ({"created_at": "2020-01-01T00:00:00Z"}, ["body", "created_at"]),
    ],
)
async def test_patch_rejects_invalid_fields_and_leaves_the_pet_unchanged(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    body: dict[str, Any],
    loc: list[str],
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    response = await client.patch(f"/pets/{pet['id']}", json=body, headers=auth_headers)
    problem = assert_problem(response, 422)
    assert loc in [error["loc"] for error in problem["errors"]]
    assert (await client.get(f"/pets/{pet['id']}")).json() == pet


async def test_patch_missing_pet_is_404(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    assert_problem(await client.patch("/pets/5", json={"name": "Tom"}, headers=auth_headers), 404)
    assert_problem(await client.patch("/pets/5", json={}, headers=auth_headers), 404)


async def test_delete_removes_the_pet(
    client: httpx.AsyncClient, auth_headers: dict[str, str], session: AsyncSession
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    keep = await create(client, auth_headers, name="Tom", pet_type="cat")
    response = await client.delete(f"/pets/{pet['id']}", headers=auth_headers)
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(await client.get(f"/pets/{pet['id']}"), 404)
    assert_problem(await client.delete(f"/pets/{pet['id']}", headers=auth_headers), 404)
    assert (await client.get(f"/pets/{keep['id']}")).status_code == 200
    assert await pet_count(session) == 1


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/pets/1", {"name": "Tom", "pet_type": "cat"}),
        ("PATCH", "/pets/1", {"name": "Tom"}),
        ("DELETE", "/pets/1", None),
    ],
)
async def test_writes_need_a_token_and_change_nothing(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    response = await client.request(method, path, json=body)
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    assert (await client.get(f"/pets/{pet['id']}")).json() == pet


async def test_pattern_errors_explain_the_rule_in_words(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/pets", json={"name": "Re\tx", "pet_type": "d0g"}, headers=auth_headers
    )
    messages = {tuple(e["loc"]): e["msg"] for e in assert_problem(response, 422)["errors"]}
    assert messages == {
        ("body", "name"): "must not contain control characters, nor format (zero-width, bidi),"
        " private-use, unassigned or line/paragraph separator characters",
        ("body", "pet_type"): "must be letters, with single spaces or hyphens between words",
    }
