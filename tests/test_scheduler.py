"""
Tests for the Twisted rotation scheduler, driven by a task.Clock.
"""

from __future__ import annotations

import gc
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import implementer

from twisted_rekey._policy import RotationPolicy
from twisted_rekey._scheduler import RotationScheduler


class Recorder:
    """A timer callback that remembers when it ran."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[tuple[float, float]] = []

    def fired(self, now: float) -> None:
        self.calls.append((now, self.clock.seconds()))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "twisted_rekey._scheduler":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)


def test_import_does_not_install_reactor() -> None:
    code = (
        "import sys, twisted_rekey._scheduler\n"
        "print('twisted.internet.reactor' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_fires_at_rounded_time_not_early(clock: Clock) -> None:
    scheduler = RotationScheduler(clock)
    r = Recorder(clock)
    assert scheduler.schedule(r.fired, 10.2) == 11.0
    assert scheduler.getDeadline(r.fired) == 11.0
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(10.2)
    assert r.calls == []
    clock.advance(0.7999)
    assert r.calls == []
    clock.advance(0.0001)
    assert r.calls == [(clock.seconds(), clock.seconds())]
    assert clock.seconds() >= 10.2
    assert clock.getDelayedCalls() == []
    assert len(scheduler) == 0


def test_fine_granularity_exact_deadlines(clock: Clock) -> None:
    """
    Deadlines on the grid fire exactly there, never a rounding error before.
    """
    scheduler = RotationScheduler(clock, granularity=0.05)
    recorders = [Recorder(clock) for _ in range(40)]
    for i, r in enumerate(recorders):
        scheduler.schedule(r.fired, 0.05 * (i + 1) + 0.1)
    for _ in range(250):
        clock.advance(0.01)
    for i, r in enumerate(recorders):
        deadline = 0.05 * (i + 1) + 0.1
        assert len(r.calls) == 1
        (_, seen) = r.calls[0]
        assert seen >= deadline
        assert seen - deadline < 0.05 + 0.01 + 1e-9
    assert clock.getDelayedCalls() == []


def test_one_delayed_call_for_many_keys(clock: Clock) -> None:
    scheduler = RotationScheduler(clock)
    recorders = [Recorder(clock) for _ in range(500)]
    for i, r in enumerate(recorders):
        scheduler.schedule(r.fired, 5.0 + i * 0.1)
    assert len(clock.getDelayedCalls()) == 1
    assert clock.getDelayedCalls()[0].getTime() == 5.0
    clock.advance(5.0)
    assert sum(len(r.calls) for r in recorders) == 1
    assert clock.getDelayedCalls()[0].getTime() == 6.0


def test_earlier_deadline_moves_the_call(clock: Clock) -> None:
    scheduler = RotationScheduler(clock)
    late, early = Recorder(clock), Recorder(clock)
    scheduler.schedule(late.fired, 50.0)
    scheduler.schedule(early.fired, 3.0)
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == 3.0
    scheduler.cancel(early.fired)
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == 50.0
    clock.advance(49.0)
    assert late.calls == []
    clock.advance(1.0)
    assert len(late.calls) == 1


def test_cancel_leaves_reactor_clean(clock: Clock) -> None:
    scheduler = RotationScheduler(clock)
    recorders = [Recorder(clock) for _ in range(100)]
    for i, r in enumerate(recorders):
        scheduler.schedule(r.fired, 10.0 + i)
    for r in recorders:
        assert scheduler.cancel(r.fired) is True
    assert scheduler.cancel(recorders[0].fired) is False
    assert clock.getDelayedCalls() == []
    clock.advance(1000)
    assert all(r.calls == [] for r in recorders)


def test_reschedule_replaces(clock: Clock) -> None:
    scheduler = RotationScheduler(clock)
    r = Recorder(clock)
    scheduler.schedule(r.fired, 5.0)
    scheduler.schedule(r.fired, 8.0)
    assert len(scheduler) == 1
    clock.advance(7.0)
    assert r.calls == []
    clock.advance(1.0)
    assert len(r.calls) == 1


def test_exception_logged_and_others_run(
    clock: Clock, logged: list[LogEvent], logged_failures: Any
) -> None:
    scheduler = RotationScheduler(clock)
    before, after = Recorder(clock), Recorder(clock)

    def broken(now: float) -> None:
        raise ZeroDivisionError("boom")

    scheduler.schedule(before.fired, 1.0)
    scheduler.schedule(broken, 1.0)
    scheduler.schedule(after.fired, 1.0)
    clock.advance(1.0)
    assert len(before.calls) == 1
    assert len(after.calls) == 1
    (event,) = logged
    assert event["log_failure"].check(ZeroDivisionError)
    assert event["callback"] is broken
    assert "raised" in event["log_format"]
    assert "broken" in formatEvent(event)
    # The suite fails any test that logs a failure; this one is meant.
    (flushed,) = logged_failures.flush(ZeroDivisionError)
    assert flushed is event["log_failure"]
    assert clock.getDelayedCalls() == []


def test_callback_can_reschedule_itself(clock: Clock) -> None:
    scheduler = RotationScheduler(clock)
    times: list[float] = []

    def tick(now: float) -> None:
        times.append(now)
        if len(times) < 5:
            scheduler.schedule(tick, now + 10.0)

    scheduler.schedule(tick, 10.0)
    for _ in range(100):
        clock.advance(1.0)
    assert times == [10.0, 20.0, 30.0, 40.0, 50.0]
    assert clock.getDelayedCalls() == []


def test_callback_can_cancel_another_due_one(clock: Clock) -> None:
    scheduler = RotationScheduler(clock)
    victim = Recorder(clock)

    def killer(now: float) -> None:
        assert scheduler.cancel(victim.fired) is True

    scheduler.schedule(killer, 1.0)
    scheduler.schedule(victim.fired, 1.0)
    clock.advance(1.0)
    assert victim.calls == []
    assert clock.getDelayedCalls() == []


def test_past_deadline_from_a_callback_waits_for_next_bucket(clock: Clock) -> None:
    """
    A callback that reschedules itself in the past does not spin the
    reactor: it runs again at the next bucket.
    """
    scheduler = RotationScheduler(clock)
    runs: list[float] = []

    def again(now: float) -> None:
        runs.append(now)
        scheduler.schedule(again, now - 5.0)

    scheduler.schedule(again, 1.0)
    clock.advance(1.0)
    assert runs == [1.0]
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == 2.0
    clock.advance(0.5)
    assert runs == [1.0]
    clock.advance(0.5)
    assert runs == [1.0, 2.0]
    scheduler.cancel(again)
    assert clock.getDelayedCalls() == []


def test_past_deadline_from_outside_runs_at_once(clock: Clock) -> None:
    scheduler = RotationScheduler(clock)
    clock.advance(100.0)
    r = Recorder(clock)
    scheduler.schedule(r.fired, 50.0)
    clock.advance(0)
    assert r.calls == [(100.0, 100.0)]


def test_wakeups_for_ten_thousand_connections(clock: Clock) -> None:
    """
    10,000 connections rotating every 60 s (jitter 10%) wake the reactor
    about once a second, not 10,000 times a minute.
    """
    scheduler = RotationScheduler(clock, granularity=1.0)
    policy = RotationPolicy(interval=60.0, jitter=0.1, rng=random.Random(5))
    fired = 0

    class Connection:
        def __init__(self) -> None:
            self.deadline = policy._draw(60.0)
            scheduler.schedule(self.rotationTimer, self.deadline)

        def rotationTimer(self, now: float) -> None:
            nonlocal fired
            fired += 1
            assert now >= self.deadline
            self.deadline = now + policy._draw(60.0)
            scheduler.schedule(self.rotationTimer, self.deadline)

    connections = [Connection() for _ in range(10_000)]
    # Let the deadlines spread out for ten minutes, then count one minute.
    for _ in range(600):
        clock.advance(1.0)
        assert len(clock.getDelayedCalls()) == 1
    wakeUps, firedBefore = scheduler.wakeUps, fired
    for _ in range(240):
        clock.advance(0.25)
    perMinute = scheduler.wakeUps - wakeUps
    rotations = fired - firedBefore
    assert 9_000 <= rotations <= 11_000
    assert perMinute <= 61
    for c in connections:
        scheduler.cancel(c.rotationTimer)
    assert clock.getDelayedCalls() == []


def test_for_reactor_is_shared(clock: Clock) -> None:
    a = RotationScheduler.forReactor(clock)
    assert RotationScheduler.forReactor(clock) is a
    assert RotationScheduler.forReactor(Clock()) is not a
    assert a.clock is clock


def test_for_reactor_does_not_keep_clocks_alive() -> None:
    import weakref

    c = Clock()
    scheduler = RotationScheduler.forReactor(c)
    ref = weakref.ref(c)
    del c, scheduler
    gc.collect()
    assert ref() is None


def test_for_reactor_lives_while_deadlines_pending(clock: Clock) -> None:
    r = Recorder(clock)
    RotationScheduler.forReactor(clock).schedule(r.fired, 5.0)
    gc.collect()
    assert r.fired in RotationScheduler.forReactor(clock)
    clock.advance(5.0)
    assert len(r.calls) == 1


def test_granularity_validated(clock: Clock) -> None:
    with pytest.raises(ValueError, match="granularity"):
        RotationScheduler(clock, granularity=0)
    assert RotationScheduler(clock, granularity=0.05).granularity == 0.05
