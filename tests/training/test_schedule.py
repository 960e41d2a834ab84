"""The learning-rate schedule is a pure function of the step (so resume needs no scheduler state)."""

from __future__ import annotations

import pytest
from fpt_deploy.training import TrainConfig
from fpt_deploy.training.loop import learning_rate

from fpt_deploy.errors import ConfigError


def test_cosine_warms_up_then_decays_to_zero():
    config = TrainConfig(task="bit-xor", lr=1e-3, warmup_steps=10)
    lrs = [learning_rate(config, s, 200) for s in range(200)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # monotone decay after warmup
    assert lrs[-1] < 1e-6


def test_warmup_is_capped_at_a_tenth_of_short_runs():
    config = TrainConfig(task="bit-xor", lr=1e-3, warmup_steps=50)
    assert learning_rate(config, 1, 20) == pytest.approx(1e-3)  # warmup of 2 steps, not 50


def test_constant_is_the_papers_setting():
    config = TrainConfig(task="bit-xor", lr=2e-3, schedule="constant")
    assert {learning_rate(config, s, 100) for s in range(100)} == {2e-3}


def test_bad_schedule_is_refused():
    with pytest.raises(ConfigError, match="schedule must be"):
        TrainConfig(schedule="linear")
