"""Smoke run: the TINY architecture on generated shapes with Korean captions (seconds on a CPU)."""

from configs import default


def get_config():
    return default.get_config().replace(
        model="tiny",
        synthetic_examples=96,
        batch_size_per_device=8,
        num_epochs=3,
        learning_rate=1e-3,
        warmup_steps=3,
        schedule="cosine",
        weight_decay=0.01,
        checkpoint_every_steps=5,
        log_every_steps=3,
        eval_batch_size=16,
        num_workers=2,
    )
