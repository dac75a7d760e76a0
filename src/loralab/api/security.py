"""Network guard in front of the whole app (API, WebSockets, mounted web UI): Host allow-list, cross-site
refusal, loralab's own CORS, token before body, failed-auth rate limit, streamed body limits, JSON depth."""
from __future__ import annotations

import json
import math
import re
import time
from collections import OrderedDict, deque
from urllib.parse import parse_qs, urlsplit

import numpy as np
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loralab.api.deps import TICKET_PARAM, token_ok
from loralab.settings import Settings
from loralab.ui.i18n import pick_language

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
UPLOAD_PATHS = {"/api/datasets/upload", "/gradio_api/upload"}
FORM_OVERHEAD_BYTES = 64 * 1024
LOGIN_PATHS = {"/login", "/login/"}
MAX_JSON_DEPTH = 64
RATE_WINDOW_SECONDS = 60.0
MAX_TRACKED_CLIENTS = 10_000
CORS_MAX_AGE = "600"
# WebSocket close codes for refusals before the handshake is accepted (HTTP status + 4000)
WS_CLOSE = {400: 4400, 401: 4401, 403: 4403, 413: 4413, 429: 4429}

# code -> (English, Japanese); {fields} are filled from the refusal
MESSAGES = {
    "bad_host": (
        "the Host header '{host}' is not served here (DNS rebinding protection): open the server by "
        "localhost/127.0.0.1, or add this name to LORALAB_ALLOWED_HOSTS",
        "Host ヘッダー '{host}' はこのサーバーでは受け付けません (DNS リバインディング対策)。localhost/127.0.0.1 で"
        "開くか、この名前を LORALAB_ALLOWED_HOSTS に追加してください"),
    "cross_site": (
        "cross-site request refused: {why}; call the API from the same origin, or add the origin to "
        "LORALAB_CORS_ORIGINS",
        "クロスサイトのリクエストは拒否されました: {why}。同じオリジンから呼び出すか、オリジンを "
        "LORALAB_CORS_ORIGINS に追加してください"),
    "cors_origin": (
        "origin '{origin}' may not call this server cross-site: add it to LORALAB_CORS_ORIGINS to allow it",
        "オリジン '{origin}' からのクロスサイト呼び出しは許可されていません。許可するには LORALAB_CORS_ORIGINS に"
        "追加してください"),
    "unauthorized": (
        "missing or wrong API token: send 'Authorization: Bearer <LORALAB_API_TOKEN>'",
        "API トークンがないか間違っています。'Authorization: Bearer <LORALAB_API_TOKEN>' を送ってください"),
    "too_many_auth_failures": (
        "too many failed logins or token checks from this address: wait {retry} s and try again with the right "
        "token (limit: LORALAB_AUTH_FAILURES_PER_MINUTE)",
        "このアドレスからのログイン/トークン確認の失敗が多すぎます。{retry} 秒待ってから正しいトークンで"
        "やり直してください (上限: LORALAB_AUTH_FAILURES_PER_MINUTE)"),
    "request_too_large": (
        "the request body is larger than the {limit} bytes allowed: send less (limit: LORALAB_MAX_REQUEST_BYTES)",
        "リクエスト本文が上限 {limit} バイトを超えています。小さくして送ってください (上限: LORALAB_MAX_REQUEST_BYTES)"),
    "file_too_large": (
        "the upload is larger than the {limit} bytes allowed (LORALAB_MAX_UPLOAD_BYTES = {max_upload} plus form "
        "overhead): split the file or raise the limit",
        "アップロードが上限 {limit} バイト (LORALAB_MAX_UPLOAD_BYTES = {max_upload} + フォームの分) を超えています。"
        "ファイルを分けるか上限を上げてください"),
    "bad_content_length": (
        "the Content-Length header is not a number: send a valid one or use chunked encoding",
        "Content-Length ヘッダーが数値ではありません。正しい値を送るか chunked で送ってください"),
    "bad_json": (
        "the JSON body is nested deeper than {limit} levels: flatten it",
        "JSON 本文の入れ子が {limit} 段を超えています。浅くしてください"),
}


class Refusal(Exception):
    """A request the guard answers itself: HTTP status, error code and message fields."""

    def __init__(self, status: int, code: str, param: str | None = None, headers: dict | None = None, **fields):
        super().__init__(code)
        self.status, self.code, self.param, self.headers, self.fields = status, code, param, headers or {}, fields

    def body(self, lang: str) -> dict:
        en, ja = MESSAGES[self.code]
        return {"detail": (ja if lang == "ja" else en).format(**self.fields), "code": self.code, "param": self.param}


class FailureLimiter:
    """Failed auth attempts per client address in a sliding minute; bounded table (oldest clients dropped)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.failures: OrderedDict[str, deque] = OrderedDict()

    def _recent(self, client: str) -> deque | None:
        times = self.failures.get(client)
        if times is None:
            return None
        cutoff = self.clock() - RATE_WINDOW_SECONDS
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self.failures[client]
            return None
        return times

    def retry_after(self, client: str, limit: int) -> int | None:
        """Seconds until `client` may try again, or None when it is under the limit."""
        times = self._recent(client)
        if times is None or len(times) < limit:
            return None
        return max(1, math.ceil(times[-limit] + RATE_WINDOW_SECONDS - self.clock()))

    def record(self, client: str, limit: int) -> None:
        times = self._recent(client)
        if times is None:
            times = self.failures[client] = deque()
        self.failures.move_to_end(client)
        times.append(self.clock())
        while len(times) > limit:  # only the newest `limit` matter for the verdict
            times.popleft()
        while len(self.failures) > MAX_TRACKED_CLIENTS:
            self.failures.popitem(last=False)


_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
_DEPTH_STEP = np.zeros(256, dtype=np.int32)
_DEPTH_STEP[[ord("["), ord("{")]] = 1
_DEPTH_STEP[[ord("]"), ord("}")]] = -1


class JsonDepth:
    """Nesting depth of a JSON text fed piece by piece (strings and escapes skipped), without holding it."""

    def __init__(self) -> None:
        self.depth, self.deepest, self.in_string, self.carry = 0, 0, False, b""

    def feed(self, chunk: bytes) -> int:
        """Feed the next bytes; returns the deepest nesting seen so far."""
        data = _ESCAPE.sub(b"", self.carry + chunk)
        self.carry = b""
        if data.endswith(b"\\"):  # an escape split across pieces: its second byte comes next
            data, self.carry = data[:-1], b"\\"
        if self.in_string:
            end = data.find(b'"')
            if end < 0:
                return self.deepest
            data, self.in_string = data[end + 1:], False
        data = _STRING.sub(b"", data)
        start = data.find(b'"')
        if start >= 0:
            data, self.in_string = data[:start], True
        if data:
            levels = np.cumsum(_DEPTH_STEP[np.frombuffer(data, dtype=np.uint8)]) + self.depth
            self.deepest = max(self.deepest, int(levels.max()))
            self.depth = int(levels[-1])
        return self.deepest


def host_name(value: str) -> str:
    """The host part of a Host header or netloc, lower-case, without port, brackets or trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def host_allowed(host: str, allowed: list[str]) -> bool:
    name = host_name(host)
    if not name:
        return False
    if name in LOOPBACK_HOSTS:
        return True
    for entry in allowed:
        entry = entry.strip().lower()
        if entry == "*" or host_name(entry) == name:
            return True
        if entry.startswith("*.") and name.endswith(entry[1:]):
            return True
    return False


def _origin_key(origin: str) -> tuple[str, str, int | None] | None:
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return parts.scheme, parts.hostname.rstrip("."), port


def _request_origin_key(scope: Scope, host: str) -> tuple[str, str, int | None] | None:
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
    return _origin_key(f"{scheme}://{host}")


def route_path(scope: Scope) -> str:
    """The path the routes match: without the prefix of `loralab serve --root-path` (ASGI's path includes it)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


def protected_path(path: str) -> bool:
    """Paths the API token guards (token checked here, before any body is read)."""
    if path in ("/api/health", "/api/health/"):
        return False
    return path.startswith(("/api/", "/v1/", "/ws/")) or path in ("/api", "/v1")


class SecurityMiddleware:
    """Pure ASGI guard (no BaseHTTPMiddleware: it would buffer streams). Settings are read per request."""

    def __init__(self, app: ASGIApp, settings: Settings, limiter: FailureLimiter | None = None) -> None:
        self.app = app
        self.settings = settings
        self.limiter = limiter or FailureLimiter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        lang = pick_language(headers.get("accept-language"))
        try:
            await self._guard(scope, headers, receive, send)
        except Refusal as refusal:
            await self._refuse(scope, send, refusal, lang)

    def _cors_allowed(self, origin: str) -> bool:
        key = _origin_key(origin)
        return key is not None and any(_origin_key(o) == key for o in self.settings.cors_origins)

    def _client(self, scope: Scope) -> str:
        client = scope.get("client")
        return client[0] if client else "unknown"

    async def _guard(self, scope: Scope, headers: Headers, receive: Receive, send: Send) -> None:
        settings = self.settings
        path = route_path(scope)
        is_ws = scope["type"] == "websocket"
        method = "GET" if is_ws else scope["method"]
        host = headers.get("host", "")
        if not host_allowed(host, settings.allowed_hosts):
            raise Refusal(400, "bad_host", host=host[:100])
        origin = headers.get("origin")
        same_origin = origin is not None and _origin_key(origin) is not None \
            and _origin_key(origin) == _request_origin_key(scope, host)
        cors_ok = origin is not None and not same_origin and self._cors_allowed(origin)

        if not is_ws and method == "OPTIONS" and origin and "access-control-request-method" in headers:
            await self._preflight(headers, send, origin, cors_ok)
            return
        if is_ws or method in STATE_CHANGING:
            if origin is not None and not same_origin and not cors_ok:
                raise Refusal(403, "cross_site", why=f"Origin {origin[:100]} is another site")
            if headers.get("sec-fetch-site", "").lower() == "cross-site" and not cors_ok:
                raise Refusal(403, "cross_site", why="the browser marked it Sec-Fetch-Site: cross-site")

        client = self._client(scope)
        limit = settings.auth_failures_per_minute
        guarded = protected_path(path)
        login = not is_ws and method == "POST" and path in LOGIN_PATHS
        if guarded or login:
            retry = self.limiter.retry_after(client, limit)
            if retry is not None:
                raise Refusal(429, "too_many_auth_failures", headers={"Retry-After": str(retry)}, retry=retry)
        if guarded and settings.api_token and not token_ok(settings.api_token, headers.get("authorization")):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if not (method in ("GET", "HEAD") and TICKET_PARAM in query):  # the route checks the ticket itself
                self.limiter.record(client, limit)
                raise Refusal(401, "unauthorized", headers={"WWW-Authenticate": "Bearer"})

        if is_ws:
            await self.app(scope, receive, self._ws_sender(send, client, guarded, limit))
            return
        await self._forward_http(scope, headers, receive, send, path, origin if cors_ok else None,
                                 client, guarded or login, limit)

    async def _preflight(self, headers, send, origin, cors_ok) -> None:
        if not cors_ok:
            raise Refusal(403, "cors_origin", origin=origin[:100])
        allow = {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true",
                 "Access-Control-Allow-Methods": "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT",
                 "Access-Control-Max-Age": CORS_MAX_AGE, "Vary": "Origin"}
        requested = headers.get("access-control-request-headers")
        if requested:
            allow["Access-Control-Allow-Headers"] = requested
        await send({"type": "http.response.start", "status": 204,
                    "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in allow.items()]})
        await send({"type": "http.response.body", "body": b""})

    def _body_limit(self, path: str) -> tuple[int, Refusal]:
        settings = self.settings
        if path in UPLOAD_PATHS:
            limit = settings.max_upload_bytes + FORM_OVERHEAD_BYTES
            return limit, Refusal(413, "file_too_large", "file", limit=limit, max_upload=settings.max_upload_bytes)
        limit = settings.max_request_bytes
        return limit, Refusal(413, "request_too_large", limit=limit)

    async def _forward_http(self, scope, headers, receive, send, path, cors_origin, client, count_failures,
                            limit_failures) -> None:
        limit, too_large = self._body_limit(path)
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise Refusal(400, "bad_content_length")
            if int(declared) > limit:
                raise too_large
        content_type = headers.get("content-type", "").lower()
        depth = JsonDepth() if not content_type or "json" in content_type else None
        state = {"received": 0, "refusal": None, "started": False}

        async def guarded_receive() -> Message:
            if state["refusal"] is not None:
                raise state["refusal"]
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                state["received"] += len(body)
                if state["received"] > limit:
                    state["refusal"] = too_large
                elif depth is not None and body and depth.feed(body) > MAX_JSON_DEPTH:
                    state["refusal"] = Refusal(400, "bad_json", limit=MAX_JSON_DEPTH)
                if state["refusal"] is not None:
                    raise state["refusal"]
            return message

        async def guarded_send(message: Message) -> None:
            if state["refusal"] is not None and not state["started"]:
                return  # the app's answer to a refused body is replaced by ours
            if message["type"] == "http.response.start":
                state["started"] = True
                message = self._rewrite_headers(message, cors_origin)
                if count_failures and message["status"] in (400, 401) and \
                        (message["status"] == 401 or path in LOGIN_PATHS):
                    self.limiter.record(client, limit_failures)
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Refusal:
            if state["started"]:  # a response already under way (it read the body late): it just ends here
                return
        except Exception:
            if state["refusal"] is None or state["started"]:
                raise
        if state["refusal"] is not None and not state["started"]:
            raise state["refusal"]

    @staticmethod
    def _rewrite_headers(message: Message, cors_origin: str | None) -> Message:
        """Only loralab decides CORS (drop what the mounted UI adds); no cookie is SameSite=None."""
        headers = MutableHeaders(scope=message)
        for name in [k for k in headers.keys() if k.startswith("access-control-")]:
            del headers[name]
        cookies = headers.getlist("set-cookie")
        if cookies:
            del headers["set-cookie"]
            for cookie in cookies:
                headers.append("set-cookie", harden_cookie(cookie))
        if cors_origin is not None:
            headers["Access-Control-Allow-Origin"] = cors_origin
            headers["Access-Control-Allow-Credentials"] = "true"
            headers.add_vary_header("Origin")
        return message

    def _ws_sender(self, send: Send, client: str, guarded: bool, limit: int) -> Send:
        async def ws_send(message: Message) -> None:
            if guarded and message["type"] == "websocket.close" and message.get("code") == WS_CLOSE[401]:
                self.limiter.record(client, limit)
            await send(message)
        return ws_send

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal, lang: str) -> None:
        body = refusal.body(lang)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": WS_CLOSE.get(refusal.status, 1008),
                        "reason": body["detail"].encode()[:120].decode(errors="ignore")})
            return
        if route_path(scope).startswith("/v1/") or route_path(scope) == "/v1":  # OpenAI clients read "error"
            kind = "invalid_request_error"
            code = "invalid_api_key" if refusal.status == 401 else refusal.code
            body["error"] = {"message": body["detail"], "type": kind, "param": refusal.param, "code": code}
        payload = json.dumps(body, ensure_ascii=False).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
        headers.append((b"connection", b"close"))  # a refused body is never read: the connection cannot be reused
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def harden_cookie(cookie: str) -> str:
    """SameSite=None becomes Lax (no cookie rides along cross-site requests); HttpOnly is always added."""
    parts = [part.strip() for part in cookie.split(";")]
    attrs = {part.split("=", 1)[0].lower(): i for i, part in enumerate(parts[1:], 1)}
    if "samesite" in attrs:
        if parts[attrs["samesite"]].split("=", 1)[-1].strip().lower() == "none":
            parts[attrs["samesite"]] = "SameSite=Lax"
    else:
        parts.append("SameSite=Lax")
    if "httponly" not in attrs:
        parts.append("HttpOnly")
    return "; ".join(parts)
