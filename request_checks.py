"""HTTP preconditions the routes share: unknown query parameters, JSON bodies (checked before
FastAPI parses them), content negotiation by Accept, and ETags with If-Match."""

import hmac
import re
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import urlencode
from weakref import WeakKeyDictionary

import mimeparse
from fastapi import Depends, FastAPI, Header, Path, Request, Response, params
from fastapi.routing import APIRoute
from pydantic import StringConstraints, WithJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from errors import (
    BadRequest,
    ErrorItem,
    InvalidParameters,
    NotAcceptable,
    Unauthorized,
    UnsupportedMediaType,
)
from models import INT32_MAX, PetRecord
from settings import Settings

PetId = Annotated[int, Path(ge=1, le=INT32_MAX, description="The pet's id.")]

# Per app: (path, method) to the query parameters its OpenAPI document gives the operation, and
# those that may repeat. Read from the document once.
QueryParameters = dict[tuple[str, str], tuple[frozenset[str], frozenset[str]]]
_QUERY_PARAMETERS: "WeakKeyDictionary[FastAPI, QueryParameters]" = WeakKeyDictionary()


def documented_query_parameters(
    app: FastAPI, path: str, method: str
) -> tuple[frozenset[str], frozenset[str]]:
    """The query parameters the OpenAPI document gives an operation, and those of them that may
    be given more than once (its arrays)."""
    if app not in _QUERY_PARAMETERS:
        _QUERY_PARAMETERS[app] = {
            (route_path, verb.upper()): (
                frozenset(p["name"] for p in operation.get("parameters", []) if p["in"] == "query"),
                frozenset(
                    p["name"]
                    for p in operation.get("parameters", [])
                    if p["in"] == "query" and p.get("schema", {}).get("type") == "array"
                ),
            )
            for route_path, operations in app.openapi()["paths"].items()
            for verb, operation in operations.items()
        }
    return _QUERY_PARAMETERS[app].get((path, method), (frozenset(), frozenset()))


def _unknown(request: Request, name: str) -> str:
    """What to say of an unknown parameter; a format= on /metrics points to the export."""
    if name == "format" and request.scope["route"].path_format in ELSEWHERE:
        kind = "ndjson" if request.query_params["format"] == "ndjson" else "csv"
        return (
            "unknown parameter: GET /metrics answers JSON only; the same question as"
            f" {kind.upper()}: {export_url(request, kind)}"
        )
    return "unknown parameter"


async def check_query_parameters(request: Request) -> None:
    """Unknown query parameters, and repeats of ones that take a single value (any but an
    array's: not silently "the last one wins"), are 422."""
    route = request.scope["route"]
    known, repeatable = documented_query_parameters(request.app, route.path_format, request.method)
    counts = Counter(name for name, _ in request.query_params.multi_items())
    problems_found: list[ErrorItem] = [
        (["query", name], _unknown(request, name) if name not in known else "given more than once")
        for name, count in sorted(counts.items())
        if name not in known or (count > 1 and name not in repeatable)
    ]
    if problems_found:
        raise InvalidParameters(problems_found)


async def require_json_body(request: Request) -> None:
    """415 for a body that says it is something other than JSON (curl -d sends a form); 400 for
    one that is not UTF-8 (RFC 8259), which the JSON parser would otherwise guess (UTF-16)."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise UnsupportedMediaType(
                f"The body must be JSON (Content-Type: application/json), not {media_type!r}."
            )
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not accepted; send plain JSON."
        )
    try:
        (await request.body()).decode("utf-8")
    except ClientDisconnect:
        return  # gone (or refused as too large): FastAPI meets the same, and answers nobody
    except UnicodeDecodeError:
        raise BadRequest("The body is not UTF-8: JSON must be sent as UTF-8.") from None


class CheckedRoute(APIRoute):
    """A route whose JSON body (if it takes one) passes require_json_body before FastAPI parses
    it: a gzip or Latin-1 body would otherwise be FastAPI's generic 400 "error parsing the
    body", not the 415 or 400 that says what is wrong."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        if self.body_field is None or isinstance(self.body_field.field_info, params.Form):
            return handle

        async def checked(request: Request) -> Response:
            await require_json_body(request)  # reads the body, which FastAPI then reuses
            return await handle(request)

        return checked


JSON = "application/json"
CSV = "text/csv"
NDJSON = "application/x-ndjson"
# What each route can send, the preferred one last (it wins ties); the rest send JSON.
OFFERED_MEDIA_TYPES = {"/metrics/export": (NDJSON, CSV)}
# Where a route's question can be had in other media types: /metrics is JSON only.
ELSEWHERE = {"/metrics": "/metrics/export"}


# A /metrics request's parameters that are not part of its question.
PAGE_PARAMETERS = frozenset({"limit", "offset", "format"})


def export_url(request: Request, kind: str) -> str:
    """The export, as `kind` (csv or ndjson), of the question a /metrics request asks: its
    parameters but the page's, as a relative URL (a forged Host never reaches it)."""
    kept = [(k, v) for k, v in request.query_params.multi_items() if k not in PAGE_PARAMETERS]
    return f"/metrics/export?{urlencode([*kept, ('format', kind)])}"


def _best_match(offered: tuple[str, ...], accept: str) -> str | None:
    try:
        return str(mimeparse.best_match(offered, accept)) or None
    except ValueError:  # an unparseable Accept is ignored, as if absent
        return offered[-1]


async def negotiate(request: Request) -> str:
    """The media type to answer with, by the Accept header's q values: 406 when the client
    accepts none of the route's (naming the export for a /metrics question asked as CSV or
    NDJSON). Errors are always sent as problem+json (RFC 9110 allows it)."""
    route = request.scope["route"]
    offered = OFFERED_MEDIA_TYPES.get(route.path_format, (JSON,))
    # Several Accept lines are one list (RFC 9110 5.3); media types are case-insensitive.
    accept = ", ".join(request.headers.getlist("accept")).lower()
    if not accept or route.status_code == 204:
        return offered[-1]
    if route.path_format in OFFERED_MEDIA_TYPES and "format" in request.query_params:
        return offered[-1]  # format= chooses the type instead (the route reads it)
    chosen = _best_match(offered, accept)
    if chosen is not None:
        return chosen
    detail = f"This resource can be sent as {' or '.join(reversed(offered))} only."
    elsewhere = ELSEWHERE.get(route.path_format)
    wanted = elsewhere and _best_match(OFFERED_MEDIA_TYPES[elsewhere], accept)
    if wanted:
        kind = "ndjson" if wanted == NDJSON else "csv"
        detail += f" The same question as {wanted}: {export_url(request, kind)}"
    raise NotAcceptable(detail)


MediaType = Annotated[str, Depends(negotiate)]

ETAG_LIST_PATTERN = r'^\s*(\*|(W/)?"[^"]*"(\s*,\s*(W/)?"[^"]*")*)\s*$'


def etag_of(pet: PetRecord) -> str:
    """A strong ETag: the pet's id and version, which goes up with every change."""
    return f'"{pet.id}-{pet.version}"'


def versions_named(if_match: str | None, pet_id: int) -> list[int] | None:
    """The versions of this pet an If-Match names; None when there is no condition (absent or
    `*`). Weak or foreign tags never match (strong comparison, RFC 9110 13.1.1)."""
    if if_match is None or if_match.strip() == "*":
        return None
    ours = re.compile(rf'"{pet_id}-(0|[1-9][0-9]{{0,9}})"')  # exactly as etag_of writes it
    tags = (ours.fullmatch(tag.strip()) for tag in if_match.split(","))
    return [version for tag in tags if tag and (version := int(tag[1])) <= INT32_MAX]


def etag_matches(if_none_match: str, etag: str) -> bool:
    # Weak comparison for If-None-Match (RFC 9110 13.1.2).
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags


# A list of entity tags, or `*`. Stated as a plain string in OpenAPI: "absent" is not a value a
# client can send, so the schema does not offer null.
ETAG_LIST_SCHEMA = {"type": "string", "maxLength": 1000, "pattern": ETAG_LIST_PATTERN}
EtagList = Annotated[
    Annotated[str, StringConstraints(max_length=1000, pattern=ETAG_LIST_PATTERN)] | None,
    WithJsonSchema(ETAG_LIST_SCHEMA),
]
IfMatch = Annotated[
    EtagList,
    Header(description="Only change the pet if its ETag is one of these (else 412); `*`: any."),
]
ETAG_HEADER = {"ETag": {"description": "The pet's version", "schema": {"type": "string"}}}


async def if_match_versions(
    request: Request, pet_id: PetId, if_match: IfMatch = None
) -> list[int] | None:
    # The parameter validates and documents the header; several If-Match lines are one list.
    lines = request.headers.getlist("if-match")
    return versions_named(", ".join(lines) if if_match is not None else None, pet_id)


# The pet versions a write is conditional on (If-Match); None: unconditional.
IfMatchVersions = Annotated[list[int] | None, Depends(if_match_versions)]


# --- the operators' routes ---------------------------------------------------------------------

AuthorizationHeader = Annotated[str | None, Header(alias="Authorization")]


def require_prometheus_token(settings: Settings, authorization: str | None) -> None:
    """404 when no PROMETHEUS_TOKEN is set (as if the path were not there); 401 unless the
    request carries it as a bearer token, compared in constant time."""
    if settings.PROMETHEUS_TOKEN is None:
        raise StarletteHTTPException(404)
    scheme, _, credentials = (authorization or "").partition(" ")
    expected = settings.PROMETHEUS_TOKEN.get_secret_value().encode()
    # The scheme is case-insensitive (RFC 9110 11.1); the token is compared in constant time.
    if not (scheme.lower() == "bearer" and hmac.compare_digest(credentials.encode(), expected)):
        raise Unauthorized("The metrics need the bearer token PROMETHEUS_TOKEN.")
