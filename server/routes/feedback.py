"""`POST /v1/feedback`: a user's rating of one answer, counted for the experiment variant that
served it. The request id is the `X-Request-Id` of that answer; only the tenant that made the
request may rate it, once."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request

from server.errors import Conflict, NotFound
from server.protocol import error_responses, openapi_body
from server.routes.admin_common import json_body
from server.state import get_state

router = APIRouter(tags=["openai"])


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=128)
    rating: Literal["up", "down"] | None = None
    score: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _something(self) -> FeedbackBody:
        if self.rating is None and self.score is None:
            raise ValueError("give a rating ('up' or 'down'), a score in [0, 1], or both")
        return self


class FeedbackNotFound(NotFound):
    code = "request_not_found"


class FeedbackExists(Conflict):
    code = "feedback_exists"


@router.post(
    "/v1/feedback",
    openapi_extra=openapi_body(FeedbackBody),
    responses=error_responses(400, 401, 404, 409, 413),
)
async def feedback(request: Request) -> dict[str, Any]:
    state = get_state(request)
    tenant = state.tenants.authenticate(request.headers.get("authorization"))
    body = await json_body(request, FeedbackBody)
    memory = state.experiments.memory
    served = memory.lookup(tenant.name, body.request_id)
    if served is None:
        raise FeedbackNotFound(
            "No recent request with this id was served in an experiment for this key.",
            param="request_id",
        )
    if not memory.rate_once(tenant.name, body.request_id):
        raise FeedbackExists("Feedback for this request was already recorded.")
    m = state.metrics
    if body.rating is not None:
        m.child(m.exp_feedback, served.experiment, served.variant, body.rating).inc()
    if body.score is not None:
        m.child(m.exp_feedback_score, served.experiment, served.variant).observe(body.score)
    return {
        "object": "feedback",
        "request_id": body.request_id,
        "experiment": served.experiment,
        "variant": served.variant,
    }
