#!/usr/bin/env bash
# Run fsx (File System eXerciser, crate fsx 0.3.2) against spoolfs: a
# reproducible pseudorandom sequence of reads, writes, mmap reads/writes,
# truncates, ... on one file, verifying the data on every read.
#
# Usage: tests/fsx/run.sh [DIR]
#   no DIR: mount a fresh spoolfs (empty temporary data dir) on a temporary
#           mountpoint, run fsx on a file there, unmount (needs root).
#   DIR:    run fsx on a file in a fresh subdirectory of DIR instead (used to
#           validate this script, e.g. on a tmpfs).
#
# Environment:
#   SPOOLFS_BIN         spoolfs binary (default: <repo>/target/release/spoolfs)
#   SPOOLFS_MOUNT_OPTS  if set, passed as `spoolfs mount -o "$SPOOLFS_MOUNT_OPTS"`
#   FSX_BIN             fsx binary (default: from PATH, else ~/.cargo/bin)
#   FSX_OPS             number of operations (default: 10000)
#   FSX_SEED            RNG seed; the same seed gives the same operations (default: 1)
#   FSX_CONFIG          fsx.toml to use instead of the built-in one below
#   FSX_TIMEOUT         seconds before fsx is killed (default: 1200)
#
# The fsx output (with the operation log of a failure), spoolfs's messages and,
# on failure, the expected file contents (<file>.fsxgood) are kept in a log
# directory whose path is printed.  The last line is `fsx: 1 passed, 0 failed`
# or `fsx: 0 passed, 1 failed`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

SPOOLFS_BIN=${SPOOLFS_BIN:-$repo/target/release/spoolfs}
FSX_BIN=${FSX_BIN:-$(command -v fsx || echo "${CARGO_HOME:-$HOME/.cargo}/bin/fsx")}
FSX_OPS=${FSX_OPS:-10000}
FSX_SEED=${FSX_SEED:-1}
FSX_TIMEOUT=${FSX_TIMEOUT:-1200}

die() {
    echo "fsx: error: $*" >&2
    exit 1
}

[[ $# -le 1 ]] || die "usage: $0 [DIR]"
[[ -x $FSX_BIN ]] || die "fsx not found (cargo install fsx --version 0.3.2 --locked)"
[[ $FSX_OPS =~ ^[0-9]+$ && $FSX_OPS -gt 0 ]] || die "FSX_OPS must be a positive integer"
[[ $FSX_SEED =~ ^[0-9]+$ ]] || die "FSX_SEED must be a non-negative integer"

# --- temporary directories and cleanup -------------------------------------

# Kept after the run: fsx output, fsx artifacts, spoolfs messages.
logdir=$(mktemp -d --tmpdir spoolfs-fsx-log.XXXXXX)
log=$logdir/fsx.log
# Removed on exit: mountpoint, spoolfs data dir, config.
work=$(mktemp -d --tmpdir spoolfs-fsx.XXXXXX)

mounts=()  # every mountpoint we mount on, unmounted (lazily) on exit
child=     # pid of the running fsx, stopped on exit
testsub=   # in DIR mode: our subdirectory of DIR, removed on exit

name=fsx
# shellcheck source=../lib/spoolfs.sh
source "$repo/tests/lib/spoolfs.sh"

# shellcheck disable=SC2317 # (only reached through the trap)
cleanup() {
    local rc=$? i
    set +e
    if [[ -n $child ]]; then
        kill "$child" 2>/dev/null # timeout(1) passes the signal on to fsx
        wait "$child" 2>/dev/null
    fi
    [[ -n $testsub ]] && rm -rf "$testsub"
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        if is_mounted "${mounts[i]}"; then
            umount -l "${mounts[i]}" || echo "fsx: warning: cannot unmount ${mounts[i]}" >&2
        fi
    done
    # Never rm -rf through a mount that is still there.  (Not grep -q: its
    # early exit could kill findmnt with SIGPIPE, failing the pipeline.)
    if findmnt -rn -o TARGET | grep -F -- "$work" >/dev/null; then
        echo "fsx: warning: something is still mounted under $work; not removing it" >&2
    else
        rm -rf --one-file-system "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- file system under test --------------------------------------------------

mnt=
if [[ $# -eq 1 ]]; then
    [[ -d $1 ]] || die "$1 is not a directory"
    testsub=$(mktemp -d "$(realpath "$1")/fsx.XXXXXX")
    testdir=$testsub
else
    [[ $(id -u) -eq 0 ]] || die "must run as root to mount spoolfs"
    data=$work/data
    mnt=$work/mnt
    mkdir "$data" "$mnt"
    mount_spoolfs "$data" "$mnt"
    testdir=$mnt
fi

# --- run fsx -------------------------------------------------------------------

if [[ -n ${FSX_CONFIG:-} ]]; then
    config=$FSX_CONFIG
else
    # fsx's defaults (256 KiB max file size, ops up to 64 KiB, weight 1 each
    # for read, write, mapread, mapwrite, truncate) plus the operations that
    # are off by default; see ~/.cargo/registry/src/*/fsx-0.3.2/doc/fsx.toml.
    # spoolfs implements FALLOC_FL_PUNCH_HOLE, so hole punching is exercised too.
    config=$work/fsx.toml
    cat >"$config" <<'EOF'
[weights]
read = 10
write = 10
mapread = 10
mapwrite = 10
truncate = 10
close_open = 2       # close and reopen the file: data must survive
invalidate = 1       # msync(MS_INVALIDATE)
fsync = 1
fdatasync = 1
posix_fallocate = 1
sendfile = 1
posix_fadvise = 1
copy_file_range = 1
punch_hole = 1
EOF
fi
cp "$config" "$logdir/fsx.toml"

file=$testdir/fsx.testfile
# -P: write the artifacts of a failure (fsx.testfile.fsxgood, the expected
# contents) to the kept log directory instead of next to the test file.
cmd=("$FSX_BIN" -N "$FSX_OPS" -S "$FSX_SEED" -f "$config" -P "$logdir" "$file")
echo "fsx: running: ${cmd[*]}"
echo "fsx: full log: $log"

start=$SECONDS
# In the background and waited for, so that INT/TERM reach our traps at once.
NO_COLOR=1 timeout -k 10 "$FSX_TIMEOUT" "${cmd[@]}" </dev/null >"$log" 2>&1 &
child=$!
rc=0
wait "$child" || rc=$?
child=
elapsed=$((SECONDS - start))

ok=1
# fsx exits 0 and prints this line only when every operation verified fine;
# on a miscompare it exits 1 after dumping the last operations.
if [[ $rc -ne 0 ]] || ! grep -qx 'All operations completed A-OK!' "$log"; then
    ok=0
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "fsx: error: timed out after ${FSX_TIMEOUT}s" >&2
    fi
    echo "fsx: FAILED (exit status $rc, seed $FSX_SEED); end of log:" >&2
    tail -n 40 "$log" >&2
else
    echo "fsx: $FSX_OPS operations with seed $FSX_SEED completed OK in ${elapsed}s"
fi

# --- unmount -----------------------------------------------------------------

if [[ -n $mnt ]] && ! unmount_and_fsck "$data" "$mnt"; then
    ok=0
fi

echo "fsx: full log: $log"
if [[ $ok -eq 1 ]]; then
    echo "fsx: 1 passed, 0 failed"
    exit 0
fi
echo "fsx: 0 passed, 1 failed"
exit 1
