"""Contrastive training of koclip models (kept apart from the library: koclip never imports this).

    from koclip.train import load_config, train_and_evaluate
    summary = train_and_evaluate(load_config("configs/tiny.py"), "runs/tiny")

or from a shell: `koclip train --config configs/tiny.py --workdir runs/tiny`
(`python -m koclip.train` takes the same flags).
"""

from koclip.train.config import TrainConfig, load_config
from koclip.train.losses import clip_loss, siglip_loss
from koclip.train.train import DivergedError, train_and_evaluate

__all__ = ["TrainConfig", "load_config", "clip_loss", "siglip_loss", "train_and_evaluate", "DivergedError"]
