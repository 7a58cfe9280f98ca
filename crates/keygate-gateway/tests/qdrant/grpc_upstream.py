"""A small gRPC stand-in for Qdrant, built from the servicers bundled in qdrant-client
(run by tests/gateway_grpc.rs): collections and points in memory, every call recorded.

usage: grpc_upstream.py LOG

Prints its port on the first line of standard output. Appends one JSON object per call to
LOG: the method, the collection, and the credentials it received (`api-key`,
`authorization`).
"""

import json
import sys
import threading
from concurrent import futures

import grpc
from qdrant_client import grpc as q
from qdrant_client.grpc import collections_service_pb2_grpc as cs
from qdrant_client.grpc import points_service_pb2_grpc as ps

LOG = sys.argv[1]
LOCK = threading.Lock()
# collection -> {id: vector}
STORE = {"docs": {}}


def record(method, request, context):
    meta = dict(context.invocation_metadata())
    entry = {
        "method": method,
        "collection": getattr(request, "collection_name", None),
        "api_key": meta.get("api-key"),
        "authorization": meta.get("authorization"),
    }
    with LOCK, open(LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")


def missing(name, context):
    context.abort(grpc.StatusCode.NOT_FOUND, f"Collection `{name}` doesn't exist!")


class Collections(cs.CollectionsServicer):
    def List(self, request, context):
        record("List", request, context)
        return q.ListCollectionsResponse(
            collections=[q.CollectionDescription(name=n) for n in sorted(STORE)], time=0.001
        )


class Points(ps.PointsServicer):
    def Upsert(self, request, context):
        record("Upsert", request, context)
        points = STORE.get(request.collection_name)
        if points is None:
            missing(request.collection_name, context)
        for p in request.points:
            points[p.id.num] = True
        return q.PointsOperationResponse(
            result=q.UpdateResult(operation_id=len(points), status=q.UpdateStatus.Completed),
            time=0.001,
        )

    def Query(self, request, context):
        record("Query", request, context)
        points = STORE.get(request.collection_name)
        if points is None:
            missing(request.collection_name, context)
        hits = [q.ScoredPoint(id=q.PointId(num=i), score=1.0, version=1) for i in sorted(points)]
        return q.QueryResponse(result=hits[: request.limit or 10], time=0.001)

    def Count(self, request, context):
        record("Count", request, context)
        points = STORE.get(request.collection_name)
        if points is None:
            missing(request.collection_name, context)
        return q.CountResponse(result=q.CountResult(count=len(points)), time=0.001)


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    cs.add_CollectionsServicer_to_server(Collections(), server)
    ps.add_PointsServicer_to_server(Points(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
