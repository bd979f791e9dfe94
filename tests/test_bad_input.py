"""A catalogue of bad input, in families over every route each applies to, as one parametrized
test: each is a 4xx problem response, and the database is unchanged afterwards."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlmodel.ext.asyncio.session import AsyncSession

from tests.helpers import sql

PET = 1  # the pet each test starts with (see `one_pet`)
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON = {"Content-Type": "application/json"}


@dataclass
class Bad:
    method: str
    url: str
    params: Any = None
    json: Any = None
    data: dict[str, str] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


# A valid request per route: the families below spoil one part of it.
VALID = {
    "token": Bad("POST", "/auth/token", data={"username": "admin", "password": "not-it"}),
    "list pets": Bad("GET", "/pets"),
    "get pet": Bad("GET", f"/pets/{PET}"),
    "create pet": Bad("POST", "/pets", json={"name": "Tom", "pet_type": "cat"}),
    "replace pet": Bad("PUT", f"/pets/{PET}", json={"name": "Tom", "pet_type": "cat"}),
    "patch pet": Bad("PATCH", f"/pets/{PET}", json={"name": "Tom"}),
    "delete pet": Bad("DELETE", f"/pets/{PET}"),
    "metrics": Bad("GET", "/metrics"),
    "dimensions": Bad("GET", "/dimensions"),
    "dimension values": Bad("GET", "/dimensions/region"),
    "health": Bad("GET", "/health"),
    "ready": Bad("GET", "/ready"),
}
BODY_ROUTES = ("token", "create pet", "replace pet", "patch pet")


def with_text(route: str, value: str) -> Bad:
    """The route's request with `value` where it takes text; routes that take none get it as a
    query parameter, which they reject as unknown."""
    path = quote(value, safe="")
    spoiled = {
        "token": {"data": {"username": value, "password": "x"}},
        "list pets": {"params": {"name": value}},
        "get pet": {"url": f"/pets/{path}"},
        "create pet": {"json": {"name": value, "pet_type": "cat"}},
        "replace pet": {"json": {"name": value, "pet_type": "cat"}},
        "patch pet": {"json": {"pet_type": value}},
        "delete pet": {"url": f"/pets/{path}"},
        "metrics": {"params": {"region": value}},
        "dimension values": {"url": f"/dimensions/{path}"},
    }.get(route, {"params": {"q": value}})
    return dataclasses.replace(VALID[route], **spoiled)  # type: ignore[arg-type]


def with_params(route: str, params: Any) -> Bad:
    return dataclasses.replace(VALID[route], params=params)


def cases(families: dict[str, dict[str, list[Bad]]]) -> list[Any]:
    return [
        pytest.param(bad, id=f"{family}-{route}-{number}")
        for family, routes in families.items()
        for route, bads in routes.items()
        for number, bad in enumerate(bads)
    ]


CONTROL = ["\x00", "Rex\x00", "\x1b[31mRex", "Re\x7fx", "Re\u0085x", "\t"]
CONTROL_CHARACTERS = {route: [with_text(route, value) for value in CONTROL] for route in VALID}

# A lone surrogate: a JSON escape in bodies; in URLs and forms its bytes, invalid UTF-8.
SURROGATE = "%ED%A0%80"
LONE_SURROGATES = {
    route: [
        dataclasses.replace(
            with_text(route, "x"), params=None, url=f"{VALID[route].url}?q={SURROGATE}"
        )
    ]
    for route in VALID
}
LONE_SURROGATES["token"].append(
    Bad("POST", "/auth/token", content=f"username={SURROGATE}&password=x".encode(), headers=FORM)
)
LONE_SURROGATES["get pet"].append(Bad("GET", f"/pets/{SURROGATE}"))
LONE_SURROGATES["dimension values"].append(Bad("GET", f"/dimensions/{SURROGATE}"))
for route, body in (
    ("create pet", b'{"name": "\\ud800", "pet_type": "cat"}'),
    ("replace pet", b'{"name": "a\\udfff", "pet_type": "cat"}'),
    ("patch pet", b'{"name": "\\ud800\\ud800"}'),
):
    LONE_SURROGATES[route].append(
        dataclasses.replace(VALID[route], json=None, content=body, headers=JSON)
    )

# 100 times the longest name in bodies; 10,000 characters in URLs (clients cap a URL at 64 kB).
FAR_OVER_THE_LIMIT = {
    route: [
        with_text(
            route,
            "x"
            * (
                10_000
                if VALID[route].method == "GET" or route in ("get pet", "delete pet")
                else 100_000
            ),
        )
    ]
    for route in VALID
}

BIG = ["2147483648", "9223372036854775808", "-9223372036854775809", "1e400"]
BIG_INTEGERS = {route: [with_text(route, value) for value in BIG] for route in VALID}
for route in ("list pets", "metrics"):
    BIG_INTEGERS[route] = [with_params(route, {k: v}) for k in ("limit", "offset") for v in BIG]
# In bodies, as JSON numbers where text belongs (a string of digits is a fine name).
for route in ("create pet", "replace pet"):
    BIG_INTEGERS[route] = [
        dataclasses.replace(
            VALID[route],
            json=None,
            headers=JSON,
            content=f'{{"name": {v}, "pet_type": "cat"}}'.encode(),
        )
        for v in BIG
    ]
BIG_INTEGERS["replace pet"].append(
    Bad("PUT", f"/pets/{2**31}", json={"name": "Tom", "pet_type": "cat"})
)
BIG_INTEGERS["patch pet"].append(Bad("PATCH", f"/pets/{2**63}", json={"name": "Tom"}))
BIG_INTEGERS["delete pet"].append(Bad("DELETE", f"/pets/{2**31}"))

PAGING = [{"limit": "0"}, {"limit": "-1"}, {"offset": "-1"}, {"limit": "0", "offset": "-5"}]
NEGATIVE_AND_ZERO_PAGING = {route: [with_params(route, p) for p in PAGING] for route in VALID}

MALFORMED = [b'{"name": "Tom"', b"{name: Tom}", b"[]", b'"Tom"', b"\xff\xfe", b""]
MALFORMED_JSON = {
    route: [
        dataclasses.replace(VALID[route], json=None, data=None, content=c, headers=JSON)
        for c in MALFORMED
    ]
    for route in BODY_ROUTES
}

WRONG_TYPES = [
    ("text/plain", b'{"name": "Tom", "pet_type": "cat"}'),
    ("application/x-www-form-urlencoded", b"name=Tom&pet_type=cat"),
    ("application/xml", b"<pet><name>Tom</name></pet>"),
    ("multipart/form-data; boundary=x", b"--x--"),
]
WRONG_CONTENT_TYPES = {
    route: [
        dataclasses.replace(
            VALID[route], json=None, data=None, content=body, headers={"Content-Type": kind}
        )
        for kind, body in WRONG_TYPES
        if not (route == "token" and kind.startswith(("application/x-www", "multipart")))
    ]
    for route in BODY_ROUTES
}
WRONG_CONTENT_TYPES["token"].append(
    Bad("POST", "/auth/token", json={"username": "admin", "password": "x"})
)

HUGE_LISTS = {route: [with_params(route, [("q", "1")] * 2000)] for route in VALID}
HUGE_LISTS["list pets"].append(with_params("list pets", [("name", "a")] * 2000))
HUGE_LISTS["metrics"] += [
    with_params("metrics", [("region", "North")] * 2000),
    with_params("metrics", [("group_by", "date")] * 2000),
]

DATES = ["0000-01-01", "10000-01-01", "2026-02-30", "2026-13-01", "-2026-01-01", "20261124"]
DATES_OUT_OF_RANGE = {
    "metrics": [with_params("metrics", {"start_date": d, "end_date": "2026-11-24"}) for d in DATES]
    + [with_params("metrics", {"start_date": "1900-01-01", "end_date": "9999-12-31"})]
}


@pytest.fixture
async def one_pet(
    empty_pet_table: None,  # noqa: ARG001 - requested for its effect
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
) -> None:
    response = await client.post(
        "/pets", json={"name": "Rex", "pet_type": "dog"}, headers=auth_headers
    )
    assert response.json()["id"] == PET


FINGERPRINT = """
SELECT (SELECT md5(coalesce(string_agg(p::text, ';' ORDER BY id), '')) FROM pet p),
       (SELECT md5(coalesce(string_agg(u::text, ';' ORDER BY id), '')) FROM "user" u),
       (SELECT count(*) FROM fact_ad_metrics_daily), (SELECT count(*) FROM dim_region)
"""


async def fingerprint(session: AsyncSession) -> tuple[Any, ...]:
    result = await sql(session, FINGERPRINT)
    await session.commit()
    return tuple(result.one())


pytestmark = pytest.mark.usefixtures("one_pet")


# Each family of bad input, over every route it applies to.
FAMILIES = {
    "control characters": CONTROL_CHARACTERS,
    "lone surrogates": LONE_SURROGATES,
    "strings far over the limit": FAR_OVER_THE_LIMIT,
    "integers at and past 2^31 and 2^63": BIG_INTEGERS,
    "negative and zero paging": NEGATIVE_AND_ZERO_PAGING,
    "malformed JSON": MALFORMED_JSON,
    "wrong content types": WRONG_CONTENT_TYPES,
    "huge query lists": HUGE_LISTS,
    "dates out of range": DATES_OUT_OF_RANGE,
}


@pytest.mark.parametrize("bad", cases(FAMILIES))
async def test_bad_input_is_a_4xx_problem_and_changes_nothing(
    bad: Bad, client: httpx.AsyncClient, auth_headers: dict[str, str], session: AsyncSession
) -> None:
    before = await fingerprint(session)
    response = await client.request(
        bad.method,
        bad.url,
        params=bad.params,
        json=bad.json,
        data=bad.data,
        content=bad.content,
        headers={**auth_headers, **bad.headers},
    )
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == response.status_code
    assert problem["title"]
    assert problem["detail"]
    assert await fingerprint(session) == before


async def test_the_valid_requests_are_accepted(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    """The counterpart: only what each family spoils makes its request fail."""
    for route, good in VALID.items():
        response = await client.request(
            good.method, good.url, json=good.json, data=good.data, headers=auth_headers
        )
        expected = (
            401
            if route == "token"
            else 204
            if route == "delete pet"
            else 201
            if route == "create pet"
            else 200
        )
        assert response.status_code == expected, (route, response.text)
