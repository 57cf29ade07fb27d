"""koclip: Korean CLIP in JAX/Flax.

    model, processor = koclip.load("koclip-base")
    batch = processor(text=["이것은 고양이 이다"], images=[image])
    zimg = model.encode_image(batch["pixel_values"])
    ztxt = model.encode_text(batch["input_ids"], batch["attention_mask"])
"""

from koclip.config import ModelConfig, TextConfig, VisionConfig
from koclip.embedder import Embedder, load_embedder
from koclip.errors import CheckpointError, ImageError, KoclipError, OfflineError, UnknownModelError
from koclip.formats import checkpoints
from koclip.loading import from_towers, load
from koclip.model import KoCLIP
from koclip.processing import DEFAULT_TEMPLATE, Processor, apply_template
from koclip.quantize import precision_of
from koclip.registry import available_models


def save(model: KoCLIP, directory, processor: Processor | None = None):
    """Writes `model` in koclip's own format (config.json + model.safetensors),
    with the processor's tokenizer files when `processor` is given.  A quantised
    model is refused: koclip checkpoints hold float32 weights."""
    precision = precision_of(model)
    if precision != "fp32":
        raise CheckpointError(f"refusing to save a {precision} model: koclip checkpoints hold fp32 weights; "
                              "save the model before quantising it (load with precision='fp32')")
    return checkpoints.save(model, directory, tokenizer=processor.tokenizer if processor is not None else None)


__all__ = [
    "KoCLIP", "Embedder", "load_embedder", "ModelConfig", "TextConfig", "VisionConfig", "Processor", "load", "from_towers", "save",
    "available_models", "apply_template", "DEFAULT_TEMPLATE", "KoclipError", "CheckpointError",
    "ImageError", "OfflineError", "UnknownModelError",
]
