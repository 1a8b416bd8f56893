"""The pipeline's step guard (server/pipeline_health.py): retried until stored, never stored twice."""

from __future__ import annotations

import threading

import pytest

from mlink.server.pipeline_health import StepGuard


class Step:
    """A step that stores its batch, then fails ``fail_after`` times after (or before) storing."""

    def __init__(self, guard: StepGuard, fail: int, after_store: bool) -> None:
        self.guard, self.fail, self.after_store = guard, fail, after_store
        self.stored: list[int] = []

    def __call__(self, batch: int) -> None:
        if not self.after_store and self.fail:
            self.fail -= 1
            raise RuntimeError("before storing")
        self.stored.append(batch)
        self.guard.committed()
        if self.after_store and self.fail:
            self.fail -= 1
            raise RuntimeError("after storing")


def test_a_step_that_failed_before_storing_is_retried_and_stores_once() -> None:
    guard = StepGuard(threading.Event(), retries=3, backoff_s=0.0)
    step = Step(guard, fail=2, after_store=False)
    guard.run(step, 7)
    assert step.stored == [7] and guard.failed_total == 2 and guard.failed_in_row == 0


def test_a_step_that_failed_after_storing_is_not_run_again() -> None:
    guard = StepGuard(threading.Event(), retries=3, backoff_s=0.0)
    step = Step(guard, fail=1, after_store=True)
    guard.run(step, 7)
    assert step.stored == [7]  # once, not twice
    guard.run(step, 8)  # the next batch succeeds: the failures in a row start again
    assert step.stored == [7, 8] and guard.failed_in_row == 0 and guard.failed_total == 1


def test_failures_after_storing_still_end_the_pipeline_when_they_keep_coming() -> None:
    guard = StepGuard(threading.Event(), retries=3, backoff_s=0.0)
    step = Step(guard, fail=10, after_store=True)
    guard.run(step, 1)
    guard.run(step, 2)
    with pytest.raises(RuntimeError, match="after storing"):
        guard.run(step, 3)
    assert step.stored == [1, 2, 3]


def test_a_step_that_keeps_failing_before_storing_raises_after_the_retries() -> None:
    guard = StepGuard(threading.Event(), retries=3, backoff_s=0.0)
    step = Step(guard, fail=5, after_store=False)
    with pytest.raises(RuntimeError, match="before storing"):
        guard.run(step, 1)
    assert step.stored == [] and guard.failed_total == 3
