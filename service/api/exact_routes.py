"""In front of FastAPI's middleware stack: the hottest routes found by one dict lookup.

NOTE: on a prediction, FastAPI 0.165 spends its time around the endpoint, not in it: matching
an included router's routes (`_IncludedRouter._match`, 7% of a worker's samples), running
`solve_dependencies` for a route that declares nothing to solve (4%), and six middleware
layers (server errors, exception telemetry, two body-limit layers, exception handlers, the
exit stack), each another await and another wrapped `send` (~5%). The routes given here stay
ordinary `APIRoute`s, in the OpenAPI document and reachable through the router for anything
this lookup does not take, but their requests skip all of that. What those layers did for them
is done here with the same parts:
- the body limit is Starlette's `RequestBodyLimitMiddleware`, the one behind FastAPI's
  `max_body_size`, at the app's limit;
- an exception the endpoint raises is answered by the app's own handler for its class (found
  as Starlette finds it, along the class's MRO); anything without one goes on up, to the
  request middleware's last-resort 500.
FastAPI's telemetry span, when switched on, is opened by `FastAPI.__call__` outside all of
this, so these requests keep theirs.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from fastapi.routing import APIRoute
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request, Exception], Awaitable[Response]]


def _takes_only_the_request(route: APIRoute) -> bool:
    dependant = route.dependant
    return dependant.request_param_name is not None and not (
        dependant.path_params
        or dependant.query_params
        or dependant.header_params
        or dependant.cookie_params
        or dependant.body_params
        or dependant.dependencies
    )


class ExactRoutes:
    def __init__(
        self,
        app: ASGIApp,
        routes: Iterable[APIRoute],
        *,
        max_body_size: int,
        exception_handlers: Mapping[Any, Callable[..., Any]],
    ) -> None:
        self.app = app
        self.routes: dict[tuple[str, str], APIRoute] = {}
        for route in routes:
            # Only routes whose whole contract is "take the request, return a response".
            if not _takes_only_the_request(route) or route.param_convertors:
                raise ValueError(f"{route.path} declares parameters: it needs the router")
            self.routes.update({(route.path, method): route for method in route.methods or ()})
        # By class only: `Exception` (and 500) is the last resort's, which is outside.
        self.handlers: dict[type[Exception], Handler] = {}
        for key, handler in exception_handlers.items():
            if isinstance(key, type) and key is not Exception:
                if not inspect.iscoroutinefunction(handler):
                    raise ValueError(f"the handler for {key.__name__} must be async")
                self.handlers[key] = handler
        self.limited = RequestBodyLimitMiddleware(self._serve, max_body_size=max_body_size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (
            self.routes.get((scope["path"], scope["method"])) if scope["type"] == "http" else None
        )
        if route is None:
            await self.app(scope, receive, send)
            return
        # What the router's match would have put in the scope (metrics read `route`).
        scope.update(route=route, endpoint=route.endpoint, path_params={})
        await self.limited(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        endpoint: Any = scope["endpoint"]
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Handler | None:
        for cls in type(exc).__mro__:
            handler = self.handlers.get(cls)
            if handler is not None:
                return handler
        return None
