#!/usr/bin/env bash
# A local Prefect server for takeoff-cache: server (on 127.0.0.1), the process
# work pool, the deployments of deployments/prefect.yaml and one worker.
# Ctrl-C stops the worker and the server. See docs/operations.md.
#
#   scripts/server.sh                  SQLite in $PREFECT_HOME (default ./.prefect)
#   PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://... scripts/server.sh
#
# Environment: PREFECT_SERVER_API_HOST (127.0.0.1; another address serves
# companion computers, see docs), PREFECT_SERVER_API_PORT (4200),
# POOL (takeoff-cache), VENV (.venv).
set -euo pipefail
# Job control: background jobs keep SIGINT (a non-interactive shell would
# ignore it for them, and Prefect's worker stops on SIGINT).
set -m
cd "$(dirname "$0")/.."

BIN="${VENV:-.venv}/bin"
HOST="${PREFECT_SERVER_API_HOST:-127.0.0.1}"
PORT="${PREFECT_SERVER_API_PORT:-4200}"
CLIENT_HOST="$HOST"
[ "$HOST" != 0.0.0.0 ] || CLIENT_HOST=127.0.0.1
POOL="${POOL:-takeoff-cache}"
# shellcheck source=scripts/offline.env
set -a; . scripts/offline.env; set +a
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_API_URL="http://$CLIENT_HOST:$PORT/api"
# With basic auth on the server, this script's own clients (deploy, worker) log in too.
if [ -n "${PREFECT_SERVER_API_AUTH_STRING:-}" ]; then
    export PREFECT_API_AUTH_STRING="${PREFECT_API_AUTH_STRING:-$PREFECT_SERVER_API_AUTH_STRING}"
fi
mkdir -p "$PREFECT_HOME"

pids=()
stop() {
    # Worker first, so it does not log connection errors while the server goes.
    # Each job is its own process group (set -m): the worker's group holds the
    # flow-run processes it started, which stop with it (builds are crash-safe).
    # A worker that ignores SIGINT (started from a shell that ignores it) turns
    # SIGTERM into a SIGINT it never sees: give it 15 s, then SIGKILL.
    local pid
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid=${pids[i]}
        kill -TERM -- "-$pid" 2>/dev/null || continue
        for _ in $(seq 1 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap stop EXIT
trap 'exit 130' INT TERM

"$BIN/prefect" server start --host "$HOST" --port "$PORT" &
pids+=($!)

healthy() {
    "$BIN/python" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "$PREFECT_API_URL/health" 2>/dev/null
}
for _ in $(seq 1 240); do
    healthy && break
    kill -0 "${pids[0]}" 2>/dev/null || { echo "server: prefect server exited" >&2; exit 1; }
    sleep 0.5
done
healthy || { echo "server: no answer from $PREFECT_API_URL after 120 s" >&2; exit 1; }

"$BIN/python" scripts/deploy.py --pool "$POOL"
# The deployments' example parameters are the demo request in .demo/.
[ -f .demo/request.toml ] || "$BIN/takeoff-cache" demo-data .demo
BUILD=build-cache
[ "$POOL" = takeoff-cache ] || BUILD="build-cache-$POOL"

"$BIN/prefect" worker start --pool "$POOL" --install-policy never &
pids+=($!)

cat <<EOF

takeoff-cache on Prefect:
  UI:      http://$CLIENT_HOST:$PORT
  API:     $PREFECT_API_URL      (export PREFECT_API_URL=$PREFECT_API_URL)
  pool:    $POOL (one process worker running)
  run:     prefect deployment run 'build-cache/$BUILD' --param cache_root=... (see docs)
Ctrl-C stops the worker and the server.

EOF
wait "${pids[0]}"
