# PostgreSQL for docker/compose.yaml where the `postgres` image cannot be pulled (no
# registry: `make docker-test`): Debian's package on the same base as the cogpipe images,
# started as the official image is (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB; data in
# /var/lib/postgresql/data).
#
#   docker build -f docker/postgres.Dockerfile --build-arg BASE=cogpipe-base -t cogpipe-postgres .
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update && apt-get install -y --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o postgres -g postgres /var/lib/postgresql/data /var/run/postgresql
COPY docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PGDATA=/var/lib/postgresql/data
LABEL org.opencontainers.image.title=cogpipe
USER postgres
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
