"""The labelling web server: a few static pages and a JSON API, a Starlette app served by uvicorn.

Authentication: every page but the login page, and every API call, needs an annotator's token, given as
`Authorization: Bearer TOKEN` or as the `alignkit_token` cookie that logging in on the page sets
(HttpOnly, SameSite=Strict, and Secure behind HTTPS). Only the token's sha256 is stored.

Cross-site requests: every POST and every API call from a browser must come from this server's own pages.
A browser says where a request comes from in `Origin` and `Sec-Fetch-Site`, and a page on another site
can set neither, so a request whose headers name another origin is refused with 403 (a logged-in
annotator's cookie, or a login form posted by another site, is never acted on). Clients that are not
browsers send neither header and authenticate with a bearer token, which no other site can add.

Model outputs are untrusted: the page puts them in the DOM with `textContent` only, and the
Content-Security-Policy allows scripts from this server's /static/ alone, so even a mistake in the page
would not let a completion run script.

What the HTTP stack guards against (findings of issue 17, each tested with the attack in
tests/test_label_attacks.py):
- h11 parses requests strictly (one `Content-Length`, bounded headers); a request that gives both
  `Transfer-Encoding` and `Content-Length` is refused, as a proxy in front could frame it otherwise;
- a client gets `request_seconds` to send each whole request, and an idle keep-alive connection is closed
  after `keep_alive_seconds`; at `max_connections`, the connections idle the longest are closed to make
  room, so idle sockets cannot lock annotators out; past that, requests get 503;
- bodies are capped at 64 KiB (413) and JSON that Python cannot parse (deep nesting, huge integers) is 400;
- the request log escapes control characters and never shows a `token` query parameter.

The API (see docs/label.md): GET /api/me, GET /api/next, POST /api/answer, POST /api/skip,
GET /api/progress (admin), GET /api/export (admin). Errors are JSON {"error": "..."} with 400 (malformed
body), 401 (no or bad token), 403 (not an admin, or a cross-site request), 404, 405, 409 (conflict:
already answered, not yours, task full), 413 (body too large).
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import signal
import socket
import sys
import threading
import time
import traceback
import unicodedata
from collections.abc import Awaitable, Callable
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from alignkit.errors import AlignkitError
from alignkit.label.analysis import agreement_summary, annotator_agreement, export_rows, json_safe, position_summary
from alignkit.label.store import Annotator, Answer, LabelStore, Refused

STATIC = Path(__file__).parent / "static"
COOKIE = "alignkit_token"
MAX_BODY = 64 * 1024
TOO_LARGE = f"the body must be at most {MAX_BODY} bytes"
MAX_HEADERS = 16 * 1024  # request line and headers together
MAX_TASK_ID = 2**63 - 1  # the database's integer range: a larger id cannot name a task
MAX_CONNECTIONS = 256
REQUEST_SECONDS = 10.0
KEEP_ALIVE_SECONDS = 5
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: under it a browser sends `Origin: null` with the page's own form posts, which the
    # cross-site check below could not tell from a forged one. same-origin still sends nothing to other sites.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
ANSWER_FIELDS = {"task_id", "choice", "ranking", "reason"}
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
T = TypeVar("T")


# --- the connection: uvicorn's h11 protocol with a request deadline and eviction of idle connections -------


class GuardedH11Protocol(H11Protocol):
    """uvicorn closes a keep-alive connection that stays idle after a response, but a connection that never
    finishes its first request (it sends nothing, or a byte now and then) would stay open for ever, and
    every such connection counts against `limit_concurrency`. Here each request must arrive whole within
    `request_seconds`, and a new connection at the limit closes the connections idle the longest."""

    request_seconds = REQUEST_SECONDS  # the server sets its own value on a subclass

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self.arm_deadline()
        self.make_room()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        super().connection_lost(exc)

    def arm_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.idle_since = self.loop.time()
        self.deadline = self.loop.call_later(self.request_seconds, self.on_deadline)

    def on_deadline(self) -> None:
        # IDLE: the request's head is not complete; SEND_BODY: its body is not. Once the whole request is
        # in (DONE), the app may take its time.
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()

    def waiting(self) -> bool:
        """No request in progress: nothing is lost by closing this connection."""
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def make_room(self) -> None:
        if self.limit_concurrency is None:
            return
        excess = len(self.connections) - self.limit_concurrency + 1  # uvicorn answers 503 at the limit
        if excess <= 0:
            return
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol) and c.waiting()]
        for connection in sorted(idle, key=lambda c: c.idle_since)[:excess]:
            connection.transport.close()
            # Counted out now: its connection_lost runs only on the loop's next turn, after this request's check.
            self.connections.discard(connection)


# --- requests: who is asking, and from where -----------------------------------------------------------------


def printable(text: str) -> str:
    """`text` with control characters (C0, DEL, C1, and other invisible ones) as escapes: what a client
    sends cannot move the cursor, recolour or rewrite an operator's terminal through the log."""
    return "".join(c if not unicodedata.category(c).startswith("C") else ascii(c)[1:-1] for c in text)


def loggable_target(scope: Scope) -> str:
    """The request target as sent (still percent-encoded), with the value of any `token` parameter hidden."""
    path = scope.get("raw_path") or scope["path"].encode("utf-8")
    query = scope.get("query_string", b"").decode("latin-1")
    query = re.sub(r"((?:^|&)[^&=]*token[^&=]*=)[^&]*", r"\1***", query, flags=re.IGNORECASE)
    return printable(path.decode("latin-1") + ("?" + query if query else ""))


def same_site(headers: Headers) -> bool:
    """Whether a browser would say this request comes from this server's own pages (see the module docstring)."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    # Behind a reverse proxy the browser's host may arrive as X-Forwarded-Host; another site cannot set
    # either header on a browser's request, so both are safe to compare with.
    hosts = {headers.get("host", ""), headers.get("x-forwarded-host", "").split(",")[0].strip()} - {""}
    return origin != "null" and urlsplit(origin).netloc.lower() in {h.lower() for h in hosts}


def ambiguous_framing(headers: Headers) -> bool:
    """A body framed by both Transfer-Encoding and Content-Length: h11 reads it as chunked, but a proxy in
    front may have used the length, and the rest of the body would be a second request to one of them."""
    return "transfer-encoding" in headers and "content-length" in headers


def error_response(path: str, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="alignkit-label"'
    if status == 413:
        headers["Connection"] = "close"  # the body is not read: the connection cannot carry another request
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status, headers)
    return Response(message, status, headers, media_type="text/plain; charset=utf-8")


class TooLarge(Exception):
    """A body found to pass MAX_BODY while it is read (a chunked one says no length up front)."""


def refusal(scope: Scope, headers: Headers) -> tuple[int, str, dict[str, str]] | None:
    """Why the request is answered without running the app, if it is: (status, message, headers)."""
    if ambiguous_framing(headers):
        return 400, "a request may not have both Transfer-Encoding and Content-Length", {"Connection": "close"}
    if (scope["method"] in UNSAFE_METHODS or scope["path"].startswith("/api/")) and not same_site(headers):
        return 403, "cross-site request refused: use this server's own pages, or a bearer token without an Origin header", {}
    length = headers.get("content-length", "0")  # h11 has checked that it is digits
    if len(length) > 12 or int(length) > MAX_BODY:
        return 413, TOO_LARGE, {}
    return None


class Guard:
    """The outermost layer: framing, cross-site and size checks before the app runs, the size of the body as
    it is read, security headers on every response, a 500 that names no internals for a bug, and the log."""

    def __init__(self, app: ASGIApp, *, log: bool) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = received = 0

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY:
                raise TooLarge
            return message

        path = scope["path"]
        try:
            refused = refusal(scope, Headers(scope=scope))
            if refused is None:
                await self.app(scope, receive_counted, send_with_headers)
            else:
                await error_response(path, *refused)(scope, receive, send_with_headers)
        except ClientDisconnect:
            pass  # the client left (or was cut off by the deadline) mid-body: there is no one to answer
        except TooLarge:
            if not status:
                await error_response(path, 413, TOO_LARGE)(scope, receive, send_with_headers)
        except Exception:  # a bug: answer 500 and keep serving the other annotators
            sys.stderr.write("".join(printable(line) + "\n" for line in traceback.format_exc().splitlines()))
            if not status:
                response = error_response(path, 500, "internal error in the labelling server; see its log", {"Connection": "close"})
                await response(scope, receive, send_with_headers)
        finally:
            if self.log:
                client = scope.get("client") or ("-", 0)
                line = f'{client[0]} "{scope["method"]} {loggable_target(scope)} HTTP/{scope["http_version"]}" {status} {1000 * (time.perf_counter() - began):.0f}ms'
                sys.stderr.write(printable(line) + "\n")


# --- endpoint plumbing --------------------------------------------------------------------------------------


def settings(request: Request) -> tuple[LabelStore, float]:
    return request.app.state.store, request.app.state.lease_seconds


def token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    try:
        morsel = SimpleCookie(request.headers.get("cookie", "")).get(COOKIE)
    except CookieError:
        return None
    return morsel.value if morsel else None


async def as_annotator(request: Request, work: Callable[[Annotator], T], *, admin: bool = False) -> T:
    """Authenticate the request and run `work` for the annotator, in one trip to the thread pool: the
    database calls block, and must not block the event loop that serves every other connection."""
    store, _ = settings(request)
    given = token(request)

    def run() -> T:
        who = store.authenticate(given)
        if who is None:
            raise Refused(401, "a valid annotator token is needed: 'Authorization: Bearer TOKEN' (from `alignkit label add-annotator`)")
        if admin and not who.is_admin:
            raise Refused(403, "only an admin token may do this (`alignkit label add-annotator NAME --admin`)")
        return work(who)

    return await run_in_threadpool(run)


def json_object(request: Request, body: bytes) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise Refused(400, "send the body as JSON with 'Content-Type: application/json'")
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Refused(400, f"the body is not valid JSON ({exc})") from None
    except RecursionError:
        raise Refused(400, "the body is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise Refused(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise Refused(400, "the body must be a JSON object")
    return payload


def json_response(status: int, payload: Any) -> Response:
    body = json.dumps(json_safe(payload), ensure_ascii=False).encode("utf-8")
    return Response(body, status, media_type="application/json; charset=utf-8")


def page(name: str, status: int = 200, message: str | None = None) -> Response:
    text = (STATIC / name).read_text(encoding="utf-8")
    if message is not None:
        text = text.replace("{{message}}", html.escape(message))
    return Response(text, status, media_type="text/html; charset=utf-8")


def redirect(location: str, headers: dict[str, str] | None = None) -> Response:
    return Response(b"", 303, {"Location": location, **(headers or {})}, media_type="text/plain; charset=utf-8")


def cookie(request: Request, value: str, max_age: int) -> str:
    """The login cookie; Secure behind HTTPS, seen as `--https-proxy` or a trusted proxy's X-Forwarded-Proto
    (uvicorn turns that into the request's scheme), so the browser never sends the token over plain HTTP."""
    secure = request.app.state.https_proxy or request.url.scheme == "https"
    return f"{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}" + ("; Secure" if secure else "")


# --- pages ---------------------------------------------------------------------------------------------------


async def static_file(request: Request) -> Response:
    name = request.path_params["name"]
    file = STATIC / name
    if "/" in name or file.suffix not in STATIC_TYPES or not file.is_file():
        raise Refused(404, "not found")
    return Response(file.read_bytes(), media_type=STATIC_TYPES[file.suffix])


async def login(request: Request) -> Response:
    if request.method != "POST":
        return page("login.html", message="")
    store, _ = settings(request)
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    given = (form.get("token") or [""])[0].strip()
    if await run_in_threadpool(store.authenticate, given) is None:
        return page("login.html", 401, "That token is not valid.")
    return redirect("/", {"Set-Cookie": cookie(request, given, 2592000)})


async def logout(request: Request) -> Response:
    return redirect("/login", {"Set-Cookie": cookie(request, "", 0)})


async def home(request: Request) -> Response:
    store, _ = settings(request)
    who = await run_in_threadpool(store.authenticate, token(request))
    if who is None:
        return redirect("/login")
    if request.url.path == "/admin" and not who.is_admin:
        raise Refused(403, "only admins see the progress page")
    return page("index.html" if request.url.path == "/" else "admin.html")


# --- the API -------------------------------------------------------------------------------------------------


async def api_me(request: Request) -> Response:
    store, _ = settings(request)
    return json_response(200, await as_annotator(request, store.annotator_summary))


async def api_next(request: Request) -> Response:
    if request.method == "HEAD":  # HEAD must change nothing, and a GET here hands out a task
        return error_response(request.url.path, 405, "HEAD is not allowed on /api/next: a GET hands out a task", {"Allow": "GET"})
    store, lease_seconds = settings(request)
    task = await as_annotator(request, lambda who: store.next_task(who, lease_seconds=lease_seconds))
    if task is None:
        return json_response(200, {"task": None, "message": "no tasks left for you: thank you!"})
    return json_response(200, {"task": task.to_json()})


async def api_answer(request: Request) -> Response:
    store, _ = settings(request)
    body = await request.body()  # `Guard` answers 413 past MAX_BODY

    def answer(who: Annotator) -> tuple[int, int]:
        task_id, given = parse_answer(json_object(request, body))
        return task_id, store.submit(who, task_id, given)

    task_id, label_id = await as_annotator(request, answer)
    return json_response(201, {"ok": True, "label_id": label_id, "task_id": task_id})


async def api_skip(request: Request) -> Response:
    store, _ = settings(request)
    body = await request.body()

    def skip(who: Annotator) -> int:
        payload = json_object(request, body)
        unknown = set(payload) - {"task_id"}
        if unknown:
            raise Refused(400, f"unknown field '{sorted(unknown)[0]}'; a skip is {{\"task_id\": N}}")
        task_id = _task_id(payload)
        store.skip(who, task_id)
        return task_id

    return json_response(200, {"ok": True, "task_id": await as_annotator(request, skip)})


async def api_progress(request: Request) -> Response:
    store, _ = settings(request)

    def progress(_: Annotator) -> dict[str, Any]:
        labels = store.labels()
        return {
            **store.tasks_overview(),
            "agreement": agreement_summary(labels),
            "agreement_by_annotator": annotator_agreement(labels),
            "position_bias": position_summary(labels),
        }

    return json_response(200, await as_annotator(request, progress, admin=True))


async def api_export(request: Request) -> Response:
    store, _ = settings(request)
    labels = await as_annotator(request, lambda _: store.labels(), admin=True)
    query = request.query_params
    aggregate = query.get("aggregate", "majority")
    if aggregate not in ("majority", "all"):
        raise Refused(400, "aggregate must be 'majority' or 'all'")
    try:
        min_labels = int(query.get("min_labels", "1"))
    except ValueError:
        raise Refused(400, "min_labels must be an integer") from None
    rows, left_out = export_rows(labels, aggregate=aggregate, min_labels=min_labels)  # type: ignore[arg-type]
    if query.get("format", "json") == "jsonl":
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        disposition = {"Content-Disposition": 'attachment; filename="prefs.jsonl"'}
        return Response(body, 200, disposition, media_type="application/x-ndjson; charset=utf-8")
    return json_response(200, {"rows": rows, "left_out": dict(left_out)})


def _task_id(body: dict[str, Any]) -> int:
    task_id = body.get("task_id")
    if not isinstance(task_id, int) or isinstance(task_id, bool):
        raise Refused(400, "'task_id' must be an integer (the id from GET /api/next)")
    if not 0 < task_id <= MAX_TASK_ID:
        raise Refused(400, "'task_id' is not a task's id (ids are positive integers below 2^63)")
    return task_id


def parse_answer(body: dict[str, Any]) -> tuple[int, Answer]:
    """{"task_id", "choice": "1"|"2"|"tie"|"both_bad"} or {"task_id", "ranking": [shown numbers, best first]}, "reason" optional."""
    unknown = set(body) - ANSWER_FIELDS
    if unknown:
        raise Refused(400, f"unknown field '{sorted(unknown)[0]}'; an answer has {', '.join(sorted(ANSWER_FIELDS))}")
    task_id = _task_id(body)
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise Refused(400, "'reason' must be a string")
    reason = reason.strip() if reason else None
    if ("choice" in body) == ("ranking" in body):
        raise Refused(400, "give either 'choice' (\"1\", \"2\", \"tie\", \"both_bad\") or 'ranking' (shown numbers, best first)")
    if "choice" in body:
        choice = body["choice"]
        choice = str(choice) if isinstance(choice, int) and not isinstance(choice, bool) else choice
        if choice == "1":
            return task_id, Answer("ranked", [0, 1], reason)
        if choice == "2":
            return task_id, Answer("ranked", [1, 0], reason)
        if choice in ("tie", "both_bad"):
            return task_id, Answer(choice, None, reason)
        raise Refused(400, f"'choice' must be \"1\", \"2\", \"tie\" or \"both_bad\", not {json.dumps(choice)}")
    ranking = body["ranking"]
    if not isinstance(ranking, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ranking):
        raise Refused(400, "'ranking' must be a list of the shown answers' numbers (1, 2, ...), best first")
    return task_id, Answer("ranked", [x - 1 for x in ranking], reason)


# --- the app and the server -------------------------------------------------------------------------------------


async def refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return error_response(request.url.path, exc.status, exc.message)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no route, wrong method) in the API's words."""
    assert isinstance(exc, HTTPException)
    path, method = request.url.path, request.method
    api = path.startswith("/api/")
    messages = {
        404: f"no API endpoint {path}" if api else "not found",
        405: f"{method} is not allowed on {path}" if api else f"{method} is not allowed here",
    }
    return error_response(path, exc.status_code, messages.get(exc.status_code, str(exc.detail)), exc.headers)


Endpoint = Callable[[Request], Awaitable[Response]]
ROUTES: list[tuple[str, Endpoint, list[str]]] = [
    ("/static/{name:path}", static_file, ["GET"]),
    ("/login", login, ["GET", "POST"]),
    ("/logout", logout, ["POST"]),
    ("/", home, ["GET"]),
    ("/admin", home, ["GET"]),
    ("/api/me", api_me, ["GET"]),
    ("/api/next", api_next, ["GET"]),
    ("/api/answer", api_answer, ["POST"]),
    ("/api/skip", api_skip, ["POST"]),
    ("/api/progress", api_progress, ["GET"]),
    ("/api/export", api_export, ["GET"]),
]


def create_app(store: LabelStore, *, lease_seconds: float = 1800, https_proxy: bool = False, log: bool = False) -> Starlette:
    """The ASGI app: pages, API, and the `Guard` around them."""
    app = Starlette(
        routes=[Route(path, endpoint, methods=methods) for path, endpoint, methods in ROUTES],
        middleware=[Middleware(Guard, log=log)],
        exception_handlers={Refused: refused, HTTPException: http_error},
    )
    app.state.store, app.state.lease_seconds, app.state.https_proxy = store, lease_seconds, https_proxy
    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound and listening at once: a port of 0 is resolved, and clients queue until uvicorn accepts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it each response's second write waits for the client's delayed ACK (~40 ms a request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class LabelServer:
    """uvicorn serving the app on one socket; `serve_forever()` here, or `start_in_thread()` for tests."""

    def __init__(
        self,
        store: LabelStore,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        lease_seconds: float = 1800,
        log: bool = False,
        https_proxy: bool = False,
        max_connections: int = MAX_CONNECTIONS,
        request_seconds: float = REQUEST_SECONDS,
        keep_alive_seconds: int = KEEP_ALIVE_SECONDS,
    ) -> None:
        self.socket = listening_socket(host, port)
        protocol = type("LabelProtocol", (GuardedH11Protocol,), {"request_seconds": request_seconds})
        config = uvicorn.Config(
            create_app(store, lease_seconds=lease_seconds, https_proxy=https_proxy, log=log),
            http=protocol,
            loop="asyncio",
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,  # leave the process's logging alone; the app writes its own request log
            access_log=False,  # uvicorn's would print the decoded path (control characters) and the query (tokens)
            server_header=False,
            limit_concurrency=max_connections,
            timeout_keep_alive=keep_alive_seconds,
            timeout_graceful_shutdown=5,
            h11_max_incomplete_event_size=MAX_HEADERS,
        )
        self.uvicorn = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self.socket.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def serve_forever(self) -> None:
        self.uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        """Stop serving (after the answers in flight) and wait for the thread of `start_in_thread`."""
        self.uvicorn.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.socket.close()


def start_in_thread(store: LabelStore, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> LabelServer:
    """Serve in a background thread (tests, notebooks); `server.shutdown()` stops it."""
    server = LabelServer(store, host, port, **kwargs)
    server.thread = threading.Thread(target=server.serve_forever, name="alignkit-label", daemon=True)
    server.thread.start()
    deadline = time.monotonic() + 10
    while not server.uvicorn.started:
        if not server.thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the labelling server did not start")
        time.sleep(0.01)
    return server


def serve(store: LabelStore, host: str, port: int, *, lease_seconds: float, log: bool = True, https_proxy: bool = False) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    try:
        server = LabelServer(store, host, port, lease_seconds=lease_seconds, log=log, https_proxy=https_proxy)
    except OSError as exc:
        raise AlignkitError(f"cannot listen on {host}:{port} ({exc.strerror})", fix="choose another --port, or stop what holds it") from None
    overview = store.tasks_overview()
    print(
        f"serving {overview['tasks']} tasks ({overview['labels']} of {overview['labels_wanted']} labels done) on {server.url}\n"
        f"  annotators log in with the token from `alignkit label add-annotator NAME`; admins see progress at {server.url}admin",
        file=sys.stderr,
    )
    if not overview["annotators"]:
        print("  there are no annotators yet: create one with `alignkit label add-annotator NAME`", file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1") and not https_proxy:
        print("  note: this is plain HTTP; put it behind an HTTPS proxy (and pass --https-proxy) before tokens cross a network you do not trust", file=sys.stderr)
    if threading.current_thread() is threading.main_thread():
        # uvicorn stops gracefully on SIGINT and SIGTERM, then raises the signal again for the previous
        # handler: make SIGTERM's (`kill`, systemd, docker stop) end here as Ctrl-C's does.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.socket.close()
    print("stopped; every answer given so far is in the database", file=sys.stderr)
