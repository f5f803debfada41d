# pgsage: the proxy, its HTTP API and the learned parts (config/docker-compose.yml builds it).
#   docker build -t pgsage .
#   docker run --rm -p 6432:6432 -p 9930:9930 -e PGSAGE_UPSTREAM=db:5432 pgsage
FROM python:3.11-slim-bookworm

# libpq for psycopg in the tools, postgresql-client for psql against the admin console
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpq5 postgresql-client libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY optimizer ./optimizer
COPY models ./models
COPY warehouse_sql ./warehouse_sql
COPY bench ./bench
COPY config ./config
RUN pip install --no-cache-dir . \
 && useradd --system --home /var/lib/pgsage --create-home pgsage

USER pgsage
ENV PGSAGE_LISTEN=0.0.0.0:6432 \
    PGSAGE_HTTP=0.0.0.0:9930 \
    PGSAGE_MODEL_DIR=/var/lib/pgsage/models
EXPOSE 6432 9930
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9930/healthz')"
CMD ["pgsage", "serve"]
