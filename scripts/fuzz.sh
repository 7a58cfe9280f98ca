#!/usr/bin/env bash
# Runs every fuzz target (or those named) for a bounded time, one process at a time, and
# prints executions, coverage and crashes per target.
#
#   scripts/fuzz.sh                 # every target, 60 s each
#   FUZZ_SECONDS=300 scripts/fuzz.sh key stack
#   FUZZ_SAVE=1 scripts/fuzz.sh     # then save the minimized corpus (at most FUZZ_MAX_CORPUS=300) in fuzz/corpus/
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). libFuzzer needs nightly flags; on a stable
# toolchain RUSTC_BOOTSTRAP=1 lets rustc accept them. CI does not run this: it replays the
# saved corpus and regressions with `cargo test --workspace --all-features`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${FUZZ_SECONDS:-60}"
export RUSTC_BOOTSTRAP=1 CARGO_INCREMENTAL=0
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

cargo fuzz build -O -a -s none >/dev/null
printf '%-12s %8s %14s %10s %8s %8s\n' target seconds executions exec/s cov crashes
for t in "${targets[@]}"; do
    work="corpus-work/$t"
    mkdir -p "$work" "corpus/$t" "artifacts/$t"
    cp -n "corpus/$t"/* "$work"/ 2>/dev/null || true
    log="$(mktemp)"
    before=$(find "artifacts/$t" -type f | wc -l)
    # -jobs=1 / one worker: other builds on the machine keep making progress.
    cargo fuzz run -O -a -s none "$t" "$work" -- \
        -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 \
        -timeout=10 -max_len=4096 >"$log" 2>&1 || true
    after=$(find "artifacts/$t" -type f | wc -l)
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
    printf '%-12s %8s %14s %10s %8s %8s\n' "$t" "$seconds" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$((after - before))"
    if [ "$after" -gt "$before" ]; then
        grep -m1 -A3 'panicked at' "$log" || tail -20 "$log"
    fi
    if [ -n "${FUZZ_SAVE:-}" ]; then
        fresh="corpus-work/$t.min"
        rm -rf "$fresh" && mkdir -p "$fresh"
        cargo fuzz run -O -a -s none "$t" "$fresh" "$work" -- -set_cover_merge=1 -max_len=4096 >/dev/null 2>&1
        # Keep the saved corpus small: at most FUZZ_MAX_CORPUS inputs, the smallest first.
        ls -S "$fresh" | head -n -"${FUZZ_MAX_CORPUS:-300}" | (cd "$fresh" && xargs -r rm -f)
        rm -rf "corpus/$t" && mv "$fresh" "corpus/$t"
        echo "saved corpus: $(ls "corpus/$t" | wc -l) inputs in fuzz/corpus/$t"
    fi
    rm -f "$log"
done
