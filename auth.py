"""Password hashing, the login throttle, access tokens, the user a token is for, and the admin
account provisioned at start-up."""

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import jwt
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

import crud
from backoff import Backoff
from db import SessionMaker
from errors import TooManyRequests, Unauthorized
from models import INT32_MAX, Token, User
from settings import PLACEHOLDER_ADMIN_PASSWORD, Settings
from turns import Turns

log = logging.getLogger("pets.api")

ALGORITHM = "HS256"

password_hasher = PasswordHash((Argon2Hasher(),))


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
            "password_checks_busy",
        ),
        read_engine=read_engine,
    )


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
        raise TooManyRequests(
            "Too many failed logins; try again later.", retry_after=wait, reason="login_throttled"
        )


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


async def user_of_token(session: AsyncSession, token: str | None, settings: Settings) -> User:
    """The user a bearer token is for; 401 without one, for a bad one, or for a user gone."""
    if token is None:
        raise Unauthorized("This operation needs a bearer token: POST /auth/token to get one.")
    user = await crud.get_user(session, user_id_from_token(token, settings))
    if user is None:
        raise Unauthorized("The access token's user no longer exists.", invalid_token=True)
    return user


# --- the admin account -------------------------------------------------------------------------


class PlaceholderAdminPassword(RuntimeError):
    """Outside development, the admin account still opens with the placeholder password."""


async def provision_admin(settings: Settings, sessionmaker: SessionMaker) -> None:
    """Create the configured admin account if it is missing; an existing one is left as it is,
    but outside development it must not still have the placeholder password (an account made
    before ADMIN_PASSWORD was set is never overwritten by it)."""
    async with sessionmaker() as session:
        admin = await crud.get_user_by_username(session, settings.ADMIN_USERNAME)
    if admin is not None:
        if settings.ENVIRONMENT != "development" and await has_placeholder_password(admin):
            raise PlaceholderAdminPassword(
                f"the admin account {admin.username!r} still has the development placeholder"
                " password; give it a real one (e.g. delete the account so that start-up"
                " creates it again with ADMIN_PASSWORD)"
            )
        return
    password_hash = await hash_password(settings.ADMIN_PASSWORD.get_secret_value())
    async with sessionmaker() as session:
        if await crud.add_user_if_missing(session, settings.ADMIN_USERNAME, password_hash):
            log.info("created admin user %r", settings.ADMIN_USERNAME)


def stop_this_process() -> None:
    """Shut down as `docker stop` would: requests under way finish, then the process exits."""
    os.kill(os.getpid(), signal.SIGTERM)


# Waits between attempts to provision the admin account while the database is away.
ADMIN_BACKOFF = Backoff(first=2.0, cap=30.0)


async def keep_provisioning_admin(settings: Settings, sessionmaker: SessionMaker) -> None:
    """Retry with backoff until the database (and its schema) is there. The API is serving by
    then, so an admin account that turns out to have the placeholder password stops it."""

    async def on_retry(error: Exception, _failures: int, delay: float) -> None:
        log.warning("admin user not provisioned yet (%s); retrying in %.0f s", error, delay)

    await asyncio.sleep(1.0)  # the lifespan's own attempt has just failed
    try:
        await ADMIN_BACKOFF.retry(
            lambda: provision_admin(settings, sessionmaker),
            retryable=lambda error: not isinstance(error, PlaceholderAdminPassword),
            on_retry=on_retry,
        )
    except PlaceholderAdminPassword as error:
        log.critical("refusing to serve, stopping: %s", error)
        stop_this_process()
