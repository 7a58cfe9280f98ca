"""The official Chroma Python client through keygate-gateway (run by tests/gateway_chroma.rs).

usage: client.py PORT STEP KEY...

Steps print one JSON object on the last line of standard output:
- setup OPERATOR: create collection `docs`.
- isolation ACME GLOBEX: two tenants write, read, query, delete; report what each saw.
- refused KEY: one call; report the error.
"""

import json
import sys

import chromadb
from chromadb.config import Settings


def client(port, key):
    return chromadb.HttpClient(
        host="127.0.0.1",
        port=port,
        headers={"x-chroma-token": key},
        settings=Settings(anonymized_telemetry=False),
    )


def error_of(call):
    try:
        call()
    except Exception as e:  # the client raises its own error types
        return f"{type(e).__name__}: {e}"
    return None


def collection(c):
    # Embeddings are always given, so no embedding model is loaded.
    return c.get_collection("docs", embedding_function=None)


def main():
    port = int(sys.argv[1])
    step = sys.argv[2]
    keys = sys.argv[3:]
    out = {}
    if step == "setup":
        c = client(port, keys[0])
        c.get_or_create_collection("docs", embedding_function=None)
        out["collections"] = [col.name for col in c.list_collections()]
    elif step == "isolation":
        acme = collection(client(port, keys[0]))
        globex = collection(client(port, keys[1]))
        acme.add(
            ids=["a1", "a2"],
            embeddings=[[1.0, 0.0], [0.9, 0.1]],
            metadatas=[{"n": 1}, {"n": 2, "tenant": "globex"}],
            documents=["acme one", "acme two"],
        )
        globex.upsert(ids=["g1"], embeddings=[[1.0, 0.0]], metadatas=[{"n": 3}])
        out["acme_get"] = sorted(acme.get()["ids"])
        out["acme_metadatas"] = sorted(m["tenant"] for m in acme.get(include=["metadatas"])["metadatas"])
        out["globex_get"] = sorted(globex.get()["ids"])
        out["acme_query"] = sorted(acme.query(query_embeddings=[[1.0, 0.0]], n_results=3)["ids"][0])
        out["globex_query_where"] = globex.query(
            query_embeddings=[[1.0, 0.0]], n_results=3, where={"n": {"$gte": 1}}
        )["ids"][0]
        out["acme_get_globex_id"] = acme.get(ids=["g1"])["ids"]
        acme.delete(ids=["g1"])
        out["globex_after_acme_delete"] = globex.get()["ids"]
        out["acme_upsert_globex_id"] = error_of(
            lambda: acme.upsert(ids=["g1"], embeddings=[[0.0, 1.0]], metadatas=[{"n": 9}])
        )
        out["globex_after_acme_upsert"] = globex.get(include=["embeddings"])["embeddings"][0].tolist()
        acme.update(ids=["a1"], metadatas=[{"n": 10}])
        out["acme_a1_after_update"] = acme.get(ids=["a1"], include=["metadatas"])["metadatas"]
        out["acme_update_globex_id"] = error_of(lambda: acme.update(ids=["g1"], metadatas=[{"n": 0}]))
        out["globex_after_acme_update"] = globex.get(include=["metadatas"])["metadatas"]
        out["acme_count"] = error_of(lambda: acme.count())
        out["acme_delete_collection"] = error_of(lambda: client(port, keys[0]).delete_collection("docs"))
    elif step == "refused":
        out["error"] = error_of(lambda: collection(client(port, keys[0])).get())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
