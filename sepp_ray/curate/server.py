"""The HTTP layer of `sepp curate`: Starlette routes over a `Curation`, served by uvicorn.

Safe by default, on every address:
- a random token guards every request (``$SEPP_CURATE_TOKEN`` replaces it; it never goes on the
  command line, where ``ps`` shows it to every user of the host). The URL printed carries it
  once, as Jupyter's does: the first request with ``?token=`` gets it back as an HttpOnly,
  SameSite=Strict cookie and a redirect to the clean URL, so it leaves the address bar and the
  history. Scripts may send the ``X-Sepp-Token`` header instead. Tokens compare in constant time.
- on a loopback address, only requests whose Host is a loopback name are answered (a page
  elsewhere cannot reach the server through DNS rebinding);
- writes take JSON only (a cross-site form cannot post it without a CORS preflight, which is
  never granted), with a Content-Length checked before a byte of the body is read;
- the page's Content-Security-Policy allows no inline script; static assets come from a fixed
  list: no path from a URL reaches a filesystem.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sepp_ray.curate.images import mime_type
from sepp_ray.curate.pairs import Query
from sepp_ray.curate.session import Curation, NotFound
from sepp_ray.errors import SeppError

ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_BODY = 2_000_000
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]", "::1"]
TOKEN_ENV = "SEPP_CURATE_TOKEN"
TOKEN_HEADER = "x-sepp-token"
MIN_TOKEN_CHARS = 16
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class HttpError(SeppError):
    """A request refused with a given HTTP status (411, 413, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_from_env(env: dict[str, str]) -> str:
    """``$SEPP_CURATE_TOKEN`` when set (long enough to resist guessing), else a random one."""
    given = env.get(TOKEN_ENV, "")
    if not given:
        return new_token()
    if len(given) < MIN_TOKEN_CHARS:
        raise SeppError(
            f"${TOKEN_ENV} has {len(given)} characters: give at least {MIN_TOKEN_CHARS} "
            f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'), or unset it "
            "for a random token"
        )
    return given


def same_token(given: str, token: str) -> bool:
    """Constant time whatever the lengths: compare digests, not the strings."""
    a = hashlib.sha256(given.encode()).digest()
    return hmac.compare_digest(a, hashlib.sha256(token.encode()).digest())


def _asset(name: str) -> bytes:
    return (resources.files("sepp_ray.curate") / "assets" / name).read_bytes()


class TokenMiddleware:
    """Every request presents the token (cookie or header); ``/?token=`` trades it for the
    cookie and redirects to the clean URL."""

    def __init__(self, app: ASGIApp, token: str, cookie: str) -> None:
        self.app = app
        self.token = token
        self.cookie = cookie

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        req = Request(scope)
        if "token" in req.query_params:
            response = self._exchange(req)
        elif same_token(self._given(req), self.token):
            await self.app(scope, receive, send)
            return
        else:
            response = self._refuse(scope["path"])
        await response(scope, receive, send)

    def _given(self, req: Request) -> str:
        return req.headers.get(TOKEN_HEADER) or req.cookies.get(self.cookie, "")

    def _exchange(self, req: Request) -> Response:
        if req.url.path != "/" or not same_token(req.query_params["token"], self.token):
            return self._refuse(req.url.path)
        rest = [(k, v) for k, v in req.query_params.multi_items() if k != "token"]
        clean = "/" + (f"?{urlencode(rest)}" if rest else "")
        response = RedirectResponse(clean, status_code=303, headers={"Cache-Control": "no-store"})
        response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict", path="/")
        return response

    @staticmethod
    def _refuse(path: str) -> Response:
        text = "missing or wrong token: open the URL `sepp curate` printed (it ends in ?token=...)"
        if path.startswith(("/api/", "/img/")):
            return JSONResponse({"error": text}, 401)
        return PlainTextResponse(text, 401)


def _error(e: SeppError) -> JSONResponse:
    status = e.status if isinstance(e, HttpError) else 404 if isinstance(e, NotFound) else 400
    return JSONResponse({"error": str(e)}, status)


def _content_length(request: Request) -> int:
    """The declared body size, refused before reading when it is absent, malformed or large."""
    raw = request.headers.get("content-length")
    if raw is None:
        raise HttpError(411, "send the body with a Content-Length (no chunked uploads)")
    if not raw.isdigit():
        raise HttpError(400, f"malformed Content-Length {raw!r}")
    if int(raw) > MAX_BODY:
        raise HttpError(413, f"request body of {raw} bytes is over the {MAX_BODY}-byte limit")
    return int(raw)


async def _body(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise SeppError("send JSON (Content-Type: application/json)")
    limit = _content_length(request)
    chunks, size = [], 0
    async for chunk in request.stream():  # the server holds the body to the declared length
        size += len(chunk)
        if size > limit:
            raise HttpError(400, "the body is longer than its Content-Length")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError as e:
        raise SeppError(f"malformed JSON: {e}") from None
    if not isinstance(body, dict):
        raise SeppError("the JSON body must be an object")
    return body


def _routes(cur: Curation) -> list[Route]:
    async def index(request: Request) -> Response:
        return Response(_asset("index.html"), media_type="text/html", headers=PAGE_HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return JSONResponse({"error": f"no asset {name!r}"}, 404)
        return Response(_asset(name), media_type=ASSETS[name], headers=PAGE_HEADERS)

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
        headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
        return Response(data, media_type=mime_type(data), headers=headers)

    def writer(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                body = await _body(request)  # JSON only: no cross-site form posts
                return JSONResponse(await run_in_threadpool(fn, body))
            except SeppError as e:
                return _error(e)

        return endpoint

    return [
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


def create_app(
    cur: Curation, token: str, loopback: bool = True, cookie: str = "sepp-curate"
) -> Starlette:
    """The ASGI app; ``loopback`` restricts the Host header to loopback names; ``cookie`` names
    the cookie that keeps the token (one per port: cookies do not tell ports apart)."""
    if not token:
        raise SeppError("the curation page needs a token")
    middleware = []
    if loopback:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_NAMES))
    middleware.append(Middleware(TokenMiddleware, token=token, cookie=cookie))
    return Starlette(routes=_routes(cur), middleware=middleware)


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


def serve(cur: Curation, host: str, port: int, token: str, announce: Any = print) -> None:
    """Serve until interrupted; ``announce`` gets the page's URL (with its token) first."""
    import uvicorn

    sock = bind(host, port)
    real_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    app = create_app(cur, token, loopback=is_loopback(host), cookie=f"sepp-curate-{real_port}")
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    announce(f"curating {len(cur.table)} pairs at http://{shown}:{real_port}/?token={token}")
    uvicorn.Server(config).run(sockets=[sock])
