"""Fashion-MNIST with Korean captions: LiT on koclip-mini.

Both towers are locked and precomputed; the heads learn to map clothing
images onto captions made from the Korean class names in several templates.
A subset keeps the run within ~20 minutes on 2 CPU cores (the image features
dominate: one EfficientNet pass per image).  scripts/fashion_mnist.py runs it
and measures zero-shot accuracy before and after.
"""

from configs import default

TEMPLATES = (
    "{} 사진",
    "{}의 사진",
    "이것은 {} 이다",
    "{} 흑백 사진",
    "옷 종류: {}",
    "작은 {} 이미지",
)


def get_config():
    return default.get_config().replace(
        model="koclip-mini",
        features="both",
        train_data="fashion-mnist",
        train_split="train",
        templates=TEMPLATES,
        max_train_examples=6000,
        val_size=500,
        batch_size_per_device=128,
        num_epochs=10,
        learning_rate=1e-3,
        warmup_steps=20,
        schedule="cosine",
        weight_decay=0.05,
        checkpoint_every_steps=100,
        log_every_steps=10,
        eval_batch_size=128,
    )
