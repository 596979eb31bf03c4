"""In front of FastAPI's router: the hottest routes found by one dict lookup on path and method.

NOTE: FastAPI 0.165 matches an included router's routes through `_IncludedRouter._match` (7% of
a worker's samples on a prediction) and runs `solve_dependencies` for every route (4%), even one
that declares nothing to solve. The routes given here stay ordinary `APIRoute`s — in the OpenAPI
document, and reachable through the router for any request this lookup does not take — but
their requests skip the matching and the solver: the endpoint is called with the request.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send


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
    def __init__(self, app: ASGIApp, routes: Iterable[APIRoute]) -> None:
        self.app = app
        self.routes: dict[tuple[str, str], APIRoute] = {}
        for route in routes:
            # Only routes whose whole contract is "take the request, return a response".
            if not _takes_only_the_request(route) or route.param_convertors:
                raise ValueError(f"{route.path} declares parameters: it needs the router")
            self.routes.update({(route.path, method): route for method in route.methods or ()})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (
            self.routes.get((scope["path"], scope["method"])) if scope["type"] == "http" else None
        )
        if route is None:
            await self.app(scope, receive, send)
            return
        # What the router's match would have put in the scope (metrics read `route`).
        scope.update(route=route, endpoint=route.endpoint, path_params={})
        endpoint: Any = route.endpoint
        response = await endpoint(Request(scope, receive, send))
        await response(scope, receive, send)
