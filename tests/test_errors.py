"""Every error is a problem response; database faults map to 409, 422 and 503, never a bare 500."""

from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from deps import SessionDep
from main import create_app
from settings import Settings
from tests.helpers import PROBLEM, assert_problem, client_for, make_settings, sql
from tests.servers import unused_port


async def test_unknown_route_is_a_404_problem(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/no/such/route"), 404)


async def test_wrong_method_is_a_405_problem_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.put("/pets")
    assert_problem(response, 405)
    assert response.headers["allow"] == "GET, HEAD, POST"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/docs", "GET, HEAD"),
        ("DELETE", "/docs/oauth2-redirect", "GET, HEAD"),
        ("PUT", "/redoc", "GET, HEAD"),
        ("POST", "/openapi.json", "GET, HEAD"),
        ("POST", "/docs/assets/swagger-ui.css", "GET, HEAD"),
        ("POST", "/pets/1", "DELETE, GET, HEAD, PATCH, PUT"),
        ("GET", "/auth/token", "POST"),
    ],
)
async def test_every_405_lists_the_methods_its_path_answers(
    client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    """RFC 9110 15.5.6: the docs pages, the document and the static files too."""
    response = await client.request(method, path)
    assert_problem(response, 405)
    assert response.headers["allow"] == allow


@pytest.fixture
async def unreachable_app() -> AsyncIterator[FastAPI]:
    """The app configured for a PostgreSQL and a Redis that are not there."""
    port = unused_port()
    settings = make_settings(
        f"postgresql+asyncpg://postgres@127.0.0.1:{port}/nowhere",
        REDIS_URL=f"redis://127.0.0.1:{port}/0",
        DB_CONNECT_TIMEOUT=2,
    )
    application = create_app(settings)
    async with LifespanManager(application):
        yield application


async def test_database_outage_is_503_with_retry_after(unreachable_app: FastAPI) -> None:
    async with client_for(unreachable_app) as client:
        for path in ("/pets", "/pets/1"):
            response = await client.get(path)
            assert_problem(response, 503)
            assert int(response.headers["retry-after"]) > 0
        login = await client.post("/auth/token", data={"username": "a", "password": "b"})
        assert_problem(login, 503)


async def test_ready_names_what_is_down_while_health_stays_up(unreachable_app: FastAPI) -> None:
    async with client_for(unreachable_app) as client:
        assert (await client.get("/health")).status_code == 200
        problem = assert_problem(await client.get("/ready"), 503)
        assert "database" in problem["detail"]
        assert "redis" in problem["detail"]


async def test_ready_names_redis_alone_when_only_redis_is_down(database_url: str) -> None:
    settings = make_settings(database_url, REDIS_URL=f"redis://127.0.0.1:{unused_port()}/0")
    application = create_app(settings)
    async with LifespanManager(application), client_for(application) as client:
        problem = assert_problem(await client.get("/ready"), 503)
        assert problem["detail"] == "Not ready: redis unreachable."


# Real PostgreSQL faults, raised through a route added to a fresh app: the one mapping point
# in problems.py must turn each into its status.
FAULTS = {
    "unique": "INSERT INTO \"user\" (username, password_hash) VALUES ('admin', 'x')",
    "data": "SELECT 1 / 0",
    "too long": "INSERT INTO pet (name, pet_type) VALUES (repeat('x', 200), 'cat')",
    "not null": "INSERT INTO pet (name, pet_type) VALUES (NULL, 'cat')",
    "timeout": "SET LOCAL statement_timeout = 50; SELECT pg_sleep(2)",
    "bug": "SELECT * FROM no_such_table",
}


@pytest.fixture
async def faulty_app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)

    async def run_fault(kind: str, session: SessionDep) -> None:
        for statement in FAULTS[kind].split("; "):
            await sql(session, statement)

    application.add_api_route("/fault/{kind}", run_fault)
    async with LifespanManager(application):
        yield application


@pytest.mark.parametrize(
    ("kind", "status"),
    [("unique", 409), ("data", 422), ("too long", 422), ("not null", 422), ("timeout", 503)],
)
async def test_database_faults_map_to_problem_statuses(
    faulty_app: FastAPI, kind: str, status: int
) -> None:
    async with client_for(faulty_app) as client:
        response = await client.get(f"/fault/{kind}")
    problem = assert_problem(response, status)
    assert "SELECT" not in problem["detail"]
    assert "INSERT" not in problem["detail"]
    assert ("retry-after" in response.headers) == (status == 503)


async def test_unexpected_error_is_a_500_problem_without_internals(faulty_app: FastAPI) -> None:
    async with client_for(faulty_app, raise_app_exceptions=False) as client:
        response = await client.get("/fault/bug")
    problem = assert_problem(response, 500)
    assert "no_such_table" not in response.text
    assert problem["detail"] == "An unexpected error occurred."


async def test_openapi_declares_problem_bodies_and_bearer_auth(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert "Problem" in schema["components"]["schemas"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert list(response["content"]) == [PROBLEM], (path, method, status)
    assert (
        schema["components"]["securitySchemes"]["OAuth2PasswordBearer"]["flows"]["password"][
            "tokenUrl"
        ]
        == "auth/token"
    )
    protected = {
        ("/pets", "post"),
        ("/pets/{pet_id}", "put"),
        ("/pets/{pet_id}", "patch"),
        ("/pets/{pet_id}", "delete"),
    }
    for path, method in protected:
        operation = schema["paths"][path][method]
        assert operation["security"] == [{"OAuth2PasswordBearer": []}]
        assert "401" in operation["responses"]
    assert "security" not in schema["paths"]["/pets"]["get"]
    name = schema["components"]["schemas"]["PetCreate"]["properties"]["name"]
    assert (name["minLength"], name["maxLength"]) == (1, 100)
    assert name["allOf"] == [{"$ref": "#/components/schemas/Name"}]
    assert schema["components"]["schemas"]["Name"]["pattern"].startswith("^(?!")
    assert schema["components"]["schemas"]["PetCreate"]["additionalProperties"] is False


async def test_swagger_ui_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert "swagger-ui" in response.text
