"""HTTP as specified: HEAD, conditional requests on pets, security headers, content
negotiation, Locations that never come from Host, UTF-8 bodies, printable names, /ready that
never fails on bad data, and analytics that queue on their own pool."""

import asyncio
import base64
import gzip
import hashlib
import re
import zlib
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.pool import QueuePool
from sqlmodel.ext.asyncio.session import AsyncSession

from deps import state_of
from settings import HEARTBEAT_KEY
from tests.helpers import assert_problem, client_for, create, make_settings, pet_count
from turns import Turns

# --- HEAD ----------------------------------------------------------------------------------


async def test_head_answers_every_get_route_with_the_gets_headers_and_no_body(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    paths = (await client.get("/openapi.json")).json()["paths"]
    get_paths = [path for path, operations in paths.items() if "get" in operations]
    assert len(get_paths) >= 7
    for template in [*get_paths, "/docs", "/openapi.json"]:
        path = template.replace("{pet_id}", str(pet["id"])).replace("{name}", "region")
        got, head = await client.get(path), await client.head(path)
        assert head.status_code == got.status_code, path
        assert head.content == b"", path
        assert head.headers.get("content-type") == got.headers.get("content-type"), path
        if "content-length" in got.headers:
            assert head.headers["content-length"] == got.headers["content-length"], path


async def test_head_on_a_route_without_get_is_405_and_allow_lists_head_with_get(
    client: httpx.AsyncClient,
) -> None:
    head = await client.head("/auth/token")
    assert head.status_code == 405
    assert head.headers["allow"] == "POST"
    delete = await client.delete("/pets")
    assert delete.headers["allow"] == "GET, HEAD, POST"


# --- ETags and conditional requests ----------------------------------------------------------


async def test_get_pet_has_an_etag_and_if_none_match_gives_304_without_a_body(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    first = await client.get(f"/pets/{pet['id']}")
    etag = first.headers["etag"]
    assert re.fullmatch(r'"\d+-\d+"', etag)
    assert first.headers["cache-control"] == "no-cache"
    for condition in (etag, f'"other", W/{etag}', "*"):
        cached = await client.get(f"/pets/{pet['id']}", headers={"If-None-Match": condition})
        assert cached.status_code == 304, condition
        assert cached.content == b""
        assert cached.headers["etag"] == etag
    stale = await client.get(f"/pets/{pet['id']}", headers={"If-None-Match": '"0-0"'})
    assert stale.status_code == 200
    assert stale.json() == first.json()


async def test_every_change_gives_a_new_etag(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    created = await client.post(
        "/pets", json={"name": "Rex", "pet_type": "dog"}, headers=auth_headers
    )
    url = created.headers["location"]
    etags = [created.headers["etag"]]
    etags.append((await client.patch(url, json={"name": "Max"}, headers=auth_headers)).headers["etag"])  # fmt: skip  # noqa: E501
    body = {"name": "Max", "pet_type": "cat"}
    etags.append((await client.put(url, json=body, headers=auth_headers)).headers["etag"])
    assert len(set(etags)) == 3
    assert (await client.get(url)).headers["etag"] == etags[-1]


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_a_write_with_a_stale_if_match_is_412_and_changes_nothing(
    client: httpx.AsyncClient, auth_headers: dict[str, str], method: str
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    url = f"/pets/{pet['id']}"
    stale = (await client.get(url)).headers["etag"]
    changed = await client.patch(url, json={"name": "Max"}, headers=auth_headers)
    body = {"name": "Bella", "pet_type": "cat"} if method != "DELETE" else None
    foreign = ['"1-1", "x"', f'"{pet["id"]}-\u00b2"', f'"{pet["id"]}-99999999999"']
    for if_match in [stale, f"W/{changed.headers['etag']}", *foreign]:
        headers = {
            name.encode(): value.encode("latin-1")
            for name, value in {**auth_headers, "If-Match": if_match}.items()
        }
        response = await client.request(method, url, json=body, headers=headers)
        problem = assert_problem(response, 412)
        assert "changed" in problem["detail"]
    assert (await client.get(url)).json()["name"] == "Max"
    current = {**auth_headers, "If-Match": f'"0-0", {changed.headers["etag"]}'}
    response = await client.request(method, url, json=body, headers=current)
    assert response.status_code == (204 if method == "DELETE" else 200), response.text


async def test_if_match_star_or_no_if_match_write_as_before_and_a_missing_pet_is_404(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    url = f"/pets/{pet['id']}"
    star = {**auth_headers, "If-Match": "*"}
    assert (await client.patch(url, json={"name": "A"}, headers=star)).status_code == 200
    assert (await client.patch(url, json={"name": "B"}, headers=auth_headers)).status_code == 200
    assert (await client.patch(url, json={}, headers=star)).status_code == 200
    missing = {**auth_headers, "If-Match": '"2147483647-1"'}
    response = await client.patch("/pets/2147483647", json={"name": "C"}, headers=missing)
    assert_problem(response, 404)


async def test_an_empty_patch_with_a_stale_if_match_is_412(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    stale = {**auth_headers, "If-Match": f'"{pet["id"]}-999"'}
    assert_problem(await client.patch(f"/pets/{pet['id']}", json={}, headers=stale), 412)


async def test_a_malformed_if_match_is_422(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    headers = {**auth_headers, "If-Match": "no-quotes"}
    response = await client.patch(f"/pets/{pet['id']}", json={"name": "A"}, headers=headers)
    assert_problem(response, 422)


# --- headers on every response --------------------------------------------------------------


async def test_every_response_carries_the_security_headers(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    responses = [
        await client.get("/health"),
        await client.get("/pets/0"),
        await client.get("/nowhere"),
        await client.post("/pets", json={}, headers=auth_headers),
        await client.get("/openapi.json"),
    ]
    for response in responses:
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
        assert response.headers["cache-control"] == "no-store"


async def test_the_docs_csp_allows_exactly_what_the_docs_pages_load(
    client: httpx.AsyncClient,
) -> None:
    for path in ("/docs", "/docs/oauth2-redirect", "/redoc"):
        response = await client.get(path)
        policy = response.headers["content-security-policy"]
        csp = dict(part.strip().split(" ", 1) for part in policy.split(";"))
        scripts = re.findall(r'<script[^>]+src="([^"]+)"', response.text)
        inline = re.findall(r"<script>(.*?)</script>", response.text, re.S)
        links = [
            (re.search(r'rel="([^"]+)"', tag), re.search(r'href="([^"]+)"', tag))
            for tag in re.findall(r"<link[^>]+>", response.text)
        ]
        loads = [(url, "script-src") for url in scripts] + [
            (href[1], "style-src" if rel and rel[1] == "stylesheet" else "img-src")
            for rel, href in links
            if href
        ]
        for url, directive in loads:
            # Everything from this origin: a relative URL, nothing from a CDN.
            assert url.startswith("/"), url
            assert not url.startswith("//"), url
            assert "'self'" in csp[directive].split(), (path, url)
            assert (await client.get(url)).status_code == 200, url
        # Inline scripts run only by their hash: exactly the pages' own start-up scripts.
        hashes = {
            f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
            for body in inline
        }
        assert hashes <= set(csp["script-src"].split()), path
        assert "'unsafe-inline'" not in csp["script-src"]
        assert "https:" not in policy
        assert "http:" not in policy
        assert "frame-ancestors" in csp
    assert "'sha256-" in policy


async def test_the_docs_assets_are_revalidated_not_stored(client: httpx.AsyncClient) -> None:
    first = await client.get("/docs/assets/swagger-ui-bundle.js")
    assert first.status_code == 200
    assert first.headers["cache-control"] == "no-cache"
    again = await client.get(
        "/docs/assets/swagger-ui-bundle.js", headers={"If-None-Match": first.headers["etag"]}
    )
    assert again.status_code == 304
    assert (await client.get("/docs/assets/nothing.js")).status_code == 404


async def test_the_token_is_never_stored_by_a_cache(client: httpx.AsyncClient) -> None:
    from tests.helpers import ADMIN_PASSWORD, ADMIN_USERNAME

    response = await client.post(
        "/auth/token", data={"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD}
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"


# --- Host never reaches a Location ------------------------------------------------------------


async def test_a_forged_host_never_reaches_a_location(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    evil = {**auth_headers, "Host": "evil.example"}
    created = await client.post("/pets", json={"name": "Rex", "pet_type": "dog"}, headers=evil)
    assert created.headers["location"] == f"/pets/{created.json()['id']}"
    redirect = await client.get("/pets/?limit=5", headers={"Host": "evil.example"})
    assert redirect.status_code == 307
    assert redirect.headers["location"] == "/pets?limit=5"
    assert "evil" not in str(redirect.headers)
    followed = await client.get(redirect.headers["location"])
    assert followed.status_code == 200
    assert (await client.get("//evil.example/")).status_code == 404


# --- content negotiation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        (None, 200),
        ("*/*", 200),
        ("application/*", 200),
        ("text/csv;q=0, application/json", 200),
        ("text/csv;q=0, */*", 200),
        ("text/csv;q=0.5, application/json", 200),
        ("application/json;q=0.5, text/csv", 200),
        ("not a media type;;", 200),
        ("text/csv", 406),
        ("text/*", 406),
        ("text/csvx", 406),
        ("text/html", 406),
        ("application/json;q=0, text/csv;q=0", 406),
    ],
)
async def test_metrics_negotiates_json_only_by_q_values(
    client: httpx.AsyncClient, accept: str | None, status: int
) -> None:
    headers = {"Accept": accept} if accept is not None else {}
    response = await client.get("/metrics", headers=headers)
    if status == 406:
        problem = assert_problem(response, status)
        assert problem["detail"].startswith("This resource can be sent as application/json only.")
    else:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"


async def test_json_only_routes_answer_406_to_an_accept_they_cannot_meet(
    client: httpx.AsyncClient,
) -> None:
    assert_problem(await client.get("/pets", headers={"Accept": "text/csv"}), 406)
    assert (await client.get("/pets", headers={"Accept": "text/html, */*;q=0.1"})).is_success
    assert (await client.get("/pets", headers={"Accept": "application/json"})).is_success


# --- input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "\u200b",  # zero-width space alone
        "\u202egnp.exe",  # right-to-left override
        "Rex\u2028Max",  # line separator
        "Rex\u2029",  # paragraph separator
        "Rex\ufeff",  # zero-width no-break space (a format character)
        "\ue000Rex",  # private use
        "Rex\U000e0080",  # unassigned
        "\u0301",  # a combining mark with nothing visible to mark
        "\u2066Rex\u2069",  # bidi isolates
        "\u3164",  # a Hangul filler: a letter that renders as nothing
        "\u115f\u1160",
        "\u2800",  # the blank Braille pattern
    ],
)
async def test_names_that_hide_or_disrupt_text_are_422(
    client: httpx.AsyncClient, auth_headers: dict[str, str], session: AsyncSession, name: str
) -> None:
    before = await pet_count(session)
    response = await client.post("/pets", json={"name": name, "pet_type": "dog"}, headers=auth_headers)  # fmt: skip  # noqa: E501
    problem = assert_problem(response, 422)
    assert problem["errors"][0]["loc"] == ["body", "name"]
    assert await pet_count(session) == before


async def test_names_in_any_script_with_emoji_and_marks_are_accepted(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    for name in ("Zoë 🐶", "Müller-Lüdenscheidt", "小白", "Ранд", "e\u0301"):
        pet = await create(client, auth_headers, name=name, pet_type="dog")
        assert pet["name"] == name


async def test_the_name_rule_is_stated_in_the_openapi_document(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["PetCreate"]
    assert "format" in schema["properties"]["name"]["description"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "latin-1"])
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_a_body_that_is_not_utf8_is_400_saying_so(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    session: AsyncSession,
    encoding: str,
    method: str,
) -> None:
    pet = await create(client, auth_headers, name="Zoe", pet_type="cat")
    before = await pet_count(session)
    body = '{"name": "Zoë", "pet_type": "dog"}'.encode(encoding)
    headers = {**auth_headers, "Content-Type": "application/json"}
    url = "/pets" if method == "POST" else f"/pets/{pet['id']}"
    response = await client.request(method, url, content=body, headers=headers)
    problem = assert_problem(response, 400)
    assert problem["detail"] == "The body is not UTF-8: JSON must be sent as UTF-8."
    assert await pet_count(session) == before
    assert (await client.get(url if method != "POST" else f"/pets/{pet['id']}")).json() == pet


@pytest.mark.parametrize("recorded", [b"not a time", b"\xff\xfe", b"2026-13-45T00:00:00"])
async def test_ready_reports_an_unreadable_heartbeat_instead_of_failing(
    app: FastAPI, client: httpx.AsyncClient, recorded: bytes
) -> None:
    redis = state_of(app).redis
    saved = await redis.get(HEARTBEAT_KEY)
    await redis.set(HEARTBEAT_KEY, recorded)
    try:
        response = await client.get("/ready")
    finally:
        if saved is None:
            await redis.delete(HEARTBEAT_KEY)
        else:
            await redis.set(HEARTBEAT_KEY, saved)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["worker_heartbeat"] == "unreadable"
    assert body["worker_heartbeat_at"] is None


# --- analytics on their own pool, a few at a time -------------------------------------------


@pytest.fixture
async def governed_app(database_url: str) -> Any:
    from asgi_lifespan import LifespanManager

    from main import create_app

    settings = make_settings(
        database_url,
        METRICS_MAX_CONCURRENT=2,
        METRICS_QUEUE_SECONDS=0.2,
        METRICS_STATEMENT_TIMEOUT_MS=4321,
        PETS_LIST_MAX_CONCURRENT=2,
        PETS_LIST_QUEUE_SECONDS=0.2,
    )
    application = create_app(settings)
    async with LifespanManager(application):
        yield application


async def test_analytics_beyond_the_limit_wait_briefly_then_get_503_with_retry_after(
    governed_app: FastAPI,
) -> None:
    turns: Turns = state_of(governed_app).metrics_turns
    async with client_for(governed_app) as client:
        assert (await client.get("/metrics")).status_code == 200
        async with AsyncExitStack() as taken:
            for _ in range(turns.size):  # every turn busy
                await taken.enter_async_context(turns.take())
            started = asyncio.get_running_loop().time()
            busy = await client.get("/metrics")
            waited = asyncio.get_running_loop().time() - started
            problem = assert_problem(busy, 503)
            assert "analytics" in problem["detail"]
            assert int(busy.headers["retry-after"]) >= 1
            assert 0.2 <= waited < 2
            assert (await client.get("/pets")).status_code == 200  # other routes unaffected
        assert (await client.get("/metrics")).status_code == 200


async def test_pet_listings_beyond_the_limit_get_503_while_reads_by_id_go_on(
    governed_app: FastAPI,
) -> None:
    turns: Turns = state_of(governed_app).listing_turns
    async with client_for(governed_app) as client:
        async with AsyncExitStack() as taken:
            for _ in range(turns.size):
                await taken.enter_async_context(turns.take())
            problem = assert_problem(await client.get("/pets", params={"name": "x"}), 503)
            assert "listings" in problem["detail"]
            assert (await client.get("/pets/1")).status_code in (200, 404)
            assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/pets")).status_code == 200


async def test_analytics_run_on_a_pool_of_their_own_with_their_own_statement_timeout(
    governed_app: FastAPI,
) -> None:
    engine = state_of(governed_app).analytics_engine
    assert isinstance(engine.pool, QueuePool)
    assert engine.pool.size() == 2
    assert engine.pool is not state_of(governed_app).read_engine.pool
    async with engine.connect() as connection:
        timeout = (await connection.exec_driver_sql("SHOW statement_timeout")).scalar_one()
    assert timeout == "4321ms"


# --- details an outside review found ---------------------------------------------------------


async def test_media_types_in_accept_are_case_insensitive(client: httpx.AsyncClient) -> None:
    assert (await client.get("/pets", headers={"Accept": "Application/JSON"})).is_success
    csv = await client.get("/metrics/export", headers={"Accept": "TEXT/CSV"})
    assert csv.headers["content-type"].startswith("text/csv")
    assert csv.headers["vary"] == "Accept"
    ndjson = await client.get("/metrics/export", headers={"Accept": "Application/X-NDJSON"})
    assert ndjson.headers["content-type"] == "application/x-ndjson"


async def test_if_match_on_several_lines_is_one_list_and_compared_exactly(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    pet = await create(client, auth_headers, name="Rex", pet_type="dog")
    url = f"/pets/{pet['id']}"
    etag = (await client.get(url)).headers["etag"]
    padded = etag.replace("-", "-0")
    assert_problem(
        await client.patch(url, json={"name": "A"}, headers={**auth_headers, "If-Match": padded}),
        412,
    )
    lines = [*auth_headers.items(), ("If-Match", '"0-0"'), ("If-Match", etag)]
    assert (await client.patch(url, json={"name": "B"}, headers=lines)).status_code == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
@pytest.mark.parametrize("compress", [gzip.compress, zlib.compress, lambda body: body])
async def test_a_compressed_body_is_415_before_it_is_parsed(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    session: AsyncSession,
    method: str,
    compress: Callable[[bytes], bytes],
) -> None:
    pet = await create(client, auth_headers, name="Zoe", pet_type="cat")
    before = await pet_count(session)
    encoding = "gzip" if compress is gzip.compress else "deflate"
    headers = {**auth_headers, "Content-Type": "application/json", "Content-Encoding": encoding}
    body = compress(b'{"name": "Rex", "pet_type": "dog"}')  # truly compressed, or only labelled
    url = "/pets" if method == "POST" else f"/pets/{pet['id']}"
    response = await client.request(method, url, content=body, headers=headers)
    problem = assert_problem(response, 415)
    assert problem["detail"] == f"Content-Encoding {encoding!r} is not accepted; send plain JSON."
    assert await pet_count(session) == before
    assert (await client.get(f"/pets/{pet['id']}")).json() == pet


async def test_a_crash_is_a_bare_500_with_the_security_headers(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    import crud

    async def broken(*_args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(crud, "get_pet", broken)
    async with client_for(app, raise_app_exceptions=False) as client:
        response = await client.get("/pets/1")
    problem = assert_problem(response, 500)
    assert "bug" not in str(problem)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert response.headers["cache-control"] == "no-store"


async def test_the_openapi_document_declares_the_servers_own_answers(
    client: httpx.AsyncClient,
) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for operations in paths.values():
        for operation in operations.values():
            assert {"408", "413", "431"} <= set(operation["responses"])
    assert "ETag" in paths["/pets/{pet_id}"]["get"]["responses"]["304"]["headers"]
