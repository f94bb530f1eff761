#!/usr/bin/env bash
# Several hosts, for real (issue 15, `make netns`): two mmgun hosts sharing one PostgreSQL,
# each in its own Linux network namespace, killed, cut off the database and left without it
# while a load generator submits mail to both.
#
#   e2e-tests/netns/run.sh [pytest options]      e.g. e2e-tests/netns/run.sh -k restart -x
#   e2e-tests/netns/run.sh --exec SECONDS COMMAND...
#       the same topology and clean-up, COMMAND (argv) run in lg instead of pytest, for at
#       most SECONDS: how bench/netns.py (make bench, two hosts) reuses this harness. With
#       NETNS_OUT set, output goes there instead of out/, and the lock is taken on its parent
#       folder (so a bench neither clears nor waits for the suite's out/).
#
# Needs root (ip netns) and PostgreSQL's server binaries (/usr/lib/postgresql/*/bin); without
# either it fails with one line (never a skip).
#
# The topology, all of it made here and removed on every exit (pass, failure, Ctrl-C, TERM):
#
#   namespace   interfaces (each one end of a veth pair; the other end is a bridge port)
#   ---------   --------------------------------------------------------------------------
#   NET         the two bridges, "front" and "back", and the bridge end of every veth pair;
#               no address, no process: a switch, out of the root namespace
#   db          back  198.51.100.1   PostgreSQL 15 (trust for 198.51.100.0/24), data in a temp dir
#   h1          back  198.51.100.11  front 203.0.113.11   mmgun: frontend + sender, HTTP :8080
#   h2          back  198.51.100.12  front 203.0.113.12   mmgun: frontend + sender, HTTP :8080
#   mx          front 203.0.113.25/.26 (SMTP stubs, :25) and 203.0.113.53/.54 (DNS stubs, :53)
#   lg          front 203.0.113.100  the pytest session: load generator and judge
#
# Two networks so that the database path of one host can be cut alone: the back network
# (TEST-NET-2) carries only PostgreSQL traffic, the front one (TEST-NET-3) HTTP, DNS and SMTP.
# `ip -n h1 link set back down` cuts h1 off the database while it still answers HTTP and
# still reaches its MX. Each host has a resolver and an MX of its own (h1: DNS .53 whose
# zone points at SMTP .25; h2: .54 and .26), one maildir per SMTP stub, so the maildir a
# message lands in tells which host delivered it.
#
# Namespace names are mmgun-<PID of this script>-<role>, so two runs cannot collide and a
# run killed with SIGKILL leaves names that the next run recognises as stale (their PID is
# gone) and removes, with the processes in them. Interfaces live only inside these
# namespaces, so their short names cannot collide with anything either.
#
# The mmgun hosts themselves are started by the tests (a fresh database and fresh hosts per
# scenario; see hosts.py), through `ip netns exec`, and their PIDs written to
# $STATE/test-pids. On exit every process this script or the tests started is stopped by
# PID (SIGTERM, then SIGKILL after 15 s), PostgreSQL with pg_ctl (then by the PID in
# postmaster.pid); then, to be sure, any process still inside one of this run's namespaces
# (all of them ours: the namespaces are private to this run) is killed by PID, and the
# namespaces are deleted.
#
# Output lives in e2e-tests/netns/out/ (cleared at the start of a run, kept after it):
# logs/ (one file per process, postgres.log copied at the end) and state/ (maildirs, zones,
# clients file).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
E2E=$(dirname "$HERE")
ROOT=$(dirname "$E2E")
PY=$ROOT/.venv/bin/python
EXEC_SECONDS=  # --exec: run a command instead of pytest, for at most this long
if [ "${1:-}" = --exec ]; then
    EXEC_SECONDS=${2:?usage: run.sh --exec SECONDS COMMAND...}
    shift 2
fi
OUT=${NETNS_OUT:-$HERE/out}
LOGS=$OUT/logs
STATE=$OUT/state
READY_SECONDS=30    # for each process to get ready
STOP_SECONDS=15     # for the processes to stop after SIGTERM
PYTEST_SECONDS=300  # for the whole pytest session (a normal run takes about a minute)
SLOW_SECONDS=0.05   # the SMTP stubs accept each slowdata@ message after this: paces the batches

log() { printf 'netns: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "FAILED: must run as root (it creates network namespaces with ip netns); try: sudo $0"
    exit 1
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/initdb" ]; then
    log "FAILED: PostgreSQL's server binaries are missing (/usr/lib/postgresql/*/bin); install them: apt-get install -y postgresql"
    exit 1
fi

ID=$$
PREFIX=mmgun-$ID
NS_NET=$PREFIX-net
NS_DB=$PREFIX-db
NS_MX=$PREFIX-mx
NS_H1=$PREFIX-h1
NS_H2=$PREFIX-h2
NS_LG=$PREFIX-lg
NAMESPACES=()  # made here, deleted on exit
PIDS=()        # started here (not PostgreSQL), stopped in reverse order
PGDIR=         # PostgreSQL's temp dir (data, socket, log), owned by postgres

# stop PID...: SIGTERM to all, wait until they are gone (SIGKILL after STOP_SECONDS), reap ours.
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

# Processes the tests started and did not stop (a failed or interrupted test): one PID per
# line in $STATE/test-pids; only those still running one of our programs are touched.
test_pids() {
    local pid
    [ -f "$STATE/test-pids" ] || return 0
    while read -r pid; do
        [ -n "$pid" ] || continue
        if { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -q -e twistd -e mmgun; then
            printf '%s\n' "$pid"
        fi
    done <"$STATE/test-pids"
}

# in_ns NS COMMAND...: run COMMAND in namespace NS.
in_ns() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

stop_postgres() {
    local pid
    [ -n "$PGDIR" ] && [ -f "$PGDIR/data/PG_VERSION" ] || return 0
    if [ -f "$PGDIR/data/postmaster.pid" ]; then
        in_ns "$NS_DB" runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDIR/data" -m fast -t "$STOP_SECONDS" \
            stop >/dev/null 2>&1 || true
    fi
    if [ -f "$PGDIR/data/postmaster.pid" ]; then
        pid=$(head -n 1 "$PGDIR/data/postmaster.pid")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            log "PostgreSQL ($pid) did not stop; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
}

# sweep NS: kill, by PID, whatever still runs in namespace NS (only this run's processes can).
sweep() {
    local pid pids
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    for pid in $pids; do
        log "process $pid ($({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | cut -c1-80)) still in $1; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    done
}

finish() {
    local status=$? pids=() i ns
    trap - EXIT
    trap '' INT TERM
    # pytest first: until it is gone it may start more processes.
    if [ -n "${PYTEST:-}" ]; then stop "$PYTEST"; fi
    mapfile -t pids < <(test_pids)
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do pids+=("${PIDS[i]}"); done
    if [ "${#pids[@]}" -gt 0 ]; then stop "${pids[@]}"; fi
    stop_postgres
    if [ -n "$PGDIR" ]; then
        cp "$PGDIR/postgres.log" "$LOGS/postgres.log" 2>/dev/null || true
        rm -rf "$PGDIR"
    fi
    for ns in "${NAMESPACES[@]}"; do sweep "$ns"; done
    for ns in "${NAMESPACES[@]}"; do ip netns delete "$ns" 2>/dev/null || log "could not delete namespace $ns"; done
    if [ "$status" -ne 0 ]; then
        log "FAILED (status $status); logs and state of this run are in $OUT"
    fi
    exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Namespaces of an earlier run that was killed too hard to clean up (its PID is gone).
remove_stale() {
    local ns pid
    for ns in $(ip netns list | awk '{print $1}' | grep -E '^mmgun-[0-9]+-(net|db|mx|h1|h2|lg)$' || true); do
        pid=${ns#mmgun-}
        pid=${pid%%-*}
        if [ "$pid" != "$ID" ] && ! kill -0 "$pid" 2>/dev/null; then
            log "removing namespace $ns, left by run $pid"
            sweep "$ns"
            ip netns delete "$ns" 2>/dev/null || true
        fi
    done
    for dir in /tmp/mmgun-netns-*-pg.*; do
        [ -d "$dir" ] || continue
        pid=${dir#/tmp/mmgun-netns-}
        pid=${pid%%-*}
        if [ "$pid" != "$ID" ] && ! kill -0 "$pid" 2>/dev/null; then
            log "removing $dir, left by run $pid"
            rm -rf "$dir"
        fi
    done
}

# One run at a time in a checkout: they would share out/. The processes started here do not
# inherit the lock (9<&-): if this script is killed with SIGKILL, what it left running does not
# keep the next run waiting; that run removes it (remove_stale).
if [ -n "${NETNS_OUT:-}" ]; then
    mkdir -p "$(dirname "$OUT")"
    exec 9<"$(dirname "$OUT")"
else
    exec 9<"$HERE/run.sh"
fi
if ! flock -n 9; then
    log "another netns run is going on in this checkout; waiting up to 300 s for it to finish"
    flock -w 300 9 || { log "gave up waiting for the other run"; exit 1; }
fi
remove_stale
rm -rf "$OUT"
mkdir -p "$LOGS" "$STATE"

# ---- the network ----------------------------------------------------------------------
new_ns() {
    ip netns add "$1"
    NAMESPACES+=("$1")
    ip -n "$1" link set lo up
}

# plug NS IFNAME BRIDGE ADDRESS...: a veth pair, IFNAME in NS, its peer (NS's role-IFNAME)
# in NET as a port of BRIDGE; the addresses (CIDR) on IFNAME.
plug() {
    local ns=$1 ifname=$2 bridge=$3 peer
    shift 3
    peer=${ns##*-}-$ifname
    ip -n "$NS_NET" link add "$peer" type veth peer name "$ifname" netns "$ns"
    ip -n "$NS_NET" link set "$peer" master "$bridge" up
    for address in "$@"; do ip -n "$ns" addr add "$address" dev "$ifname"; done
    ip -n "$ns" link set "$ifname" up
}

for ns in "$NS_NET" "$NS_DB" "$NS_MX" "$NS_H1" "$NS_H2" "$NS_LG"; do new_ns "$ns"; done
for bridge in front back; do
    ip -n "$NS_NET" link add "$bridge" type bridge
    ip -n "$NS_NET" link set "$bridge" up
done
plug "$NS_DB" back back 198.51.100.1/24
plug "$NS_H1" back back 198.51.100.11/24
plug "$NS_H2" back back 198.51.100.12/24
plug "$NS_H1" front front 203.0.113.11/24
plug "$NS_H2" front front 203.0.113.12/24
plug "$NS_MX" front front 203.0.113.25/24 203.0.113.26/24 203.0.113.53/24 203.0.113.54/24
plug "$NS_LG" front front 203.0.113.100/24
log "namespaces $PREFIX-{net,db,mx,h1,h2,lg} ready"

# ---- PostgreSQL in db -------------------------------------------------------------------
PGDIR=$(mktemp -d "/tmp/mmgun-netns-$ID-pg.XXXXXX")
chown postgres: "$PGDIR"
runuser -u postgres -- "$PGBIN/initdb" -D "$PGDIR/data" -A trust -U mmgun -E UTF8 --no-locale \
    >"$LOGS/initdb.log" 2>&1 || { log "initdb failed:"; tail -n 20 "$LOGS/initdb.log" >&2; exit 1; }
printf 'host all all 198.51.100.0/24 trust\n' >>"$PGDIR/data/pg_hba.conf"
PGOPTS="-c listen_addresses=198.51.100.1 -c port=5432 -c unix_socket_directories=$PGDIR -c fsync=on"
PGOPTS+=" -c max_connections=200 -c log_line_prefix='%m [%p] %h ' -c log_connections=off"
in_ns "$NS_DB" runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/postgres.log" \
    -o "$PGOPTS" -w -t "$READY_SECONDS" start >"$LOGS/pg_ctl.log" 2>&1 9<&- \
    || { log "PostgreSQL did not start:"; tail -n 20 "$PGDIR/postgres.log" >&2; exit 1; }
# The options pg_ctl restart reuses are in postmaster.opts; the tests restart it with these.
log "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on 198.51.100.1:5432"

# ---- the MX host: two DNS stubs, two SMTP stubs -------------------------------------------
# start NAME NS COMMAND...: run COMMAND in namespace NS, output in $LOGS/NAME.log.
start() {
    local name=$1 ns=$2
    shift 2
    ip netns exec "$ns" "$@" >>"$LOGS/$name.log" 2>&1 9<&- &
    STARTED=$!
    PIDS+=("$STARTED")
}

# ready NAME PID PORTFILE: poll until PORTFILE is written; fail on exit or timeout.
ready() {
    local status=0
    "$PY" "$E2E/waitfor.py" port-file "$3" "$2" "$READY_SECONDS" >/dev/null || status=$?
    if [ "$status" -ne 0 ]; then
        log "$1 did not get ready (status $status):"
        tail -n 20 "$LOGS/$1.log" >&2
        exit 1
    fi
}

for host in h1 h2; do
    if [ "$host" = h1 ]; then smtp=203.0.113.25 dns=203.0.113.53; else smtp=203.0.113.26 dns=203.0.113.54; fi
    cat >"$STATE/zone-$host.txt" <<EOF
# The zone $host's resolver ($dns) serves: netns.test's MX is the SMTP stub on $smtp.
netns.test        60 MX 10 mx.netns.test
mx.netns.test     60 A  $smtp
EOF
    start "dns-$host" "$NS_MX" "$PY" "$E2E/dnsstub.py" --listen "$dns:53" --zone "$STATE/zone-$host.txt" \
        --port-file "$STATE/dns-$host.port"
    dns_pid=$STARTED
    start "smtp-$host" "$NS_MX" "$PY" "$E2E/smtpstub.py" --listen "$smtp:25" --no-tls \
        --slow-seconds "$SLOW_SECONDS" --hostname "mx-$host.netns.test" --maildir "$STATE/mail-$host" \
        --port-file "$STATE/smtp-$host.port"
    ready "dns-$host" "$dns_pid" "$STATE/dns-$host.port"
    ready "smtp-$host" "$STARTED" "$STATE/smtp-$host.port"
done
printf '# no client ids: the netns suite authenticates with API keys\n' >"$STATE/clients"
log "DNS 203.0.113.53-54:53, SMTP 203.0.113.25-26:25 ready"

# ---- the tests, in lg -------------------------------------------------------------------
export NETNS_H1=$NS_H1 NETNS_H2=$NS_H2 NETNS_DB=$NS_DB NETNS_LG=$NS_LG NETNS_MX=$NS_MX
export NETNS_PGBIN=$PGBIN NETNS_PGDATA=$PGDIR/data NETNS_PGSOCKET=$PGDIR
export NETNS_STATE=$STATE NETNS_LOGS=$LOGS NETNS_TEST_PIDS=$STATE/test-pids
export NETNS_ROOT=$ROOT
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
# In the background, so that a signal to this script is handled at once (bash runs a trap
# only when its foreground command has finished; `wait` it interrupts).
if [ -n "$EXEC_SECONDS" ]; then
    ip netns exec "$NS_LG" timeout -k 10 "$EXEC_SECONDS" "$@" 9<&- &
else
    ip netns exec "$NS_LG" timeout -k 10 "$PYTEST_SECONDS" \
        "$PY" -m pytest -p no:cacheprovider -q -rxX "$HERE/test_hosts.py" "$@" 9<&- &
fi
PYTEST=$!
status=0
wait "$PYTEST" || status=$?
PYTEST=
if [ "$status" -eq 124 ]; then
    if [ -n "$EXEC_SECONDS" ]; then log "$1 did not finish within ${EXEC_SECONDS}s"; else log "pytest did not finish within ${PYTEST_SECONDS}s"; fi
fi
exit "$status"
