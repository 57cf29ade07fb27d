"""Fitting koclip-mini's heads: both towers locked (multilingual-e5-small, EfficientNet-Lite0),
their pooled features cached once, and only the two projection heads and the temperature trained.

LiT-style: with both towers precomputed a step is two small matmuls, so large
batches (more negatives) are cheap.  The heads start afresh (`reinit_heads`:
the ConSE heads' matrices drawn anew, their means, temperature and blend as a
newly built head holds them, the initial logit scale); set reinit_heads=false
to fine-tune the published ones instead.  Give the caption data with
`--set train_data=...` (JSONL or KoCLIP JSON).
"""

from configs import default


def get_config():
    return default.get_config().replace(
        model="koclip-mini",
        reinit_heads=True,
        features="both",
        batch_size_per_device=256,
        learning_rate=1e-3,
        warmup_steps=100,
        schedule="cosine",
        weight_decay=0.05,
        num_epochs=10,
        val_size=1000,
        checkpoint_every_steps=500,
        log_every_steps=50,
        eval_batch_size=256,
    )
