"""Logins and their throttle, tokens, the bearer dependency, the admin account, `cli.py
create-user` and the settings production refuses."""

import asyncio
import logging
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from jwt.warnings import InsecureKeyLengthWarning
from pydantic import ValidationError
from sqlalchemy.pool import QueuePool
from sqlmodel.ext.asyncio.session import AsyncSession

import auth
import crud
from auth import PlaceholderAdminPassword, provision_admin
from deps import state_of
from main import create_app
from models import PASSWORD_MIN_LENGTH
from settings import PLACEHOLDER_ADMIN_PASSWORD, PLACEHOLDER_JWT_SECRET, Settings
from tests.helpers import (
    ADMIN_PASSWORD,
    ADMIN_USERNAME,
    JWT_SECRET,
    client_for,
    make_settings,
    run_cli,
    sql,
)
from turns import Turns


async def login(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await client.post("/auth/token", data={"username": username, "password": password})


async def admin_id(session: AsyncSession) -> int:
    user = await crud.get_user_by_username(session, ADMIN_USERNAME)
    assert user is not None
    assert user.id is not None
    return user.id


async def test_token_is_an_hs256_jwt_with_subject_and_expiry(client: httpx.AsyncClient) -> None:
    response = await login(client, ADMIN_USERNAME, ADMIN_PASSWORD)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 30 * 60
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "HS256"
    claims = jwt.decode(body["access_token"], JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"].isdigit()
    expires = datetime.fromtimestamp(claims["exp"], UTC)
    assert timedelta(minutes=29) < expires - datetime.now(UTC) <= timedelta(minutes=30)


async def test_token_opens_writes(client: httpx.AsyncClient) -> None:
    token = (await login(client, ADMIN_USERNAME, ADMIN_PASSWORD)).json()["access_token"]
    response = await client.post(
        "/pets",
        json={"name": "Rex", "pet_type": "dog"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 201


@pytest.mark.parametrize(
    ("username", "password"),
    [(ADMIN_USERNAME, "wrong-password"), ("nobody", ADMIN_PASSWORD)],
)
async def test_login_with_bad_credentials_is_401(
    client: httpx.AsyncClient, username: str, password: str
) -> None:
    response = await login(client, username, password)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"] == "Incorrect username or password."


@pytest.mark.parametrize("username", ["Admin", "ADMIN", "aDmIn"])
async def test_usernames_are_case_insensitive(
    client: httpx.AsyncClient, session: AsyncSession, username: str
) -> None:
    response = await login(client, username, ADMIN_PASSWORD)
    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == str(await admin_id(session))


@pytest.mark.parametrize(
    "form",
    [
        {"username": ADMIN_USERNAME},
        {"password": ADMIN_PASSWORD},
        {"username": "", "password": ADMIN_PASSWORD},
        {"username": "a\x00b", "password": ADMIN_PASSWORD},
        {"username": "u" * 65, "password": ADMIN_PASSWORD},
        {"username": ADMIN_USERNAME, "password": "p" * 1025},
        {
            "username": ADMIN_USERNAME,
            "password": ADMIN_PASSWORD,
            "grant_type": "client_credentials",
        },
    ],
)
async def test_login_rejects_malformed_forms(
    client: httpx.AsyncClient, form: dict[str, str]
) -> None:
    response = await client.post("/auth/token", data=form)
    assert response.status_code == 422
    assert response.json()["errors"]


# --- throttling --------------------------------------------------------------------------------


def from_address(app: FastAPI, address: str) -> httpx.AsyncClient:
    """A client whose requests come from that address (what the throttle counts by)."""
    return client_for(app, client=(address, 1234))


@pytest.fixture
def login_settings(app: FastAPI) -> Iterator[Callable[..., None]]:
    """Run this test's logins with some settings changed (and `slots` concurrent verifications).
    By default a login waits up to 30 s for a verification slot, so that a loaded machine cannot
    turn an expected 401 into a 503."""
    guard: auth.LoginGuard = state_of(app).login_guard

    def use(slots: int | None = None, **overrides: object) -> None:
        settings = guard.settings.model_copy(update={"LOGIN_HASH_WAIT_SECONDS": 30, **overrides})
        slots_now = guard.verification_slots
        turns = Turns(
            slots or slots_now.size,
            settings.LOGIN_HASH_WAIT_SECONDS,
            slots_now.busy,
            slots_now.reason,
        )
        state_of(app).login_guard = replace(guard, settings=settings, verification_slots=turns)

    use()
    yield use
    state_of(app).login_guard = guard


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hashes every password verification from now on was checked against."""
    calls: list[str] = []
    real_verify = auth.password_hasher.verify

    def counting_verify(password: str, password_hash: str) -> bool:
        calls.append(password_hash)
        return real_verify(password, password_hash)

    monkeypatch.setattr(auth.password_hasher, "verify", counting_verify)
    return calls


def statuses(responses: list[httpx.Response]) -> Counter[int]:
    return Counter(response.status_code for response in responses)


async def counters(app: FastAPI, username: str, client: str) -> list[int]:
    """The throttle's counts: this username from this client, this client, this username."""
    values = await state_of(app).redis.mget(auth.login_counter_keys(username, client))
    return [int(value or 0) for value in values]


@pytest.mark.usefixtures("client", "login_settings")
async def test_concurrent_wrong_passwords_check_at_most_the_limit(
    app: FastAPI, verifications: list[str]
) -> None:
    async with from_address(app, "10.0.0.1") as attacker:
        responses = await asyncio.gather(
            *(login(attacker, ADMIN_USERNAME, f"guess-{n}") for n in range(60))
        )
    assert statuses(responses) == {401: 5, 429: 55}
    assert len(verifications) == 5


@pytest.mark.usefixtures("client", "login_settings")
async def test_throttled_login_is_429_problem_with_retry_after(app: FastAPI) -> None:
    async with from_address(app, "10.0.0.1") as attacker:
        for _ in range(5):
            assert (await login(attacker, ADMIN_USERNAME, "wrong-password")).status_code == 401
        blocked = await login(attacker, ADMIN_USERNAME, ADMIN_PASSWORD)
        # Another account from the same client is not locked out by this one's failures.
        assert (await login(attacker, "someone-else", "wrong-password")).status_code == 401
    assert blocked.status_code == 429
    assert blocked.headers["content-type"] == "application/problem+json"
    assert 0 < int(blocked.headers["retry-after"]) <= 300
    assert await counters(app, ADMIN_USERNAME, "10.0.0.1") == [5, 6, 5], "a 429 counts nothing"


@pytest.mark.usefixtures("client", "login_settings")
async def test_wrong_guesses_from_one_client_do_not_lock_the_user_out_from_another(
    app: FastAPI,
) -> None:
    async with from_address(app, "10.0.0.1") as attacker:
        guesses = await asyncio.gather(
            *(login(attacker, ADMIN_USERNAME, f"guess-{n}") for n in range(10))
        )
    assert statuses(guesses) == {401: 5, 429: 5}
    async with from_address(app, "10.0.0.2") as owner:
        assert (await login(owner, ADMIN_USERNAME, ADMIN_PASSWORD)).status_code == 200


@pytest.mark.usefixtures("client", "login_settings")
async def test_one_client_is_capped_across_usernames(
    app: FastAPI, verifications: list[str]
) -> None:
    async with from_address(app, "10.0.0.1") as sprayer:
        responses = await asyncio.gather(
            *(login(sprayer, f"user-{n}", "wrong-password") for n in range(40))
        )
        assert statuses(responses) == {401: 20, 429: 20}
        assert len(verifications) == 20
        blocked = await login(sprayer, ADMIN_USERNAME, ADMIN_PASSWORD)
        assert blocked.status_code == 429
        assert int(blocked.headers["retry-after"]) > 0
    async with from_address(app, "10.0.0.2") as other:
        assert (await login(other, ADMIN_USERNAME, ADMIN_PASSWORD)).status_code == 200


@pytest.mark.usefixtures("client")
async def test_one_username_is_capped_across_clients(
    app: FastAPI, login_settings: Callable[..., None], verifications: list[str]
) -> None:
    login_settings(LOGIN_LIMIT_PER_USER=8)
    clients = [from_address(app, f"10.0.1.{n}") for n in range(30)]
    try:
        responses = await asyncio.gather(
            *(login(http, ADMIN_USERNAME, "wrong-password") for http in clients)
        )
    finally:
        await asyncio.gather(*(http.aclose() for http in clients))
    assert statuses(responses) == {401: 8, 429: 22}
    assert len(verifications) == 8
    async with from_address(app, "10.0.2.1") as newcomer:
        capped = await login(newcomer, ADMIN_USERNAME, ADMIN_PASSWORD)
        assert capped.status_code == 429
        assert int(capped.headers["retry-after"]) > 0
        assert (await login(newcomer, "someone-else", "wrong-password")).status_code == 401


@pytest.mark.usefixtures("client")
async def test_a_successful_login_gives_back_its_reservation(
    app: FastAPI, login_settings: Callable[..., None]
) -> None:
    login_settings(LOGIN_LIMIT_PER_CLIENT=5)
    async with from_address(app, "10.0.0.1") as http:
        for _ in range(3):
            assert (await login(http, ADMIN_USERNAME, "wrong-password")).status_code == 401
        assert (await login(http, ADMIN_USERNAME, ADMIN_PASSWORD)).status_code == 200
        # This username from this client starts afresh; the client's and the username's own
        # counts keep the three failures but not the success.
        assert await counters(app, ADMIN_USERNAME, "10.0.0.1") == [0, 3, 3]
        # So a user who logs in more often than a limit is never capped by their successes.
        for _ in range(6):
            assert (await login(http, ADMIN_USERNAME, ADMIN_PASSWORD)).status_code == 200
        assert await counters(app, ADMIN_USERNAME, "10.0.0.1") == [0, 3, 3]


@pytest.mark.usefixtures("client")
async def test_a_login_without_a_free_verification_slot_is_503_and_costs_nothing(
    app: FastAPI, login_settings: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    login_settings(slots=1, LOGIN_HASH_WAIT_SECONDS=0.2)
    real_verify = auth.password_hasher.verify

    def slow_verify(password: str, password_hash: str) -> bool:
        time.sleep(1.0)  # in the hashing thread: holds the one slot for a second
        return real_verify(password, password_hash)

    monkeypatch.setattr(auth.password_hasher, "verify", slow_verify)
    async with from_address(app, "10.0.0.1") as first, from_address(app, "10.0.0.2") as second:
        checked = asyncio.create_task(login(first, ADMIN_USERNAME, "wrong-password"))
        await asyncio.sleep(0.1)
        turned_away = await login(second, ADMIN_USERNAME, "wrong-password")
        assert (await checked).status_code == 401
    assert turned_away.status_code == 503
    assert int(turned_away.headers["retry-after"]) > 0
    assert await counters(app, ADMIN_USERNAME, "10.0.0.2") == [0, 0, 1], "only the 401 counts"


@pytest.mark.usefixtures("client")
async def test_a_login_the_database_fails_costs_no_attempt(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unreachable(*_args: object) -> None:
        raise ConnectionRefusedError("the database is down")

    monkeypatch.setattr(crud, "get_user_by_username", unreachable)
    async with from_address(app, "10.0.0.1") as http:
        response = await login(http, ADMIN_USERNAME, ADMIN_PASSWORD)
    assert response.status_code == 503
    assert await counters(app, ADMIN_USERNAME, "10.0.0.1") == [0, 0, 0]


@pytest.mark.usefixtures("login_settings")
async def test_a_login_holds_no_pooled_connection_while_verifying(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = state_of(app).engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    in_use: list[int] = []
    real_verify = auth.password_hasher.verify

    def watching_verify(password: str, password_hash: str) -> bool:
        in_use.append(pool.checkedout())
        return real_verify(password, password_hash)

    monkeypatch.setattr(auth.password_hasher, "verify", watching_verify)
    assert (await login(client, ADMIN_USERNAME, "wrong-password")).status_code == 401
    assert (await login(client, "nobody", "wrong-password")).status_code == 401
    assert (await login(client, ADMIN_USERNAME, ADMIN_PASSWORD)).status_code == 200
    assert in_use == [0, 0, 0]


async def test_unknown_user_costs_one_hash_verification_like_a_wrong_password(
    client: httpx.AsyncClient, verifications: list[str]
) -> None:
    assert (await login(client, "nobody", "wrong-password")).status_code == 401
    assert (await login(client, ADMIN_USERNAME, "wrong-password")).status_code == 401
    assert len(verifications) == 2
    # Both are full argon2 verifications with the same parameters.
    assert verifications[0].rsplit("$", 2)[0] == verifications[1].rsplit("$", 2)[0]


def forge(claims: dict[str, Any], key: str = JWT_SECRET, algorithm: str = "HS256") -> str:
    with warnings.catch_warnings():
        # HS512 wants a 64-byte key; the forged token only has to look like an attacker's.
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(claims, key, algorithm=algorithm)


def later(minutes: int = 10) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


TokenMaker = Callable[[int], str]

BAD_TOKENS: dict[str, TokenMaker] = {
    "wrong key": lambda uid: forge({"sub": str(uid), "exp": later()}, key="x" * 40),
    "expired": lambda uid: forge({"sub": str(uid), "exp": later(-1)}),
    "no exp": lambda uid: forge({"sub": str(uid)}),
    "no sub": lambda _uid: forge({"exp": later()}),
    "alg none": lambda uid: jwt.encode({"sub": str(uid), "exp": later()}, None, algorithm="none"),
    "other algorithm": lambda uid: forge({"sub": str(uid), "exp": later()}, algorithm="HS512"),
    "unknown user": lambda _uid: forge({"sub": "2147483647", "exp": later()}),
    "non-numeric sub": lambda _uid: forge({"sub": "admin", "exp": later()}),
    "sub beyond id range": lambda _uid: forge({"sub": "99999999999999999999", "exp": later()}),
    "integer sub": lambda uid: forge({"sub": uid, "exp": later()}),
    "malformed": lambda _uid: "not.a.jwt",
    "empty": lambda _uid: "",
}


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_bad_tokens_are_401_with_bearer_challenge(
    client: httpx.AsyncClient, session: AsyncSession, kind: str
) -> None:
    token = BAD_TOKENS[kind](await admin_id(session))
    response = await client.post(
        "/pets",
        json={"name": "Rex", "pet_type": "dog"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_well_forged_token_is_accepted(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    """The counterpart of the bad tokens above: only what they break makes them fail."""
    token = forge({"sub": str(await admin_id(session)), "exp": later()})
    response = await client.post(
        "/pets",
        json={"name": "Rex", "pet_type": "dog"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 201


@pytest.mark.parametrize("header", ["Basic YWRtaW46YWRtaW4=", "Bearer", "Token abc"])
async def test_other_authorization_schemes_are_401(client: httpx.AsyncClient, header: str) -> None:
    response = await client.delete("/pets/1", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_admin_is_provisioned_but_never_overwritten(settings: Settings, app: FastAPI) -> None:
    changed = make_settings(settings.DATABASE_URL, ADMIN_PASSWORD="a-different-password")
    await provision_admin(changed, state_of(app).sessionmaker)
    guard = state_of(app).login_guard
    assert await auth.authenticate(guard, ADMIN_USERNAME, ADMIN_PASSWORD) is not None
    assert await auth.authenticate(guard, ADMIN_USERNAME, "a-different-password") is None


async def test_cli_create_user_adds_a_user_who_can_log_in(
    settings: Settings, client: httpx.AsyncClient
) -> None:
    result = run_cli(settings, "create-user", "editor", "--password-stdin", stdin="s3cret-pass\n")
    assert result.returncode == 0, result.stderr
    assert "created user 'editor'" in result.stdout
    assert (await login(client, "editor", "s3cret-pass")).status_code == 200

    again = run_cli(settings, "create-user", "editor", "--password-stdin", stdin="other-pass\n")
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert (await login(client, "editor", "s3cret-pass")).status_code == 200


async def test_cli_create_user_lower_cases_the_name(
    settings: Settings, client: httpx.AsyncClient
) -> None:
    created = run_cli(settings, "create-user", "Author", "--password-stdin", stdin="long-enough\n")
    assert created.returncode == 0, created.stderr
    assert "created user 'author'" in created.stdout
    assert (await login(client, "AUTHOR", "long-enough")).status_code == 200
    # `admin` exists, so `Admin` is the same account, not a second one.
    taken = run_cli(settings, "create-user", "Admin", "--password-stdin", stdin="long-enough\n")
    assert taken.returncode == 1
    assert "user 'admin' already exists" in taken.stderr


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [("bad name", "long-enough", "username"), ("shortpw", "short", "password")],
)
def test_cli_create_user_rejects_invalid_accounts(
    settings: Settings, username: str, password: str, message: str
) -> None:
    result = run_cli(settings, "create-user", username, "--password-stdin", stdin=password + "\n")
    assert result.returncode == 1
    assert message in result.stderr


def test_cli_create_user_help_states_the_password_minimum(settings: Settings) -> None:
    result = run_cli(settings, "create-user", "--help")
    assert result.returncode == 0
    assert f"The password needs {PASSWORD_MIN_LENGTH} characters or more" in result.stdout
    assert f"read the password ({PASSWORD_MIN_LENGTH}+ characters)" in result.stdout


@pytest.fixture
def no_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)


STRONG = {"JWT_SECRET": "4f1c9e0b7a2d6c3e8b5a1f0d9c7e2b4a", "ADMIN_PASSWORD": "correct-horse"}


@pytest.mark.usefixtures("no_settings_env")
@pytest.mark.parametrize(
    ("weak", "message"),
    [
        (
            {"JWT_SECRET": PLACEHOLDER_JWT_SECRET},
            "JWT_SECRET still has its development placeholder",
        ),
        ({"JWT_SECRET": "a" * 32}, "JWT_SECRET has fewer than 8 distinct characters"),
        ({"JWT_SECRET": "secret" * 8}, "JWT_SECRET has fewer than 8 distinct characters"),
        ({"JWT_SECRET": "too-short"}, "JWT_SECRET must be at least 32 bytes"),
        ({"ADMIN_PASSWORD": PLACEHOLDER_ADMIN_PASSWORD}, "ADMIN_PASSWORD still has its"),
        ({"ADMIN_PASSWORD": "x"}, "ADMIN_PASSWORD must be at least 8 characters"),
        ({"ADMIN_PASSWORD": ""}, "ADMIN_PASSWORD must be at least 8 characters"),
        ({"ADMIN_PASSWORD": "7-chars"}, "ADMIN_PASSWORD must be at least 8 characters"),
        ({"ADMIN_USERNAME": "ops admin"}, "ADMIN_USERNAME\n  String should match pattern"),
        ({"ADMIN_USERNAME": ""}, "ADMIN_USERNAME\n  String should have at least 1 character"),
    ],
)
@pytest.mark.parametrize("environment", ["production", "test"])
def test_weak_settings_are_refused_outside_development(
    environment: str, weak: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(**{"ENVIRONMENT": environment, **STRONG, **weak})  # type: ignore[arg-type]
    assert message in str(refused.value)
    # The refusal names the setting but does not repeat the values it was given.
    assert STRONG["JWT_SECRET"] not in str(refused.value)
    assert STRONG["ADMIN_PASSWORD"] not in str(refused.value)


@pytest.mark.usefixtures("no_settings_env")
def test_strong_settings_are_accepted_in_production() -> None:
    settings = Settings(ENVIRONMENT="production", ADMIN_USERNAME="Ops.Admin", **STRONG)  # type: ignore[arg-type]
    assert settings.ADMIN_USERNAME == "ops.admin"


@pytest.mark.usefixtures("no_settings_env")
def test_development_accepts_the_placeholders() -> None:
    defaults = Settings(ENVIRONMENT="development")
    assert defaults.JWT_SECRET.get_secret_value() == PLACEHOLDER_JWT_SECRET
    assert defaults.ADMIN_PASSWORD.get_secret_value() == PLACEHOLDER_ADMIN_PASSWORD
    assert Settings(ENVIRONMENT="development", JWT_SECRET="a" * 32, ADMIN_PASSWORD="x")


@pytest.mark.usefixtures("no_settings_env")
def test_short_secret_is_refused_even_in_development() -> None:
    with pytest.raises(ValidationError, match="32 bytes"):
        Settings(ENVIRONMENT="development", JWT_SECRET="too-short")


# --- an admin account that still has the placeholder password ----------------------------------

LEGACY_ADMIN = "legacy-admin"


@pytest.fixture
async def placeholder_admin(settings: Settings, session: AsyncSession) -> AsyncIterator[Settings]:
    """An account made with the placeholder password (as `docker compose up` made `admin`
    before ADMIN_PASSWORD was set), and the test settings naming it as the admin."""
    password_hash = await auth.hash_password(PLACEHOLDER_ADMIN_PASSWORD)
    assert await crud.add_user_if_missing(session, LEGACY_ADMIN, password_hash) is not None
    try:
        yield make_settings(settings.DATABASE_URL, ADMIN_USERNAME=LEGACY_ADMIN)
    finally:
        await sql(session, 'DELETE FROM "user" WHERE username = :name', name=LEGACY_ADMIN)
        await session.commit()


async def test_an_admin_with_the_placeholder_password_stops_start_up(
    placeholder_admin: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(PlaceholderAdminPassword, match="still has the development placeholder"):
        async with LifespanManager(create_app(placeholder_admin)):
            pass
    refusal = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(refusal) == 1
    assert refusal[0].getMessage().startswith("refusing to start: the admin account")


async def test_development_starts_with_a_placeholder_admin(placeholder_admin: Settings) -> None:
    development = placeholder_admin.model_copy(update={"ENVIRONMENT": "development"})
    application = create_app(development)
    async with LifespanManager(application), client_for(application) as http:
        # Development is the one place the placeholder still opens the account.
        assert (await login(http, LEGACY_ADMIN, PLACEHOLDER_ADMIN_PASSWORD)).status_code == 200


async def test_provisioning_after_an_outage_stops_the_api_for_a_placeholder_admin(
    placeholder_admin: Settings,
    app: FastAPI,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the database was down at start-up, the background retry finds the account later,
    while the API is serving: it stops the process (SIGTERM to itself, stubbed here)."""
    stopped: list[bool] = []
    monkeypatch.setattr(auth, "stop_this_process", lambda: stopped.append(True))
    async with asyncio.timeout(10):
        await auth.keep_provisioning_admin(placeholder_admin, state_of(app).sessionmaker)
    assert stopped == [True]
    assert "refusing to serve, stopping: the admin account 'legacy-admin'" in caplog.text


@pytest.mark.usefixtures("placeholder_admin")
async def test_the_placeholder_password_never_logs_in_outside_development(
    client: httpx.AsyncClient, verifications: list[str]
) -> None:
    response = await login(client, LEGACY_ADMIN, PLACEHOLDER_ADMIN_PASSWORD)
    assert response.status_code == 401
    assert verifications == [], "refused before any hash is checked"


@pytest.mark.usefixtures("no_settings_env")
def test_plain_postgres_url_gets_the_async_driver() -> None:
    settings = Settings(ENVIRONMENT="development", DATABASE_URL="postgresql://u@h:5432/d")
    assert settings.DATABASE_URL == "postgresql+asyncpg://u@h:5432/d"


async def test_a_token_stops_working_when_its_user_is_deleted(
    settings: Settings, client: httpx.AsyncClient, session: AsyncSession
) -> None:
    created = run_cli(settings, "create-user", "leaver", "--password-stdin", stdin="leaving-soon\n")
    assert created.returncode == 0, created.stderr
    token = (await login(client, "leaver", "leaving-soon")).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    created_pet = await client.post(
        "/pets", json={"name": "Rex", "pet_type": "dog"}, headers=headers
    )
    assert created_pet.status_code == 201
    await sql(session, "DELETE FROM \"user\" WHERE username = 'leaver'")
    await session.commit()
    response = await client.post("/pets", json={"name": "Max", "pet_type": "dog"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["detail"] == "The access token's user no longer exists."


def _property_names(schema: Any, components: dict[str, Any], seen: set[str]) -> set[str]:
    """Every property name reachable from a JSON schema, following $refs."""
    if isinstance(schema, list):
        return set().union(*(_property_names(item, components, seen) for item in schema))
    if not isinstance(schema, dict):
        return set()
    names: set[str] = set()
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref not in seen:
        seen.add(ref)
        names |= _property_names(components[ref.rsplit("/", 1)[1]], components, seen)
    names |= set(schema.get("properties", {}))
    for value in schema.values():
        names |= _property_names(value, components, seen)
    return names


async def test_no_response_can_carry_a_password_hash_or_a_traceback(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    components = document["components"]["schemas"]
    names: set[str] = set()
    for operations in document["paths"].values():
        for operation in operations.values():
            for response in operation["responses"].values():
                for content in response.get("content", {}).values():
                    names |= _property_names(content.get("schema", {}), components, set())
    assert {"id", "name", "access_token", "detail"} <= names  # the walk reaches the bodies
    words = ("password", "hash", "secret", "trace")
    assert {n for n in names if any(word in n.lower() for word in words)} == set()


def test_cli_create_user_without_a_terminal_says_to_use_password_stdin(
    settings: Settings,
) -> None:
    result = run_cli(settings, "create-user", "no-tty-user")
    assert result.returncode != 0
    assert (
        result.stderr.strip() == "error: no terminal to ask for the password; use --password-stdin"
    )
