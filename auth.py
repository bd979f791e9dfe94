"""Password hashing, login throttling, access tokens, and the `CurrentUser` dependency."""

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Annotated

import jwt
from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from sqlalchemy.ext.asyncio import AsyncEngine

import crud
from db import SessionDep, SettingsDep
from errors import TooManyRequests, Unauthorized
from models import INT32_MAX, Token, User
from settings import PLACEHOLDER_ADMIN_PASSWORD, Settings
from turns import Turns

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


# Login throttle. An attempt is reserved on three counters before its password is checked, in
# one step, so that N concurrent guesses check at most the limit; a refused attempt changes
# nothing. KEYS: the counters; ARGV: each counter's limit, then the window in seconds. Returns 0
# when reserved, else the seconds until every full counter has room again (at least 1).
RESERVE_LOGIN_ATTEMPT = """
local window = tonumber(ARGV[#KEYS + 1])
local wait = 0
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') >= tonumber(ARGV[i]) then
    local ttl = redis.call('TTL', key)
    if ttl < 0 then
      redis.call('EXPIRE', key, window)
      ttl = window
    end
    wait = math.max(wait, ttl, 1)
  end
end
if wait > 0 then
  return wait
end
for _, key in ipairs(KEYS) do
  redis.call('INCR', key)
  if redis.call('TTL', key) < 0 then
    redis.call('EXPIRE', key, window)
  end
end
return 0
"""
# Gives a reservation back: after a success (ARGV[1] = 1) the first counter, this username from
# this client, is cleared, so its owner is not held to failures that preceded it; after a login
# that was never checked (ARGV[1] = 0) every counter only loses this attempt. A counter whose
# window has ended meanwhile is not brought back.
RELEASE_LOGIN_ATTEMPT = """
for i, key in ipairs(KEYS) do
  if i == 1 and ARGV[1] == '1' then
    redis.call('DEL', key)
  elseif tonumber(redis.call('GET', key) or '0') > 0 then
    redis.call('DECR', key)
  end
end
return 0
"""


@dataclass(frozen=True)
class LoginGuard:
    """What every login shares, made once in the lifespan: the settings, the throttle's Redis
    scripts, the slots that bound concurrent verifications, and the autocommit engine the user
    is looked up on."""

    settings: Settings
    reserve: AsyncScript
    release: AsyncScript
    verification_slots: Turns
    read_engine: AsyncEngine


def create_login_guard(settings: Settings, redis: Redis, read_engine: AsyncEngine) -> LoginGuard:
    return LoginGuard(
        settings=settings,
        reserve=redis.register_script(RESERVE_LOGIN_ATTEMPT),
        release=redis.register_script(RELEASE_LOGIN_ATTEMPT),
        verification_slots=Turns(
            settings.LOGIN_MAX_CONCURRENT_HASHES,
            settings.LOGIN_HASH_WAIT_SECONDS,
            "Too many logins at once; try again shortly.",
        ),
        read_engine=read_engine,
    )


def login_guard(request: Request) -> LoginGuard:
    guard: LoginGuard = request.app.state.login_guard
    return guard


def client_address(request: Request) -> str:
    # What uvicorn says the peer is (it decides whether proxy headers may change that).
    return request.client.host if request.client else "unknown"


LoginGuardDep = Annotated[LoginGuard, Depends(login_guard)]
ClientAddress = Annotated[str, Depends(client_address)]


def login_counter_keys(username: str, client: str) -> list[str]:
    """Per username from this client, per client, per username (a username has no ':')."""
    prefix = "pets:login-attempts"
    return [
        f"{prefix}:user-client:{username}:{client}",
        f"{prefix}:client:{client}",
        f"{prefix}:user:{username}",
    ]


async def reserve_login_attempt(guard: LoginGuard, keys: list[str]) -> None:
    """Count this attempt on every counter, or raise 429 (counting nothing) if one is full."""
    settings = guard.settings
    limits = (
        settings.LOGIN_LIMIT_PER_USER_AND_CLIENT,
        settings.LOGIN_LIMIT_PER_CLIENT,
        settings.LOGIN_LIMIT_PER_USER,
    )
    wait = int(await guard.reserve(keys, [*limits, settings.LOGIN_FAILURE_WINDOW_SECONDS]))
    if wait > 0:
        raise TooManyRequests("Too many failed logins; try again later.", retry_after=wait)


async def release_login_attempt(guard: LoginGuard, keys: list[str], *, succeeded: bool) -> None:
    await guard.release(keys, [1 if succeeded else 0])


async def authenticate(guard: LoginGuard, username: str, password: str) -> User | None:
    """The user, if the password is theirs. The user is looked up on a connection that goes back
    to the pool before the password is hashed: no pooled connection waits on the hash."""
    if guard.settings.ENVIRONMENT != "development" and password == PLACEHOLDER_ADMIN_PASSWORD:
        # Whichever account still has it (an admin made before ADMIN_PASSWORD was set, say).
        return None
    async with guard.read_engine.connect() as connection:
        user = await crud.get_user_by_username(connection, username)
    async with guard.verification_slots.take():
        if user is None:
            await verify_password(password, dummy_hash())
            return None
        return user if await verify_password(password, user.password_hash) else None


async def log_in(guard: LoginGuard, username: str, password: str, client: str) -> User:
    """The user these credentials belong to; 401 if they belong to none, 429 while a throttle
    counter is full. A login that could not be judged (no verification slot in time: 503; the
    database failing) costs no attempt."""
    keys = login_counter_keys(username, client)
    await reserve_login_attempt(guard, keys)
    try:
        user = await authenticate(guard, username, password)
    except Exception:
        await release_login_attempt(guard, keys, succeeded=False)
        raise
    if user is None:
        raise Unauthorized("Incorrect username or password.")
    await release_login_attempt(guard, keys, succeeded=True)
    return user


async def has_placeholder_password(user: User) -> bool:
    """Whether the account still opens with the development placeholder password."""
    return await verify_password(PLACEHOLDER_ADMIN_PASSWORD, user.password_hash)


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
    settings: SettingsDep,
    session: SessionDep,
    token: Annotated[str | None, Depends(bearer_scheme)],
) -> User:
    if token is None:
        raise Unauthorized("This operation needs a bearer token: POST /auth/token to get one.")
    user = await crud.get_user(session, user_id_from_token(token, settings))
    if user is None:
        raise Unauthorized("The access token's user no longer exists.", invalid_token=True)
    return user


CurrentUser = Annotated[User, Depends(current_user)]
# For a route that needs a signed-in user but not the user itself (in its `dependencies`).
Authenticated = Depends(current_user)
