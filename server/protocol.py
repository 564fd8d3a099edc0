"""OpenAI request/response shapes the gateway checks before forwarding.

Only the fields the gateway acts on or that must not reach the engine malformed are typed; all
other fields pass through untouched (`extra="allow"`) so new OpenAI/vLLM parameters work
without a gateway release. The engine does the full sampling-parameter validation.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The largest count a request may name (token counts, versions, ids): a 32-bit signed integer,
# as the registry's columns (PostgreSQL INTEGER) and the engine's own parameters hold them.
MAX_INT32 = 2**31 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, max_length=256)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)
    n: int | None = Field(default=None, ge=1, le=128)
    best_of: int | None = Field(default=None, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    user: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1, max_length=64)
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraplex"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON body that a route reads itself (not via FastAPI).

    pydantic puts nested models under the schema's own `$defs` and points at them with
    `#/$defs/Name`, which in an OpenAPI document resolves against the document root, where no
    `$defs` is: the nested models are inlined so the body schema stands alone."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline_refs(schema, defs, ())}},
        }
    }


def _inline_refs(node: Any, defs: dict[str, Any], seen: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_inline_refs(v, defs, seen) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        name = ref.removeprefix("#/$defs/")
        if name in seen:
            raise ValueError(f"recursive model {name} cannot be inlined")
        target = _inline_refs(defs[name], defs, (*seen, name))
        rest = {k: _inline_refs(v, defs, seen) for k, v in node.items() if k != "$ref"}
        return {**target, **rest}
    return {k: _inline_refs(v, defs, seen) for k, v in node.items()}


# What each error status means, for the routes' OpenAPI `responses` (docs/api.md lists codes).
ERROR_STATUSES: dict[int, str] = {
    400: "Malformed JSON, invalid fields or parameters (`invalid_json`, `invalid_request`, ...)",
    401: "Missing or unknown API key (`invalid_api_key`)",
    403: "A tenant key on the admin API (`permission_denied`)",
    404: "Unknown (or, for a tenant, not entitled) resource",
    409: "Conflicts with the current state",
    413: "Body over the size limit (`request_too_large`)",
    422: "Refused adapter or source (one code per reason, docs/adapters.md)",
    429: "Quota spent (`rate_limit_exceeded`); `Retry-After` set",
    502: "The engine or a source failed (`upstream_error`, `source_unreachable`)",
    503: "Engine unavailable or at capacity; `Retry-After` set",
    504: "Engine timeout (`upstream_timeout`)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses, all in the one error shape."""
    return {s: {"model": ErrorResponse, "description": ERROR_STATUSES[s]} for s in statuses}


_FASTAPI_422 = "#/components/schemas/HTTPValidationError"


def without_fastapi_422(document: dict[str, Any]) -> dict[str, Any]:
    """Drop the 422 `HTTPValidationError` FastAPI documents on every operation with parameters:
    the gateway answers invalid parameters 400 in its own error shape (the routes declare it),
    and an operation that can answer 422 declares its own. In place; idempotent."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            content = responses.get("422", {}).get("content", {}).get("application/json", {})
            if content.get("schema", {}).get("$ref") == _FASTAPI_422:
                del responses["422"]
    schemas = document.get("components", {}).get("schemas", {})
    if "HTTPValidationError" in schemas and _FASTAPI_422 not in str(document.get("paths")):
        schemas.pop("HTTPValidationError")
        schemas.pop("ValidationError", None)
    return document
