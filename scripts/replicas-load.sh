#!/usr/bin/env bash
# Shared limits at local speed? Three showcase replicas (vector_db processes) on one Redis,
# loaded together over loopback, against local-only replicas (no Redis), in one run:
#
#   1. one local-only replica, loaded alone;
#   2. three local-only replicas, loaded together (the same CPU sharing as 3 and 4);
#   3. three replicas with --redis-url --redis-limits leased, loaded together;
#   4. three replicas with --redis-url --redis-limits precise, loaded together.
#
# Every replica serves `GET /collections` to one key allowed 500,000/s with a quota of
# 100,000,000 a day (so every request is decided by the rate limit and the quota). Prints
# requests/s per replica and the ratios to the local-only replicas.
#
#   scripts/replicas-load.sh                     # 8 s per load, 16 connections per replica
#   DURATION=5s CONNECTIONS=8 scripts/replicas-load.sh
#   BUILD=0 scripts/replicas-load.sh             # use the release binary as built
#
# Needs: PostgreSQL (KEYGATE_LOAD_POSTGRES, default postgres://postgres@127.0.0.1:5432; a
# database keygate_replicas_load is created and dropped), Redis (KEYGATE_LOAD_REDIS, default
# redis://127.0.0.1:6379; keys under a prefix of the run, deleted at the end), psql, curl,
# cargo, awk. oha is installed into .tools/ on first use, as by scripts/load.sh.
set -euo pipefail
export LC_ALL=C

DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-16}
OHA_VERSION=${OHA_VERSION:-1.16.0}
PG=${KEYGATE_LOAD_POSTGRES:-postgres://postgres@127.0.0.1:5432}
REDIS=${KEYGATE_LOAD_REDIS:-redis://127.0.0.1:6379}

die() { echo "replicas-load.sh: $*" >&2; exit 1; }
[[ $DURATION =~ ^[1-9][0-9]{0,2}s$ ]] || die "DURATION is 1s to 999s, not '$DURATION'"
[[ $CONNECTIONS =~ ^[1-9][0-9]{0,2}$ ]] || die "CONNECTIONS is 1 to 999, not '$CONNECTIONS'"
for tool in cargo awk psql curl; do command -v $tool >/dev/null || die "$tool is needed"; done

cd "$(dirname "$0")/.."
root=$(pwd)
oha="$root/.tools/bin/oha"
if [[ ! -x $oha ]]; then
    echo "installing oha $OHA_VERSION into .tools/ (once; takes a few minutes)..."
    cargo install oha --version "$OHA_VERSION" --locked --root "$root/.tools"
fi
if [[ ${BUILD:-1} != 0 ]]; then
    echo "building the showcase (release)..."
    cargo build --release --quiet -p keygate-showcase --example vector_db
fi
target_dir=${CARGO_TARGET_DIR:-target}
[[ $target_dir = /* ]] || target_dir="$root/$target_dir"
bin="$target_dir/release/examples/vector_db"
[[ -x $bin ]] || die "no binary at $bin"

db=keygate_replicas_load
prefix="kg-load-$$"
work=$(mktemp -d "${TMPDIR:-/tmp}/keygate-replicas.XXXXXX")
pids=()
stop_all() {
    for p in "${pids[@]}"; do
        if kill -0 "$p" 2>/dev/null; then kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; fi
    done
    pids=()
}
cleanup() {
    stop_all
    psql "$PG/postgres" -q -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

psql "$PG/postgres" -q -c "DROP DATABASE IF EXISTS $db" >/dev/null
psql "$PG/postgres" -q -c "CREATE DATABASE $db" >/dev/null
export KEYGATE_DATABASE_URL="$PG/$db"
unset KEYGATE_REDIS_URL KEYGATE_REDIS_URL_FILE

# start NAME PORT [ARGS...]: a replica in its own folder; waits until it listens.
start() {
    local name=$1 port=$2
    shift 2
    mkdir -p "$work/$name"
    (cd "$work/$name" && exec "$bin" --listen "127.0.0.1:$port" --audit-log "audit/" \
        --admin-key-file "$work/admin.key" "$@" >"$work/$name/out.log" 2>&1) &
    pids+=($!)
    for _ in $(seq 1 100); do
        if grep -q "listening on" "$work/$name/out.log" 2>/dev/null; then return; fi
        sleep 0.1
    done
    cat "$work/$name/out.log" >&2
    die "replica $name did not start"
}

# The first start issues the admin key; it creates the load key.
start first 7190
admin=$(tr -d '\n' <"$work/admin.key")
key=$(curl -sf -X POST "http://127.0.0.1:7190/admin/keys" -H "Authorization: Bearer $admin" \
    -H 'content-type: application/json' \
    -d '{"name": "load", "scopes": ["collections:read"], "collections": ["*"],
         "rate_limits": ["burst=500000/s"], "quotas": ["daily=100000000/day"]}' |
    sed -n 's/.*"key": *"\([^"]*\)".*/\1/p')
[[ -n $key ]] || die "could not create the load key"
stop_all

# load PORT...: oha on every port at once; prints requests/s per port, in order.
load() {
    local i=0 ports=("$@") opids=()
    for port in "${ports[@]}"; do
        "$oha" -z "$DURATION" -c "$CONNECTIONS" --no-tui --output-format json \
            -H "Authorization: Bearer $key" "http://127.0.0.1:$port/collections" \
            >"$work/oha-$port.json" 2>/dev/null &
        opids+=($!)
    done
    for p in "${opids[@]}"; do wait "$p"; done
    for port in "${ports[@]}"; do
        local rps ok
        rps=$(tr -d ' \n' <"$work/oha-$port.json" | sed -n 's/.*"requestsPerSec":\([0-9.]*\).*/\1/p')
        ok=$(tr -d ' \n' <"$work/oha-$port.json" | sed -n 's/.*"statusCodeDistribution":{\([^}]*\)}.*/\1/p')
        printf '%s %s\n' "${rps:-0}" "${ok:-none}"
        i=$((i + 1))
    done
}

report() { # LABEL then lines "rps statuses"
    local label=$1 r
    shift
    printf '%-34s' "$label"
    for r in "$@"; do printf ' %10.0f' "${r%% *}"; done
    printf '   statuses:'
    for r in "$@"; do printf ' {%s}' "${r#* }"; done
    printf '\n'
}

echo "== $DURATION per load, $CONNECTIONS connections per replica, $(nproc) cores =="
start local-alone 7191
mapfile -t alone < <(load 7191)
stop_all
report "1 local-only replica, alone" "${alone[@]}"

start local-a 7192; start local-b 7193; start local-c 7194
mapfile -t local3 < <(load 7192 7193 7194)
stop_all
report "3 local-only replicas, together" "${local3[@]}"

results=()
for mode in leased precise; do
    start "$mode-a" 7195 --redis-url "$REDIS" --redis-prefix "$prefix-$mode" --redis-limits "$mode"
    start "$mode-b" 7196 --redis-url "$REDIS" --redis-prefix "$prefix-$mode" --redis-limits "$mode"
    start "$mode-c" 7197 --redis-url "$REDIS" --redis-prefix "$prefix-$mode" --redis-limits "$mode"
    mapfile -t r < <(load 7195 7196 7197)
    stop_all
    report "3 Redis replicas ($mode), together" "${r[@]}"
    results+=("$mode ${r[*]}")
done

# Ratios: each Redis replica against the mean local-only replica of the same load shape.
awk -v l3="${local3[*]}" -v alone="${alone[*]}" -v res="$(printf '%s\n' "${results[@]}")" 'BEGIN {
    n = split(l3, a, " "); mean = (a[1] + a[3] + a[5]) / 3
    split(alone, b, " ")
    m = split(res, lines, "\n")
    printf "mean local-only replica (3 together): %.0f req/s; alone: %.0f req/s\n", mean, b[1]
    for (i = 1; i <= m; i++) {
        split(lines[i], f, " ")
        printf "%-8s per replica vs local (3 together): %.0f%% %.0f%% %.0f%%; sum vs 1 local alone: %.0f%%\n",
            f[1], 100 * f[2] / mean, 100 * f[4] / mean, 100 * f[6] / mean, 100 * (f[2] + f[4] + f[6]) / b[1]
    }
}'
# The run's Redis keys.
if command -v redis-cli >/dev/null; then
    redis-cli -u "$REDIS" --scan --pattern "$prefix*" | xargs -r redis-cli -u "$REDIS" DEL >/dev/null || true
fi
