"""
Tests for the coalescing timer wheel: pure, no reactor.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from twisted_rekey._wheel import TimerWheel


def test_rounds_up_and_coalesces() -> None:
    wheel: TimerWheel[str] = TimerWheel(1.0)
    assert wheel.add("a", 10.2) == 11.0
    assert wheel.add("b", 10.9) == 11.0
    assert wheel.add("c", 11.0) == 11.0
    assert wheel.add("d", 11.01) == 12.0
    assert wheel.next_deadline() == 11.0
    assert wheel.pop_due(10.99) == []
    assert wheel.pop_due(11.0) == ["a", "b", "c"]
    assert wheel.next_deadline() == 12.0
    assert len(wheel) == 1
    assert wheel.pop_due(100.0) == ["d"]
    assert wheel.next_deadline() is None
    assert len(wheel) == 0


@pytest.mark.parametrize(
    ("granularity", "deadline"),
    [
        (0.1, 0.3),
        (0.1, 0.1 * 3),
        (0.1, 100.05),
        # 0.45000000000000007 / 0.05 rounds to exactly 9.0, and 9 * 0.05 is
        # 0.45: the bucket would land just before the deadline.
        (0.05, 0.45000000000000007),
        (0.05, 1.7500000000000002),
    ],
)
def test_fine_granularity_never_rounds_down(
    granularity: float, deadline: float
) -> None:
    wheel: TimerWheel[int] = TimerWheel(granularity)
    when = wheel.add(1, deadline)
    assert when >= deadline
    assert when - deadline < granularity + 1e-9
    assert wheel.pop_due(math.nextafter(when, 0.0)) == []
    assert wheel.pop_due(when) == [1]


def test_reschedule_replaces_deadline() -> None:
    wheel: TimerWheel[str] = TimerWheel(1.0)
    wheel.add("a", 5.0)
    assert wheel.add("a", 20.0) == 20.0
    assert wheel.deadline("a") == 20.0
    assert len(wheel) == 1
    assert wheel.pop_due(10.0) == []
    assert wheel.next_deadline() == 20.0
    wheel.add("a", 3.0)
    assert wheel.pop_due(3.0) == ["a"]


def test_remove() -> None:
    wheel: TimerWheel[str] = TimerWheel(1.0)
    wheel.add("a", 5.0)
    wheel.add("b", 5.0)
    assert wheel.remove("a") is True
    assert wheel.remove("a") is False
    assert "a" not in wheel
    assert "b" in wheel
    assert wheel.deadline("a") is None
    assert wheel.pop_due(5.0) == ["b"]
    assert wheel.remove("zzz") is False


def test_removing_last_key_of_earliest_bucket_moves_next_deadline() -> None:
    wheel: TimerWheel[str] = TimerWheel(1.0)
    wheel.add("early", 1.0)
    wheel.add("late", 9.0)
    wheel.remove("early")
    assert wheel.next_deadline() == 9.0


def test_heap_stays_small_under_churn() -> None:
    """
    Connections that come and go do not leave the heap growing without bound.
    """
    wheel: TimerWheel[int] = TimerWheel(0.05)
    wheel.add(-1, 1e6)
    for i in range(100_000):
        wheel.add(i, 1000.0 + i * 0.05)
        wheel.remove(i)
    assert len(wheel) == 1
    assert len(wheel._heap) <= 2 * len(wheel._buckets) + 65
    assert wheel.next_deadline() == pytest.approx(1e6)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan])
def test_bad_granularity(bad: float) -> None:
    with pytest.raises(ValueError, match="granularity"):
        TimerWheel(bad)


def test_granularity_type() -> None:
    with pytest.raises(TypeError, match="granularity"):
        TimerWheel("1")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_bad_deadline(bad: float) -> None:
    wheel: TimerWheel[str] = TimerWheel()
    with pytest.raises(ValueError, match="deadline"):
        wheel.add("a", bad)
    assert len(wheel) == 0


granularities = st.sampled_from([0.05, 0.1, 0.25, 1.0, 3.0])
deadlines = st.floats(min_value=0.0, max_value=1e5, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    granularity=granularities,
    entries=st.lists(st.tuples(st.integers(0, 50), deadlines), max_size=60),
    removals=st.sets(st.integers(0, 50), max_size=20),
    steps=st.lists(st.floats(min_value=0.0, max_value=2e3), max_size=40),
)
def test_nothing_early_nothing_lost_removed_never_fire(
    granularity: float,
    entries: list[tuple[int, float]],
    removals: set[int],
    steps: list[float],
) -> None:
    wheel: TimerWheel[int] = TimerWheel(granularity)
    expected: dict[int, float] = {}
    for key, deadline in entries:
        wheel.add(key, deadline)
        expected[key] = deadline
    for key in removals:
        assert wheel.remove(key) is (key in expected)
        expected.pop(key, None)

    fired: dict[int, float] = {}
    now = 0.0
    for step in [*steps, 2e5]:
        now += step
        for key in wheel.pop_due(now):
            assert key not in fired, "fired twice"
            assert key in expected, "removed key fired"
            assert now >= expected[key], "fired early"
            fired[key] = now
        # Everything still in the wheel is not yet due at its rounded time.
        nd = wheel.next_deadline()
        assert nd is None or nd > now
    assert fired.keys() == expected.keys(), "due key lost"
    for key, at in fired.items():
        # Fired at the first step at or after the rounded deadline.
        assert expected[key] <= at
    assert len(wheel) == 0


class WheelMachine(RuleBasedStateMachine):
    """
    Interleaved adds, removals, reschedules and clock steps keep the wheel in
    agreement with a plain dict of deadlines.
    """

    @initialize(granularity=granularities)
    def setup(self, granularity: float) -> None:
        self.wheel: TimerWheel[int] = TimerWheel(granularity)
        self.granularity = granularity
        self.model: dict[int, float] = {}
        self.now = 0.0

    @rule(key=st.integers(0, 30), delta=st.floats(min_value=-5.0, max_value=50.0))
    def add(self, key: int, delta: float) -> None:
        deadline = self.now + delta
        when = self.wheel.add(key, deadline)
        assert deadline <= when < deadline + self.granularity + 1e-9
        self.model[key] = deadline

    @rule(key=st.integers(0, 30))
    def remove(self, key: int) -> None:
        assert self.wheel.remove(key) is (key in self.model)
        self.model.pop(key, None)

    @rule(step=st.floats(min_value=0.0, max_value=20.0))
    def advance(self, step: float) -> None:
        self.now += step
        due = self.wheel.pop_due(self.now)
        assert len(due) == len(set(due))
        for key in due:
            assert key in self.model
            assert self.model.pop(key) <= self.now
        for key, deadline in self.model.items():
            # Not returned: so its rounded deadline is still ahead.
            rounded = self.wheel.deadline(key)
            assert rounded is not None and rounded > self.now
            assert rounded >= deadline

    @invariant()
    def agrees(self) -> None:
        if not hasattr(self, "wheel"):
            return
        assert len(self.wheel) == len(self.model)
        nd = self.wheel.next_deadline()
        if self.model:
            assert nd == min(
                d for d in (self.wheel.deadline(k) for k in self.model) if d is not None
            )
        else:
            assert nd is None


TestWheelMachine = WheelMachine.TestCase
TestWheelMachine.settings = settings(max_examples=60, deadline=None)
