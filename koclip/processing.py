"""Turning text and images into model inputs.

Token lengths are padded to a few fixed buckets: every new input shape costs
a JIT compile, so a session with labels of any length compiles a handful of
times, not once per length.  Models trained on fixed-length text (SigLIP) get
every text padded to exactly their max_length instead (`text_padding`).
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Sequence

import numpy as np

from koclip.buckets import LENGTH_BUCKETS, bucket
from koclip.errors import CheckpointError, KoclipError
from koclip.images import PRESETS, open_image, preprocess

DEFAULT_TEMPLATE = "이것은 {} 이다"
# Templates for prompt ensembling: averaged label embeddings are more robust than any single one.
KOREAN_TEMPLATES = (
    "이것은 {} 이다",
    "{}의 사진",
    "{} 사진",
    "{}이(가) 있는 사진",
    "{}의 이미지",
    "이것은 {}의 사진이다",
)
ENGLISH_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "this is a {}.")


def apply_template(labels: Sequence[str], template: str | None = DEFAULT_TEMPLATE) -> list[str]:
    """Puts each label into `template` ('{}' marks the label); None or '' leaves labels as they are."""
    if not template:
        return list(labels)
    if "{}" not in template:
        raise KoclipError(f"prompt template {template!r} has no '{{}}' where the label goes")
    return [template.replace("{}", label) for label in labels]


def clean_labels(labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """Strips labels and drops blanks and duplicates (keeping the first).

    Returns (kept, dropped) so a caller can tell the user what was dropped.
    """
    kept, dropped, seen = [], [], set()
    for raw in labels:
        label = " ".join(str(raw).split())
        if not label or label in seen:
            dropped.append(raw)
            continue
        seen.add(label)
        kept.append(label)
    return kept, dropped


class Processor:
    """Prepares model inputs.

    `processor(text=[...], images=[...])` returns a dict with `input_ids` and
    `attention_mask` (n_texts, L) int32, L a length bucket (padding "bucket") or
    max_length (padding "max_length"), and `pixel_values` (n_images, size, size, 3)
    float32, NHWC.  `mask_padding` False gives an all-ones attention mask (the model
    sees its padding tokens, as SigLIP's did); `lowercase` lowercases texts first.
    """

    def __init__(self, tokenizer, image_spec, *, max_length: int = 96, text_prefix: str = "",
                 padding: str = "bucket", mask_padding: bool = True, lowercase: bool = False):
        if padding not in ("bucket", "max_length"):
            raise KoclipError(f"unknown text padding {padding!r}; valid: bucket, max_length")
        self.tokenizer = tokenizer
        self.image_spec = image_spec
        self.max_length = max_length
        self.text_prefix = text_prefix
        self.padding = padding
        self.mask_padding = mask_padding
        self.lowercase = lowercase

    @classmethod
    def for_config(cls, config, tokenizer) -> Processor:
        """The processor a model of `config` (a ModelConfig) needs: its image preprocessing
        (image_spec_for), its text length, prefix, padding and casing, around `tokenizer`."""
        return cls(tokenizer, image_spec_for(config), max_length=config.max_length, text_prefix=config.text_prefix,
                   padding=config.text_padding, mask_padding=config.text_mask_padding,
                   lowercase=config.text_lowercase)

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        # NFC first: decomposed Hangul (as macOS writes it) would otherwise tokenize as jamo.
        texts = [self.text_prefix + unicodedata.normalize("NFC", t) for t in texts]
        if self.lowercase:
            texts = [t.lower() for t in texts]
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)
        longest = max((len(ids) for ids in enc["input_ids"]), default=1)
        if self.padding == "max_length":
            length = max(self.max_length, longest)
        else:
            length = min(bucket(longest, LENGTH_BUCKETS), max(self.max_length, longest))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = np.full((len(texts), length), pad, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for i, row in enumerate(enc["input_ids"]):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        if not self.mask_padding:
            mask[:] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def preprocess_images(self, images) -> np.ndarray:
        if not isinstance(images, (list, tuple)):
            images = [images]
        return preprocess([open_image(im) for im in images], self.image_spec)

    def __call__(self, text=None, images=None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if text is not None:
            out.update(self.tokenize(text))
        if images is not None:
            out["pixel_values"] = self.preprocess_images(images)
        return out


def image_spec_for(config):
    """The preprocessing preset named by a ModelConfig, sized to its image tower."""
    try:
        spec = PRESETS[config.preprocess]
    except KeyError:
        raise CheckpointError(f"unknown preprocessing {config.preprocess!r}; "
                              f"valid: {', '.join(PRESETS)}") from None
    if spec.size != config.vision.image_size:
        spec = dataclasses.replace(spec, size=config.vision.image_size)
    return spec
