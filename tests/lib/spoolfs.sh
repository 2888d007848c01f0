# Shared by the shell suites (pjdfstest, fsx, soak): mount a fresh spoolfs, and take it down
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
