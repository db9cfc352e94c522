"""Per-key token buckets on the gateway's clock, charged on arrival.

A bucket is charged when a payload arrives for its key (a profile's device, or a device's
rejects), before anything in the payload is decoded, and refills only by the gateway's
monotonic clock. Nothing a device sends, neither a sequence number nor a device time, can
buy it tokens: a jump to the highest seq or a device clock set far back changes nothing.

A redelivery (MQTT QoS 1 after a reconnect) costs a token like any arrival. A profile's
`burst` must therefore cover what one device may deliver at once, such as the readings a
meter buffered out of coverage, or the broker's backlog for it after a gateway outage.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

DEFAULT_MAX_DEVICES = 262_144


class _Bucket:
    __slots__ = ("t", "tokens")

    def __init__(self, tokens: float, t: float) -> None:
        self.tokens = tokens
        self.t = t


class RateLimiter:
    """Thread-safe: MQTT intake and the gRPC API arrive on different threads."""

    def __init__(self, clock: Callable[[], float], max_devices: int = DEFAULT_MAX_DEVICES) -> None:
        self._clock = clock
        self._max = max_devices
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: Hashable, per_s: float, burst: int) -> bool:
        """Charge one token to `key`'s bucket (`burst` deep, refilled at `per_s`); False
        when it is empty."""
        now = self._clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                b = _Bucket(float(burst), now)
                self._buckets[key] = b
                # The least recently seen key goes first; a forgotten bucket comes back
                # full, which only ever errs towards accepting.
                if len(self._buckets) > self._max:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                elapsed = now - b.t
                if elapsed > 0:
                    b.tokens = min(float(burst), b.tokens + elapsed * per_s)
                    b.t = now
            if b.tokens < 1.0:
                return False
            b.tokens -= 1.0
            return True
