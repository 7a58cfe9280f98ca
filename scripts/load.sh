#!/usr/bin/env bash
# Over-HTTP load test: the showcase's trivial route (GET /) bare and behind keygate's full
# six-layer stack, served by one process (crates/keygate-showcase/examples/load_target.rs) on two loopback ports,
# loaded in turn by oha. Prints requests/s and p99 latency for both and their ratio.
#
#   scripts/load.sh                          # 2 rounds x (bare, stack), 10 s each, 32 connections
#   DURATION=5s CONNECTIONS=16 ROUNDS=1 scripts/load.sh
#   LAYERS=auth,scope scripts/load.sh        # a subset of audit,auth,ip,scope,rate,quota
#   FORM=layers scripts/load.sh              # six separate layers (default: all six fused)
#
# Bounded: every run lasts DURATION (oha -z), the number of runs is fixed, and the only
# target is 127.0.0.1. The load generator, oha, is installed from crates.io into .tools/ on
# first use (a one-off build of a few minutes). Needs: bash, awk, cargo.
set -euo pipefail
export LC_ALL=C

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
ROUNDS=${ROUNDS:-2}
OHA_VERSION=${OHA_VERSION:-1.16.0}
LAYERS=${LAYERS:-audit,auth,ip,scope,rate,quota}
FORM=${FORM:-fused}

die() { echo "load.sh: $*" >&2; exit 1; }

[[ $DURATION =~ ^[1-9][0-9]{0,2}s$ ]] || die "DURATION is 1s to 999s, not '$DURATION'"
[[ $CONNECTIONS =~ ^[1-9][0-9]{0,2}$ ]] || die "CONNECTIONS is 1 to 999, not '$CONNECTIONS'"
[[ $ROUNDS =~ ^[1-9]$ ]] || die "ROUNDS is 1 to 9, not '$ROUNDS'"
[[ $LAYERS =~ ^[a-z,]+$ ]] || die "LAYERS is a comma-separated list, not '$LAYERS'"
[[ $FORM == fused || $FORM == layers ]] || die "FORM is fused or layers, not '$FORM'"
command -v cargo >/dev/null || die "cargo is needed"
command -v awk >/dev/null || die "awk is needed"

cd "$(dirname "$0")/.."
root=$(pwd)

oha="$root/.tools/bin/oha"
if [[ ! -x $oha ]]; then
    echo "installing oha $OHA_VERSION into .tools/ (once; takes a few minutes)..."
    cargo install oha --version "$OHA_VERSION" --locked --root "$root/.tools"
fi

echo "building crates/keygate-showcase/examples/load_target.rs (release)..."
cargo build --release --quiet -p keygate-showcase --example load_target
target_dir=${CARGO_TARGET_DIR:-target}
[[ $target_dir = /* ]] || target_dir="$root/$target_dir"
bin="$target_dir/release/examples/load_target"
[[ -x $bin ]] || die "no binary at $bin"

work=$(mktemp -d "${TMPDIR:-/tmp}/keygate-load.XXXXXX")
server=
cleanup() {
    if [[ -n $server ]] && kill -0 "$server" 2>/dev/null; then
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

form_args=()
[[ $FORM == fused ]] && form_args=(--fused)
"$bin" --audit-dir "$work/audit" --layers "$LAYERS" "${form_args[@]}" >"$work/target.log" 2>&1 &
server=$!

# Wait (at most 30 s) for the target to print its addresses and key.
for _ in $(seq 1 300); do
    grep -q '^ready$' "$work/target.log" 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat "$work/target.log" >&2; die "load_target exited"; }
    sleep 0.1
done
grep -q '^ready$' "$work/target.log" || die "load_target did not start within 30 s"
field() { awk -v k="$1" '$1 == k { print $2; exit }' "$work/target.log"; }
bare_url=$(field bare)
stack_url=$(field stack)
key=$(field key)
for url in "$bare_url" "$stack_url"; do
    [[ $url == http://127.0.0.1:* ]] || die "refusing to load '$url' (127.0.0.1 only)"
done

# run NAME URL ARGS...: one oha run; its text report goes to $work/NAME.txt.
run() {
    local name=$1 url=$2
    shift 2
    "$oha" --no-tui -u ms -c "$CONNECTIONS" -H "x-api-key: $key" "$@" "$url" >"$work/$name.txt"
    # Only 200s count: a refused request would measure the rejection path.
    awk '/^Status code distribution:/ { s = 1; next }
         s && /^ *\[[0-9]+\]/ { if ($1 != "[200]") bad = bad " " $1 " x" $2 }
         s && /^$/ { s = 0 }
         END { if (bad != "") { print "non-200 answers:" bad; exit 1 } }' "$work/$name.txt" >&2 ||
        die "$name: the target answered something other than 200 (see above)"
}
rps() { awk -F'\t' '/Requests\/sec:/ { print $2; exit }' "$work/$1.txt"; }
p99() { awk '$1 == "99.00%" && $2 == "in" { print $3; exit }' "$work/$1.txt"; }
ok200() { awk '$1 == "[200]" { print $2; exit }' "$work/$1.txt"; }

echo "warming up..."
run warm-bare "$bare_url" -n 2000
run warm-stack "$stack_url" -n 2000

echo "loading: $ROUNDS round(s) of bare then stack, $DURATION each, $CONNECTIONS connections"
for r in $(seq 1 "$ROUNDS"); do
    for which in bare stack; do
        url=$bare_url
        [[ $which == stack ]] && url=$stack_url
        run "$which-$r" "$url" -z "$DURATION"
        printf '  round %s %-5s %10.0f req/s   p99 %7.3f ms\n' "$r" "$which" "$(rps "$which-$r")" "$(p99 "$which-$r")"
    done
done

# Stop the target: it flushes the audit queue and reports what it wrote.
kill -TERM "$server"
wait "$server" || true
server=
audit=$(awk '$1 == "audit" { print; exit }' "$work/target.log")
[[ -n $audit ]] || die "load_target did not report its audit writer"
written=$(echo "$audit" | sed -n 's/.*written=\([0-9]*\).*/\1/p')
dropped=$(echo "$audit" | sed -n 's/.*dropped=\([0-9]*\).*/\1/p')
served=$(ok200 warm-stack)
for r in $(seq 1 "$ROUNDS"); do served=$((served + $(ok200 "stack-$r"))); done
[[ $dropped == 0 ]] || die "the audit writer dropped $dropped events"
[[ ,$LAYERS, != *,audit,* ]] || ((written >= served)) || die "audit wrote $written events for $served answered requests"

mean() { # mean KIND FIELD-FUNCTION
    local kind=$1 fn=$2 vals=""
    for r in $(seq 1 "$ROUNDS"); do vals="$vals $($fn "$kind-$r")"; done
    echo "$vals" | awk '{ s = 0; for (i = 1; i <= NF; i++) s += $i; printf "%.6f", s / NF }'
}
bare_rps=$(mean bare rps)
stack_rps=$(mean stack rps)
bare_p99=$(mean bare p99)
stack_p99=$(mean stack p99)
echo
echo "GET / on 127.0.0.1, oha $("$oha" --version | awk '{ print $2 }'), -c $CONNECTIONS, $ROUNDS x $DURATION per target, $(nproc 2>/dev/null || echo '?') cores"
awk -v br="$bare_rps" -v sr="$stack_rps" -v bp="$bare_p99" -v sp="$stack_p99" 'BEGIN {
    printf "  %-28s %12s %12s\n", "", "requests/s", "p99 (ms)"
    printf "  %-28s %12.0f %12.3f\n", "bare", br, bp
    printf "  %-28s %12.0f %12.3f\n", "stack", sr, sp
    printf "  %-28s %11.1f%% %11.2fx\n", "stack / bare", 100 * sr / br, sp / bp
}'
echo "  stack layers: $LAYERS ($(awk '$1 == "layers" { print ($3 == "" ? "separate" : "fused"); exit }' "$work/target.log"))"
if [[ ,$LAYERS, == *,audit,* ]]; then
    echo "  audit: $written events written to the hash-chained file, none dropped"
fi
