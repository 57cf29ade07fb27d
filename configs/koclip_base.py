"""KoCLIP-base: klue/roberta-large + openai/clip-vit-base-patch32, fine-tuned end to end.

As the original KoCLIP run: 64 pairs per device, AdamW lr 5e-5 with linear
decay, weight decay 0.1, 40 epochs, captions of up to 96 tokens.  Point
train_data/val_data at MSCOCO's Korean captions (JSONL or KoCLIP's JSON), e.g.
`--set train_data=coco_ko/train.json --set val_data=coco_ko/val.json`.
"""

from configs import default


def get_config():
    return default.get_config().replace(
        model="towers",
        text_tower="klue/roberta-large",
        vision_tower="openai/clip-vit-base-patch32",
        projection_dim=512,
        max_length=96,
        batch_size_per_device=64,
        learning_rate=5e-5,
        schedule="linear",
        warmup_steps=0,
        weight_decay=0.1,
        num_epochs=40,
        checkpoint_every_steps=1000,
        log_every_steps=50,
        eval_every_steps=2000,
        num_workers=8,
        prefetch_batches=8,
    )
