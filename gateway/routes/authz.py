"""``/authz``: the gateway as the external authorizer of a Kubernetes inference router.

With the Gateway API Inference Extension (llm-d), the router's proxy (Envoy) sits in front
of the engine pods, before any tenant is known, and its flow control shares capacity fairly
among the values of the ``x-llm-d-inference-fairness-id`` header. Envoy's HTTP external
authorization asks this route about each request first (its headers, ``Authorization``
among them, at ``/authz`` + the request's own path, with the request's method, without the
body): a valid key with the ``inference`` scope gets 200 with the tenant as that header,
which Envoy sets on the request it routes (replacing whatever the client sent); anything
else gets the error the API would give (401, 403, 503 in the API's envelope), which Envoy
returns to the client. The tenant id is the key the engine's own fair scheduler uses for
the same tenant (``Principal.fairness``), so both levels share capacity by the same tenant.
The chart wires it (``inferencePool.extAuth``, docs/deploy.md).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from loraplex.gateway.deps import InferenceDep

router = APIRouter(tags=["authz"], include_in_schema=False)

FAIRNESS_HEADER = "x-llm-d-inference-fairness-id"
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


async def check(principal: InferenceDep) -> Response:
    fairness_id, _weight, _tier = principal.fairness
    return Response(status_code=200, headers={FAIRNESS_HEADER: fairness_id})


router.add_api_route("/authz", check, methods=METHODS)
router.add_api_route("/authz/{path:path}", check, methods=METHODS)
