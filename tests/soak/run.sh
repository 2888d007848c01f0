#!/usr/bin/env bash
# Soak test: a 10-minute mixed mail-spool load on a mount with a deliberately small memfd
# budget, sampling the daemon's memory, then the checks that memory stayed bounded.
#
# Usage: tests/soak/run.sh          (root, /dev/fuse, python3)
#
# The load (tests/soak/soak.py load; every actor a process with a fixed seed): spool
# writers (create in tmp/, write, xattr, fsync, close, rename into queue/, fsync queue/),
# deliverers (readdir, read, check sha256 and xattr, unlink), metadata churn against a model
# (mkdir/rmdir, xattrs, symlinks, hard links, rename, chmod, utime, readdir), big files
# written to 2.5x the budget while kept open (with rewrites, read-backs, ftruncate, hole
# punches) and a truncator.  At most 200 messages wait in queue/ and every other actor works
# on a fixed set of names, so the file count stays bounded: nothing in the load gives the
# daemon a reason to hold more memory at the end than in the middle.
#
# Steps (the last line is `soak: N passed, M failed`):
#   mount         spoolfs mount --memfd-budget SOAK_MEMFD_BUDGET --metrics-addr 127.0.0.1:0
#   load          SOAK_SECONDS of load, then the deliverers drain the queue: no operation
#                 may fail, every read must match what was written, every message enqueued
#                 must be delivered and verified
#   monitor       the sampler (soak.py monitor) ran to the end: every second it reads
#                 /proc/PID/status, the daemon's memfd descriptors (their st_blocks: memory
#                 really used) and /metrics; every SOAK_INTERVAL s it writes a row of
#                 memory.csv (the memfd columns hold the largest value since the last row)
#   daemon-alive  the daemon (PID in DATA_DIR/spoolfs.lock) still runs
#   memory        soak.py report prints a short table and checks (its docstring says why):
#                   - spoolfs_memfd_bytes never above the budget: content.rs evicts at the end
#                     of every operation that leaves the memfds over it, and the gauge is set
#                     between batches, so no slack;
#                   - the memfds' real memory never above budget + 1 MiB + 64 KiB: a sample
#                     may land inside one operation, which loads at most one max_write and
#                     the partial chunk at its end before the check;
#                   - RSS flat: after a warm-up (the first 20%), the largest RSS of the last
#                     third of the run is at most the largest of the middle third + 10% +
#                     16 MiB (window maxima ignore malloc's saw-tooth; the margin covers
#                     allocator noise; it prints the slope and the smallest steady leak, in
#                     KiB/s and bytes per request, that the check catches)
#   umount-fsck   `spoolfs umount`, then `spoolfs fsck DATA_DIR` exits 0
#   daemon-log    no panic and no ERROR in the daemon log (except fuser's failed replies to
#                 requests the kernel gave up on)
# There are no other timing assertions.  A load that overruns SOAK_SECONDS + SOAK_HANG_GRACE
# fails and the mount is cut with `spoolfs abort` (a hang).
#
# Environment:
#   SPOOLFS_BIN         spoolfs binary (default: <repo>/target/release/spoolfs)
#   SPOOLFS_MOUNT_OPTS  if set, passed as `spoolfs mount -o "$SPOOLFS_MOUNT_OPTS"`
#   SOAK_SECONDS        length of the load (default 600; e.g. 60 for a quick local run)
#   SOAK_MEMFD_BUDGET   --memfd-budget in bytes (default 8388608: 8 MiB, far below what the
#                       big files and concurrent messages would stage)
#   SOAK_SEED           seed of every actor's RNG (default 1)
#   SOAK_INTERVAL       seconds between CSV rows (default SOAK_SECONDS/60, 1 to 10)
#   SOAK_HANG_GRACE     seconds the load may overrun before it counts as hung (default 300)
#   SOAK_LOAD_ARGS      extra arguments to `soak.py load` (e.g. "--writers 8 --bigs 1")
#
# The CSV (memory.csv), the load's and sampler's output, the daemon log and fsck's report
# are kept in a log directory whose path is printed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

SPOOLFS_BIN=${SPOOLFS_BIN:-$repo/target/release/spoolfs}
SOAK_SECONDS=${SOAK_SECONDS:-600}
SOAK_MEMFD_BUDGET=${SOAK_MEMFD_BUDGET:-8388608}
SOAK_SEED=${SOAK_SEED:-1}
SOAK_HANG_GRACE=${SOAK_HANG_GRACE:-300}
SOAK_LOAD_ARGS=${SOAK_LOAD_ARGS:-}

name=soak
die() {
    echo "soak: error: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (mounts spoolfs)"
command -v python3 >/dev/null || die "python3 not found"
for v in SOAK_SECONDS SOAK_MEMFD_BUDGET SOAK_SEED SOAK_HANG_GRACE; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer"
done
((SOAK_SECONDS >= 30)) || die "SOAK_SECONDS must be at least 30 (the RSS check needs samples)"
((SOAK_MEMFD_BUDGET >= 1048576)) || die "SOAK_MEMFD_BUDGET must be at least 1 MiB"
if [[ -z ${SOAK_INTERVAL:-} ]]; then
    SOAK_INTERVAL=$((SOAK_SECONDS / 60))
    ((SOAK_INTERVAL < 1)) && SOAK_INTERVAL=1
    ((SOAK_INTERVAL > 10)) && SOAK_INTERVAL=10
fi
[[ $SOAK_INTERVAL =~ ^[0-9]+$ && $SOAK_INTERVAL -gt 0 ]] ||
    die "SOAK_INTERVAL must be a positive integer"

# --- temporary directories and cleanup -------------------------------------

logdir=$(mktemp -d --tmpdir spoolfs-soak-log.XXXXXX)
work=$(mktemp -d --tmpdir spoolfs-soak.XXXXXX)
data=$work/data
mnt=$work/mnt
mkdir "$data" "$mnt"
csv=$logdir/memory.csv
stopfile=$work/stop-monitor
echo "soak: logs in $logdir"

mounts=()  # every mountpoint we mount on, unmounted (lazily) on exit
child=     # pid of the running load, stopped on exit
monitor=   # pid of the sampler, stopped on exit

# shellcheck source=../lib/spoolfs.sh
source "$repo/tests/lib/spoolfs.sh"


# shellcheck disable=SC2317 # (only reached through the trap)
cleanup() {
    local rc=$? i pid
    set +e
    for pid in $child $monitor; do
        kill "$pid" 2>/dev/null # timeout(1) passes the signal on
        wait "$pid" 2>/dev/null
    done
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        if is_mounted "${mounts[i]}"; then
            umount -l "${mounts[i]}" || echo "soak: warning: cannot unmount ${mounts[i]}" >&2
        fi
    done
    reap_run "$data" "$work" "$logdir/daemon.log"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- steps -------------------------------------------------------------------

passed=0
failed=0
failures=()

# step NAME CMD...: run CMD, count and report its outcome; returns CMD's success.
# (Not `local name`: the helpers of tests/lib/spoolfs.sh print $name, ours.)
step() {
    local step=$1 start=$SECONDS
    shift
    if "$@"; then
        passed=$((passed + 1))
        echo "soak: $step: ok ($((SECONDS - start))s)"
    else
        failed=$((failed + 1))
        failures+=("$step")
        echo "soak: $step: FAILED ($((SECONDS - start))s)"
        return 1
    fi
}

# The load, in the background (so INT/TERM reach our traps at once), with a hang guard: past
# its limit timeout(1) kills it, and the FUSE connection is cut (`spoolfs abort`), which also
# releases processes stuck in a request the daemon never answers (SIGKILL cannot).
run_load() {
    local limit=$((SOAK_SECONDS + SOAK_HANG_GRACE)) rc=0 watchdog
    # shellcheck disable=SC2086 # (SOAK_LOAD_ARGS is a list of words)
    timeout -k 10 "$limit" python3 "$here/soak.py" load --mount "$mnt" \
        --seconds "$SOAK_SECONDS" --budget "$SOAK_MEMFD_BUDGET" --seed "$SOAK_SEED" \
        $SOAK_LOAD_ARGS </dev/null >"$logdir/load.log" 2>&1 &
    child=$!
    (
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
        sleep $((limit + 30)) &
        sleeper=$!
        wait "$sleeper"
        kill -0 "$child" 2>/dev/null && abort_mount
    ) &
    watchdog=$!
    wait "$child" || rc=$?
    child=
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
    cat "$logdir/load.log"
    if ((rc == 124 || rc == 137)); then
        echo "soak: error: the load hung: killed after ${limit}s" >&2
        abort_mount
    fi
    return "$rc"
}

abort_mount() {
    [[ -e $logdir/abort.txt ]] && return 0
    echo "soak: error: cutting the FUSE connection: $SPOOLFS_BIN abort $mnt" >&2
    timeout 60 "$SPOOLFS_BIN" abort "$mnt" >"$logdir/abort.txt" 2>&1 ||
        echo "soak: error: spoolfs abort failed (see $logdir/abort.txt)" >&2
}

start_monitor() {
    python3 "$here/soak.py" monitor --pid "$(daemon_pid)" --csv "$csv" --stop "$stopfile" \
        --interval "$SOAK_INTERVAL" </dev/null >"$logdir/monitor.log" 2>&1 &
    monitor=$!
}

# Ask the sampler for its last row and wait for it (it samples at least every second).
stop_monitor() {
    local rc=0
    touch "$stopfile"
    wait "$monitor" || rc=$?
    monitor=
    cat "$logdir/monitor.log"
    return "$rc"
}

# The daemon named in the lock file runs and is not stopped.
daemon_alive() {
    local pid state
    pid=$(daemon_pid)
    state=$(daemon_state "${pid:-0}")
    case $state in
    dead)
        echo "soak: error: the daemon (pid ${pid:-?}) is gone" >&2
        return 1
        ;;
    T | t)
        echo "soak: error: the daemon (pid $pid) is stopped" >&2
        return 1
        ;;
    esac
}

memory_report() {
    python3 "$here/soak.py" report --csv "$csv" --budget "$SOAK_MEMFD_BUDGET"
}

# No panic, and no ERROR other than fuser's "Failed to send FUSE reply" (the kernel no
# longer waits for that request, e.g. an interrupted one); as in tests/stress/run.sh.
daemon_log_clean() {
    local bad
    cp "$data/spoolfs.log" "$logdir/daemon.log" 2>/dev/null
    bad=$(grep -E 'ERROR|panicked' "$logdir/daemon.log" | grep -v 'Failed to send FUSE reply')
    if [[ -n $bad ]]; then
        echo "soak: error: the daemon logged errors:" >&2
        head -n 20 <<<"$bad" >&2
        return 1
    fi
}

# --- run ---------------------------------------------------------------------

begin=$SECONDS
echo "soak: ${SOAK_SECONDS}s of mixed load, memfd budget $SOAK_MEMFD_BUDGET bytes, seed" \
    "$SOAK_SEED, a sample row every ${SOAK_INTERVAL}s"
step mount mount_spoolfs "$data" "$mnt" \
    --memfd-budget "$SOAK_MEMFD_BUDGET" --metrics-addr 127.0.0.1:0 || true
if ! is_mounted "$mnt"; then
    echo "soak: 0 passed, 1 failed"
    exit 1
fi
echo "soak: daemon pid $(daemon_pid)"
start_monitor
step load run_load
step monitor stop_monitor
step daemon-alive daemon_alive
step memory memory_report
echo "soak: CSV: $csv"
step umount-fsck unmount_and_fsck "$data" "$mnt"
step daemon-log daemon_log_clean

echo "soak: took $((SECONDS - begin))s; logs in $logdir"
if ((failed > 0)); then
    echo "soak: failed steps: ${failures[*]}"
fi
echo "soak: $passed passed, $failed failed"
((failed == 0))
