#!/usr/bin/env bash
# Run the pjdfstest POSIX conformance suite (Rust rewrite, crate pjdfstest
# 0.2.2) against spoolfs.
#
# Usage: tests/pjdfstest/run.sh [DIR]
#   no DIR: mount a fresh spoolfs (empty temporary data dir) on a temporary
#           mountpoint, run the suite there, unmount.
#   DIR:    run the suite inside the existing directory DIR instead (used to
#           validate this script, e.g. on a tmpfs: 384 passed, 0 failed).
#
# Must run as root: about half of the tests need root (chown, mknod, switching
# to the dummy users nobody/nogroup and daemon/daemon of pjdfstest.toml).
#
# Environment:
#   SPOOLFS_BIN         spoolfs binary (default: <repo>/target/release/spoolfs)
#   SPOOLFS_MOUNT_OPTS  if set, passed as `spoolfs mount -o "$SPOOLFS_MOUNT_OPTS"`
#   PJDFSTEST_BIN       pjdfstest binary (default: from PATH, else ~/.cargo/bin)
#   PJDFSTEST_NAPTIME   overrides settings.naptime of pjdfstest.toml (seconds)
#   PJDFSTEST_FILTER    space-separated test name patterns (default: all tests)
#   PJDFSTEST_TIMEOUT   seconds before the suite is killed (default: 1200)
#
# Fails if any test fails that is not listed in expected-failures.txt.  The
# last line printed is the summary `pjdfstest: N passed, M failed`; the full
# pjdfstest output is kept in a log file whose path is printed.
set -euo pipefail
export LC_ALL=C # stable sort/comm order

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

SPOOLFS_BIN=${SPOOLFS_BIN:-$repo/target/release/spoolfs}
PJDFSTEST_BIN=${PJDFSTEST_BIN:-$(command -v pjdfstest || echo "${CARGO_HOME:-$HOME/.cargo}/bin/pjdfstest")}
PJDFSTEST_TIMEOUT=${PJDFSTEST_TIMEOUT:-1200}
config_src=$here/pjdfstest.toml
expected_src=$here/expected-failures.txt

die() {
    echo "pjdfstest: error: $*" >&2
    exit 1
}

[[ $# -le 1 ]] || die "usage: $0 [DIR]"
[[ $(id -u) -eq 0 ]] || die "must run as root (many pjdfstest cases need root)"
[[ -x $PJDFSTEST_BIN ]] ||
    die "pjdfstest not found (cargo install pjdfstest --version 0.2.2 --locked)"
[[ -f $config_src ]] || die "missing $config_src"
[[ -f $expected_src ]] || die "missing $expected_src"

# --- temporary directories and cleanup -------------------------------------

# Kept after the run: pjdfstest output, spoolfs messages, parsed results.
logdir=$(mktemp -d --tmpdir spoolfs-pjdfstest-log.XXXXXX)
log=$logdir/pjdfstest.log
# Removed on exit: mountpoints, spoolfs data dir, secondary tmpfs.
work=$(mktemp -d --tmpdir spoolfs-pjdfstest.XXXXXX)
# The tests switch to the dummy users, which must be able to reach the test
# directory: every directory on the path needs o+x (mktemp makes 0700).
chmod 0755 "$work"

mounts=() # every mountpoint we mount on, unmounted (lazily) on exit
child=    # pid of the running test suite, stopped on exit

name=pjdfstest
# shellcheck source=../lib/spoolfs.sh
source "$repo/tests/lib/spoolfs.sh"

# shellcheck disable=SC2317 # (only reached through the trap)
cleanup() {
    local rc=$? i
    set +e
    if [[ -n $child ]]; then
        kill "$child" 2>/dev/null # timeout(1) passes the signal on to pjdfstest
        wait "$child" 2>/dev/null
    fi
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        if is_mounted "${mounts[i]}"; then
            umount -l "${mounts[i]}" || echo "pjdfstest: warning: cannot unmount ${mounts[i]}" >&2
        fi
    done
    # Never rm -rf through a mount that is still there.  (Not grep -q: its
    # early exit could kill findmnt with SIGPIPE, failing the pipeline.)
    if findmnt -rn -o TARGET | grep -F -- "$work" >/dev/null; then
        echo "pjdfstest: warning: something is still mounted under $work; not removing it" >&2
    else
        rm -rf --one-file-system "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- file systems under test -------------------------------------------------

# Secondary file system for the EXDEV cases (link/rename across devices):
# always a fresh tmpfs, so it differs from the file system under test.
secondary=$work/secondary
mkdir -m 0755 "$secondary"
mounts+=("$secondary")
mount -t tmpfs -o size=16m,mode=0755 spoolfs-pjdfstest-secondary "$secondary"

mnt=
if [[ $# -eq 1 ]]; then
    [[ -d $1 ]] || die "$1 is not a directory"
    testdir=$(realpath "$1")
else
    data=$work/data
    mnt=$work/mnt
    mkdir -m 0755 "$data" "$mnt"
    mount_spoolfs "$data" "$mnt"
    testdir=$mnt
fi

# Tests switched to nobody/daemon need to reach the test directory; on FUSE
# that also needs the allow_other mount option.  Say so up front instead of
# failing dozens of tests with EACCES.
runuser -u nobody -- test -x "$testdir" ||
    die "user nobody cannot enter $testdir (path not world-searchable, or a FUSE mount without allow_other)"

# --- run the suite -------------------------------------------------------------

config=$work/pjdfstest.toml
if [[ -n ${PJDFSTEST_NAPTIME:-} ]]; then
    sed -E "s/^naptime *=.*/naptime = $PJDFSTEST_NAPTIME/" "$config_src" >"$config"
else
    cp "$config_src" "$config"
fi

read -r -a filter <<<"${PJDFSTEST_FILTER:-}"
cmd=("$PJDFSTEST_BIN" -c "$config" -p "$testdir" -s "$secondary" "${filter[@]}")
echo "pjdfstest: running: ${cmd[*]}"
echo "pjdfstest: full log: $log"

start=$SECONDS
# Run in the background and wait, so that INT/TERM reach our traps at once
# (cleanup stops the suite before unmounting).  pjdfstest exits 1 when any
# test fails; the result is judged from its output below.
NO_COLOR=1 timeout -k 10 "$PJDFSTEST_TIMEOUT" "${cmd[@]}" </dev/null >"$log" 2>&1 &
child=$!
rc=0
wait "$child" || rc=$?
child=
elapsed=$((SECONDS - start))

errors=0
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "pjdfstest: error: timed out after ${PJDFSTEST_TIMEOUT}s" >&2
    errors=1
fi

# --- parse the results -------------------------------------------------------

# One line per test: "<name><spaces><status>", status being one of ok,
# FAILED, skipped (or, with expected_failures in the config, "failed as
# expected" / "PASSED UNEXPECTEDLY").  Failures are followed by indented
# message lines and, with RUST_BACKTRACE set, a backtrace.
results=$logdir/results.tsv # "<status>\t<name>"
sed -E 's/\x1b\[[0-9;]*m//g' "$log" |
    sed -nE 's/^([^[:space:]]+)[[:space:]]+(ok|FAILED|skipped|failed as expected|PASSED UNEXPECTEDLY)$/\2\t\1/p' \
        >"$results"

count() { grep -cE "^($1)"$'\t' "$results" || true; }
passed=$(count 'ok|PASSED UNEXPECTEDLY')
failed=$(count 'FAILED|failed as expected')
skipped=$(count 'skipped')

# pjdfstest's own closing line: "Summary: F failed, S skipped, P passed,
# E expected failures, T total".  Its absence means pjdfstest crashed.
total=$(sed -nE 's/^Summary: .* ([0-9]+) total$/\1/p' "$log" | tail -n 1)
if [[ -z $total ]]; then
    echo "pjdfstest: error: no summary from pjdfstest (exit status $rc); end of log:" >&2
    tail -n 20 "$log" >&2
    errors=1
elif [[ $total -ne $((passed + failed + skipped)) ]]; then
    echo "pjdfstest: error: pjdfstest reports $total tests but $((passed + failed + skipped)) were parsed" >&2
    errors=1
elif [[ $total -eq 0 ]]; then
    echo "pjdfstest: error: no test was run" >&2
    errors=1
fi

# Failed tests not in expected-failures.txt (comments and blanks stripped).
expected=$logdir/expected-failures.txt
sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$expected_src" | sort -u >"$expected"
awk -F'\t' '$1 == "FAILED" || $1 == "failed as expected" { print $2 }' "$results" |
    sort -u >"$logdir/failed.txt"
unexpected=$(comm -23 "$logdir/failed.txt" "$expected")
stale=$(awk -F'\t' '$1 == "ok" { print $2 }' "$results" | sort -u | comm -12 - "$expected")

if [[ -n $unexpected ]]; then
    echo "pjdfstest: unexpected failures (name and message; backtraces in the log):"
    # Print each failed test's line and its indented message lines.
    awk -v names="$unexpected" '
        BEGIN { n = split(names, a, "\n"); for (i = 1; i <= n; i++) want[a[i]] = 1 }
        /^[^[:space:]]/ { show = ($1 in want) && / FAILED$/ }
        /^Backtrace:/   { show = 0 }
        show            { print "  " $0 }
    ' "$log"
    errors=1
fi
if [[ -n $stale ]]; then
    echo "pjdfstest: note: listed in expected-failures.txt but passed (remove them):"
    while read -r name; do echo "  $name"; done <<<"$stale"
fi
echo "pjdfstest: $skipped tests skipped (see log for reasons), took ${elapsed}s"

# --- unmount -----------------------------------------------------------------

if [[ -n $mnt ]] && ! unmount_and_fsck "$data" "$mnt"; then
    errors=1
fi

echo "pjdfstest: full log: $log"
echo "pjdfstest: $passed passed, $failed failed"
exit "$errors"
