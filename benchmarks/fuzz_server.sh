#!/usr/bin/env bash
# Fuzz every route of `qwenkit serve` with schemathesis against its /openapi.json, every
# check on: no 5xx, and every answer (status, content type, headers, body) as the document
# says; schema-valid requests accepted, schema-invalid ones refused.
#
#   benchmarks/fuzz_server.sh                         # starts a server on a tiny random Qwen3 (loopback)
#   benchmarks/fuzz_server.sh http://127.0.0.1:8000   # fuzzes a server that already runs
#
# Needs `pip install -e '.[fuzz]'` (schemathesis, pinned). MAX_EXAMPLES (default 50 per
# operation) and MAX_TIME (default 300 s for the whole run) bound it; the server is
# stopped at the end. Results so far: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
ST="${SCHEMATHESIS:-schemathesis}"
MAX_EXAMPLES="${MAX_EXAMPLES:-50}"
MAX_TIME="${MAX_TIME:-300}"
SERVER_PID=""
TMP="$(mktemp -d -t qwenkit-fuzz-XXXXXX)"

cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        for _ in $(seq 1 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$SERVER_PID" 2>/dev/null && { echo "server ignored SIGTERM; killing" >&2; kill -KILL "$SERVER_PID"; }
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

if [[ $# -ge 1 ]]; then
    URL="$1"
else
    PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    URL="http://127.0.0.1:$PORT"
    PYTHONPATH="tests:." "$PY" -c "
import sys, pathlib
from tiny import make_checkpoint
make_checkpoint(pathlib.Path(sys.argv[1]), 'qwen3', max_len=2048)" "$TMP/tiny-qwen3" >/dev/null 2>&1
    # A 256-token context keeps fuzzed requests without max_tokens (generate until the context
    # is full) short. No --request-timeout: its 504 is a (deliberate) 5xx that the check would flag.
    PYTHONPATH=. "$PY" -m qwenkit serve --model "$TMP/tiny-qwen3" --host 127.0.0.1 --port "$PORT" \
        --dtype float32 --max-model-len 256 --drain-timeout 5 --chat-db "$TMP/conversations.sqlite3" \
        >"$TMP/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 600); do
        curl -fsS "$URL/health" >/dev/null 2>&1 && break
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited:"; cat "$TMP/server.log"; exit 1; }
        sleep 0.5
    done
fi

set +e
# A generation may run a few seconds on a busy CPU: the response-time check is not the point here.
"$ST" run "$URL/openapi.json" \
    --checks all \
    --max-response-time 120 \
    --max-examples "$MAX_EXAMPLES" \
    --max-time "$MAX_TIME" \
    --request-timeout 90 \
    --seed "${SEED:-0}" \
    --workers 1
STATUS=$?
set -e
if [[ $STATUS -ne 0 && -f "$TMP/server.log" ]]; then
    echo "--- server log (tail) ---"; tail -n 60 "$TMP/server.log"
fi
exit $STATUS
