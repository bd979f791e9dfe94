"""What the OpenAPI document says beyond FastAPI's defaults (problem responses, the headers
each response carries, the name rule), and the docs pages served from the image."""

import importlib.resources
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Response
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

import name_rule
from middleware import DOCS_OAUTH2_REDIRECT_PATH, DOCS_PATH, REDOC_PATH, security_headers
from models import Problem
from problems import PROBLEM_MEDIA_TYPE


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem responses an operation can give."""
    return {
        status: {"model": Problem, "description": HTTPStatus(status).phrase} for status in statuses
    }


def _header(description: str, schema_type: str = "string") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": schema_type}
    if schema_type == "integer":
        schema["minimum"] = 0
    return {"description": description, "schema": schema}


# What the security headers' values mean where they vary (middleware.security_headers is
# their one source; the document lists them from it).
SECURITY_HEADER_NOTES = {
    "Cache-Control": "unless the route chooses otherwise (no-cache on a pet, with its ETag)",
    "Content-Security-Policy": "for the API (the docs pages: 'self' only)",
}
# On every response (middleware.SecurityHeaders and middleware.ObserveRequests).
EVERY_RESPONSE_HEADERS = (*security_headers(""), "X-Request-ID")
# Every response header a client can get, declared once under components/headers.
RESPONSE_HEADERS = {
    **{
        name: _header(
            f"{value}, {SECURITY_HEADER_NOTES[name]}" if name in SECURITY_HEADER_NOTES else value
        )
        for name, value in security_headers("").items()
    },
    "X-Request-ID": _header(
        "This request's id: the client's X-Request-ID when it is 1 to 64 of [A-Za-z0-9._-], "
        "else a new one; also `request_id` in a problem body, and on every log line"
    ),
    "WWW-Authenticate": _header('Bearer, or Bearer error="invalid_token" for a bad token'),
    "Retry-After": _header("Seconds to wait before retrying", "integer"),
    "Allow": _header("The methods this path answers, HEAD included wherever GET is"),
    "Vary": _header("Accept: the export is CSV or NDJSON by the Accept header"),
    "Content-Disposition": _header('attachment; filename="metrics.csv" (or metrics.ndjson)'),
}
STATUS_HEADERS = {"401": ("WWW-Authenticate",), "429": ("Retry-After",), "503": ("Retry-After",)}
OPERATION_HEADERS = {("/metrics/export", "get", "200"): ("Vary", "Content-Disposition")}


def _header_refs(names: Iterable[str]) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def openapi_with_problems(app: FastAPI) -> dict[str, Any]:
    """The generated document, with every error response declared as application/problem+json
    and every response header a client can get declared on the responses that carry it."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        problem_ref = {"schema": {"$ref": "#/components/schemas/Problem"}}
        for path, item in schema["paths"].items():
            for method, operation in item.items():
                responses = operation["responses"]
                # Any request can be malformed below the schema: a URL that is not UTF-8, a
                # body that cannot be decoded.
                responses.setdefault("400", {"description": "Bad Request"})
                if "204" not in responses:  # Accept names no type the route sends
                    responses.setdefault("406", {"description": "Not Acceptable"})
                # What server.py answers for any request: too slow, too large, headers too
                # large, past the connection limit.
                for status in (408, 413, 431, 503):
                    responses.setdefault(str(status), {"description": HTTPStatus(status).phrase})
                for status, response in responses.items():
                    if int(status) >= 400:
                        response["content"] = {PROBLEM_MEDIA_TYPE: problem_ref}
                    names = (
                        *STATUS_HEADERS.get(status, ()),
                        *OPERATION_HEADERS.get((path, method, status), ()),
                        *EVERY_RESPONSE_HEADERS,
                    )
                    response["headers"] = {**_header_refs(names), **response.get("headers", {})}
        components = schema.setdefault("components", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components["schemas"].pop(unused, None)
        # What a name may hold, stated once (models.NAME_SCHEMA refers to it).
        components["schemas"]["Name"] = {
            "type": "string",
            "description": name_rule.RULE,
            "pattern": name_rule.json_schema_pattern(),
        }
        components["headers"] = RESPONSE_HEADERS
        # A method a path does not answer: no operation of this document gives it, so it is
        # declared once here.
        components["responses"] = {
            "MethodNotAllowed": {
                "description": "Method Not Allowed: Allow lists the methods the path answers",
                "headers": _header_refs(("Allow", *EVERY_RESPONSE_HEADERS)),
                "content": {PROBLEM_MEDIA_TYPE: problem_ref},
            }
        }
        app.openapi_schema = schema
    return app.openapi_schema


# --- the docs pages ----------------------------------------------------------------------------
# nothing from outside the image, so they work offline and under a 'self'-only CSP.
DOCS_ASSETS_PATH = "/docs/assets"
DOCS_ASSETS = importlib.resources.files("fastapi_offline") / "static"


class DocsAssets(StaticFiles):
    """The docs pages' scripts and styles; a browser keeps them and revalidates (ETag)."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def docs_pages(app: FastAPI) -> dict[str, bytes]:
    """The three docs pages, built once. Their URLs are fixed (no root_path) so that the inline
    scripts never change: middleware.DOCS_CSP allows exactly those by hash."""
    openapi_url = app.openapi_url or "/openapi.json"
    favicon = f"{DOCS_ASSETS_PATH}/favicon.png"
    swagger = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=DOCS_OAUTH2_REDIRECT_PATH,
        swagger_js_url=f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=favicon,
        # No badge image fetched from the public validator (it could not see this API anyway).
        swagger_ui_parameters={"validatorUrl": None},
    )
    redoc = get_redoc_html(
        openapi_url=openapi_url,
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{DOCS_ASSETS_PATH}/redoc.standalone.js",
        redoc_favicon_url=favicon,
        with_google_fonts=False,
    )
    return {
        DOCS_PATH: bytes(swagger.body),
        DOCS_OAUTH2_REDIRECT_PATH: bytes(get_swagger_ui_oauth2_redirect_html().body),
        REDOC_PATH: bytes(redoc.body),
    }


def add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs (with its OAuth2 redirect page) and ReDoc at /redoc."""
    pages = docs_pages(app)

    def serve(path: str) -> None:
        async def page() -> HTMLResponse:
            return HTMLResponse(pages[path])

        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)

    for path in pages:
        serve(path)
    app.mount(DOCS_ASSETS_PATH, DocsAssets(directory=str(DOCS_ASSETS)), name="docs-assets")
