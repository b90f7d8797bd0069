"""Config files load through config_flags; overrides work and misspellings fail by name."""

import pytest
from absl import flags
from ml_collections import config_flags

from tests.conftest import REPO


def _parse(*overrides):
    argv = ["prog", f"--config={REPO / 'configs/smoke.py'}:runlocal", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


def test_override_any_field():
    config = _parse("--config.optim.learning_rate=0.5", "--config.data.seq_len=64")
    assert config.optim.learning_rate == 0.5 and config.data.seq_len == 64


def test_misspelt_override_fails_naming_the_key():
    with pytest.raises(Exception, match="learning_rat"):
        _parse("--config.optim.learning_rat=0.5")


def test_config_is_locked_against_new_fields():
    config = _parse()
    with pytest.raises(AttributeError, match="typo_field"):
        config.train.typo_field = 1


def test_unknown_config_argument_is_named():
    from itune import configlib

    with pytest.raises(ValueError, match="'runlcal'"):
        configlib.parse_arg("runlcal", runlocal=False)
