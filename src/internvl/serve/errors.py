"""The error vocabulary of the server: SERVING.md §2.2 as one table, and the OpenAI error envelope (§2.1).

This table is the only place an HTTP status and an error `type` are decided. Code raises `APIError(ErrorCode.X,
message, param=...)`; the boundary (`app.py` exception handlers, the in-stream error event) renders it with
`envelope()`. The OpenAI SDK picks its exception class from the status alone and retries 408/409/429/>=500, so a
client mistake must never be a 5xx (§2.2 rules).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping


class ErrorCode(enum.Enum):
    """internal code -> (HTTP status, OpenAI `type`, default string `code`)."""

    INVALID_REQUEST = (400, "invalid_request_error", "invalid_request")
    CONTEXT_LENGTH_EXCEEDED = (400, "invalid_request_error", "context_length_exceeded")
    UNSUPPORTED_PARAMETER = (400, "invalid_request_error", "unsupported_parameter")
    INVALID_IMAGE = (400, "invalid_request_error", "invalid_image")
    INVALID_IMAGE_URL = (400, "invalid_request_error", "invalid_image_url")
    TOO_MANY_IMAGES = (400, "invalid_request_error", "too_many_images")
    PAYLOAD_TOO_LARGE = (413, "invalid_request_error", "payload_too_large")
    UNAUTHORIZED = (401, "authentication_error", "invalid_api_key")
    MODEL_NOT_FOUND = (404, "not_found_error", "model_not_found")
    NOT_FOUND = (404, "invalid_request_error", "not_found")
    METHOD_NOT_ALLOWED = (405, "invalid_request_error", "method_not_allowed")
    OVERLOADED = (429, "rate_limit_error", "server_busy")
    QUEUE_TIMEOUT = (503, "service_unavailable_error", "queue_timeout")
    UNAVAILABLE = (503, "service_unavailable_error", "model_loading")  # or shutting_down / engine_dead
    INTERNAL = (500, "server_error", "internal_error")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def type(self) -> str:
        return self.value[1]

    @property
    def default_code(self) -> str:
        return self.value[2]


# statuses that tell the client to come back later carry Retry-After (§2.2: overload is 429/503 *with* it)
RETRY_AFTER_SECONDS = {ErrorCode.OVERLOADED: 1, ErrorCode.QUEUE_TIMEOUT: 5, ErrorCode.UNAVAILABLE: 5}


class APIError(Exception):
    """An error the boundary renders as the envelope. `code` overrides the table's string code (e.g.
    `shutting_down` for UNAVAILABLE); `param` is a JSON path into the request (`messages[0].content[1]...`)."""

    def __init__(
        self,
        kind: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code or kind.default_code
        self.headers = dict(headers or {})
        if kind in RETRY_AFTER_SECONDS:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS[kind]))
        if kind is ErrorCode.UNAUTHORIZED:
            self.headers.setdefault("WWW-Authenticate", "Bearer")

    @property
    def status(self) -> int:
        return self.kind.status

    def body(self) -> dict:
        return envelope(self.kind, self.message, param=self.param, code=self.code)

    def __repr__(self) -> str:
        return f"APIError({self.kind.name}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def envelope(kind: ErrorCode, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    """`{"error": {"message", "type", "param", "code"}}` (§2.1); `code` is always a string."""
    return {"error": {"message": message, "type": kind.type, "param": param, "code": code or kind.default_code}}


def envelope_bytes(err: APIError) -> bytes:
    return json.dumps(err.body(), ensure_ascii=False).encode()


def unavailable(code: str, message: str) -> APIError:
    """503 with one of the readiness codes: `model_loading`, `shutting_down`, `engine_dead`."""
    return APIError(ErrorCode.UNAVAILABLE, message, code=code)


def internal(message: str = "The server failed while generating the response; the error was logged.") -> APIError:
    return APIError(ErrorCode.INTERNAL, message)
