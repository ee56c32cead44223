"""Token buckets: the mechanics of rate limiting, in-process or shared through Redis.

A bucket holds at most ``burst`` tokens and gains ``per_second`` tokens a second; a request
takes one token from every bucket it is charged to, or from none of them (all-or-nothing, so a
request refused by its brand's bucket does not also spend its region's). What to charge, and
what to answer, is ``security/admission.py``'s business; this module only counts.

Two implementations of :class:`RateLimiter`:

- :class:`LocalRateLimiter` — one process (the default), with an injectable clock;
- :class:`RedisRateLimiter` — several API replicas share the buckets: one Lua script per
  acquisition reads, refills and takes atomically, with the Redis server's clock (``TIME``) so
  replicas with skewed clocks still agree.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from tally.config_values import Rate

log = logging.getLogger(__name__)

PRUNE_EVERY = 4096  # acquisitions between sweeps of full buckets (the local dict stays small)


@dataclass(frozen=True)
class Bucket:
    """One bucket: ``limit`` is its kind (``client``, ``brand``, ``region``, ``token``), ``key``
    what it is for (a client id, a brand…)."""

    limit: str
    key: str
    rate: Rate

    @property
    def name(self) -> str:
        return f"{self.limit}:{self.key}"


@dataclass(frozen=True)
class BucketState:
    """A bucket right after an acquisition; ``tokens`` may be fractional."""

    bucket: Bucket
    tokens: float

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.tokens))

    @property
    def reset(self) -> int:
        """Whole seconds until the bucket is full again (the ``t`` of ``RateLimit``)."""
        missing = self.bucket.rate.burst - self.tokens
        return max(0, math.ceil(missing / self.bucket.rate.per_second - 1e-9))

    @property
    def retry_after(self) -> int:
        """Whole seconds (≥ 1) until the bucket holds a token again; 0 if it holds one."""
        if self.tokens >= 1:
            return 0
        return max(1, math.ceil((1 - self.tokens) / self.bucket.rate.per_second - 1e-9))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    states: tuple[BucketState, ...]

    @property
    def denied_by(self) -> BucketState | None:
        """The refusing bucket that frees up last (it decides ``Retry-After``)."""
        empty = [s for s in self.states if s.tokens < 1]
        return max(empty, key=lambda s: s.retry_after) if empty and not self.allowed else None


class RateLimiter(Protocol):
    def acquire(self, buckets: Sequence[Bucket]) -> Decision:
        """One token from each bucket if every one holds a token; otherwise none taken."""

    def close(self) -> None: ...


class LocalRateLimiter:
    """Buckets in this process's memory; ``clock`` is monotonic seconds (tests inject one)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # name → (tokens, at)
        self._full_at: dict[str, float] = {}
        self._since_prune = 0

    def acquire(self, buckets: Sequence[Bucket]) -> Decision:
        with self._lock:
            now = self.clock()
            tokens = [self._refilled(b, now) for b in buckets]
            allowed = all(t >= 1 for t in tokens)
            if allowed:
                tokens = [t - 1 for t in tokens]
            for bucket, left in zip(buckets, tokens, strict=True):
                self._buckets[bucket.name] = (left, now)
                self._full_at[bucket.name] = (
                    now + (bucket.rate.burst - left) / bucket.rate.per_second)
            self._prune(now)
            return Decision(allowed, tuple(BucketState(b, t)
                                           for b, t in zip(buckets, tokens, strict=True)))

    def _refilled(self, bucket: Bucket, now: float) -> float:
        held, at = self._buckets.get(bucket.name, (float(bucket.rate.burst), now))
        return min(float(bucket.rate.burst),
                   held + max(0.0, now - at) * bucket.rate.per_second)

    def _prune(self, now: float) -> None:
        """Forget full buckets: a full bucket is the same as no bucket."""
        self._since_prune += 1
        if self._since_prune < PRUNE_EVERY:
            return
        self._since_prune = 0
        for name in [n for n, full_at in self._full_at.items() if full_at <= now]:
            del self._buckets[name], self._full_at[name]

    def close(self) -> None:
        pass


# KEYS: one hash per bucket; ARGV: per_second, burst for each key, in order.
# Returns {allowed (1|0), tokens of each bucket after the acquisition (strings: Lua numbers
# would be truncated to integers in the reply)}.
BUCKET_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local held = {}
local allowed = 1
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', key, 'tokens', 'at')
  local tokens, at = tonumber(state[1]), tonumber(state[2])
  if tokens == nil or at == nil then tokens, at = burst, now end
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
  if tokens < 1 then allowed = 0 end
  held[i] = tokens
end
local reply = {allowed}
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tokens = held[i]
  if allowed == 1 then tokens = tokens - 1 end
  redis.call('HSET', key, 'tokens', string.format('%.17g', tokens),
             'at', string.format('%.6f', now))
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate * 1000) + 1000)
  reply[i + 1] = string.format('%.17g', tokens)
end
return reply
"""


class RedisRateLimiter:
    """Buckets in Redis, shared by every replica configured with the same URL and prefix.

    If Redis stops answering, requests are let through (logged, at most every 10 s): the
    limits protect the service, and refusing every request would be the outage they exist to
    prevent. ``tally serve`` does refuse to start when Redis cannot be reached at all."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client, self.prefix = client, prefix
        self._script = client.register_script(BUCKET_SCRIPT)
        self._last_warning = 0.0

    def acquire(self, buckets: Sequence[Bucket]) -> Decision:
        if not buckets:
            return Decision(True, ())
        keys = [f"{self.prefix}rl:{b.name}" for b in buckets]
        args: list[Any] = []
        for bucket in buckets:
            args += [repr(bucket.rate.per_second), bucket.rate.burst]
        try:
            reply = self._script(keys=keys, args=args)
        except redis.RedisError as exc:
            self.warn(exc)
            return Decision(True, ())
        tokens = [float(v) for v in reply[1:]]
        return Decision(int(reply[0]) == 1,
                        tuple(BucketState(b, t) for b, t in zip(buckets, tokens, strict=True)))

    def warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 10:
            self._last_warning = now
            log.warning("rate limiter: Redis unavailable, request let through",
                        extra={"error": f"{type(exc).__name__}: {exc}"})

    def close(self) -> None:
        self.client.close()
