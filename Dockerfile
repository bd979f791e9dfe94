# One image for the API, the worker and the one-off migration: the command picks the role.

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /app --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY main.py deps.py problems.py openapi.py request_checks.py observability.py logs.py server.py \
     middleware.py turns.py backoff.py \
     models.py name_rule.py crud.py metrics.py metrics_sql.py cube.py db.py auth.py errors.py \
     settings.py worker.py cli.py metrics_data.py alembic.ini ./
COPY alembic ./alembic
COPY templates ./templates
USER 10001:10001
EXPOSE 8000
# The API's check; compose gives the worker its own (arq --check) and the migration none.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
CMD ["python", "server.py", "--host", "0.0.0.0", "--port", "8000"]
