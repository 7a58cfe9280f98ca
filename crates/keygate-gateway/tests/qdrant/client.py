"""The official Qdrant Python client through keygate-gateway (run by tests/gateway_qdrant.rs).

usage: client.py PORT STEP KEY...

Steps print one JSON object on the last line of standard output:
- isolation ACME GLOBEX: two tenants write, read, search, count, delete; report what each saw.
- refused KEY: one call; report the error.
"""

import json
import sys
import warnings

from qdrant_client import QdrantClient, models

# The client warns that an API key travels over plain HTTP (a loopback test).
warnings.filterwarnings("ignore")


def client(port, key):
    return QdrantClient(url=f"http://127.0.0.1:{port}", api_key=key, prefer_grpc=False, timeout=10)


def error_of(call):
    try:
        call()
    except Exception as e:  # the client raises its own error types
        return f"{type(e).__name__}: {e}"
    return None


def ids(points):
    return sorted(p.id for p in points)


def main():
    port = int(sys.argv[1])
    step = sys.argv[2]
    keys = sys.argv[3:]
    out = {}
    if step == "isolation":
        acme = client(port, keys[0])
        globex = client(port, keys[1])
        acme.upsert(
            "docs",
            points=[
                models.PointStruct(id=1, vector=[1.0, 0.0], payload={"n": 1}),
                models.PointStruct(id=2, vector=[0.9, 0.1], payload={"n": 2, "tenant": "globex"}),
            ],
            wait=True,
        )
        globex.upsert("docs", points=[models.PointStruct(id=3, vector=[1.0, 0.0])], wait=True)
        points, _ = acme.scroll("docs", limit=10, with_payload=True)
        out["acme_scroll"] = ids(points)
        out["acme_tenants"] = sorted(p.payload["tenant"] for p in points)
        out["globex_scroll"] = ids(globex.scroll("docs", limit=10)[0])
        out["acme_query"] = ids(acme.query_points("docs", query=[1.0, 0.0], limit=10).points)
        out["globex_query_filtered"] = ids(
            globex.query_points(
                "docs",
                query=[1.0, 0.0],
                limit=10,
                query_filter=models.Filter(
                    must=[models.FieldCondition(key="tenant", match=models.MatchValue(value="acme"))]
                ),
            ).points
        )
        out["acme_count"] = acme.count("docs").count
        out["acme_retrieve"] = ids(acme.retrieve("docs", ids=[1, 3]))
        out["globex_upsert_acme_id"] = error_of(
            lambda: globex.upsert("docs", points=[models.PointStruct(id=1, vector=[0.0, 1.0])], wait=True)
        )
        globex.delete("docs", points_selector=models.PointIdsList(points=[1, 2]), wait=True)
        out["acme_after_globex_delete"] = acme.count("docs").count
        out["acme_delete_collection"] = error_of(lambda: acme.delete_collection("docs"))
    elif step == "refused":
        out["error"] = error_of(lambda: client(port, keys[0]).count("docs"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
