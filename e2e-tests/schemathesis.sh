#!/usr/bin/env bash
# Fuzz the live HTTP API against its description, docs/openapi.yaml, with schemathesis.
#
#   e2e-tests/schemathesis.sh [schemathesis run options]     e.g. --seed 1 or -n 10
#
# Starts one mmgun frontend (twistd, --role frontend: nothing is delivered) on a free
# loopback port with a fresh database in a temporary folder, polls GET / until it answers
# (never a fixed sleep), creates a client and an API key with the admin command, and runs
# schemathesis against every operation with that key as a bearer token. Checks: all of
# schemathesis's -- no 5xx; status codes, content types, headers and bodies as documented;
# schema-invalid requests refused; undocumented methods 405 with the right Allow header;
# requests without credentials refused -- but positive_data_acceptance: a schema-valid
# body may carry the deprecated client_id, which is a 400 beside an Authorization header
# (the one rule between a header and the body that OpenAPI cannot state).
# Bounded: at most EXAMPLES test cases per operation and phase (schemathesis 4 runs
# Hypothesis without a deadline), and the whole run is killed after RUN_SECONDS.
#
# --max-auth-failures is raised: schemathesis sends requests without credentials to every
# operation from one address, more than the default allows before answering 429.
# The frontend is stopped by PID (SIGTERM, then SIGKILL) however this script ends. The
# exit status is schemathesis's (1 when the set-up failed). On failure the daemon log and
# schemathesis's JUnit report are left in e2e-tests/out/schemathesis/.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
PY=$ROOT/.venv/bin/python
TWISTD=$ROOT/.venv/bin/twistd
OUT=$HERE/out/schemathesis
EXAMPLES=${EXAMPLES:-50}
RUN_SECONDS=${RUN_SECONDS:-120}
READY_SECONDS=30
STOP_SECONDS=10
# The deprecated client id of the spec's examples: requests without a key use it.
LEGACY_CLIENT=demo-client-0123456789abcdef

# Test the checkout, not whatever copy of mmgun was last installed into .venv.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

log() { printf 'schemathesis.sh: %s\n' "$*" >&2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/mmgun-schemathesis.XXXXXX")
PID=

stop() {
    local deadline=$((SECONDS + STOP_SECONDS))
    kill -TERM "$PID" 2>/dev/null || true
    while kill -0 "$PID" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "mmgun (pid $PID) did not stop after SIGTERM; sending SIGKILL"
            kill -KILL "$PID" 2>/dev/null || true
            break
        fi
        # Reaps it as soon as it exits; the timeout only paces the check.
        wait "$PID" 2>/dev/null || true
    done
    wait "$PID" 2>/dev/null || true
    PID=
}

finish() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "$PID" ]; then stop; fi
    if [ "$status" -ne 0 ]; then
        mkdir -p "$OUT"
        cp -r "$TMP/mmgun.log" "$TMP/report" "$OUT/" 2>/dev/null || true
        log "FAILED (status $status); the daemon log and the report are in $OUT"
    fi
    rm -rf "$TMP"
    exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rm -rf "$OUT"
cd "$ROOT"
printf '# schemathesis run\n%s\n' "$LEGACY_CLIENT" >"$TMP/clients"

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_ready URL: poll until URL answers 200 (0), the daemon exits (1) or READY_SECONDS pass (2).
wait_ready() {
    "$PY" - "$1" "$PID" "$READY_SECONDS" <<'EOF'
import os, sys, time, urllib.request
url, pid, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    try:
        os.kill(pid, 0)
        # A zombie has exited, too.
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                sys.exit(1)
    except (ProcessLookupError, FileNotFoundError):
        sys.exit(1)
    time.sleep(0.05)
sys.exit(2)
EOF
}

# A port picked at random can be taken by the time it is bound: try three times.
for attempt in 1 2 3; do
    PORT=$(free_port)
    # --workers 1: one process, whose /metrics (read below) counts every accepted submission.
    "$TWISTD" --pidfile= -n mmgun --role frontend --workers 1 --listen "tcp:$PORT:interface=127.0.0.1" \
        --database "$TMP/mmgun.sqlite3" --clients "$TMP/clients" --helo mmgun.test --max-auth-failures 100000 \
        >>"$TMP/mmgun.log" 2>&1 &
    PID=$!
    status=0
    wait_ready "http://127.0.0.1:$PORT/" || status=$?
    case $status in
    0) break ;;
    1) log "mmgun exited during start-up:"; tail -n 5 "$TMP/mmgun.log" >&2; wait "$PID" 2>/dev/null || true; PID= ;;
    *) log "mmgun not ready after ${READY_SECONDS}s"; exit 1 ;;
    esac
    [ "$attempt" -lt 3 ] || exit 1
done
URL=http://127.0.0.1:$PORT

MMGUN=("$PY" -c 'import sys; from mmgun.admin import main; sys.exit(main())')
"${MMGUN[@]}" clients add schemathesis --database "$TMP/mmgun.sqlite3" >/dev/null
KEY=$("${MMGUN[@]}" keys create schemathesis --database "$TMP/mmgun.sqlite3" | sed -n 's/^key: *//p')
[ -n "$KEY" ] || { log "could not create an API key"; exit 1; }
log "mmgun frontend (pid $PID) at $URL; running schemathesis"

# From the temporary folder: schemathesis keeps a cache of failures (.schemathesis/) in
# the working directory.
cd "$TMP"
status=0
timeout --kill-after=5 "$RUN_SECONDS" "$ROOT/.venv/bin/schemathesis" run "$ROOT/docs/openapi.yaml" \
    --url "$URL" \
    --header "Authorization: Bearer $KEY" \
    --generation-with-security-parameters false \
    --checks all --exclude-checks positive_data_acceptance \
    --max-examples "$EXAMPLES" \
    --generation-database none \
    --request-timeout 10 \
    --report junit --report-dir "$TMP/report" \
    --no-color \
    "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    log "schemathesis did not finish within ${RUN_SECONDS}s"
fi
[ "$status" -eq 0 ] || exit "$status"

# Not vacuous: with a broken key every request would be a (documented) 401.
ACCEPTED=$("$PY" - "$URL/metrics" <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
    text = response.read().decode()
total = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("mmgun_submissions_accepted_total "))
print(int(total))
EOF
)
if [ "$ACCEPTED" -lt 1 ]; then
    log "schemathesis passed, but no submission was accepted: were the requests authenticated?"
    exit 1
fi
log "passed; mmgun accepted $ACCEPTED submissions"
