"""Fails when a locked dependency asks for a newer Rust than the workspace's `rust-version`.

Reads `cargo metadata` (resolved for this host) on stdin. Without an old toolchain at hand,
this and clippy's `incompatible_msrv` are how the minimum Rust version is kept honest.
"""
import json
import sys


def version(text):
    return tuple(int(x) for x in (text.split(".") + ["0", "0"])[:3])


meta = json.load(sys.stdin)
ours = set(meta["workspace_members"])
msrv = max(version(p["rust_version"]) for p in meta["packages"] if p["id"] in ours)
newer = [
    f'{p["name"]} {p["version"]} needs {p["rust_version"]}'
    for p in meta["packages"]
    if p["id"] not in ours and p.get("rust_version") and version(p["rust_version"]) > msrv
]
print(f'rust-version {".".join(map(str, msrv))}: {len(newer)} locked dependencies need more')
for line in newer:
    print("  " + line)
sys.exit(1 if newer else 0)
