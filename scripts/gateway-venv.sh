#!/usr/bin/env bash
# Installs what keygate-gateway's tests against real upstreams need, pinned, in a
# virtualenv of their own, and prints the virtualenv's path: a Chroma server and Chroma's
# official Python client (the `chromadb` package), and Qdrant's official Python client
# (`qdrant-client`). An existing one with the pinned versions is reused (a fresh install
# takes about two minutes and half a gigabyte).
#
#   export KEYGATE_TEST_GATEWAY_VENV="$(scripts/gateway-venv.sh)"
#   cargo test -p keygate-gateway
#
# Where: $KEYGATE_GATEWAY_VENV, else ~/.cache/keygate/gateway-venv-<versions>. Needs python3
# (3.9 or newer) with the venv module, and the Python package index. Fails (exit 1) when the
# install fails: CI must not pass without them.
set -euo pipefail

chroma="1.5.9"
qdrant="1.20.0"
venv="${KEYGATE_GATEWAY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/keygate/gateway-venv-chroma$chroma-qdrant$qdrant}"

installed() {
    [ -x "$venv/bin/chroma" ] &&
        [ "$("$venv/bin/python" -c 'import chromadb; print(chromadb.__version__)' 2>/dev/null)" = "$chroma" ] &&
        [ "$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("qdrant-client"))' 2>/dev/null)" = "$qdrant" ]
}

if ! installed; then
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "chromadb==$chroma" "qdrant-client==$qdrant" >&2
    installed || { echo "error: chromadb $chroma and qdrant-client $qdrant did not install in $venv" >&2; exit 1; }
fi
echo "$venv"
