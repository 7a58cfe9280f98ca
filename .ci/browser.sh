#!/usr/bin/env bash
# The console's end-to-end tests in a real browser: installs Debian's Chromium and its
# WebDriver (packages chromium and chromium-driver) when absent, starts chromedriver on a
# loopback port, runs the browser test with KEYGATE_TEST_CHROMEDRIVER pointing at it, and
# stops the driver. Chromium itself is started by the test (headless, no sandbox, no
# background networking, a fresh profile directory).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi
chromium --version
chromedriver --version
# `browser.sh install`: only the install (`.ci/run` starts the driver itself, so the browser
# test runs inside the README's test command).
if [ "${1:-}" = install ]; then exit 0; fi

port="${KEYGATE_CHROMEDRIVER_PORT:-9515}"
log="$(mktemp)"
chromedriver --port="$port" --allowed-ips=127.0.0.1 >"$log" 2>&1 &
driver=$!
trap 'kill "$driver" 2>/dev/null || true; rm -f "$log"' EXIT
# Wait, bounded, for the driver to answer.
for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$port/status" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$driver" 2>/dev/null; then cat "$log"; exit 1; fi
    sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/status" >/dev/null

export KEYGATE_TEST_CHROMEDRIVER="http://127.0.0.1:$port"
export KEYGATE_TEST_CHROMIUM="${KEYGATE_TEST_CHROMIUM:-$(command -v chromium)}"
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo test -p keygate-showcase --test showcase_console_browser -- --nocapture
