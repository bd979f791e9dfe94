"""Tokens, the bearer dependency, the admin account, `cli.py create-user` and secret settings."""

import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from jwt.warnings import InsecureKeyLengthWarning
from pydantic import ValidationError
from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

import auth
import crud
from main import provision_admin
from settings import PLACEHOLDER_ADMIN_PASSWORD, PLACEHOLDER_JWT_SECRET, Settings
from tests.conftest import ADMIN_PASSWORD, ADMIN_USERNAME, JWT_SECRET, make_settings, run_cli


async def login(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await client.post("/auth/token", data={"username": username, "password": password})


async def admin_id(session: AsyncSession) -> int:
    user = await crud.get_user_by_username(session, ADMIN_USERNAME)
    assert user is not None and user.id is not None
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
    [
        (ADMIN_USERNAME, "wrong-password"),
        ("nobody", ADMIN_PASSWORD),
    ],
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


async def test_failed_logins_per_username_are_limited(client: httpx.AsyncClient) -> None:
    for _ in range(5):
        assert (await login(client, ADMIN_USERNAME, "wrong-password")).status_code == 401
    blocked = await login(client, ADMIN_USERNAME, ADMIN_PASSWORD)
    assert blocked.status_code == 429
    assert blocked.headers["content-type"] == "application/problem+json"
    assert 0 < int(blocked.headers["retry-after"]) <= 300
    # Another account from the same client is not locked out by this one's failures.
    assert (await login(client, "someone-else", "wrong-password")).status_code == 401


async def test_failed_logins_per_client_are_limited(client: httpx.AsyncClient) -> None:
    for number in range(20):
        assert (await login(client, f"guess{number}", "wrong-password")).status_code == 401
    blocked = await login(client, ADMIN_USERNAME, ADMIN_PASSWORD)
    assert blocked.status_code == 429
    assert int(blocked.headers["retry-after"]) > 0


async def test_a_successful_login_clears_the_username_count(client: httpx.AsyncClient) -> None:
    for _ in range(2):
        for _ in range(4):
            assert (await login(client, ADMIN_USERNAME, "wrong-password")).status_code == 401
        assert (await login(client, ADMIN_USERNAME, ADMIN_PASSWORD)).status_code == 200


async def test_unknown_user_costs_one_hash_verification_like_a_wrong_password(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_verify = auth.password_hasher.verify

    def counting_verify(password: str, password_hash: str) -> bool:
        calls.append(password_hash)
        return real_verify(password, password_hash)

    monkeypatch.setattr(auth.password_hasher, "verify", counting_verify)
    assert (await login(client, "nobody", "wrong-password")).status_code == 401
    assert (await login(client, ADMIN_USERNAME, "wrong-password")).status_code == 401
    assert len(calls) == 2
    # Both are full argon2 verifications with the same parameters.
    assert calls[0].rsplit("$", 2)[0] == calls[1].rsplit("$", 2)[0]


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
    "no sub": lambda uid: forge({"exp": later()}),
    "alg none": lambda uid: jwt.encode({"sub": str(uid), "exp": later()}, None, algorithm="none"),
    "other algorithm": lambda uid: forge({"sub": str(uid), "exp": later()}, algorithm="HS512"),
    "unknown user": lambda uid: forge({"sub": "2147483647", "exp": later()}),
    "non-numeric sub": lambda uid: forge({"sub": "admin", "exp": later()}),
    "sub beyond id range": lambda uid: forge({"sub": "99999999999999999999", "exp": later()}),
    "integer sub": lambda uid: forge({"sub": uid, "exp": later()}),
    "malformed": lambda uid: "not.a.jwt",
    "empty": lambda uid: "",
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


async def test_admin_is_provisioned_but_never_overwritten(settings: Settings, app: Any) -> None:
    changed = make_settings(settings.DATABASE_URL, ADMIN_PASSWORD="a-different-password")
    await provision_admin(changed, app.state.sessionmaker)
    async with app.state.sessionmaker() as session:
        assert await auth.authenticate(session, ADMIN_USERNAME, ADMIN_PASSWORD) is not None
        assert await auth.authenticate(session, ADMIN_USERNAME, "a-different-password") is None


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
    await session.exec(text("DELETE FROM \"user\" WHERE username = 'leaver'"))  # type: ignore[call-overload]
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
