#!/usr/bin/env bash
# Run a command against a throwaway PostgreSQL cluster (Debian's postgresql):
# data in a temporary folder, listening on 127.0.0.1 only, removed on exit.
#
#   scripts/postgres.sh COMMAND [ARGS...]
#
# COMMAND sees PREFECT_API_DATABASE_CONNECTION_URL (what a Prefect server
# reads) and TAKEOFF_CACHE_TEST_DATABASE_URL (what tests/test_prefect_server.py
# reads), both postgresql+asyncpg://prefect@127.0.0.1:PORT/prefect.
# Authentication is "trust": only for a cluster that lives as long as one
# command on a loopback port. As root, the cluster runs as user postgres
# (initdb refuses root); postgresql is installed with apt-get if missing.
set -euo pipefail

if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "postgres: PostgreSQL is not installed; run: sudo apt-get install -y postgresql" >&2
        exit 2
    fi
    apt-get install -y postgresql >&2
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)

DIR=$(mktemp -d "${TMPDIR:-/tmp}/takeoff-cache-pg.XXXXXX")
AS=()
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$DIR"
    AS=(runuser -u postgres --)
fi
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

stop() {
    "${AS[@]}" "$PGBIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap stop EXIT

"${AS[@]}" "$PGBIN/initdb" -D "$DIR/data" -U prefect --auth=trust -E UTF8 >/dev/null
"${AS[@]}" "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR" start >/dev/null
"${AS[@]}" "$PGBIN/createdb" -h 127.0.0.1 -p "$PORT" -U prefect prefect

export PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://prefect@127.0.0.1:$PORT/prefect"
export TAKEOFF_CACHE_TEST_DATABASE_URL="$PREFECT_API_DATABASE_CONNECTION_URL"
echo "postgres: $("$PGBIN/postgres" --version) on 127.0.0.1:$PORT" >&2
"$@"
