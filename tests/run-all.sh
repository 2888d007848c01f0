#!/usr/bin/env bash
# The whole spoolfs test suite, as CI runs it. Needs root (mount tests, pjdfstest) and
# /dev/fuse. Installs the third-party test tools it needs from crates.io if missing.
#
#   bash tests/run-all.sh
#
# Steps: formatting, clippy, release build, cargo tests (pure core model test, redb store,
# mount/crash tests), fuzz, pjdfstest, fsx (both also with -o writeback_cache), stress, soak,
# monitoring. The last line is
# `spoolfs: N passed, M failed` (steps).
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

passed=0
failed=0
failures=()

step() {
    local name=$1
    shift
    echo
    echo "=== $name: $*"
    local start=$SECONDS
    if "$@"; then
        passed=$((passed + 1))
        echo "=== $name: ok ($((SECONDS - start))s)"
    else
        failed=$((failed + 1))
        failures+=("$name")
        echo "=== $name: FAILED ($((SECONDS - start))s)"
    fi
}

install_tool() {
    local bin=$1 crate=$2 version=$3
    if ! "$bin" --version 2>/dev/null | grep -qF "$version"; then
        cargo install "$crate" --version "$version" --locked
    fi
}

step install-tools bash -c "$(declare -f install_tool); install_tool pjdfstest pjdfstest 0.2.2 && install_tool fsx fsx 0.3.2"
step fmt cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets -- -D warnings
step build cargo build --release --workspace
step cargo-test cargo test --release --workspace
# A short fuzz run of the core (operation sequences) and the inode codec; see fuzz/run.sh.
step fuzz env FUZZ_SECONDS="${FUZZ_SECONDS:-20}" bash fuzz/run.sh
step pjdfstest bash tests/pjdfstest/run.sh
step fsx bash tests/fsx/run.sh
# The same two with the opt-in writeback cache (-o writeback_cache): the kernel then reads
# through write-only handles and owns the file's size and times while pages are dirty.
step pjdfstest-writeback env SPOOLFS_MOUNT_OPTS=writeback_cache bash tests/pjdfstest/run.sh
step fsx-writeback env SPOOLFS_MOUNT_OPTS=writeback_cache FSX_SEED=2 bash tests/fsx/run.sh
step stress bash tests/stress/run.sh
# 10 minutes of mixed spool load under a small memfd budget: the budget holds and RSS stays
# flat (SOAK_SECONDS shortens it for local runs); see tests/soak/run.sh.
step soak bash tests/soak/run.sh
step monitoring bash tests/monitoring/run.sh

echo
if ((failed > 0)); then
    echo "failed steps: ${failures[*]}"
fi
echo "spoolfs: $passed passed, $failed failed"
((failed == 0))
