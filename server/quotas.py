"""Per-tenant quotas on the request path: requests/minute and tokens/minute as token buckets,
requests in flight at once, and caps on a request's `max_tokens`, `n` and `best_of`.

Rate and concurrency limits answer 429 with `Retry-After`; a field over its cap answers 400
naming the field (a refusal, not a silent clamp: the client learns why it got fewer tokens or
choices than it asked for, as with OpenAI's own limits). A request that names no `max_tokens`
gets the tenant's cap, so the cap bounds every request.

Buckets and in-flight counts live in this gateway process: with N replicas behind a load
balancer a tenant gets up to N times its quota (docs/decisions.md). Tokens are charged when the
engine reports usage, so a request is admitted while the bucket is positive and may take it
below zero; the next one then waits until the bucket refills.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adapters.registry import Quotas
from server.errors import BadRequest, RateLimited

# Request field → the quota that caps it (chat's max_completion_tokens is max_tokens' new name).
CAPPED_FIELDS = (
    ("max_tokens", "max_tokens"),
    ("max_completion_tokens", "max_tokens"),
    ("n", "max_n"),
    ("best_of", "max_best_of"),
)


class QuotaExceeded(BadRequest):
    """A request field is over the tenant's cap (`param` names the field)."""

    code = "quota_exceeded"


class ConcurrencyLimited(RateLimited):
    code = "concurrency_limit_exceeded"


@dataclass(slots=True)
class _Bucket:
    rate_per_s: float
    capacity: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate_per_s)
        self.at = now

    def wait_s(self, need: float) -> float:
        return max(0.0, (need - self.level) / self.rate_per_s)


@dataclass(slots=True)
class QuotaBook:
    _requests: dict[str, _Bucket] = field(default_factory=dict)
    _tokens: dict[str, _Bucket] = field(default_factory=dict)
    _in_flight: dict[str, int] = field(default_factory=dict)

    def admit(self, tenant: str, quotas: Quotas) -> None:
        """Take one request from the tenant's budget or raise 429 with the wait in Retry-After."""
        now = time.monotonic()
        tokens = self._bucket(self._tokens, tenant, quotas.tokens_per_minute, now)
        if tokens is not None and tokens.level <= 0:
            raise _limited("tokens per minute", tokens.wait_s(1.0))
        requests = self._bucket(self._requests, tenant, quotas.requests_per_minute, now)
        if requests is not None:
            if requests.level < 1:
                raise _limited("requests per minute", requests.wait_s(1.0))
            requests.level -= 1

    def charge_tokens(self, tenant: str, quotas: Quotas, tokens: int) -> None:
        bucket = self._bucket(self._tokens, tenant, quotas.tokens_per_minute, time.monotonic())
        if bucket is not None:
            bucket.level -= tokens

    def enter(self, tenant: str, limit: int) -> Callable[[], None]:
        """Take one of the tenant's `limit` concurrent slots (429 when none is free); returns
        the function that gives it back, to be called exactly once when the request ends."""
        n = self._in_flight.get(tenant, 0)
        if n >= limit:
            raise ConcurrencyLimited(
                f"Too many concurrent requests for this key (limit {limit}); retry shortly.",
                retry_after_s=1,
            )
        self._in_flight[tenant] = n + 1

        def leave() -> None:
            left = self._in_flight.get(tenant, 1) - 1
            if left > 0:
                self._in_flight[tenant] = left
            else:
                self._in_flight.pop(tenant, None)

        return leave

    def in_flight(self, tenant: str) -> int:
        return self._in_flight.get(tenant, 0)

    @staticmethod
    def _bucket(
        book: dict[str, _Bucket], tenant: str, per_minute: int | None, now: float
    ) -> _Bucket | None:
        if not per_minute:
            book.pop(tenant, None)
            return None
        bucket = book.get(tenant)
        if bucket is None or bucket.capacity != per_minute:
            bucket = book[tenant] = _Bucket(per_minute / 60.0, float(per_minute), per_minute, now)
        bucket.refill(now)
        return bucket


def has_caps(quotas: Quotas) -> bool:
    return (
        quotas.max_tokens is not None or quotas.max_n is not None or quotas.max_best_of is not None
    )


def apply_caps(quotas: Quotas, body: dict[str, Any]) -> None:
    """Refuse (400 `quota_exceeded`, `param` = the field) a request over one of the tenant's
    caps; write each checked field back as the whole number that was checked (so the engine's
    own coercion cannot read "5000" differently), and give a request without `max_tokens`
    the tenant's cap."""
    for name, quota in CAPPED_FIELDS:
        cap: int | None = getattr(quotas, quota)
        value = body.get(name)
        if cap is None or value is None:
            continue
        number = _whole(value, name)
        if number > cap:
            raise QuotaExceeded(
                f"{name} is {number}; this key may ask for at most {cap}.", param=name
            )
        body[name] = number
    if (
        quotas.max_tokens is not None
        and body.get("max_tokens") is None
        and body.get("max_completion_tokens") is None
    ):
        body["max_tokens"] = quotas.max_tokens


def _whole(value: Any, name: str) -> int:
    """A JSON value that an OpenAI server would read as an integer, as that integer."""
    if isinstance(value, bool):
        raise BadRequest(f"Invalid request: {name}: must be an integer", param=name)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            as_float = float(value)
        except ValueError:
            as_float = math.nan
        if as_float.is_integer():
            return int(as_float)
    raise BadRequest(f"Invalid request: {name}: must be an integer", param=name)


def _limited(what: str, wait_s: float) -> RateLimited:
    return RateLimited(
        f"Rate limit reached for {what}; retry after the indicated time.",
        retry_after_s=max(1, math.ceil(wait_s)),
    )
