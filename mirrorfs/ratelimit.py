"""Copy-rate limiting (a token bucket over short slices) and rate measurement.

Time comes from the caller (trio's clock in the daemon), so tests drive it with
trio's autojump clock instead of sleeping.
"""

from collections import deque

SLICE_S = 0.1  # a speed change takes effect within one slice; bursts last at most one


class TokenBucket:
    """``rate`` bytes/s, 0 = unlimited. Callers take what ``allowance`` grants, then
    ``charge`` what they used; the balance may go negative (a chunk larger than one slice's
    worth), which delays the next take, so the rate holds over any window of about a second."""

    def __init__(self, rate: int, now: float) -> None:
        self._rate = rate
        self._tokens = 0.0
        self._last = now

    @property
    def rate(self) -> int:
        return self._rate

    def set_rate(self, rate: int, now: float) -> None:
        self._refill(now)
        self._rate = rate
        self._tokens = min(self._tokens, self._burst())

    def _burst(self) -> float:
        # at least one token: below 1/SLICE_S bytes/s the bucket would never hold a whole
        # token and nothing would ever be copied
        return max(self._rate * SLICE_S, 1.0)

    def _refill(self, now: float) -> None:
        if self._rate:
            self._tokens = min(self._tokens + (now - self._last) * self._rate, self._burst())
        self._last = now

    def allowance(self, now: float, min_take: int = 1) -> int | None:
        """Bytes that may start now (None: unlimited; 0: wait ``delay`` first). Waits for
        ``min_take`` bytes (capped at half a burst) rather than starting a tiny copy
        every time a few tokens trickle in: each copy costs a thread round trip."""
        if not self._rate:
            return None
        self._refill(now)
        # one byte of slack: refills are floats, and a wait for the last 1e-11 of a token
        # would be a sleep too short for any clock to pass
        return max(1, int(self._tokens)) if self._tokens + 1 >= self._need(min_take) else 0

    def delay(self, now: float, min_take: int = 1) -> float:
        """Seconds until ``allowance`` grants something, capped at one slice so that a
        speed change is seen soon."""
        if not self._rate:
            return 0.0
        self._refill(now)
        need = self._need(min_take)
        if self._tokens + 1 >= need:
            return 0.0
        # > 0 whenever allowance is 0, and at least a millisecond
        return min(SLICE_S, max(0.001, (need - self._tokens) / self._rate))

    def _need(self, min_take: int) -> float:
        # half a burst at most: the bucket is capped at a burst
        return max(1.0, min(float(min_take), self._burst() / 2))

    def charge(self, nbytes: int, now: float) -> None:
        if self._rate:
            self._refill(now)
            self._tokens -= nbytes


class RateMeter:
    """Bytes per second over the last ``window`` seconds."""

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()
        self._sum = 0

    def add(self, nbytes: int, now: float) -> None:
        self._samples.append((now, nbytes))
        self._sum += nbytes
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window:
            self._sum -= self._samples.popleft()[1]

    def rate(self, now: float, since: float) -> float:
        self._expire(now)
        span = min(self.window, now - since)
        return self._sum / span if span > 0 else 0.0
