"""The official Qdrant Python client over gRPC through keygate-gateway (run by
tests/gateway_grpc.rs).

usage: grpc_client.py PORT STEP KEY...

Steps print one JSON object on the last line of standard output:
- allowed KEY: list collections, upsert, query and count in `docs`; report the results.
- refused KEY...: one count of `docs` per key (`-` for no key), one upsert with the first;
  report the gRPC status names.
"""

import json
import sys
import warnings

import grpc
from qdrant_client import QdrantClient, models

# The client warns that an API key travels over plain HTTP (a loopback test).
warnings.filterwarnings("ignore")


def client(port, key):
    return QdrantClient(
        host="127.0.0.1",
        port=port,
        grpc_port=port,
        prefer_grpc=True,
        https=False,
        api_key=None if key == "-" else key,
        check_compatibility=False,
        timeout=10,
    )


def status_of(call):
    try:
        call()
    except grpc.RpcError as e:
        return {"code": e.code().name, "message": e.details()}
    except Exception as e:  # the client's own error types
        return {"code": type(e).__name__, "message": str(e)}
    return None


def main():
    port = int(sys.argv[1])
    step = sys.argv[2]
    keys = sys.argv[3:]
    out = {}
    if step == "allowed":
        c = client(port, keys[0])
        out["collections"] = [d.name for d in c.get_collections().collections]
        r = c.upsert(
            "docs",
            points=[
                models.PointStruct(id=1, vector=[1.0, 0.0]),
                models.PointStruct(id=2, vector=[0.0, 1.0]),
            ],
            wait=True,
        )
        out["upsert"] = str(r.status.value)
        out["query"] = sorted(p.id for p in c.query_points("docs", query=[1.0, 0.0], limit=10).points)
        out["count"] = c.count("docs").count
    elif step == "refused":
        out["count"] = [status_of(lambda k=k: client(port, k).count("docs")) for k in keys]
        out["upsert"] = status_of(
            lambda: client(port, keys[0]).upsert(
                "docs", points=[models.PointStruct(id=9, vector=[1.0, 0.0])], wait=True
            )
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
