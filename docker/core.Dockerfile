# syntax=docker/dockerfile:1.7
# The core image: pipeline components (KFP runs them with its own command) and the KServe
# predictor (`python -m predictor`, the default command). Built from the core lock file only:
#   docker build -f docker/core.Dockerfile -t ghcr.io/fraud-platform/fraud-core:<version> .
# Runs as a non-root user on a read-only root filesystem: HOME, TMPDIR and FRAUD_DATA_DIR point
# at /tmp, which the pod mounts as an emptyDir.
# Carries a Java runtime (Debian's default-jre-headless: OpenJDK 17 on bookworm) for Spark: the
# Spark feature engine, the Feast Spark profile and the SparkApplication's driver and executors
# run this image. JAVA_HOME is Debian's architecture-independent link to the default runtime; the
# JVM writes only below /tmp (java.io.tmpdir; user.home, which Java takes from the passwd entry:
# the fraud user's home is /tmp, as HOME) and the Spark local dir (spark.local.dir under
# FRAUD_DATA_DIR, or the spark-local-dir-* volume on Kubernetes).
# The entrypoint (docker/core-entrypoint.sh) turns the `driver` / `executor` arguments Spark on
# Kubernetes starts its pods with into spark-submit / the executor JVM (SPARK_HOME: the Spark of
# the environment's pyspark) and runs any other command as given.

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
# dependencies first (cached until the lock file changes), then the project itself
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY fraud ./fraud
COPY components ./components
COPY pipelines ./pipelines
COPY predictor ./predictor
COPY feature_repo ./feature_repo
RUN uv sync --frozen --no-dev

FROM ${PYTHON_IMAGE} AS runtime
ENV JAVA_HOME=/usr/lib/jvm/default-java
# update-alternatives links java's man page into /usr/share/man/man1, which the slim base lacks
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends default-jre-headless \
 && rm -rf /var/lib/apt/lists/* \
 && "$JAVA_HOME/bin/java" -version
RUN groupadd --gid 10001 fraud \
 && useradd --uid 10001 --gid fraud --no-create-home --home-dir /tmp --shell /usr/sbin/nologin fraud
COPY --from=build --chown=root:root /app /app
ENV PATH=/app/.venv/bin:$PATH \
    VIRTUAL_ENV=/app/.venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    FRAUD_DATA_DIR=/tmp/fraud-data \
    MPLCONFIGDIR=/tmp/matplotlib \
    SPARK_HOME=/app/.venv/lib/python3.11/site-packages/pyspark
COPY --chmod=0755 docker/core-entrypoint.sh /usr/local/bin/fraud-entrypoint
RUN test -x "$SPARK_HOME/bin/spark-submit" && test -d "$SPARK_HOME/jars"
WORKDIR /app
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/v2/health/live', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["/usr/local/bin/fraud-entrypoint"]
CMD ["python", "-m", "predictor", "--model_name", "fraud-detector", "--http_port", "8080", "--bundle", "/mnt/models"]
