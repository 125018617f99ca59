"""The inference routes' usual request, dispatched without FastAPI's per-request machinery.

``POST /v1/completions`` and ``POST /v1/chat/completions`` are what the gateway serves most,
and FastAPI's per-request work (routing through every router, solving the dependency tree,
its exit stacks, its exception wrappers) cost ~0.3 ms of a ``max_tokens: 1`` request's
~1 ms of gateway CPU on the 2-core dev box. :class:`FastInference`, the innermost of the
app's middleware, runs the usual request itself: a body of plain JSON that the route's
model accepts, and a bearer key. It calls the very endpoint function the FastAPI route
calls, with the values FastAPI would give it (the route's own body field validates; the
key is authorized by ``deps.authorize``, as ``InferenceDep`` does), and turns what the
key check and the endpoint raise into responses through the app's own exception handlers,
as Starlette's ``ExceptionMiddleware`` does. FastAPI's order holds: a body that is not
JSON is refused before the key is checked, a body the model refuses after.

Anything else goes to the app untouched (its body replayed): another method or media type,
a body that is not JSON or that the model refuses, an app with dependency overrides. So
every error response but the key's and the endpoint's is the app's own, byte for byte.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.gateway.deps import authorize, bearer_token
from loraplex.gateway.json_body import is_json_media_type, parse_json
from loraplex.gateway.middleware import replay_body

# path -> the scopes its FastAPI route requires (``InferenceDep``)
FAST_ROUTES = {"/v1/completions": ("inference",), "/v1/chat/completions": ("inference",)}
_PARAMS = ["body", "principal", "services"]  # each endpoint's: the model, InferenceDep, ServicesDep


@lru_cache(maxsize=64)
def _json_media_type(content_type: str) -> bool:
    return is_json_media_type(content_type)


class FastInference:
    """ASGI middleware; ``owner`` is the FastAPI app whose routes and handlers it uses."""

    def __init__(self, app: ASGIApp, owner: FastAPI) -> None:
        self.app = app
        self.owner = owner
        self._routes: dict[str, APIRoute] | None = None
        self._handlers: dict[Any, Callable[..., Any]] = {}
        self._status_handlers: dict[int, Callable[..., Any]] = {}
        self.ran = 0  # requests whose endpoint ran here (not through the app)

    def _setup(self) -> dict[str, APIRoute]:
        """The routes (and handlers) as the app has them once it takes requests."""
        self._routes = {
            r.path: r
            for r in _api_routes(self.owner.routes)
            if r.path in FAST_ROUTES
            and "POST" in (r.methods or ())
            and list(inspect.signature(r.endpoint).parameters) == _PARAMS
        }
        for key, handler in self.owner.exception_handlers.items():
            if isinstance(key, int):
                self._status_handlers[key] = handler
            elif key not in (500, Exception):  # those are ServerErrorMiddleware's
                self._handlers[key] = handler
        return self._routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        routes = self._routes if self._routes is not None else self._setup()
        route = routes.get(get_route_path(scope))
        if route is None or route.body_field is None or self.owner.dependency_overrides:
            await self.app(scope, receive, send)
            return
        authorization = content_type = None
        for name, value in scope["headers"]:  # the first of each, as Starlette reads them
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"content-type" and content_type is None:
                content_type = value.decode("latin-1")
        body = await _read_body(receive)
        if body is None:
            return  # the client left before its body was sent
        replay = replay_body(body, receive)
        if not body or content_type is None or not _json_media_type(content_type):
            await self.app(scope, replay, send)  # the 415 or the "field required"
            return
        try:
            data = parse_json(body)
        except ValueError:
            await self.app(scope, replay, send)  # the 400 naming why
            return
        services = self.owner.state.services
        scope["route"], scope["endpoint"], scope["path_params"] = route, route.endpoint, {}
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            token = bearer_token(authorization)
            principal = await authorize(services, token, FAST_ROUTES[route.path])
            model, errors = route.body_field.validate(data, {}, loc=("body",))
            if errors:
                await self.app(scope, replay, send)  # the 400 naming the field
                return
            self.ran += 1
            response = await route.endpoint(body=model, principal=principal, services=services)
            await response(scope, replay, sender)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            if started:
                raise RuntimeError(
                    "Caught handled exception, but response already started."
                ) from exc
            response = await handler(Request(scope, replay), exc)
            await response(scope, replay, sender)

    def _handler(self, exc: Exception) -> Callable[..., Any] | None:
        if isinstance(exc, HTTPException) and exc.status_code in self._status_handlers:
            return self._status_handlers[exc.status_code]
        for cls in type(exc).__mro__:
            if cls in self._handlers:
                return self._handlers[cls]
        return None


def _api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """The app's API routes as declared, through routers included with no prefix and no
    dependencies of their own (a route under any other inclusion is left to FastAPI)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        context = getattr(route, "include_context", None)  # FastAPI's included router
        router = getattr(route, "original_router", None)
        if context is not None and router is not None:
            if not context.prefix and not context.dependencies:
                yield from _api_routes(router.routes)


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks) if len(chunks) > 1 else chunks[0]
