# One image for the API, the migrations and the GPU worker (the command differs per service).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CMIM_ARTIFACT_URL=file:///data/artifacts \
    CMIM_WORK_DIR=/data/work \
    CMIM_CACHE_DIR=/data/cache

WORKDIR /srv/cmim
COPY pyproject.toml README.md alembic.ini ./
COPY ml ml
COPY app app
COPY worker worker
COPY migrations migrations
RUN pip install ".[service]"

RUN useradd --system --uid 10001 --home /srv/cmim cmim && mkdir -p /data && chown cmim /data
USER cmim
VOLUME ["/data"]
EXPOSE 8000

# Embedded mode by default (SQLite + local worker); docker-compose.yml runs the deployed split.
CMD ["cmim", "serve", "--host", "0.0.0.0", "--port", "8000"]
