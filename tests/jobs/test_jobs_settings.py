"""Settings that cannot take effect are refused when a process starts, naming the variable."""
from __future__ import annotations

import pytest

from jobs.settings import KEEP_CHECKPOINTS_MAX, Settings
from jobs.specs import Hyperparameters


@pytest.mark.parametrize("variable, value, message", [
    ("JOB_LEASE_SECONDS", "abc", "JOB_LEASE_SECONDS must be an integer, got 'abc'"),
    ("JOB_LEASE_SECONDS", "-5", "JOB_LEASE_SECONDS must be at least 1, got -5"),
    ("JOB_MAX_ATTEMPTS", "0", "JOB_MAX_ATTEMPTS must be at least 1, got 0"),
    ("JOB_REDISPATCH_SECONDS", "-1", "JOB_REDISPATCH_SECONDS must be at least 1, got -1"),
    ("MAX_UPLOAD_BYTES", "-5", "MAX_UPLOAD_BYTES must be at least 1, got -5"),
    ("MAX_INLINE_PROMPTS", "0", "MAX_INLINE_PROMPTS must be at least 1, got 0"),
    ("GENERATION_SHARD_SIZE", "0", "GENERATION_SHARD_SIZE must be at least 1, got 0"),
    ("MODEL_CACHE_SIZE", "1.5", "MODEL_CACHE_SIZE must be an integer, got '1.5'"),
    ("KEEP_CHECKPOINTS", "0", "KEEP_CHECKPOINTS must be from 1 to 1000, got 0"),
    ("KEEP_CHECKPOINTS", "99999", "KEEP_CHECKPOINTS must be from 1 to 1000, got 99999"),
])
def test_a_setting_that_cannot_take_effect_is_refused_naming_it(variable, value, message):
    with pytest.raises(ValueError) as refused:
        Settings.from_env({variable: value})
    assert str(refused.value) == message


def test_defaults_and_empty_values():
    settings = Settings.from_env({"JOB_LEASE_SECONDS": ""})
    assert (settings.job_lease_seconds, settings.job_max_attempts, settings.job_redispatch_seconds,
            settings.keep_checkpoints) == (60, 3, 30, 3)


def test_the_server_s_checkpoint_limit_is_the_one_a_job_may_ask_for():
    """What the server stores on a job from KEEP_CHECKPOINTS is always a value a client may send back."""
    assert Settings.from_env({"KEEP_CHECKPOINTS": str(KEEP_CHECKPOINTS_MAX)}).keep_checkpoints == KEEP_CHECKPOINTS_MAX
    Hyperparameters(keep_checkpoints=KEEP_CHECKPOINTS_MAX)
    with pytest.raises(ValueError):
        Hyperparameters(keep_checkpoints=KEEP_CHECKPOINTS_MAX + 1)
