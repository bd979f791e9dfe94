"""Password hashing, access tokens, and the `CurrentUser` dependency for writes."""

import asyncio
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Annotated

import jwt
from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from redis.asyncio import Redis
from sqlmodel.ext.asyncio.session import AsyncSession

import crud
from db import SessionDep
from errors import TooManyRequests, Unauthorized
from models import INT32_MAX, Token, User
from settings import Settings

ALGORITHM = "HS256"

password_hasher = PasswordHash((Argon2Hasher(),))

# auto_error=False: a missing token is answered by our own 401 problem, not FastAPI's.
bearer_scheme = OAuth2PasswordBearer(tokenUrl="auth/token", auto_error=False)


async def hash_password(password: str) -> str:
    # Argon2 takes tens of milliseconds of CPU: keep it off the event loop.
    return await asyncio.to_thread(password_hasher.hash, password)


async def verify_password(password: str, password_hash: str) -> bool:
    return await asyncio.to_thread(password_hasher.verify, password, password_hash)


@lru_cache(maxsize=1)
def dummy_hash() -> str:
    """A hash to verify against when the user does not exist, so both cases cost the same."""
    return password_hasher.hash("no user has this password")


async def authenticate(session: AsyncSession, username: str, password: str) -> User | None:
    user = await crud.get_user_by_username(session, username)
    if user is None:
        await verify_password(password, dummy_hash())
        return None
    return user if await verify_password(password, user.password_hash) else None


def _login_failure_keys(username: str, client: str) -> tuple[str, str]:
    return f"pets:login-failures:user:{username}", f"pets:login-failures:client:{client}"


async def check_login_allowed(redis: Redis, settings: Settings, username: str, client: str) -> None:
    """429 while this username or this client has used up its failed logins for the window."""
    keys = _login_failure_keys(username, client)
    limits = (settings.LOGIN_MAX_FAILURES_PER_USER, settings.LOGIN_MAX_FAILURES_PER_CLIENT)
    counts = await redis.mget(keys)
    for key, count, limit in zip(keys, counts, limits, strict=True):
        if count is not None and int(count) >= limit:
            raise TooManyRequests(
                "Too many failed logins; try again later.", retry_after=await redis.ttl(key)
            )


async def record_login(
    redis: Redis, settings: Settings, username: str, client: str, succeeded: bool
) -> None:
    """Count a failure against the username and the client (the window starts at the first);
    a success clears the username's count."""
    user_key, client_key = _login_failure_keys(username, client)
    if succeeded:
        await redis.delete(user_key)
        return
    async with redis.pipeline(transaction=True) as pipe:
        for key in (user_key, client_key):
            pipe.incr(key)
            pipe.expire(key, settings.LOGIN_FAILURE_WINDOW_SECONDS, nx=True)
        await pipe.execute()


def issue_token(user: User, settings: Settings, now: datetime | None = None) -> Token:
    issued = now or datetime.now(UTC)
    lifetime = timedelta(minutes=settings.ACCESS_TOKEN_MINUTES)
    claims = {"sub": str(user.id), "iat": issued, "exp": issued + lifetime}
    token = jwt.encode(claims, settings.JWT_SECRET.get_secret_value(), algorithm=ALGORITHM)
    return Token(access_token=token, expires_in=int(lifetime.total_seconds()))


def user_id_from_token(token: str, settings: Settings) -> int:
    try:
        claims = jwt.decode(
            token,
            settings.JWT_SECRET.get_secret_value(),
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("The access token has expired.", invalid_token=True) from None
    except jwt.PyJWTError:
        raise Unauthorized("The access token is invalid.", invalid_token=True) from None
    subject = claims["sub"]
    user_id = int(subject) if subject.isascii() and subject.isdigit() and len(subject) <= 10 else 0
    if not 0 < user_id <= INT32_MAX:
        raise Unauthorized("The access token is invalid.", invalid_token=True)
    return user_id


async def current_user(
    request: Request,
    session: SessionDep,
    token: Annotated[str | None, Depends(bearer_scheme)],
) -> User:
    if token is None:
        raise Unauthorized("This operation needs a bearer token: POST /auth/token to get one.")
    settings: Settings = request.app.state.settings
    user = await crud.get_user(session, user_id_from_token(token, settings))
    if user is None:
        raise Unauthorized("The access token's user no longer exists.", invalid_token=True)
    return user


CurrentUser = Annotated[User, Depends(current_user)]
