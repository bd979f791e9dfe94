"""Domain errors, and the one place that decides what a database fault means to a client."""

from collections.abc import Mapping, Sequence
from typing import ClassVar

from redis.exceptions import RedisError
from sqlalchemy import exc as sa_exc

# Where a problem is (as in a validation error's `loc`) and what it is.
ErrorItem = tuple[list[str | int], str]

# A 422's `detail` names this many problems; its `errors` list holds every one.
SUMMARISED_PROBLEMS = 3

# Seconds a client is told to wait after a 503.
RETRY_AFTER_SECONDS = 5


def summarise(items: Sequence[ErrorItem]) -> str:
    """The `detail` of a 422: the first few problems, and how many more `errors` lists."""
    named = "; ".join(
        f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in items[:SUMMARISED_PROBLEMS]
    )
    more = len(items) - SUMMARISED_PROBLEMS
    return f"Invalid request: {named}" + (f" (and {more} more)" if more > 0 else "")


class ServiceError(Exception):
    """An error with a meaning for the client; problems.py renders it as a problem response. A
    refusal made on purpose (a limit reached) names its `reason`, which operators count."""

    status: ClassVar[int] = 500

    def __init__(
        self, detail: str, headers: Mapping[str, str] | None = None, reason: str | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.items: list[ErrorItem] = []
        self.reason = reason


class BadRequest(ServiceError):
    status = 400


class NotFound(ServiceError):
    status = 404


class NotAcceptable(ServiceError):
    status = 406


class PreconditionFailed(ServiceError):
    status = 412


class Conflict(ServiceError):
    status = 409


class InvalidData(ServiceError):
    status = 422


class InvalidParameters(InvalidData):
    """Input that passed the schema but not a rule between parameters or one that needs the
    database, clock or settings; `items` lists every problem found."""

    def __init__(self, items: list[ErrorItem]) -> None:
        super().__init__(summarise(items))
        self.items = items


class Unauthorized(ServiceError):
    status = 401

    def __init__(self, detail: str, *, invalid_token: bool = False) -> None:
        # RFC 6750: a bad token names the error; a missing one just asks for a bearer token.
        challenge = 'Bearer error="invalid_token"' if invalid_token else "Bearer"
        super().__init__(detail, {"WWW-Authenticate": challenge})


class UnsupportedMediaType(ServiceError):
    status = 415


class TooManyRequests(ServiceError):
    status = 429

    def __init__(self, detail: str, retry_after: int, reason: str) -> None:
        super().__init__(detail, {"Retry-After": str(max(retry_after, 1))}, reason)


class Unavailable(ServiceError):
    status = 503

    def __init__(self, detail: str, reason: str | None = None) -> None:
        super().__init__(detail, {"Retry-After": str(RETRY_AFTER_SECONDS)}, reason)


# SQLSTATE classes (first two characters) whose faults are the server's, not the request's.
_UNAVAILABLE_CLASSES = {"08", "53", "57", "58"}
_CONFLICT_STATES = {"23505", "23503", "23P01", "40001", "40P01"}


def _sqlstate(error: sa_exc.DBAPIError) -> str:
    return str(getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None) or "")


def classify_db_error(error: BaseException) -> ServiceError | None:
    """Map a database, Redis or connection fault to a domain error; None means a bug (500)."""
    if isinstance(error, RedisError):
        return Unavailable("Redis is unavailable.")
    if isinstance(error, sa_exc.TimeoutError):
        return Unavailable("The database is busy: no connection became free in time.")
    if isinstance(error, sa_exc.DBAPIError):
        state = _sqlstate(error)
        if state == "57014":
            return Unavailable("The database did not answer in time.")
        if error.connection_invalidated or state[:2] in _UNAVAILABLE_CLASSES or state == "25006":
            return Unavailable("The database is unavailable.")
        if isinstance(error, sa_exc.InterfaceError) and not state:
            return Unavailable("The connection to the database was lost.")
        if state in _CONFLICT_STATES:
            return Conflict("The request conflicts with the current state of the data.")
        if state.startswith(("22", "23")):
            return InvalidData("The database rejected a value in the request.")
        return None
    if isinstance(error, OSError):  # refused connection, DNS failure, socket timeout
        return Unavailable("The database is unreachable.")
    return None
