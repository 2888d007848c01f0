#!/usr/bin/env bash
# Run every fuzz target for FUZZ_SECONDS (default 30) each and report:
#   fuzz: N passed, M failed
#
#   bash fuzz/run.sh                       # all targets, 30 s each
#   FUZZ_SECONDS=600 bash fuzz/run.sh ops  # one target, longer
#
# Installs cargo-fuzz if missing. The toolchain here is stable: RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz use its nightly flags; the sanitizer is AddressSanitizer unless FUZZ_SANITIZER
# says otherwise (`none` if ASan cannot be built). The committed seeds in fuzz/corpus/<target>
# are only read: what the fuzzer finds goes to fuzz/target/corpus/<target>, and crashing
# inputs to fuzz/target/artifacts/<target>/ (replay one with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>` in fuzz/). Extra libFuzzer flags:
# FUZZ_ARGS. Exit status 0 only if every target ran clean.
set -uo pipefail

cd "$(dirname "$0")" || exit 1
export RUSTC_BOOTSTRAP=1
seconds=${FUZZ_SECONDS:-30}
sanitizer=${FUZZ_SANITIZER:-address}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked || {
        echo "fuzz: cannot install cargo-fuzz" >&2
        echo "fuzz: 0 passed, 1 failed"
        exit 1
    }
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# Longer inputs for the operation sequences (more operations per run).
max_len() {
    case "$1" in
        ops) echo 4096 ;;
        *) echo 512 ;;
    esac
}

build() {
    cargo fuzz build -s "$sanitizer" "$1" >"target/fuzz-build-$1.log" 2>&1
}

passed=0
failed=0
mkdir -p target
for t in "${targets[@]}"; do
    if ! build "$t"; then
        if [ "$sanitizer" != none ] && [ -z "${FUZZ_SANITIZER:-}" ]; then
            echo "fuzz: $t: building with $sanitizer failed, retrying without a sanitizer" >&2
            sanitizer=none
        fi
        if [ "$sanitizer" = none ] && ! build "$t"; then
            echo "fuzz: $t: build failed, see fuzz/target/fuzz-build-$t.log" >&2
            failed=$((failed + 1))
            continue
        fi
    fi
    mkdir -p "target/corpus/$t" "target/artifacts/$t" "corpus/$t"
    log="target/fuzz-$t.log"
    start=$(date +%s)
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
    cargo fuzz run -s "$sanitizer" "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
        -max_len="$(max_len "$t")" -print_final_stats=1 \
        -artifact_prefix="target/artifacts/$t/" ${FUZZ_ARGS:-} >"$log" 2>&1
    status=$?
    took=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [ -z "$execs" ]; then
        execs=$(grep -o '^#[0-9]*' "$log" | tail -n 1 | tr -d '#')
    fi
    if [ "$status" -eq 0 ]; then
        passed=$((passed + 1))
        echo "fuzz: $t: ok, ${execs:-?} executions in ${took} s ($sanitizer)"
    else
        failed=$((failed + 1))
        echo "fuzz: $t: FAILED after ${execs:-?} executions in ${took} s (exit $status), see fuzz/$log"
        grep -m 5 -E 'panicked|invariant|ERROR: (libFuzzer|AddressSanitizer)|SUMMARY' "$log" |
            sed "s/^/fuzz: $t:   /"
        for a in "target/artifacts/$t"/*; do
            [ -e "$a" ] && echo "fuzz: $t:   input: fuzz/$a"
        done
    fi
done

echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
