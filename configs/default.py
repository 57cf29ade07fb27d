"""Defaults that every preset starts from (see koclip/train/config.py for what each field means)."""

from koclip.train.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig()
