"""The typed job specifications agree with the gpt2core objects they become."""
from typing import get_args

from gpt2core.config import PRESETS
from jobs.specs import PresetName


def test_preset_names_are_gpt2cores():
    assert get_args(PresetName) == tuple(PRESETS)
