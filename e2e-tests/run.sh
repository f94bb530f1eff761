#!/usr/bin/env bash
# The end-to-end suite (`make e2e`): real processes on loopback, driven over HTTP.
#
#   e2e-tests/run.sh [pytest options]     e.g. e2e-tests/run.sh -k status -x
#
# Starts these, all on loopback, polling each until it is ready (never a fixed sleep):
#   - dnsstub.py serving zone.txt on 127.0.0.1 (port 0, read back from its port file);
#   - two smtpstub.py processes on one port: 127.0.0.2 (STARTTLS offered) picks the port,
#     127.0.0.3 (clear text) reuses it; each writes what it accepts to its own maildir;
#   - mmgun as four twistd processes on one SQLite file: --role frontend on a free port
#     (ready when GET / answers 200), then --role sender, --role cleaner and --role webhooks,
#     with short retry, lease and poll times, and --webhook-allow-private (the tests' webhook
#     receivers are on loopback);
# then runs e2e-test.py in a pytest session of its own, with pytest-twisted (150 s at most).
# The tests find everything through E2E_* environment variables (see e2e-test.py); they
# start and kill more senders themselves, with the command line run.sh leaves in
# $STATE/sender.argv; the webhooks process, which a test kills, they restart with
# $STATE/webhooks.argv.
#
# Everything this script starts is stopped by PID (SIGTERM, then SIGKILL after 15 s) when it
# exits, fails or is interrupted; so are processes the tests started and listed in
# $STATE/test-pids. The exit status is pytest's (or 1 when the set-up failed).
#
# All output lives in e2e-tests/out/: logs/ (one file per process) and state/ (database,
# clients file, port files, maildirs). Each run starts by clearing it (cleanup.sh) and leaves
# the latest run's files there, pass or fail, to be read after a failure.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
PY=$ROOT/.venv/bin/python
TWISTD=$ROOT/.venv/bin/twistd
OUT=$HERE/out
LOGS=$OUT/logs
STATE=$OUT/state
READY_SECONDS=30   # for each process to get ready
STOP_SECONDS=15    # for the processes to stop after SIGTERM
PYTEST_SECONDS=150 # for the whole pytest session (a normal run takes 10 to 30 s)

PIDS=()  # started here, in order; stopped in reverse order

log() { printf 'e2e: %s\n' "$*" >&2; }

# stop PID...: SIGTERM to all, wait until they are gone (SIGKILL to those left after
# STOP_SECONDS), reap those that are our children.
stop() {
    local pid deadline=$((SECONDS + STOP_SECONDS))
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        while kill -0 "$pid" 2>/dev/null && [ "$(proc_state "$pid")" != Z ]; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                log "process $pid did not stop after SIGTERM; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.05
        done
        wait "$pid" 2>/dev/null || true
    done
}

proc_state() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    printf '%s' "${stat%% *}"
}

# Processes the tests started and did not stop themselves (a failed or interrupted test):
# one PID per line; only processes still running one of our programs are touched.
test_pids() {
    local pid
    [ -f "$STATE/test-pids" ] || return 0
    while read -r pid; do
        [ -n "$pid" ] || continue
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -e twistd -e stub.py; then
            printf '%s\n' "$pid"
        fi
    done <"$STATE/test-pids"
}

finish() {
    local status=$? pids=() i
    trap - EXIT
    trap '' INT TERM
    # pytest first: until it is gone it may start more processes.
    if [ -n "${PYTEST:-}" ]; then stop "$PYTEST"; fi
    mapfile -t pids < <(test_pids)
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do pids+=("${PIDS[i]}"); done
    if [ "${#pids[@]}" -gt 0 ]; then stop "${pids[@]}"; fi
    if [ "$status" -ne 0 ]; then
        log "FAILED (status $status); logs and state of this run are in $OUT"
    fi
    exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME COMMAND...: run COMMAND in the background with its output in $LOGS/NAME.log.
start() {
    local name=$1
    shift
    "$@" >>"$LOGS/$name.log" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
}

# forget PID: a process that exited during start-up (it is retried).
forget() {
    local kept=() pid
    for pid in "${PIDS[@]}"; do [ "$pid" = "$1" ] || kept+=("$pid"); done
    PIDS=("${kept[@]}")
    wait "$1" 2>/dev/null || true
}

# ready NAME PID KIND TARGET: poll until ready; 0 ready, 1 exited (try again); gives up on timeout.
ready() {
    local name=$1 pid=$2 status=0
    READY=$("$PY" "$HERE/waitfor.py" "$3" "$4" "$pid" "$READY_SECONDS") || status=$?
    case $status in
    0) return 0 ;;
    1) log "$name exited during start-up:"; tail -n 5 "$LOGS/$name.log" >&2; forget "$pid"; return 1 ;;
    *) log "$name not ready after ${READY_SECONDS}s:"; tail -n 20 "$LOGS/$name.log" >&2; exit 1 ;;
    esac
}

# One run at a time in a checkout: they would share out/. The lock (on this script) is held
# by every process of the run, through the inherited descriptor.
exec 9<"$HERE/run.sh"
if ! flock -n 9; then
    log "another run.sh is running in this checkout; waiting up to 300 s for it to finish"
    flock -w 300 9 || { log "gave up waiting for the other run"; exit 1; }
fi

"$HERE/cleanup.sh"
mkdir -p "$LOGS" "$STATE"
cd "$ROOT"

CLIENT=e2e-client-$("$PY" -c 'import secrets; print(secrets.token_hex(8))')
OTHER_CLIENT=e2e-other-client-$("$PY" -c 'import secrets; print(secrets.token_hex(8))')
# The webhook test's own client: its webhook receives no other test's events.
WEBHOOK_CLIENT=e2e-webhook-client-$("$PY" -c 'import secrets; print(secrets.token_hex(8))')
printf '# e2e clients\n%s\n%s\n%s\n' "$CLIENT" "$OTHER_CLIENT" "$WEBHOOK_CLIENT" >"$STATE/clients"

# mmgun's options, but for the ports that are only known later (see sender below).
MMGUN=("$TWISTD" -n --pidfile= mmgun
    --database "$STATE/mmgun.sqlite3" --clients "$STATE/clients" --helo mmgun.test
    --poll-interval 0.1 --retry-min 1s --retry-max 2s --lease-time 3s --smtp-timeout 10s
    --shutdown-timeout 2s --clean-interval 1s --allow-private-mx --webhook-allow-private)

start_dns() {
    start dnsstub "$PY" "$HERE/dnsstub.py" --listen 127.0.0.1:0 --zone "$HERE/zone.txt" \
        --port-file "$STATE/dns.port"
    DNS=$STARTED
}

# --slow-seconds: slowdata@ recipients are accepted 50 ms after their data, which paces the
# kill -9 test's batch. 127.0.0.2 offers STARTTLS, 127.0.0.3 does not.
start_smtp_a() {
    start smtp-127.0.0.2 "$PY" "$HERE/smtpstub.py" --listen 127.0.0.2:0 --tls --slow-seconds 0.05 \
        --hostname mx.alpha.test --maildir "$STATE/mail-127.0.0.2" --port-file "$STATE/smtp.port"
    SMTP_A=$STARTED
}

start_smtp_b() {
    start smtp-127.0.0.3 "$PY" "$HERE/smtpstub.py" --listen "127.0.0.3:$1" --no-tls \
        --slow-seconds 0.05 --hostname mx.beta.test --maildir "$STATE/mail-127.0.0.3" \
        --port-file "$STATE/smtp-b.port"
    SMTP_B=$STARTED
}

# The frontend creates the database before the sender and the cleaner open it.
start_frontend() {
    HTTP_PORT=$("$PY" "$HERE/waitfor.py" free-port)
    start frontend "${MMGUN[@]}" --role frontend --listen "tcp:$HTTP_PORT:interface=127.0.0.1"
    FRONTEND=$STARTED
}

# Whatever does not depend on another process starts at once; then each is polled until it
# is ready. A port picked at random may be taken by the time it is bound: a process that
# exits during start-up is started again, up to 3 times.
start_dns
start_smtp_a
start_frontend

for attempt in 1 2 3; do
    [ "$attempt" = 1 ] || start_dns
    ready dnsstub "$DNS" port-file "$STATE/dns.port" && break
    [ "$attempt" -lt 3 ] || exit 1
done
DNS_PORT=$READY

for attempt in 1 2 3; do
    [ "$attempt" = 1 ] || start_smtp_a
    if ready smtp-127.0.0.2 "$SMTP_A" port-file "$STATE/smtp.port"; then
        SMTP_PORT=$READY
        start_smtp_b "$SMTP_PORT"
        ready smtp-127.0.0.3 "$SMTP_B" port-file "$STATE/smtp-b.port" && break
        stop "$SMTP_A"
        forget "$SMTP_A"
        rm -f "$STATE/smtp.port"
    fi
    [ "$attempt" -lt 3 ] || exit 1
done

for attempt in 1 2 3; do
    [ "$attempt" = 1 ] || start_frontend
    ready frontend "$FRONTEND" http "http://127.0.0.1:$HTTP_PORT/" && break
    [ "$attempt" -lt 3 ] || exit 1
done

MMGUN+=(--nameserver "127.0.0.1:$DNS_PORT" --smtp-port "$SMTP_PORT")
SENDER=("${MMGUN[@]}" --role sender)
start sender "${SENDER[@]}"
printf '%s\n' "$STARTED" >"$STATE/sender.pid"
# The tests start more senders, and restart this one, with exactly this command line.
printf '%s\0' "${SENDER[@]}" >"$STATE/sender.argv"
start cleaner "${MMGUN[@]}" --role cleaner
# The webhooks role in a process of its own, as an operator may run it: a test kills -9 exactly
# the process POSTing webhooks (not the frontend it talks to, nor the sender other tests stop)
# and restarts it with this command line.
WEBHOOKS=("${MMGUN[@]}" --role webhooks)
start webhooks "${WEBHOOKS[@]}"
printf '%s\n' "$STARTED" >"$STATE/webhooks.pid"
printf '%s\0' "${WEBHOOKS[@]}" >"$STATE/webhooks.argv"
log "ready: DNS 127.0.0.1:$DNS_PORT, SMTP 127.0.0.2-3:$SMTP_PORT, HTTP 127.0.0.1:$HTTP_PORT"

export E2E_URL="http://127.0.0.1:$HTTP_PORT"
export E2E_CLIENT=$CLIENT
export E2E_OTHER_CLIENT=$OTHER_CLIENT
export E2E_WEBHOOK_CLIENT=$WEBHOOK_CLIENT
export E2E_MAILDIR_A=$STATE/mail-127.0.0.2
export E2E_MAILDIR_B=$STATE/mail-127.0.0.3
export E2E_SENDER_PIDFILE=$STATE/sender.pid
export E2E_SENDER_ARGV=$STATE/sender.argv
export E2E_WEBHOOKS_PIDFILE=$STATE/webhooks.pid
export E2E_WEBHOOKS_ARGV=$STATE/webhooks.argv
export E2E_STATE=$STATE
export E2E_TEST_PIDS=$STATE/test-pids
export E2E_LOGS=$LOGS

# Only the plugin the suite needs: others in the venv (hypothesis, ...) take seconds to load.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
# In the background, so that a signal to this script is handled at once (bash runs a trap
# only when its foreground command has finished; `wait` it interrupts).
timeout -k 10 "$PYTEST_SECONDS" \
    "$PY" -m pytest -p twisted -p no:cacheprovider -q -rxX "$HERE/e2e-test.py" "$@" &
PYTEST=$!
status=0
wait "$PYTEST" || status=$?
PYTEST=
if [ "$status" -eq 124 ]; then log "pytest did not finish within ${PYTEST_SECONDS}s"; fi
exit "$status"
