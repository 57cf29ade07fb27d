"""Generated training data for smoke runs: coloured shapes with Korean captions.

`make(folder, n)` draws n small PNGs (a red circle, a blue square, ...), writes
`train.jsonl` / `val.jsonl` beside them, and a character-level tokenizer
covering every caption, so a run needs nothing downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing

from koclip.files import atomic_write_text

COLOURS = {"빨간": (220, 40, 40), "파란": (40, 70, 220), "초록": (40, 170, 70), "노란": (230, 200, 30)}
SHAPES = ("원", "네모", "세모")


def captions(colour: str, shape: str) -> list[str]:
    return [f"{colour} {shape}", f"{colour}색 {shape} 그림", f"{shape} 하나, {colour}색"]


def _draw(colour, shape: str, size: int, rng: np.random.Generator):
    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
    d = ImageDraw.Draw(im)
    r = int(rng.integers(size // 4, size // 2 - 1))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "원":
        d.ellipse(box, fill=colour)
    elif shape == "네모":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return im


def char_tokenizer(texts):
    """A character-level `PreTrainedTokenizerFast` over the characters of `texts` (<s>=0, <pad>=1, </s>=2)."""
    # Deferred: transformers takes most of a second to import (koclip.tokenizer); only this tokenizer needs it.
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(set("".join(texts))):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def _write_lines(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def make(folder, n: int, *, seed: int = 0, size: int = 32, val_fraction: float = 0.25) -> dict[str, Path]:
    """Writes n examples under `folder` (reusing them if already there).

    Returns {"train": jsonl path, "val": jsonl path, "tokenizer": folder with tokenizer.json}.
    """
    folder = Path(folder)
    out = {"train": folder / "train.jsonl", "val": folder / "val.jsonl", "tokenizer": folder / "tokenizer"}
    if all(p.exists() for p in out.values()):
        return out
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [(c, s) for c in COLOURS for s in SHAPES]
    rows = []
    for i in range(n):
        colour, shape = names[i % len(names)]
        path = folder / "images" / f"{i:05d}.png"
        _draw(COLOURS[colour], shape, size, rng).save(path)
        rows.append({"image": f"images/{path.name}", "captions": captions(colour, shape)})
    n_val = max(1, int(n * val_fraction))
    char_tokenizer([c for r in rows for c in r["captions"]]).save_pretrained(str(out["tokenizer"]))
    _write_lines(out["val"], rows[:n_val])
    _write_lines(out["train"], rows[n_val:])
    return out
