"""Write tests/fixtures/parity: tiny checkpoints in every format koclip reads, with reference outputs.

The references are transformers' own models.  The Flax ones (for KoCLIP's original `hybrid-clip`
format) exist only up to transformers 4.57.6, so this runs in its own virtual environment, apart
from the project's:

    python3.11 -m venv /work/refenv
    /work/refenv/bin/pip install transformers==4.57.6 torch==2.13.0 jax==0.10.2 jaxlib==0.10.2 \
        flax==0.12.8 numpy safetensors
    /work/refenv/bin/python scripts/make_parity_fixtures.py

(The tiny tokenizer is built by tests/tiny_tokenizer.py, as the tests build it.)  It replaces only the
directories below, so the SigLIP and CLIP fixtures that scripts/make_siglip_fixtures.py and
make_clip_fixtures.py write beside them (with this module's helpers) are left as they are.  Every weight is the
reference's initialisation plus seeded noise, so LayerNorm scales are not all ones and biases not all
zeros: a tensor loaded into the wrong place changes the outputs.  Writes, under tests/fixtures/parity/:

  hybrid_clip_clip/, hybrid_clip_vit/   KoCLIP's Flax layout: config.json (model_type hybrid-clip) +
                                        flax_model.msgpack, from FlaxVisionTextDualEncoderModel, whose
                                        parameter tree and feature functions are hybrid-clip's
  dual_clip_safetensors/, dual_vit_safetensors/, dual_clip_bin/
                                        PyTorch VisionTextDualEncoderModel, save_pretrained as
                                        model.safetensors or pytorch_model.bin
  towers/{roberta,bert,clip_vision,clip,vit,vit_classifier}/
                                        RobertaModel, BertModel (pytorch_model.bin), CLIPVisionModel,
                                        CLIPModel, ViTModel, ViTForImageClassification

Every directory with a text part holds the tiny tokenizer (tokenizer.json + tokenizer_config.json).
Each `golden.npz` holds the inputs (`pixel_values` NHWC float32; `input_ids`, `attention_mask` int32,
from the tokenizer with padding to the longest caption; `texts`) and the reference outputs:
dual encoders `text_embeds`, `image_embeds` (get_*_features, L2-normalised); towers
`last_hidden_state` and `pooler_output` (none for ViTForImageClassification, which has no pooler).

Note: the Flax dual encoder's (and hybrid-clip's) get_text_features numbers positions 0..L-1 when
given no position_ids, even for RoBERTa; KoCLIP was trained and run that way, so the golden
embeddings of hybrid_clip_* are made the same way.  PyTorch's RobertaModel numbers positions from
padding_idx + 1 over non-padding tokens.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "parity"
CAPTIONS = [
    "이것은 고양이 이다",
    "빨간 자동차가 도로 위를 달린다",
    "ＡＢＣ 사진 ①",  # NFKC folds full-width letters and the circled digit
    "바다 위의 배 한 마리, 猫!",  # 猫 is not in the vocabulary: [UNK]
]
N_IMAGES = 3

TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
VISION = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=37)
PROJECTION_DIM = 16


def _conftest():
    """tests/tiny_tokenizer.py, the tokenizer the tests build too."""
    spec = importlib.util.spec_from_file_location("tiny_tokenizer", ROOT / "tests" / "tiny_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def roberta_config():
    from transformers import RobertaConfig

    return RobertaConfig(**TEXT, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)


def bert_config():
    from transformers import BertConfig

    return BertConfig(**TEXT, max_position_embeddings=40, type_vocab_size=2, pad_token_id=0)


def clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**VISION, hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0)


def vit_config(**kw):
    from transformers import ViTConfig

    return ViTConfig(**VISION, hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, **kw)


def noise(rng: np.random.Generator, shape) -> np.ndarray:
    """Seeded perturbation: larger for vectors (norm scales, biases) than for matrices."""
    scale = 0.1 if len(shape) <= 1 else 0.05
    return rng.normal(0.0, scale, shape).astype(np.float32)


def perturb_torch(model, seed: int):
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.from_numpy(noise(rng, tuple(p.shape))))
    return model.eval()


def perturb_flax(params, seed: int):
    import jax

    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(x) + noise(rng, x.shape) for x in leaves])


def inputs(tokenizer_dir: pathlib.Path, seed: int) -> dict:
    """Token ids of CAPTIONS padded to the longest, and N_IMAGES random NHWC images."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"), pad_token="[PAD]")
    enc = tok(CAPTIONS, padding=True, return_tensors="np")
    return {
        "texts": np.array(CAPTIONS),
        "input_ids": enc["input_ids"].astype(np.int32),
        "attention_mask": enc["attention_mask"].astype(np.int32),
        "pixel_values": pixels(seed),
    }


def pixels(seed: int) -> np.ndarray:
    """N_IMAGES seeded standard-normal NHWC images, 32 x 32, float32."""
    return np.random.default_rng(seed).normal(0.0, 1.0, (N_IMAGES, 32, 32, 3)).astype(np.float32)


def l2n(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def fresh_dir(name: str) -> pathlib.Path:
    """OUT/name, emptied: the one directory a fixture writes (nothing else under OUT is touched)."""
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def save_golden(d: pathlib.Path, **arrays):
    np.savez_compressed(d / "golden.npz", **{k: np.asarray(v) for k, v in arrays.items()})


def nchw(pixels: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))


def torch_ids(batch: dict):
    import torch

    return (torch.from_numpy(batch["input_ids"].astype(np.int64)),
            torch.from_numpy(batch["attention_mask"].astype(np.int64)))


def make_hybrid_clip(name: str, vision_cfg, seed: int, ct) -> None:
    """KoCLIP's original format: a hybrid-clip config.json and the Flax params as msgpack."""
    import flax.serialization
    import transformers
    from transformers import FlaxVisionTextDualEncoderModel, VisionTextDualEncoderConfig

    d = fresh_dir(name)
    ct.write_tiny_tokenizer(d)
    batch = inputs(d, seed)
    text_cfg = roberta_config()
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(vision_cfg, text_cfg, projection_dim=PROJECTION_DIM)
    size = vision_cfg.image_size
    model = FlaxVisionTextDualEncoderModel(cfg, input_shape=((1, 4), (1, size, size, 3)), seed=seed)
    model.params = perturb_flax(model.params, seed)
    assert sorted(model.params) == ["logit_scale", "text_model", "text_projection", "vision_model",
                                    "visual_projection"], sorted(model.params)
    (d / "flax_model.msgpack").write_bytes(flax.serialization.to_bytes(model.params))
    config = {
        "architectures": ["FlaxHybridCLIP"],
        "model_type": "hybrid-clip",
        "projection_dim": PROJECTION_DIM,
        "initializer_factor": 1.0,
        "text_config": text_cfg.to_dict(),
        "vision_config": vision_cfg.to_dict(),
        "transformers_version": transformers.__version__,
    }
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # Both feature functions as hybrid-clip ran them: NHWC pixels, positions 0..L-1.
    text = model.get_text_features(batch["input_ids"], batch["attention_mask"])
    image = model.get_image_features(batch["pixel_values"])
    save_golden(d, **batch, text_embeds=l2n(text), image_embeds=l2n(image))


def make_dual_encoder(name: str, vision_cfg, seed: int, ct, safe: bool = True) -> None:
    """transformers' PyTorch VisionTextDualEncoderModel, saved with save_pretrained."""
    import torch
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    d = fresh_dir(name)
    batch = inputs(ct.write_tiny_tokenizer(d), seed)
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(vision_cfg, roberta_config(),
                                                               projection_dim=PROJECTION_DIM)
    torch.manual_seed(seed)
    model = perturb_torch(VisionTextDualEncoderModel(cfg), seed)
    model.save_pretrained(d, safe_serialization=safe)
    ids, mask = torch_ids(batch)
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids, attention_mask=mask)
        image = model.get_image_features(pixel_values=nchw(batch["pixel_values"]))
    save_golden(d, **batch, text_embeds=l2n(text.numpy()), image_embeds=l2n(image.numpy()))


def make_text_tower(name: str, cls, cfg, layout: str, seed: int, ct, safe: bool = True) -> None:
    import torch

    d = fresh_dir(f"towers/{name}")
    batch = inputs(ct.write_tiny_tokenizer(d, layout=layout), seed)
    torch.manual_seed(seed)
    model = perturb_torch(cls(cfg), seed)
    model.save_pretrained(d, safe_serialization=safe)
    ids, mask = torch_ids(batch)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    del batch["pixel_values"]
    save_golden(d, **batch, last_hidden_state=out.last_hidden_state.numpy(), pooler_output=out.pooler_output.numpy())


def make_vision_tower(name: str, model, seed: int, hidden_of=None) -> None:
    """`hidden_of(model, pixels_nchw)` -> (last_hidden_state, pooler_output or None)."""
    import torch

    d = fresh_dir(f"towers/{name}")
    model = perturb_torch(model, seed)
    model.save_pretrained(d)
    px = pixels(seed)
    with torch.no_grad():
        hidden, pooled = hidden_of(model, nchw(px))
    extra = {} if pooled is None else {"pooler_output": pooled.numpy()}
    save_golden(d, pixel_values=px, last_hidden_state=hidden.numpy(), **extra)


def report(name: str) -> None:
    """Prints the size of every file under OUT/name, then their total."""
    files = sorted(f for f in (OUT / name).rglob("*") if f.is_file())
    for f in files:
        print(f"{f.stat().st_size:>9}  {f.relative_to(OUT)}")
    print(f"{sum(f.stat().st_size for f in files):>9}  {name} total bytes")


def main():
    import torch
    from transformers import (
        BertModel,
        CLIPConfig,
        CLIPModel,
        CLIPVisionModel,
        RobertaModel,
        ViTForImageClassification,
        ViTModel,
    )

    torch.set_num_threads(1)
    ct = _conftest()
    make_hybrid_clip("hybrid_clip_clip", clip_vision_config(), 1, ct)
    make_hybrid_clip("hybrid_clip_vit", vit_config(), 2, ct)
    make_dual_encoder("dual_clip_safetensors", clip_vision_config(), 3, ct)
    make_dual_encoder("dual_vit_safetensors", vit_config(), 4, ct)
    make_dual_encoder("dual_clip_bin", clip_vision_config(), 5, ct, safe=False)
    make_text_tower("roberta", RobertaModel, roberta_config(), "klue", 6, ct)
    make_text_tower("bert", BertModel, bert_config(), "bert", 7, ct, safe=False)

    def vision_out(m, px):
        out = m(pixel_values=px)
        return out.last_hidden_state, out.pooler_output

    torch.manual_seed(8)
    make_vision_tower("clip_vision", CLIPVisionModel(clip_vision_config()), 8, vision_out)
    torch.manual_seed(9)
    clip_cfg = CLIPConfig(text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=37, max_position_embeddings=16),
                          vision_config=clip_vision_config().to_dict(), projection_dim=PROJECTION_DIM)
    make_vision_tower("clip", CLIPModel(clip_cfg), 9, lambda m, px: vision_out(m.vision_model, px))
    torch.manual_seed(10)
    make_vision_tower("vit", ViTModel(vit_config()), 10, vision_out)
    torch.manual_seed(11)
    make_vision_tower("vit_classifier", ViTForImageClassification(vit_config(num_labels=3)), 11,
                      lambda m, px: (m.vit(pixel_values=px).last_hidden_state, None))

    for name in ("hybrid_clip_clip", "hybrid_clip_vit", "dual_clip_safetensors", "dual_vit_safetensors",
                 "dual_clip_bin", "towers"):
        report(name)


if __name__ == "__main__":
    main()
