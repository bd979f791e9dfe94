"""Service configuration, read from the environment (and an optional .env file)."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models import PASSWORD_MIN_LENGTH, Username

# Redis key where the worker's heartbeat job records when it last ran (read by GET /ready).
HEARTBEAT_KEY = "pets:worker:heartbeat"
# The worker's job that prints a report on demand (`python cli.py report-now` enqueues it).
REPORT_JOB = "pet_report"

# Development defaults: they make `docker compose up` work without set-up and are refused elsewhere.
PLACEHOLDER_JWT_SECRET = "dev-only-placeholder-secret-change-me-please"  # noqa: S105
PLACEHOLDER_ADMIN_PASSWORD = "admin"  # noqa: S105
# Outside development a JWT secret needs this many distinct characters: it refuses a repeated
# character or a word typed twice, while a random secret (`openssl rand -hex 32`: 64 characters
# from 16) has fewer only with a probability far below one in 10^20.
JWT_SECRET_MIN_DISTINCT_CHARACTERS = 8
# The .env file beside this module, so every entry point reads the same one whatever the cwd;
# .env.example is the development one to copy.
ENV_FILE = Path(__file__).resolve().parent / ".env"
ENV_EXAMPLE = ENV_FILE.with_name(".env.example")


# compose's default for the observability profile; refused outside development.
PLACEHOLDER_PROMETHEUS_TOKEN = "dev-prometheus-token"  # noqa: S105 - the placeholder itself
PROMETHEUS_TOKEN_MIN_LENGTH = 16


class Settings(BaseSettings):
    # hide_input_in_errors: a refusal must not print the secrets it was given into the log.
    model_config = SettingsConfigDict(
        env_file=ENV_FILE, extra="ignore", frozen=True, hide_input_in_errors=True
    )

    ENVIRONMENT: Literal["development", "test", "production"] = "production"
    DATABASE_URL: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/pets"
    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    JWT_SECRET: SecretStr = SecretStr(PLACEHOLDER_JWT_SECRET)
    ACCESS_TOKEN_MINUTES: int = Field(default=30, ge=1, le=24 * 60)
    # The login form's rule, lower-cased like every username.
    ADMIN_USERNAME: Username = "admin"
    ADMIN_PASSWORD: SecretStr = SecretStr(PLACEHOLDER_ADMIN_PASSWORD)
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # json: one JSON object per line on STDERR (searchable); text: a readable line. Unset: text
    # in development, json everywhere else.
    LOG_FORMAT: Literal["json", "text"] | None = None
    # The bearer token GET /internal/metrics (Prometheus) requires; unset: that path is a 404.
    PROMETHEUS_TOKEN: SecretStr | None = None
    # The worker's Prometheus exposition (its own HTTP port); 0 turns it off.
    WORKER_METRICS_PORT: int = Field(default=9101, ge=0, le=65535)
    DB_POOL_SIZE: int = Field(default=20, ge=1)
    DB_MAX_OVERFLOW: int = Field(default=5, ge=0)
    # Seconds a request waits for a pooled connection before it is answered 503.
    DB_POOL_TIMEOUT: float = Field(default=5.0, gt=0)
    DB_CONNECT_TIMEOUT: float = Field(default=5.0, gt=0)
    # Server-side statement_timeout for the service's sessions (migrations are not bound by it).
    DB_STATEMENT_TIMEOUT_MS: int = Field(default=15_000, ge=0)
    # The window of the login throttle's counters (below), from an address's or a username's
    # first counted attempt.
    LOGIN_FAILURE_WINDOW_SECONDS: int = Field(default=300, ge=1)
    # The longest date range GET /metrics answers (three years).
    METRICS_MAX_SPAN_DAYS: int = Field(default=3 * 365 + 1, ge=1)
    # Analytics run on a pool of their own, this many questions at a time per API process; one
    # more waits up to METRICS_QUEUE_SECONDS for a turn, then gets 503 + Retry-After. Pet reads
    # and logins keep the main pool whatever /metrics does.
    METRICS_MAX_CONCURRENT: int = Field(default=4, ge=1, le=100)
    METRICS_QUEUE_SECONDS: float = Field(default=2.0, ge=0, le=60)
    # GET /metrics/export streams every row of a question, this many at a time per process (each
    # also holds one of the METRICS_MAX_CONCURRENT turns while it streams); one more is 503.
    METRICS_MAX_EXPORTS: int = Field(default=2, ge=1, le=100)
    # statement_timeout of the analytics pool: a question that runs longer is 503.
    METRICS_STATEMENT_TIMEOUT_MS: int = Field(default=30_000, ge=1)
    # GET /pets (a name search scans the table) runs this many at a time per process; one more
    # waits up to PETS_LIST_QUEUE_SECONDS, then gets 503 + Retry-After.
    PETS_LIST_MAX_CONCURRENT: int = Field(default=4, ge=1, le=100)
    PETS_LIST_QUEUE_SECONDS: float = Field(default=2.0, ge=0, le=60)
    # Login throttle: each attempt is reserved on three counters before its password is checked
    # (429 when one is full); a success gives its reservation back, a failure stays counted.
    # Per username from one client address: what stops guessing at one account.
    LOGIN_LIMIT_PER_USER_AND_CLIENT: int = Field(default=5, ge=1)
    # Per client address over every username: what stops one address trying many accounts.
    LOGIN_LIMIT_PER_CLIENT: int = Field(default=20, ge=1)
    # Per username over every address: caps a distributed guesser. High, so that locking a user
    # out takes failures from at least LIMIT_PER_USER / LIMIT_PER_USER_AND_CLIENT addresses.
    LOGIN_LIMIT_PER_USER: int = Field(default=100, ge=1)
    # Password verifications (argon2: about 0.15 s of one core and 64 MiB each) run at most this
    # many at once per process, so a flood of logins cannot take every core from other requests.
    LOGIN_MAX_CONCURRENT_HASHES: int = Field(default=2, ge=1)
    # Seconds a login waits for a verification slot before it is answered 503 + Retry-After.
    LOGIN_HASH_WAIT_SECONDS: float = Field(default=1.0, gt=0)
    # How the API is served (server.py): every request is bounded in size and in time.
    # The largest request body (413 beyond): a pet or a login form needs a few hundred bytes.
    HTTP_MAX_BODY_BYTES: int = Field(default=16_384, ge=1_024, le=64 * 1024 * 1024)
    # The largest request line plus headers (431 beyond); also the bound on a body's trailers.
    HTTP_MAX_HEADER_BYTES: int = Field(default=16_384, ge=1_024, le=1024 * 1024)
    # Seconds from connecting, or from a request's first byte, to the end of its headers.
    HTTP_HEADER_TIMEOUT_SECONDS: float = Field(default=10.0, gt=0, le=300)
    # Seconds from the end of a request's headers to the last byte of its body (408 after).
    HTTP_BODY_TIMEOUT_SECONDS: float = Field(default=10.0, gt=0, le=3600)
    # On SIGTERM (docker stop): new connections are refused, requests under way get this many
    # seconds to finish, then whatever still runs (a slow reader's export) is cut off, and the
    # process exits 0.
    HTTP_SHUTDOWN_GRACE_SECONDS: int = Field(default=10, ge=1, le=300)
    # Seconds an idle keep-alive connection is kept between requests.
    HTTP_KEEP_ALIVE_SECONDS: int = Field(default=5, ge=1, le=300)
    # Connections plus running requests per process; beyond it uvicorn answers 503.
    HTTP_MAX_CONCURRENCY: int = Field(default=1000, ge=1)
    # Open connections from one client address (not counting trusted proxies); beyond it a new
    # one is answered 503 and closed, so one client cannot fill HTTP_MAX_CONCURRENCY alone.
    HTTP_MAX_CONNECTIONS_PER_CLIENT: int = Field(default=100, ge=1)
    # Proxies (comma-separated addresses or networks) whose X-Forwarded-For/-Proto is believed;
    # empty: nobody's, so the client address is always the connection's own.
    FORWARDED_ALLOW_IPS: str = ""
    # API processes (uvicorn workers).
    WEB_CONCURRENCY: int = Field(default=1, ge=1, le=64)

    @field_validator("DATABASE_URL")
    @classmethod
    def use_asyncpg_driver(cls, url: str) -> str:
        """Accept the plain `postgresql://` form that most tools print."""
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+asyncpg://" + url.removeprefix(prefix)
        if not url.startswith("postgresql+asyncpg://"):
            raise ValueError("DATABASE_URL must be a postgresql:// or postgresql+asyncpg:// URL")
        return url

    @model_validator(mode="after")
    def refuse_weak_values_outside_development(self) -> "Settings":
        secret = self.JWT_SECRET.get_secret_value()
        if len(secret.encode()) < 32:
            raise ValueError("JWT_SECRET must be at least 32 bytes long")
        if self.ENVIRONMENT == "development":
            return self
        if secret == PLACEHOLDER_JWT_SECRET:
            raise ValueError("JWT_SECRET still has its development placeholder")
        if len(set(secret)) < JWT_SECRET_MIN_DISTINCT_CHARACTERS:
            raise ValueError(
                f"JWT_SECRET has fewer than {JWT_SECRET_MIN_DISTINCT_CHARACTERS} distinct"
                " characters; use a random one (e.g. `openssl rand -hex 32`)"
            )
        password = self.ADMIN_PASSWORD.get_secret_value()
        if password == PLACEHOLDER_ADMIN_PASSWORD:
            raise ValueError("ADMIN_PASSWORD still has its development placeholder")
        if len(password) < PASSWORD_MIN_LENGTH:
            raise ValueError(
                f"ADMIN_PASSWORD must be at least {PASSWORD_MIN_LENGTH} characters long"
                " (as create-user requires)"
            )
        token = self.PROMETHEUS_TOKEN
        if token is not None and token.get_secret_value() == PLACEHOLDER_PROMETHEUS_TOKEN:
            raise ValueError("PROMETHEUS_TOKEN still has its development placeholder")
        if token is not None and len(token.get_secret_value()) < PROMETHEUS_TOKEN_MIN_LENGTH:
            raise ValueError(
                f"PROMETHEUS_TOKEN must be at least {PROMETHEUS_TOKEN_MIN_LENGTH} characters long"
            )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_problem(error: ValidationError) -> str:
    """One line for invalid settings: what is wrong, and the file or variable that fixes it."""
    problems, names = [], []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        # A field's own error names it in `loc`; the cross-field checks name it first in `msg`.
        name = str(item["loc"][0]) if item["loc"] else message.split(" ", 1)[0]
        problems.append(message if message.startswith(name) else f"{name}: {message}")
        if name in Settings.model_fields and name not in names:
            names.append(name)
    settings = " and ".join(names) or "the settings"
    if ENV_FILE.exists():
        fix = f"change {settings} in {ENV_FILE} (or in the environment, which takes precedence)"
    elif ENV_EXAMPLE.exists():
        fix = (
            f"copy .env.example to .env (cp .env.example .env) for local development,"
            f" or set {settings}"
        )
    else:
        fix = f"set {settings}"
    return f"settings: {'; '.join(problems)}; {fix}"


def load_settings() -> Settings:
    """The settings for an entry point (API, worker, CLI, migrations): when they are invalid the
    process ends with one line naming what to change, not a validation traceback."""
    try:
        return get_settings()
    except ValidationError as error:
        raise SystemExit(settings_problem(error)) from None


def log_format(settings: Settings) -> Literal["json", "text"]:
    """LOG_FORMAT, or its default: text in development, json everywhere else."""
    if settings.LOG_FORMAT is not None:
        return settings.LOG_FORMAT
    return "text" if settings.ENVIRONMENT == "development" else "json"
