"""Contrastive training of koclip models (kept apart from the library: koclip never imports this).

    from koclip.train import load_config, train_and_evaluate
    summary = train_and_evaluate(load_config("configs/tiny.py"), "runs/tiny")

or from a shell: `koclip train --config configs/tiny.py --workdir runs/tiny`
(`python -m koclip.train` takes the same flags).
"""

import importlib

_EXPORTS = {
    "TrainConfig": "koclip.train.config", "load_config": "koclip.train.config",
    "clip_loss": "koclip.train.losses", "siglip_loss": "koclip.train.losses",
    "train_and_evaluate": "koclip.train.train", "DivergedError": "koclip.train.train",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    # Lazy: `koclip --help` imports koclip.train.cli and should not pay for jax and optax.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'koclip.train' has no attribute {name!r}")
