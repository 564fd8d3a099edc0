"""Operator API for A/B experiments: create, inspect (with a live analysis), ramp by hand,
pause/resume, promote, abort, delete. Every change is audited (see `experiments.controller`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from adapters.registry import ExperimentNotFound, ExperimentRecord
from adapters.types import NAME_RE
from router.experiments import ACTIVE, ExperimentSpec
from server.errors import Conflict, LoraplexError
from server.experiments import controller as ctl
from server.experiments.sources import MetricsUnavailable
from server.protocol import error_responses, openapi_body
from server.routes.admin_common import ADMIN_AUTH_ERRORS, actor, json_body, require_admin
from server.state import GatewayState, get_state

router = APIRouter(
    prefix="/admin/v1/experiments",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=ADMIN_AUTH_ERRORS,
)


class ExperimentCreate(ExperimentSpec):
    name: str = Field(pattern=NAME_RE.pattern)


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str | None = None


class WeightsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, float]


class ExperimentActive(Conflict):
    code = "experiment_active"


class AnalysisUnavailable(LoraplexError):
    status = 503
    code = "metrics_unavailable"


def _view(r: ExperimentRecord) -> dict[str, Any]:
    return {
        "name": r.name,
        "target": r.target,
        "status": r.status,
        "weights": dict(r.weights),
        "ramp_step": r.ramp_step,
        "step_started_at": r.step_started_at,
        "reason": r.reason,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "definition": dict(r.definition),
    }


def _get(state: GatewayState, name: str) -> ExperimentRecord:
    found = state.registry.snapshot.experiments.get(name)
    if found is None:
        raise ExperimentNotFound(f"no experiment named {name[:64]!r}")
    return found


@router.get("")
async def list_experiments(request: Request) -> dict[str, Any]:
    exps = get_state(request).registry.snapshot.experiments
    return {"object": "list", "data": [_view(r) for _, r in sorted(exps.items())]}


@router.post(
    "",
    status_code=201,
    openapi_extra=openapi_body(ExperimentCreate),
    responses=error_responses(400, 409, 413, 503),
)
async def create_experiment(request: Request) -> dict[str, Any]:
    state = get_state(request)
    body = await json_body(request, ExperimentCreate)
    spec = ExperimentSpec.model_validate(body.model_dump(exclude={"name"}))
    base = state.settings.engine.served_model_name
    return _view(await ctl.create(state.registry, body.name, spec, actor(request), base))


@router.get("/{name}", responses=error_responses(404))
async def get_experiment(request: Request, name: str) -> dict[str, Any]:
    return _view(_get(get_state(request), name))


@router.get("/{name}/analysis", responses=error_responses(404, 503))
async def analyse_experiment(request: Request, name: str) -> dict[str, Any]:
    """The guardrail verdict per candidate over the current window, computed now (read-only)."""
    state = get_state(request)
    record = _get(state, name)
    controller = state.controller
    if controller is None:
        raise AnalysisUnavailable("the experiment controller is not running")
    try:
        window, stats, judged = await controller.analyse(record)
    except MetricsUnavailable as exc:
        raise AnalysisUnavailable(f"experiment metrics are unavailable: {exc}") from None
    verdicts = {
        name: {
            "decision": verdict.decision,
            # Breach is a slots dataclass: it has no __dict__.
            "breaches": [dataclasses.asdict(b) for b in verdict.breaches],
            "summary": verdict.summary,
        }
        for name, verdict in judged.items()
    }
    requests = {n: s.requests for n, s in stats.items()}
    return {"experiment": name, "window_s": window, "requests": requests, "verdicts": verdicts}


@router.post("/{name}/pause", responses=error_responses(404, 409, 503))
async def pause_experiment(request: Request, name: str) -> dict[str, Any]:
    state = get_state(request)
    rec = _get(state, name)
    return _view(await ctl.set_status(state.registry, rec, "paused", actor(request)))


@router.post("/{name}/resume", responses=error_responses(404, 409, 503))
async def resume_experiment(request: Request, name: str) -> dict[str, Any]:
    state = get_state(request)
    rec = _get(state, name)
    return _view(
        await ctl.set_status(state.registry, rec, "running", actor(request), expect=("paused",))
    )


@router.post(
    "/{name}/weights",
    openapi_extra=openapi_body(WeightsBody),
    responses=error_responses(400, 404, 409, 413, 503),
)
async def set_weights(request: Request, name: str) -> dict[str, Any]:
    state = get_state(request)
    body = await json_body(request, WeightsBody)
    rec = _get(state, name)
    return _view(await ctl.set_weights(state.registry, rec, body.weights, actor(request)))


@router.post(
    "/{name}/promote",
    openapi_extra=openapi_body(PromoteBody),
    responses=error_responses(400, 404, 409, 413, 503),
)
async def promote_experiment(request: Request, name: str) -> dict[str, Any]:
    state = get_state(request)
    body = await json_body(request, PromoteBody)
    rec = _get(state, name)
    return _view(await ctl.promote(state.registry, rec, body.variant, actor(request)))


@router.post("/{name}/abort", responses=error_responses(404, 409, 503))
async def abort_experiment(request: Request, name: str) -> dict[str, Any]:
    state = get_state(request)
    rec = _get(state, name)
    return _view(await ctl.abort(state.registry, rec, actor(request)))


@router.delete("/{name}", responses=error_responses(404, 409, 503))
async def delete_experiment(request: Request, name: str) -> dict[str, Any]:
    state = get_state(request)
    rec = _get(state, name)
    if rec.status in ACTIVE:
        raise ExperimentActive(f"experiment {name!r} is {rec.status}; promote or abort it first")
    return _view(await state.registry.delete_experiment(name, actor(request)))
