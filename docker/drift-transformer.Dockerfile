# syntax=docker/dockerfile:1.7
# The drift transformer image (`python -m drift_transformer`): its own lock file and Python
# environment (kserve 0.20 + Alibi Detect); nothing of the core project is installed.
#   docker build -f docker/drift-transformer.Dockerfile -t ghcr.io/fraud-platform/fraud-drift-transformer:<version> .
# Non-root, read-only-root-filesystem compatible (HOME/TMPDIR on the /tmp emptyDir).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG UV_VERSION=0.13.9

FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
WORKDIR /app
COPY drift_transformer/pyproject.toml drift_transformer/uv.lock drift_transformer/README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY drift_transformer/drift_transformer ./drift_transformer
RUN uv sync --frozen --no-dev

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --gid 10001 fraud \
 && useradd --uid 10001 --gid fraud --no-create-home --home-dir /tmp --shell /usr/sbin/nologin fraud
COPY --from=build --chown=root:root /app /app
ENV PATH=/app/.venv/bin:$PATH \
    VIRTUAL_ENV=/app/.venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    NUMBA_CACHE_DIR=/tmp/numba \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /app
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/v2/health/live', timeout=2).status == 200 else 1)"]
CMD ["python", "-m", "drift_transformer", "--model_name", "fraud-detector", "--http_port", "8080", "--bundle", "/mnt/models"]
