#!/usr/bin/env bash
# First start: a cluster owned by POSTGRES_USER (password POSTGRES_PASSWORD, required over
# the network) with the database POSTGRES_DB; then the server on every interface.
set -euo pipefail
bin=$(echo /usr/lib/postgresql/*/bin)
: "${POSTGRES_USER:?set POSTGRES_USER}" "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
db=${POSTGRES_DB:-$POSTGRES_USER}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  "$bin/initdb" -D "$PGDATA" -U "$POSTGRES_USER" -E UTF8 --locale=C.UTF-8 --auth-local=trust \
    --auth-host=scram-sha-256 \
    --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") >/dev/null
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  echo "CREATE DATABASE \"$db\"" | "$bin/postgres" --single -D "$PGDATA" postgres >/dev/null
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*'
