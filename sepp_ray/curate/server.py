"""The HTTP layer of `sepp curate`: Starlette routes over a `Curation`, served by uvicorn.

Safe by default: it binds 127.0.0.1 and then answers only requests whose Host is a loopback
name (a page elsewhere cannot reach it through DNS rebinding). Any other address needs a token,
which every API and image request must present (header ``X-Sepp-Token`` or ``?token=``).
Writes take JSON only (a cross-site form cannot post it without a CORS preflight, which is
never granted). Static assets come from a fixed list: no path from a URL reaches a filesystem.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from collections.abc import Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sepp_ray.curate.images import mime_type
from sepp_ray.curate.pairs import Query
from sepp_ray.curate.session import Curation, NotFound
from sepp_ray.errors import SeppError

ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_BODY = 2_000_000
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]", "::1"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _asset(name: str) -> bytes:
    return (resources.files("sepp_ray.curate") / "assets" / name).read_bytes()


class TokenMiddleware:
    """401 for an API or image request without the token (pages and assets hold no data)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(("/api/", "/img/")):
            req = Request(scope)
            given = req.headers.get("x-sepp-token") or req.query_params.get("token") or ""
            if not hmac.compare_digest(given.encode(), self.token):
                await JSONResponse({"error": "missing or wrong token"}, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error(e: SeppError) -> JSONResponse:
    return JSONResponse({"error": str(e)}, 404 if isinstance(e, NotFound) else 400)


async def _body(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise SeppError("send JSON (Content-Type: application/json)")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise SeppError(f"request body over {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise SeppError(f"malformed JSON: {e}") from None
    if not isinstance(body, dict):
        raise SeppError("the JSON body must be an object")
    return body


def create_app(cur: Curation, token: str | None = None, loopback: bool = True) -> Starlette:
    """The ASGI app; ``loopback`` restricts the Host header to loopback names."""

    async def index(request: Request) -> Response:
        return Response(_asset("index.html"), media_type="text/html")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return JSONResponse({"error": f"no asset {name!r}"}, 404)
        return Response(_asset(name), media_type=ASSETS[name])

    async def info(request: Request) -> Response:
        return JSONResponse(cur.info())

    def pairs(request: Request) -> Response:
        try:
            return JSONResponse(cur.page(Query.parse(request.query_params)))
        except SeppError as e:
            return _error(e)

    def image(request: Request) -> Response:
        try:
            data = cur.image(request.path_params["id"])
        except SeppError as e:
            return _error(e)
        return Response(
            data, media_type=mime_type(data), headers={"Cache-Control": "private, max-age=3600"}
        )

    def writer(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                body = await _body(request)  # JSON only: no cross-site form posts
                return JSONResponse(await run_in_threadpool(fn, body))
            except SeppError as e:
                return _error(e)

        return endpoint

    routes = [
        Route("/", index),
        Route("/assets/{name}", asset),
        Route("/api/info", info),
        Route("/api/pairs", pairs),
        Route("/api/decide", writer(cur.decide), methods=["POST"]),
        Route("/api/decide-matching", writer(cur.decide_matching), methods=["POST"]),
        Route("/api/undo", writer(lambda _: cur.undo()), methods=["POST"]),
        Route("/api/export", writer(lambda _: cur.export()), methods=["POST"]),
        Route("/img/{id}", image),
    ]
    middleware = []
    if loopback:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_NAMES))
    if token:
        middleware.append(Middleware(TokenMiddleware, token=token))
    return Starlette(routes=routes, middleware=middleware)


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback address without a token, before anything listens."""
    if not is_loopback(host) and not token:
        raise SeppError(
            f"serving on {host} exposes the pairs and their decisions to the network: give a "
            "token (token=... or SEPP_CURATE_TOKEN) that the page must present, or use "
            "host=127.0.0.1"
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: one the OS picks), so the URL printed is the real one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SeppError(f"cannot listen on {host}:{port} ({e}): choose another port=") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(cur: Curation, host: str, port: int, token: str | None, announce: Any = print) -> None:
    """Serve until interrupted; ``announce`` gets the page's URL first."""
    import uvicorn

    check_bind(host, token)
    sock = bind(host, port)
    real_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{real_port}/" + (f"?token={token}" if token else "")
    config = uvicorn.Config(
        create_app(cur, token, loopback=is_loopback(host)), log_level="warning", access_log=False
    )
    announce(f"curating {len(cur.table)} pairs at {url}")
    uvicorn.Server(config).run(sockets=[sock])
