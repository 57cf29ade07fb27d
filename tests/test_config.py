"""Model configs refuse values they cannot build, with a ConfigError naming the value and the
valid ones (read from a checkpoint, the same values are CheckpointErrors: tests/test_formats.py)."""

import pytest

from koclip.config import ModelConfig, TextConfig, VisionConfig
from koclip.errors import ConfigError, KoclipError


def test_unknown_text_kind_is_a_config_error_naming_the_valid_kinds():
    with pytest.raises(ConfigError, match=r"unknown text tower kind 'nope'; valid: bert, roberta"):
        TextConfig(kind="nope")


def test_unknown_efficientnet_variant_is_refused_when_the_config_is_made():
    # Was accepted, and failed only when the model was built (or output_dim was read).
    with pytest.raises(ConfigError, match=r"'b0'; valid: lite0, tiny"):
        VisionConfig(kind="efficientnet", patch_size=1, variant="b0")


def test_unsupported_model_type_in_a_config_dict_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model_type 'clip' is not a dual encoder; valid: hybrid-clip"):
        ModelConfig.from_hf({"model_type": "clip"})


def test_training_config_errors_are_the_library_config_error():
    from koclip.train.config import ConfigError as TrainConfigError

    assert TrainConfigError is ConfigError and issubclass(ConfigError, KoclipError)
