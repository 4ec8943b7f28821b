import pytest

from mirrorfs.ratelimit import TokenBucket

MiB = 1 << 20


@pytest.mark.parametrize("rate", [5, 1000, MiB, 1_000_003, 100 * MiB])
@pytest.mark.parametrize("take", [1, 64 << 10, 4 * MiB])
def test_rate_holds_and_waits_always_advance(rate: int, take: int) -> None:
    """Simulated time: what the bucket grants over 10 s is the rate (within one take), and
    a refused take always asks for a wait the clock can see (no spin on float dust)."""
    now, granted = 0.0, 0
    b = TokenBucket(rate, now)
    for _ in range(200_000):
        if now >= 10:
            break
        allowed = b.allowance(now, take)
        assert allowed is not None
        if allowed:
            n = min(allowed, 4 * MiB)  # the copier takes what is allowed, up to a batch
            b.charge(n, now)
            granted += n
        else:
            d = b.delay(now, take)
            assert d >= 0.001, f"a wait of {d} s cannot advance a clock"
            now += d
    assert now >= 10, "the bucket stalled"
    assert abs(granted - 10 * rate) <= max(take, rate * 0.2) + 1, granted


def test_unlimited_and_changes() -> None:
    b = TokenBucket(0, 0.0)
    assert b.allowance(0.0) is None and b.delay(0.0) == 0
    b.set_rate(MiB, 0.0)
    assert (b.allowance(0.0, 64 << 10) or 0) <= 1 and b.delay(0.0, 64 << 10) > 0
    assert (b.allowance(1.0, 64 << 10) or 0) >= 64 << 10
