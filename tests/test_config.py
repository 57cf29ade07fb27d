"""Model configs refuse values they cannot build, with a ConfigError naming the value and the
valid ones (read from a checkpoint, the same values are CheckpointErrors: tests/test_formats.py)."""

import pytest

from koclip.config import TINY, ModelConfig, TextConfig, VisionConfig
from koclip.errors import ConfigError, KoclipError


def test_unknown_text_kind_is_a_config_error_naming_the_valid_kinds():
    with pytest.raises(ConfigError, match=r"unknown text tower kind 'nope'; valid: bert, roberta"):
        TextConfig(kind="nope")


def test_unknown_efficientnet_variant_is_refused_when_the_config_is_made():
    # Was accepted, and failed only when the model was built (or output_dim was read).
    with pytest.raises(ConfigError, match=r"'b0'; valid: lite0, tiny"):
        VisionConfig(kind="efficientnet", patch_size=1, variant="b0")


def test_unsupported_model_type_in_a_config_dict_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model_type 'bert' is not a dual encoder; valid: hybrid-clip"):
        ModelConfig.from_hf({"model_type": "bert"})


def test_training_config_errors_are_the_library_config_error():
    from koclip.train.config import ConfigError as TrainConfigError

    assert TrainConfigError is ConfigError and issubclass(ConfigError, KoclipError)


def test_per_tower_heads_scoring_and_bias_round_trip_through_config_json():
    cfg = TINY.replace(text_head="affine", vision_head="linear", scoring="sigmoid", logit_bias_init=-10.0)
    back = ModelConfig.from_hf(cfg.to_hf())
    assert (back.tower_head("text"), back.tower_head("vision"), back.scoring, back.logit_bias_init) == \
        ("affine", "linear", "sigmoid", -10.0)


def test_a_config_without_the_new_keys_reads_as_before():
    d = TINY.to_hf()
    assert not {"text_head", "vision_head", "scoring", "logit_bias_init"} & set(d["koclip"])
    assert ModelConfig.from_hf(d).scoring == "softmax"


def test_head_none_needs_the_tower_width_to_be_the_joint_width():
    with pytest.raises(ConfigError, match="text_head 'none' needs the text tower's output width 32 to equal "
                                          "projection_dim 16"):
        TINY.replace(text_head="none")


@pytest.mark.parametrize("key, value, valid", [("scoring", "softmax2", "softmax, sigmoid"),
                                               ("vision_head", "conse", "linear, affine, none")])
def test_unknown_scoring_or_tower_head_names_the_valid_values(key, value, valid):
    with pytest.raises(ConfigError, match=f"unknown {key} '{value}'; valid: {valid}"):
        TINY.replace(**{key: value})
