# vlmrun-artifact-cache: a shared cache container.
#   docker build -t vlmrun-artifact-cache .
#   docker run -d -p 127.0.0.1:8080:8080 -v vlmrun-cache:/cache vlmrun-artifact-cache
#
# The base image is pinned by exact tag. For a release build, set BASE_IMAGE to the same tag
# with its digest:
#   docker build --build-arg BASE_IMAGE=python:3.11.17-slim-bookworm@sha256:<digest> .
ARG BASE_IMAGE=python:3.11.17-slim-bookworm
FROM ${BASE_IMAGE}

# The image's own settings (0.0.0.0:8080, cache in /cache) are in a base file that a --config
# file, VLMRUN_CACHE_<KEY> variables and flags all outrank; no setting is fixed here.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLMRUN_CACHE__BASE_CONFIG=/etc/vlmrun-cache/config.toml

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin cache \
 && mkdir /cache && chown cache:cache /cache && chmod 0700 /cache

# Dependencies in a layer of their own, before any source: a code change does not download
# them again. The lock pins each one, and the build backend, by version and hash (make lock).
COPY requirements.lock /tmp/requirements.lock
RUN pip install --require-hashes -r /tmp/requirements.lock && rm /tmp/requirements.lock

# The project itself, with nothing left to resolve or download.
COPY config.container.toml /etc/vlmrun-cache/config.toml
COPY pyproject.toml README.md LICENSE /src/
COPY proxy /src/proxy
RUN pip install --no-deps --no-build-isolation /src && rm -rf /src

VOLUME ["/cache"]
USER cache
EXPOSE 8080
# `healthcheck` dials the address that serve recorded in the cache directory (serve.json), so it
# follows a port set by flag, --config file or environment; it waits 2 s per connect and read.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["vlmrun-cache", "healthcheck"]
ENTRYPOINT ["vlmrun-cache", "serve"]
