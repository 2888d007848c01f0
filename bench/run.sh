#!/usr/bin/env bash
# spoolfs benchmark suite: spoolfs vs ext4 vs tmpfs, side by side, one command.
#
#   bash bench/run.sh                      # default run (a few minutes; see bench/README.md)
#   bash bench/run.sh --quick              # smoke test of the suite itself (~1 min)
#   bash bench/run.sh -w enqueue,metadata -r 5 -o /tmp/my-results
#   BENCH_BIG=1 bash bench/run.sh -w dirsize   # adds the 1,000,000-entry directory
#   bash bench/run.sh --help               # every option and its environment variable
#
# Needs root and /dev/fuse. This script: builds spoolfs (cargo build --release; skip with
# --no-build or point SPOOLFS_BIN at a binary), installs fio from Debian if missing, makes a
# Python venv with matplotlib (for ratios.png; BENCH_VENV, default
# /var/tmp/spoolfs-bench-venv), creates a scratch dir under /var/tmp (BENCH_WORK_PARENT) and
# runs bench/bench.py. Whatever happens, every mount it made under the scratch dir is
# unmounted and every spoolfs daemon it started is stopped (trap below).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the repo

build=1
ref=${BENCH_REF:-}
args=()
while (($#)); do
    a=$1
    shift
    case "$a" in
    --no-build) build=0 ;;
    --ref)
        ref=${1:?--ref needs a revision}
        shift
        ;;
    --ref=*) ref=${a#--ref=} ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
        echo
        echo "run.sh's own options:"
        echo "  --no-build   use the existing target/release/spoolfs (or SPOOLFS_BIN)"
        echo "  --ref REV    benchmark a committed revision: build it from a clean export"
        echo "               (git archive) in /var/tmp/spoolfs-bench-src/COMMIT [BENCH_REF]"
        echo "The driver's options:"
        echo
        exec python3 "$here/bench.py" --help
        ;;
    *) args+=("$a") ;;
    esac
done

if [[ $(id -u) != 0 ]]; then
    echo "bench: must run as root (mounts, drop_caches)" >&2
    exit 1
fi

if [[ -n "$ref" ]]; then
    # A committed revision, exported clean: the work tree may hold other people's
    # half-done edits, and a benchmark should name exactly what it measured.
    rev=$(git -C "$repo" rev-parse --verify "$ref^{commit}")
    src=/var/tmp/spoolfs-bench-src/$rev
    if [[ ! -x "$src/target/release/spoolfs" ]]; then
        echo "=== building $rev from a clean export in $src"
        rm -rf "$src"
        mkdir -p "$src"
        git -C "$repo" archive "$rev" | tar -x -C "$src"
        (cd "$src" && cargo build --release --bin spoolfs)
    fi
    export SPOOLFS_BIN="$src/target/release/spoolfs"
    BENCH_SOURCE_DESC="$(git -C "$repo" log -1 --format='%h (%s)' "$rev" | cut -c1-100), clean export"
    export BENCH_SOURCE_DESC
elif [[ -z "${SPOOLFS_BIN:-}" ]]; then
    export SPOOLFS_BIN="$repo/target/release/spoolfs"
    if ((build)); then
        echo "=== cargo build --release"
        (cd "$repo" && cargo build --release --bin spoolfs)
    fi
fi

if ! command -v fio >/dev/null; then
    echo "=== installing fio (Debian)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends fio >/dev/null
fi

# matplotlib in a venv of its own (not the system Python). Without it the run still works
# and the report says why there is no plot.
venv=${BENCH_VENV:-/var/tmp/spoolfs-bench-venv}
py=python3
if "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    py="$venv/bin/python"
else
    echo "=== making $venv with matplotlib"
    if python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check matplotlib; then
        py="$venv/bin/python"
    else
        echo "bench: warning: could not install matplotlib; running without ratios.png" >&2
    fi
fi

# Scratch dir: ext4 on the same disk, holding the ext4 test dir, the spoolfs data dirs and
# all mountpoints, so the cleanup below can find every mount by its path.
work=$(mktemp -d "${BENCH_WORK_PARENT:-/var/tmp}/spoolfs-bench-work.XXXXXX")

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # Mounts under the work dir, deepest first. Lazy: a busy or dead (ENOTCONN) FUSE mount
    # is detached at once instead of failing.
    local m
    while read -r m; do
        if [[ -n "$m" ]]; then umount -l "$m" 2>/dev/null || true; fi
    done < <(awk -v w="$work" '$5 == w || index($5, w "/") == 1 {print $5}' /proc/self/mountinfo | sort -r)
    # spoolfs daemons this run started (their PIDs, one a line), if any is still there.
    if [[ -f "$work/daemon.pids" ]]; then
        local pid
        while read -r pid; do
            if [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == spoolfs* ]]; then
                kill -TERM "$pid" 2>/dev/null || true
                sleep 1
                kill -KILL "$pid" 2>/dev/null || true
            fi
        done <"$work/daemon.pids"
    fi
    if [[ "${BENCH_KEEP_WORK:-0}" == 1 ]]; then
        echo "bench: work dir kept: $work" >&2
    elif ! awk -v w="$work" 'index($5, w) == 1 {found=1} END {exit !found}' /proc/self/mountinfo; then
        rm -rf --one-file-system "$work"
    else
        echo "bench: something is still mounted under $work; not removing it" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "=== bench/bench.py (work dir $work)"
"$py" "$here/bench.py" --work-dir "$work" --spoolfs "$SPOOLFS_BIN" "${args[@]}"
