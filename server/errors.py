"""One exception tree for the gateway; each error knows its HTTP status and stable OpenAI `code`.

Every error leaving the gateway — JSON response or mid-stream SSE event — is rendered from these
classes, so clients always see `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class LoraplexError(Exception):
    """Base of all errors the gateway reports to a client."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    type: ClassVar[str] = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        self._code = code

    @property
    def error_code(self) -> str:
        return self._code or self.code

    def payload(self) -> dict[str, Any]:
        return error_payload(self.message, self.type, self.error_code, self.param)

    def json_bytes(self) -> bytes:
        return orjson.dumps(self.payload())


def error_payload(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": printable(message),
            "type": type_,
            "param": None if param is None else printable(param),
            "code": code,
        }
    }


# A client's bytes reach messages and params (a model or adapter name, an unknown field's
# name): control characters in them (C0, DEL, C1, Unicode line/paragraph separators) are shown
# escaped, so an error can never carry a raw CR/LF into a log line, a terminal or a header.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def printable(text: str) -> str:
    """`text` with its control characters written as escapes (`\\n` → `\\x0a`)."""
    return text.translate(_ESCAPES)


class BadRequest(LoraplexError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class AuthenticationFailed(LoraplexError):
    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class PermissionDenied(LoraplexError):
    status = 403
    code = "permission_denied"
    type = "permission_error"


class NotFound(LoraplexError):
    status = 404
    code = "not_found"
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(LoraplexError):
    status = 409
    code = "conflict"
    type = "invalid_request_error"


class PayloadTooLarge(LoraplexError):
    status = 413
    code = "request_too_large"
    type = "invalid_request_error"


class RateLimited(LoraplexError):
    """A tenant's requests/min or tokens/min quota is spent (server/quotas.py)."""

    status = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int = 1, **kw: Any) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, **kw)


class UpstreamError(LoraplexError):
    """The engine answered with something the gateway cannot pass on."""

    status = 502
    code = "upstream_error"
    type = "server_error"


class EngineUnavailable(LoraplexError):
    status = 503
    code = "engine_unavailable"
    type = "server_error"

    def __init__(self, message: str, *, retry_after_s: int = 1, **kw: Any) -> None:
        headers = {"Retry-After": str(retry_after_s)}
        headers.update(kw.pop("headers", None) or {})
        super().__init__(message, headers=headers, **kw)


class UpstreamTimeout(LoraplexError):
    status = 504
    code = "upstream_timeout"
    type = "server_error"


class AdapterLoadFailed(LoraplexError):
    """The engine refused an adapter an operator asked to load."""

    status = 422
    code = "adapter_load_failed"
    type = "invalid_request_error"


# Codes that HTTP-level failures (routing, method) map to; kept here so all codes live in one file.
HTTP_STATUS_CODES: dict[int, tuple[str, str]] = {
    400: ("invalid_request", "invalid_request_error"),
    401: ("invalid_api_key", "authentication_error"),
    403: ("permission_denied", "permission_error"),
    404: ("not_found", "invalid_request_error"),
    405: ("method_not_allowed", "invalid_request_error"),
    413: ("request_too_large", "invalid_request_error"),
    415: ("unsupported_media_type", "invalid_request_error"),
    422: ("invalid_request", "invalid_request_error"),
    429: ("rate_limit_exceeded", "rate_limit_error"),
}
