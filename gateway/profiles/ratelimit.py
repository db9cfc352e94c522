"""Per-device token buckets, charged for valid transactions only.

A bucket refills by the device's own clock when the payload carries a device
time, else by the gateway's monotonic clock. Device time is what makes a
backlog safe: when the broker re-delivers an hour of queued readings at once,
their device times are an hour apart and they pass, while a device that
really sends too fast (device times close together) is refused. Device time
cannot run ahead of the gateway's by more than the profile's max_ahead_s
(clock_skew), so a device cannot buy tokens by lying about the future.

Only a sequence number above the highest one charged costs a token: a
re-delivery of something already counted (MQTT QoS 1 after a reconnect) must
reach the spool and be absorbed as a duplicate, not be refused here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from gateway.profiles.spec import RateLimitSpec

DEFAULT_MAX_DEVICES = 262_144


class _Bucket:
    __slots__ = ("device_clock", "last_seq", "t", "tokens")

    def __init__(self, tokens: float, t: float, device_clock: bool) -> None:
        self.tokens = tokens
        self.t = t
        self.device_clock = device_clock
        self.last_seq = -1


class RateLimiter:
    """Thread-safe: MQTT intake and the gRPC API decode on different threads."""

    def __init__(self, clock: Callable[[], float], max_devices: int = DEFAULT_MAX_DEVICES) -> None:
        self._clock = clock
        self._max = max_devices
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(
        self, key: tuple[str, str], spec: RateLimitSpec, seq: int, device_time_ms: int
    ) -> bool:
        """Charge one token for (profile name, device) unless `seq` was charged already."""
        device_clock = device_time_ms > 0
        now = device_time_ms / 1000.0 if device_clock else self._clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                b = _Bucket(float(spec.burst), now, device_clock)
                self._buckets[key] = b
                # The least recently seen device goes first; a forgotten bucket comes
                # back full, which only ever errs towards accepting.
                if len(self._buckets) > self._max:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            if seq <= b.last_seq:
                return True
            if b.device_clock != device_clock:
                b.device_clock = device_clock
                b.t = now
            elapsed = now - b.t
            if elapsed > 0:
                b.tokens = min(float(spec.burst), b.tokens + elapsed * spec.per_s)
                b.t = now
            if b.tokens < 1.0:
                return False
            b.tokens -= 1.0
            b.last_seq = seq
            return True
