"""KoCLIP-large: klue/roberta-large + google/vit-large-patch16-224 (ViT preprocessing).

The koclip_base recipe with the ViT-L/16 tower, about 10x the compute of
ViT-B/32: 32 pairs per device in bfloat16, two micro-batches accumulated per
update.  Accumulation averages gradients but does not widen the contrastive
softmax: each micro-batch still sees 32 x devices negatives.
"""

from configs import koclip_base


def get_config():
    return koclip_base.get_config().replace(
        vision_tower="google/vit-large-patch16-224",
        batch_size_per_device=32,
        grad_accum_steps=2,
        compute_dtype="bfloat16",
    )
