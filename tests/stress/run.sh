#!/usr/bin/env bash
# Stress spoolfs with stress-ng's file system stressors and fio's verified I/O on a fresh
# mount, then check that the daemon survived, unmounts cleanly and leaves a clean fsck.
#
# Usage: tests/stress/run.sh          (root; installs stress-ng and fio with apt-get if missing)
#
# Steps (each passes or fails on its own; the last line is `stress: N passed, M failed`):
#   mount                 spoolfs mount of an empty temporary data dir
#   stress-ng-NAME        one stressor at a time, STRESS_WORKERS workers, STRESS_TIMEOUT s:
#                         dir rename link symlink xattr dentry fallocate lockf flock
#   stress-ng-mixed       all nine together (one worker each), STRESS_MIX_TIMEOUT s
#   fio-seq, fio-rand     sequential / random writes (psync) verified with crc32c
#   daemon-alive          the daemon (PID in DATA_DIR/spoolfs.lock) still runs
#   umount, fsck          `spoolfs umount`, then `spoolfs fsck DATA_DIR` exits 0
#   mount-again, fio-verify-remount, umount-again
#                         mount again and re-verify the fio files (they were closed)
#   daemon-log            no panic and no ERROR in the daemon log (except fuser's failed
#                         replies to requests the kernel gave up on: interrupted ones)
# Every stress-ng run must exit 0 (it exits non-zero when a stressor fails or verification
# finds a difference) and is guarded by a timeout: a hang fails the step, its kernel and
# daemon state is saved (hang-*.txt) and the mount is cut with `spoolfs abort`, which also
# releases processes stuck in a request the daemon never answers.
#
# Environment:
#   SPOOLFS_BIN           spoolfs binary (default: <repo>/target/release/spoolfs)
#   SPOOLFS_MOUNT_OPTS    if set, passed as `spoolfs mount -o "$SPOOLFS_MOUNT_OPTS"`
#   SPOOLFS_METRICS_ADDR  --metrics-addr of the mount (default 127.0.0.1:0: metrics recording
#                         on, as in production, on a free port)
#   STRESS_WORKERS        workers per stressor in the one-at-a-time runs (default 2)
#   STRESS_TIMEOUT        seconds per stressor (default 5)
#   STRESS_MIX_TIMEOUT    seconds of the mixed run (default 15)
#   FIO_SIZE              file size of each fio job (default 128M)
#   STRESS_HANG_GRACE     seconds a stress-ng run may overrun its timeout before it counts
#                         as hung (default 90; fio runs get 300 s)
#
# stress-ng's and fio's output, the daemon log and fsck's report are kept in a log
# directory whose path is printed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

SPOOLFS_BIN=${SPOOLFS_BIN:-$repo/target/release/spoolfs}
SPOOLFS_METRICS_ADDR=${SPOOLFS_METRICS_ADDR:-127.0.0.1:0}
STRESS_WORKERS=${STRESS_WORKERS:-2}
STRESS_TIMEOUT=${STRESS_TIMEOUT:-5}
STRESS_MIX_TIMEOUT=${STRESS_MIX_TIMEOUT:-15}
FIO_SIZE=${FIO_SIZE:-128M}
STRESS_HANG_GRACE=${STRESS_HANG_GRACE:-90}
STRESSORS=(dir rename link symlink xattr dentry fallocate lockf flock)

die() {
    echo "stress: error: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (mounts spoolfs, may install packages)"
[[ -x $SPOOLFS_BIN ]] ||
    die "spoolfs binary not found at $SPOOLFS_BIN (cargo build --release, or set SPOOLFS_BIN)"
SPOOLFS_BIN=$(realpath "$SPOOLFS_BIN") # we cd to the log directory
for v in STRESS_WORKERS STRESS_TIMEOUT STRESS_MIX_TIMEOUT STRESS_HANG_GRACE; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive integer"
done

# --- tools -------------------------------------------------------------------

missing=()
command -v stress-ng >/dev/null || missing+=(stress-ng)
command -v fio >/dev/null || missing+=(fio)
if ((${#missing[@]} > 0)); then
    echo "stress: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        >/dev/null || die "cannot install ${missing[*]}"
fi
echo "stress: $(stress-ng --version 2>&1 | head -n 1); $(fio --version)"

# --- the daemon ----------------------------------------------------------------

name=stress
# shellcheck source=../lib/spoolfs.sh
source "$repo/tests/lib/spoolfs.sh"

# --- temporary directories and cleanup -------------------------------------

logdir=$(mktemp -d --tmpdir spoolfs-stress-log.XXXXXX)
work=$(mktemp -d --tmpdir spoolfs-stress.XXXXXX)
data=$work/data
mnt=$work/mnt
mkdir "$data" "$mnt"
echo "stress: logs in $logdir"
# fio saves its verify state files in the working directory: keep them with the logs.
cd "$logdir" || die "cannot cd to $logdir"

child= # pid of the running tool, stopped on exit


# shellcheck disable=SC2317 # (only reached through the trap)
cleanup() {
    local rc=$?
    set +e
    if [[ -n $child ]]; then
        kill "$child" 2>/dev/null # timeout(1) passes the signal on
        wait "$child" 2>/dev/null
    fi
    if is_mounted "$mnt"; then
        umount -l "$mnt" || echo "stress: warning: cannot unmount $mnt" >&2
    fi
    reap_run "$data" "$work" "$logdir/spoolfs.log"
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
        echo "stress: $step: ok ($((SECONDS - start))s)"
    else
        failed=$((failed + 1))
        failures+=("$step")
        echo "stress: $step: FAILED ($((SECONDS - start))s)"
        return 1
    fi
}

# run_logged LOG SECONDS CMD...: CMD in the background (so INT/TERM reach our traps at
# once) with a hang guard; its output goes to LOG.  Returns CMD's exit status.
#
# A hang (CMD still running after SECONDS) fails the step, and then the mount cannot be
# trusted to answer anything: what the kernel and the daemon are doing is saved
# (hang-*.txt in the log directory) and the FUSE connection is cut with `spoolfs abort`.
# A process waiting for a request the daemon has read but never answers cannot be killed,
# not even by timeout(1)'s SIGKILL: a watchdog does the same 30 s after the limit, which
# releases it.
run_logged() {
    local log=$1 limit=$2 rc=0 watchdog
    shift 2
    echo "+ $*" >"$log"
    timeout -k 10 "$limit" "$@" </dev/null >>"$log" 2>&1 &
    child=$!
    (
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
        sleep $((limit + 30)) &
        sleeper=$!
        wait "$sleeper"
        if kill -0 "$child" 2>/dev/null; then
            hang_abort "$log"
        fi
    ) &
    watchdog=$!
    wait "$child" || rc=$?
    child=
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
    if ((rc == 124 || rc == 137)); then
        echo "stress: error: $(basename "$log" .log) hung: killed after ${limit}s (see $log)" >&2
        hang_abort "$log"
    elif ((rc != 0)); then
        echo "stress: error: $(basename "$log" .log) exited $rc; from $log:" >&2
        # stress-ng's "fail:"/"error:" lines, fio's verify errors; else the end of the log.
        grep -E 'fail|error|err=|bad|Expected|Received' "$log" | grep -v 'err= 0' |
            head -n 20 >&2 || tail -n 15 "$log" >&2
    fi
    return "$rc"
}

# hang_abort LOG: record what the kernel and the daemon are doing, then abort the FUSE
# connection (once).
hang_abort() {
    local dump daemon p
    dump=$logdir/hang-$(basename "$1" .log).txt
    [[ -e $dump ]] && return 0
    daemon=$(daemon_pid)
    {
        echo "# $(date -Is): $(basename "$1" .log) hangs"
        echo "# kernel requests waiting for the daemon: $(cat "$(fusectl_dir)/waiting")"
        echo "# daemon $daemon threads: name, state, wchan, kernel stack"
        for p in /proc/"$daemon"/task/*; do
            echo "## $(cat "$p/comm" 2>/dev/null) $(sed 's/.*) //' "$p/stat" 2>/dev/null |
                cut -d' ' -f1) $(cat "$p/wchan" 2>/dev/null)"
            cat "$p/stack" 2>/dev/null
        done
        echo "# processes in D state:"
        ps -eo pid,stat,wchan:32,args | awk 'NR == 1 || $2 ~ /D/'
    } >"$dump" 2>&1
    echo "stress: error: the mount hangs (see $dump); cutting the FUSE connection:" \
        "$SPOOLFS_BIN abort $mnt" >&2
    timeout 60 "$SPOOLFS_BIN" abort "$mnt" >>"$dump" 2>&1 ||
        echo "stress: error: spoolfs abort failed (see $dump)" >&2
}

# The mount's fusectl directory, named after its device number (mountinfo's major:minor:
# no stat of a mount that may hang).
fusectl_dir() {
    local dev
    dev=$(awk -v m="$mnt" '$5 == m { d = $3 } END { print d }' /proc/self/mountinfo)
    [[ $dev == *:* ]] || return 1
    echo "/sys/fs/fuse/connections/$(((${dev%%:*} << 20) | ${dev##*:}))"
}

# The daemon named in the lock file runs and is not stopped.
daemon_alive() {
    local pid state
    pid=$(daemon_pid)
    state=$(daemon_state "${pid:-0}")
    case $state in
    dead)
        echo "stress: error: the daemon (pid ${pid:-?}) is gone" >&2
        return 1
        ;;
    T | t)
        echo "stress: error: the daemon (pid $pid) is stopped" >&2
        return 1
        ;;
    esac
}

do_mount() {
    local opts=()
    [[ -n ${SPOOLFS_MOUNT_OPTS:-} ]] && opts=(-o "$SPOOLFS_MOUNT_OPTS")
    # Output to a file: the daemonized spoolfs may keep stdout/stderr open.
    if ! timeout 60 "$SPOOLFS_BIN" mount --metrics-addr "$SPOOLFS_METRICS_ADDR" "${opts[@]}" \
        "$data" "$mnt" </dev/null >>"$logdir/spoolfs-cli.log" 2>&1; then
        tail -n 5 "$logdir/spoolfs-cli.log" >&2
        return 1
    fi
    is_mounted "$mnt" || {
        echo "stress: error: spoolfs mount returned but $mnt is not mounted" >&2
        return 1
    }
    echo "stress: mounted $data at $mnt (daemon pid $(daemon_pid))"
}

do_umount() {
    if ! timeout 60 "$SPOOLFS_BIN" umount "$mnt" </dev/null >>"$logdir/spoolfs-cli.log" 2>&1; then
        echo "stress: error: spoolfs umount $mnt failed:" >&2
        tail -n 5 "$logdir/spoolfs-cli.log" >&2
        return 1
    fi
    ! is_mounted "$mnt" || {
        echo "stress: error: $mnt still mounted after spoolfs umount" >&2
        return 1
    }
}

do_fsck() {
    "$SPOOLFS_BIN" fsck "$data" >"$logdir/fsck.log" 2>&1 || {
        echo "stress: error: spoolfs fsck found problems:" >&2
        tail -n 20 "$logdir/fsck.log" >&2
        return 1
    }
    echo "stress: fsck: $(tail -n 1 "$logdir/fsck.log")"
}

# sh -c "$mkdir_exec" DIR CMD...: create DIR (on the mount), then run CMD; both under
# run_logged's hang guard.
# shellcheck disable=SC2016 # (expanded by sh -c)
mkdir_exec='mkdir -p "$0" && exec "$@"'

# stress-ng with its own directory under the mount. --verify turns on the checks of the
# stressors that have optional ones (fallocate); dir, rename, link, symlink, xattr and lockf
# always verify.
stress() {
    local name=$1 timeout=$2
    shift 2
    local dir=$mnt/stress-ng-$name
    # (mkdir under the hang guard too)
    run_logged "$logdir/stress-ng-$name.log" $((timeout + STRESS_HANG_GRACE)) \
        sh -c "$mkdir_exec" "$dir" \
        stress-ng "$@" --timeout "${timeout}s" --temp-path "$dir" --verify --metrics-brief ||
        return 1
    grep -E ' (dir|rename|link|symlink|xattr|dentry|fallocate|lockf|flock) +[0-9]' \
        "$logdir/stress-ng-$name.log" | sed 's/^stress-ng: metrc: \[[0-9]*\] */stress:   /'
}

# fio_job MODE NAME RW BS: job NAME writes FIO_SIZE with RW at block size BS (MODE write),
# then reads it all back and checks every block's crc32c (fio exits non-zero on a
# mismatch). MODE verify-only re-checks the file of an earlier run of the same job (same
# seed, same blocks) without writing.
fio_job() {
    local mode=$1 name=$2 rw=$3 bs=$4 args
    args=(--name="$name" --directory="$mnt/fio" --rw="$rw" --bs="$bs" --size="$FIO_SIZE"
        --ioengine=psync --verify=crc32c --do_verify=1 --verify_fatal=1 --end_fsync=1
        --randrepeat=1)
    [[ $mode == verify-only ]] && args+=(--verify_only)
    run_logged "$logdir/fio-$name-$mode.log" 300 \
        sh -c "$mkdir_exec" "$mnt/fio" fio "${args[@]}" || return 1
    grep -E '^ +(READ|WRITE):' "$logdir/fio-$name-$mode.log" | sed 's/^ */stress:   /'
}

# The fio files were closed before the unmount: after mounting again they must verify.
fio_verify_remount() {
    fio_job verify-only seq write 1M && fio_job verify-only rand randwrite 4k
}

# No panic, and no ERROR other than fuser's "Failed to send FUSE reply" (ENOENT: the
# kernel no longer waits for that request, e.g. the answer to an INTERRUPT of a request
# that has completed meanwhile, which happens when stress-ng stops its workers).
daemon_log_clean() {
    local log=$data/spoolfs.log bad
    cp "$log" "$logdir/spoolfs.log" 2>/dev/null
    bad=$(grep -E 'ERROR|panicked' "$log" | grep -v 'Failed to send FUSE reply')
    # Error replies by op and errno (warn level), for the record.
    grep -oE 'op="[a-z_]+".*errno="[A-Z0-9]+"' "$log" |
        sed -E 's/op="([a-z_]+)".*errno="([A-Z0-9]+)"/\1 \2/' | sort | uniq -c | sort -rn \
        >"$logdir/error-replies.txt"
    if [[ -n $bad ]]; then
        echo "stress: error: the daemon logged errors:" >&2
        head -n 20 <<<"$bad" >&2
        return 1
    fi
}

# --- run ---------------------------------------------------------------------

start=$SECONDS
step mount do_mount || true
if ! is_mounted "$mnt"; then
    echo "stress: 0 passed, 1 failed"
    exit 1
fi

for s in "${STRESSORS[@]}"; do
    step "stress-ng-$s" stress "$s" "$STRESS_TIMEOUT" "--$s" "$STRESS_WORKERS"
done
mixed=()
for s in "${STRESSORS[@]}"; do mixed+=("--$s" 1); done
step stress-ng-mixed stress mixed "$STRESS_MIX_TIMEOUT" "${mixed[@]}"
fio_written=0
step fio-seq fio_job write seq write 1M && fio_written=$((fio_written + 1))
step fio-rand fio_job write rand randwrite 4k && fio_written=$((fio_written + 1))
step daemon-alive daemon_alive
step umount do_umount
if ! is_mounted "$mnt"; then
    step fsck do_fsck
    # (only if fio wrote both files: else there is nothing to verify)
    if ((fio_written == 2)) && step mount-again do_mount && is_mounted "$mnt"; then
        step fio-verify-remount fio_verify_remount
        step umount-again do_umount
    fi
fi
step daemon-log daemon_log_clean

echo "stress: took $((SECONDS - start))s; logs in $logdir"
if ((failed > 0)); then
    echo "stress: failed steps: ${failures[*]}"
fi
echo "stress: $passed passed, $failed failed"
((failed == 0))
