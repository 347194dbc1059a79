# vlmrun-artifact-cache: a shared cache container.
#   docker build -t vlmrun-artifact-cache .
#   docker run -p 8080:8080 -v vlmrun-cache:/cache vlmrun-artifact-cache
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VLMRUN_CACHE_HOST=0.0.0.0 \
    VLMRUN_CACHE_PORT=8080 \
    VLMRUN_CACHE_CACHE_DIR=/cache
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin cache \
 && mkdir /cache && chown cache:cache /cache && chmod 0700 /cache
VOLUME ["/cache"]
USER cache
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VLMRUN_CACHE_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["vlmrun-cache", "serve"]
