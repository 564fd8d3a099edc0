"""Per-tenant rate limits: requests/minute and tokens/minute as token buckets (429 + Retry-After).

Buckets live in this gateway process: with N replicas behind a load balancer a tenant gets up to
N times its quota (docs/decisions.md). Tokens are charged when the engine reports usage, so a
request is admitted while the bucket is positive and may take it below zero; the next one then
waits until the bucket refills.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from adapters.registry import Quotas
from server.errors import RateLimited


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


def _limited(what: str, wait_s: float) -> RateLimited:
    return RateLimited(
        f"Rate limit reached for {what}; retry after the indicated time.",
        retry_after_s=max(1, math.ceil(wait_s)),
    )
