"""When a checkpoint is written (bigtrain.checkpoint.policy.save_decision): pure rules, no I/O."""

from __future__ import annotations

import pytest

from bigtrain.checkpoint import save_decision
from bigtrain.config import CheckpointSection


def decide(step, last=False, stop=False, time_due=False, **cfg):
    return save_decision(CheckpointSection(**cfg), step, last=last, stop=stop, time_due=time_due)


def test_periodic_saves_follow_every_steps_and_async():
    assert [s for s in range(1, 13) if decide(s, every_steps=4)] == [4, 8, 12]
    assert decide(4, every_steps=4) == "sync"
    assert decide(4, every_steps=4, **{"async": True}) == "async"
    assert decide(5, every_steps=0) is None  # 0: no step-based saves


def test_time_based_saves():
    assert decide(3, every_steps=4, time_due=True) == "sync"
    assert decide(3, every_steps=4, time_due=True, **{"async": True}) == "async"


@pytest.mark.parametrize("async_", [False, True])
def test_the_last_step_and_stops_save_synchronously(async_):
    assert decide(10, last=True, every_steps=4, **{"async": async_}) == "sync"  # the process exits next
    assert decide(7, stop=True, **{"async": async_}) == "sync"
    assert decide(10, last=True, save_final=False) is None
    assert decide(7, stop=True, save_on_preempt=False) is None
    assert decide(8, stop=True, every_steps=4, save_on_preempt=False) is None  # stopping: no periodic save either
