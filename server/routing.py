"""Gateway side of domain routing: `model="auto"` → classify the request → target model.

The router itself (`router/`) knows nothing of HTTP or tenants' storage; this module builds it
at start-up (the classifier is loaded or fitted in a worker thread, so start-up stays fast and
scikit-learn stays out of the import path), decides per request, checks the decision against
the tenant's entitlements through the pipeline's own resolution rule, and records metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from starlette.requests import Request

from router.domain_router import DomainRouter, build_classifier
from router.inputs import request_text
from router.policy import RoutesPolicy, load_routes
from router.types import Decision, FallbackReason, Prediction
from server.auth import Tenant
from server.errors import LoraplexError
from server.settings import RouterSettings, Settings
from server.state import GatewayState
from server.telemetry.metrics import GatewayMetrics

AUTO_MODEL = "auto"
_UNNAMED = frozenset({None, "", "default"})
log = logging.getLogger("loraplex.routing")


class AutoRouting:
    """The routes policy (parsed at start: a bad file fails start-up) and the classifier
    (ready once its loading task finishes; requests that come earlier wait for it)."""

    def __init__(self, settings: RouterSettings, policy: RoutesPolicy) -> None:
        self.settings = settings
        self.policy = policy
        self._loading: asyncio.Task[DomainRouter] | None = None

    @classmethod
    def start(cls, settings: Settings) -> AutoRouting | None:
        """Parse the routes file and start loading the classifier; None when routing is off."""
        if settings.router.routes_file is None:
            return None
        auto = cls(settings.router, load_routes(settings.router.routes_file))
        auto._loading = asyncio.create_task(auto._load(), name="router-load")
        return auto

    async def _load(self) -> DomainRouter:
        s = self.settings
        try:
            classifier = await asyncio.to_thread(
                build_classifier, self.policy, s.classifier, s.artefact
            )
        except Exception:
            log.exception(
                "router classifier %r failed to load; auto routes to fallback", s.classifier
            )
            raise
        log.info("router ready", extra={"classifier": classifier.name})
        return DomainRouter(self.policy, classifier)

    async def router(self) -> DomainRouter | None:
        """The loaded router, waiting for it if needed; None if loading failed."""
        assert self._loading is not None
        try:
            return await asyncio.shield(self._loading)
        except Exception:
            return None

    async def decide(
        self, state: GatewayState, tenant: Tenant, kind: str, body: dict[str, Any]
    ) -> Decision:
        s = self.settings
        text = request_text(kind, body, s.classify_input, s.max_chars)
        router = await self.router()
        seconds: float | None = None
        override: FallbackReason | None = None
        prediction = Prediction(None, 0.0)
        if not text:
            override = "no_text"
        elif router is None:
            override = "unavailable"
        elif router.classifier.blocking:
            prediction, seconds = await asyncio.to_thread(router.classify, text)
        else:
            prediction, seconds = router.classify(text)

        def usable(model: str) -> bool:
            return is_usable(state, tenant, model)

        name = router.classifier.name if router is not None else s.classifier
        decision = self.policy.decide(prediction, name, tenant.name, usable, tenant.default)
        if override is not None:
            decision = dataclasses.replace(decision, reason=override)
        _observe(state.metrics, tenant, decision, prediction, seconds)
        return decision


def is_usable(state: GatewayState, tenant: Tenant, model: str) -> bool:
    """Whether `tenant` may be served by `model` now, by the pipeline's one resolution rule."""
    from server.pipeline import select_adapter  # the pipeline imports this module

    try:
        select_adapter(state, tenant, None, model)
    except LoraplexError:
        return False
    return True


def _observe(
    metrics: GatewayMetrics,
    tenant: Tenant,
    decision: Decision,
    prediction: Prediction,
    seconds: float | None,
) -> None:
    metrics.observe_route(
        tenant.name,
        decision.domain or "none",
        prediction.domain or "none",
        prediction.confidence,
        decision.reason,
        decision.classifier,
        seconds,
    )


def get_auto_routing(request: Request) -> AutoRouting | None:
    auto: AutoRouting | None = getattr(request.app.state, "loraplex_router", None)
    return auto


async def resolve_model(
    state: GatewayState,
    request: Request,
    tenant: Tenant,
    kind: str,
    body: dict[str, Any],
    header: str | None,
    model: str | None,
) -> tuple[str | None, dict[str, str], Decision | None]:
    """The model name to select, the response headers that tell how it was chosen, and the
    routing decision (None when the request was not auto-routed).

    An explicit adapter header wins; then `model="auto"`, or no model for a tenant whose
    routes say `auto: true`, is routed. Anything else (and "auto" while routing is off, which
    then is an unknown model) is left to the pipeline's selection unchanged.
    """
    if header is not None and header.strip():
        return model, {}, None
    auto = get_auto_routing(request)
    if auto is None:
        return model, {}, None
    if model != AUTO_MODEL and not (model in _UNNAMED and auto.policy.tenant_auto(tenant.name)):
        return model, {}, None
    decision = await auto.decide(state, tenant, kind, body)
    headers = {
        "X-Loraplex-Domain": decision.domain or "none",
        "X-Loraplex-Confidence": f"{decision.confidence:.3f}",
    }
    return decision.target, headers, decision
