# Shared by the shell suites (pjdfstest, fsx, stress, soak): mount a fresh spoolfs, and take it down
# again with a clean unmount and an offline fsck.
#
# The caller defines: die(), $name (message prefix), $SPOOLFS_BIN, $logdir (kept logs), and
# the array `mounts` that its EXIT trap unmounts lazily.  SPOOLFS_MOUNT_OPTS, if set, is
# passed as `-o`.

# Looks in the mount table only: unlike mountpoint(1) it neither hangs on a stuck FUSE
# daemon nor misses a mount whose daemon died (ENOTCONN).  (Not grep -q: its early exit
# could kill findmnt with SIGPIPE, failing the pipeline.)
is_mounted() {
    findmnt -rn -o TARGET | grep -Fx -- "$1" >/dev/null
}

# mount_spoolfs DATA MNT [ARG...]: ARGs (e.g. --memfd-budget N) go to `spoolfs mount`.
mount_spoolfs() {
    local data=$1 mnt=$2
    shift 2
    [[ -x $SPOOLFS_BIN ]] ||
        die "spoolfs binary not found at $SPOOLFS_BIN (cargo build --release, or set SPOOLFS_BIN)"
    local mount_opts=()
    if [[ -n ${SPOOLFS_MOUNT_OPTS:-} ]]; then
        mount_opts=(-o "$SPOOLFS_MOUNT_OPTS")
    fi
    mounts+=("$mnt") # registered first, so that a half-done mount is cleaned up
    echo "$name: mounting spoolfs: $SPOOLFS_BIN mount ${mount_opts[*]} $* $data $mnt"
    # Output goes to a file: the daemonized spoolfs may keep stdout/stderr open, which
    # would make a pipe (or CI's log capture) wait for it.
    if ! timeout 60 "$SPOOLFS_BIN" mount "${mount_opts[@]}" "$@" "$data" "$mnt" \
        </dev/null >"$logdir/spoolfs.log" 2>&1; then
        cat "$logdir/spoolfs.log" >&2
        die "spoolfs mount failed"
    fi
    is_mounted "$mnt" || die "spoolfs mount returned but $mnt is not a mountpoint"
}

# unmount_and_fsck DATA MNT: a clean unmount is part of the test, and the state the suite
# left behind must pass the offline check.  Returns 1 (with the reason on stderr) if not;
# the EXIT trap lazily unmounts whatever is left.
unmount_and_fsck() {
    local data=$1 mnt=$2
    if ! timeout 60 "$SPOOLFS_BIN" umount "$mnt" </dev/null >>"$logdir/spoolfs.log" 2>&1; then
        echo "$name: error: spoolfs umount $mnt failed:" >&2
        tail -n 20 "$logdir/spoolfs.log" >&2
        return 1
    elif is_mounted "$mnt"; then
        echo "$name: error: $mnt still mounted after spoolfs umount" >&2
        return 1
    elif ! "$SPOOLFS_BIN" fsck "$data" >"$logdir/fsck.log" 2>&1; then
        echo "$name: error: spoolfs fsck found problems after the run:" >&2
        tail -n 20 "$logdir/fsck.log" >&2
        return 1
    fi
    echo "$name: fsck: $(tail -n 1 "$logdir/fsck.log")"
}

# daemon_pid [DATA]: the daemon's PID, from the data dir's lock file (DATA defaults to $data).
daemon_pid() {
    tr -d '[:space:]' <"${1:-$data}/spoolfs.lock" 2>/dev/null
}

# daemon_state PID: its state letter from /proc (R, S, D, T, ...), or "dead" (gone or a
# zombie: the daemon is reparented, and PID 1 in a container may never reap it).
daemon_state() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    case $state in
    "" | Z | X) echo dead ;;
    *) echo "$state" ;;
    esac
}

# reap_run DATA WORK LOG: the end of an EXIT trap, after the mounts are gone. Our daemon, if
# it is still there (e.g. after a hang), gets 10 s, then is killed; its log is kept as LOG;
# WORK is removed unless something is still mounted under it (never rm -rf through a mount).
reap_run() {
    local data=$1 work=$2 log=$3 pid i
    pid=$(daemon_pid "$data")
    if [[ -n $pid ]] && grep -qF -- "$data" "/proc/$pid/cmdline" 2>/dev/null; then
        for ((i = 0; i < 100; i++)); do
            [[ $(daemon_state "$pid") == dead ]] && break
            sleep 0.1
        done
        if [[ $(daemon_state "$pid") != dead ]]; then
            echo "$name: warning: daemon $pid still running; killing it" >&2
            kill -KILL "$pid"
        fi
    fi
    [[ -f $data/spoolfs.log ]] && cp "$data/spoolfs.log" "$log"
    # (Not grep -q: its early exit could kill findmnt with SIGPIPE, failing the pipeline.)
    if findmnt -rn -o TARGET | grep -F -- "$work" >/dev/null; then
        echo "$name: warning: something is still mounted under $work; not removing it" >&2
    else
        rm -rf --one-file-system "$work"
    fi
}
