"""Log lines: the request id of the request being served, JSON or text formatting for every
logger (uvicorn's and arq's included), and the access line."""

import json
import logging
import logging.config
import re
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# --- the request id ----------------------------------------------------------------------------

# The id of the request being served, for every log line written while serving it.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
# A client's own id is kept when it is short and safe to put in a log line or a header.
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def request_id_from(sent: str | None) -> str:
    """The client's X-Request-ID when it is short and safe, else a new one."""
    if sent is not None and CLIENT_REQUEST_ID.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


# --- log lines ---------------------------------------------------------------------------------


def _utc(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, the request id while a
    request is served, an access line's fields, and a traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            line["request_id"] = request_id
        line.update(getattr(record, "access", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


# What would break a text line in two (a path with %0A in it) is written as an escape.
LINE_BREAKERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(text: str) -> str:
    return LINE_BREAKERS.sub(lambda found: f"\\x{ord(found[0]):02x}", text)


class TextFormatter(logging.Formatter):
    """A readable line for development, with the request id in brackets; control characters
    of the message escaped, so that no request can forge a line (JSON escapes them itself)."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = REQUEST_ID.get()
        message = _one_line(record.getMessage())
        text = f"{_utc(record.created)} {record.levelname} {record.name}: {message}"
        if request_id is not None:
            text += f" [{request_id}]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def logging_config(level: str, log_format: str) -> dict[str, Any]:
    """Every logger, uvicorn's included, to STDERR in one format (as logging.config takes it,
    and as uvicorn applies it in each process it starts). uvicorn's own access line is off:
    the service writes one with the route, the duration and the request id."""
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"service": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "service",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "pets": {"level": level},
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
            "arq": {"level": level, "handlers": [], "propagate": True},
        },
    }


def configure_logging(level: str, log_format: str) -> None:
    logging.config.dictConfig(logging_config(level, log_format))


ACCESS = logging.getLogger("pets.access")


def log_access(fields: dict[str, Any]) -> None:
    """The access line of one request (JSON: as fields; text: on one line)."""
    ACCESS.info(
        "%s %s %s %s %.1f ms",
        fields["client"],
        fields["method"],
        fields["path"],
        fields["status"],
        fields["duration_ms"],
        extra={"access": fields},
    )
