#!/usr/bin/env bash
# Installs a real Chroma server and its official Python client (the `chromadb` package,
# pinned) in a virtualenv of their own, for keygate-gateway's Chroma tests, and prints the
# virtualenv's path. An existing one with the pinned version is reused (a fresh install
# takes about two minutes and half a gigabyte).
#
#   export KEYGATE_TEST_CHROMA_VENV="$(scripts/chroma-venv.sh)"
#   cargo test -p keygate-gateway --test gateway_chroma
#
# Where: $KEYGATE_CHROMA_VENV, else ~/.cache/keygate/chroma-$VERSION. Needs python3 (3.9 or
# newer) with the venv module, and the Python package index. Fails (exit 1) when the
# install fails: CI must not pass without the server.
set -euo pipefail

version="1.5.9"
venv="${KEYGATE_CHROMA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/keygate/chroma-$version}"

installed() {
    [ -x "$venv/bin/chroma" ] &&
        [ "$("$venv/bin/python" -c 'import chromadb; print(chromadb.__version__)' 2>/dev/null)" = "$version" ]
}

if ! installed; then
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "chromadb==$version" >&2
    installed || { echo "error: chromadb $version did not install in $venv" >&2; exit 1; }
fi
echo "$venv"
