"""ASGI plumbing of the server: request ids and the catch-all boundary, API-key auth, the body cap, disconnect
watching and the SSE response (SERVING.md §2, §3 step 1, §6, §8, §9).

Pure ASGI middleware (no BaseHTTPMiddleware): it neither buffers streamed bodies nor hides `http.disconnect`.
Order, outermost first: RequestContext (ids, catch-all 500, access log) -> CORS (opt-in) -> APIKeyAuth -> routes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse

from internvl.serve.errors import APIError, ErrorCode, internal

log = logging.getLogger("internvl.serve")
access_log = logging.getLogger("internvl.serve.access")

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


async def send_error(send, err: APIError, request_id: str | None = None) -> None:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    body = json.dumps(err.body(), ensure_ascii=False).encode("utf-8")
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ---------------------------------------------------------------------------------------------- request context
class RequestContext:
    """Assigns the request id (§9: a sane incoming X-Request-Id is kept), echoes it on every response, turns an
    exception that escaped everything else into a logged 500 envelope, and counts API requests by status."""

    def __init__(self, app, metrics=None):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if REQUEST_ID_RE.fullmatch(incoming) else secrets.token_hex(16)
        scope.setdefault("state", {})["request_id"] = rid
        status = {"code": None}
        started = time.monotonic()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": headers + [(b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s %s %s failed", rid, scope.get("method"), scope.get("path"))
            if status["code"] is None:
                status["code"] = 500
                await send_error(send, internal("The server failed unexpectedly; the error was logged."), rid)
        finally:
            path = scope.get("path", "")
            if self.metrics is not None and path.startswith("/v1/"):
                self.metrics.requests.labels(str(status["code"] or 499)).inc()
            access_log.debug("%s %s %s %s %.3fs", rid, scope.get("method"), path, status["code"],
                             time.monotonic() - started)


# ---------------------------------------------------------------------------------------------- auth (§8)
def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_matches(presented: str | None, digests: Iterable[bytes]) -> bool:
    """Hash the presented key and compare with every configured digest in constant time, never stopping at the
    first match, so timing reveals neither which key matched nor how much of one did. Empty keys fail."""
    given = key_digest(presented or "")
    matched = 0
    for ref in digests:
        matched |= hmac.compare_digest(given, ref)
    return bool(matched) and bool(presented)


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, value = auth.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer":
            return value.strip()
        return None
    key = headers.get(b"x-api-key")
    return key.decode("latin-1").strip() if key is not None else None


class APIKeyAuth:
    """401 unless a configured key is presented; `open_paths` and genuine CORS preflights pass. Unknown paths are
    guarded too (fail closed)."""

    def __init__(self, app, keys: Iterable[str], open_paths: Iterable[str]):
        self.app = app
        self.digests = tuple(key_digest(k) for k in keys)
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.digests or scope.get("path") in self.open_paths:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if scope.get("method") == "OPTIONS" and b"origin" in headers and b"access-control-request-method" in headers:
            return await self.app(scope, receive, send)
        if not key_matches(presented_key(headers), self.digests):
            err = APIError(ErrorCode.UNAUTHORIZED, "Missing or invalid API key; send it as 'Authorization: Bearer "
                           "<key>' or 'X-Api-Key: <key>'.")
            return await send_error(send, err, scope.get("state", {}).get("request_id"))
        return await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------- body (§3 step 1)
async def read_body(request: Request, cap: int) -> bytes:
    """The request body, refusing more than `cap` bytes: by Content-Length before reading anything, otherwise by
    counting while reading (chunked bodies) and stopping at the cap."""
    too_large = APIError(ErrorCode.PAYLOAD_TOO_LARGE, f"The request body is larger than the limit of {cap} bytes; "
                         "send smaller images or use image URLs.")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(ErrorCode.INVALID_REQUEST, "The Content-Length header is not a number.")
        if int(declared) > cap:
            raise too_large
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------- disconnects (§6)
class ClientDisconnected(Exception):
    """The client closed the connection before the response was sent."""


async def until_disconnect(receive, work: Awaitable):
    """Run `work`, cancelling it if the client disconnects first (listening for the ASGI `http.disconnect` message
    concurrently, not polling). Call only after the body was read: the watcher consumes `receive`."""
    task = asyncio.ensure_future(work)

    async def watch():
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
        raise
    if task.done():
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        return task.result()
    task.cancel()  # the client is gone: cancelling aborts engine requests and media fetches of this task
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected()


class EventStream(StreamingResponse):
    """SSE response that always listens for the client's disconnect while streaming (whatever the ASGI version) and
    always runs `on_close(disconnected)` once, also when the client left before the body iterator started (§6)."""

    def __init__(self, events, on_close: Callable[[bool], Awaitable[None]], headers: dict):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        disconnected = False
        try:
            async with anyio.create_task_group() as tg:

                async def produce():
                    nonlocal disconnected
                    try:
                        await self.stream_response(send)
                    except OSError:  # the transport broke while sending (the client left): caught here, since
                        disconnected = True  # out of the task group it would be an ExceptionGroup, not an OSError
                    tg.cancel_scope.cancel()

                async def listen():
                    nonlocal disconnected
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            disconnected = True
                            break
                    tg.cancel_scope.cancel()

                tg.start_soon(produce)
                tg.start_soon(listen)
        except OSError:  # the transport broke while sending
            disconnected = True
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            await self._on_close(disconnected)
