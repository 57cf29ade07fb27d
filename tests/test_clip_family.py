"""OpenAI CLIP (a CLIPModel, with its text tower) and M-CLIP, alone and composed with
`koclip.load(text=..., vision=...)`, against transformers 5.24's PyTorch models.

The fixtures tests/fixtures/parity/{clip,clip_legacy,clip_flax,mclip} and their golden.npz were written
by scripts/make_clip_fixtures.py: `clip` pools at the first end-of-text token, `clip_legacy` (eos_token_id
2, as openai/clip-vit-base-patch32's config says) at the highest token id; `clip_flax` is FlaxCLIPModel's
msgpack (transformers 4.57); `mclip` is M-CLIP's published layout, and its golden logits pair it with
`clip`'s image tower.  Embeddings are L2-normalised (entries at
most 1) and logits at most exp(logit_scale) ~ 15, so float32 parity is far inside 1e-4.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import koclip
from koclip.config import TextConfig
from koclip.errors import CheckpointError, ConfigError
from koclip.formats import safetensors_io
from koclip.formats.convert import flat_params
from koclip.formats.torch_zip import read_torch_state_dict
from parity_helpers import PARITY, TOL, golden, loaded, max_diff

CLIPS = ["clip", "clip_legacy"]


@functools.cache
def mclip_with_clip():
    return koclip.load(text=str(PARITY / "mclip"), vision=str(PARITY / "clip"))


def rows(input_ids, attention_mask) -> list[list[int]]:
    """Each row's tokens, padding dropped."""
    return [[int(t) for t, m in zip(r, mr) if m] for r, mr in zip(input_ids, attention_mask)]


def texts(name: str) -> list[str]:
    return [str(t) for t in golden(name)["texts"]]


def same_params(a, b) -> None:
    pa, pb = flat_params(a), flat_params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]), err_msg=k)


# ---------------------------------------------------------------- CLIPModel

@pytest.mark.parametrize("name", CLIPS)
def test_clip_text_and_image_embeddings_match_reference(name):
    model, _ = loaded(name)
    g = golden(name)
    assert max_diff(model.encode_text(g["input_ids"], g["attention_mask"]), g["text_embeds"]) <= TOL
    assert max_diff(model.encode_image(g["pixel_values"]), g["image_embeds"]) <= TOL


@pytest.mark.parametrize("name", CLIPS)
def test_clip_logits_use_the_checkpoints_logit_scale(name):
    model, _ = loaded(name)
    g = golden(name)
    assert abs(float(model.logit_scale[...]) - float(g["logit_scale"])) <= 1e-6
    assert max_diff(model(g["input_ids"], g["attention_mask"], g["pixel_values"]), g["logits_per_image"]) <= TOL


@pytest.mark.parametrize("name", CLIPS)
def test_clip_text_tower_pools_where_transformers_does(name):
    # The probe rows hold the end-of-text id, id 2 and the highest id at three places: pooling at the
    # first eos (clip), at the argmax (clip_legacy) or anywhere else gives three different answers.
    model, _ = loaded(name)
    g = golden(name)
    _, pooled = model.text_model(g["probe_ids"], g["probe_mask"])
    assert max_diff(pooled, g["probe_pooled"]) <= TOL


def test_clip_flax_checkpoint_matches_transformers_flax_clip():
    # openai/clip-vit-base-patch32 ships flax_model.msgpack, which koclip prefers to pytorch_model.bin.
    model, processor = loaded("clip_flax")
    g = golden("clip_flax")
    batch = processor(text=texts("clip_flax"))
    assert max_diff(model.encode_text(batch["input_ids"], batch["attention_mask"]), g["text_embeds"]) <= TOL
    assert max_diff(model.encode_image(g["pixel_values"]), g["image_embeds"]) <= TOL
    assert max_diff(model.text_features(g["probe_ids"], g["probe_mask"]), g["probe_text_features"]) <= TOL
    assert abs(float(model.logit_scale[...]) - float(g["logit_scale"])) <= 1e-6


def test_the_legacy_eos_id_is_kept_and_the_new_one_read_from_the_config():
    assert loaded("clip_legacy")[0].config.text.eos_token_id == 2
    tokenizer = loaded("clip")[1].tokenizer
    assert loaded("clip")[0].config.text.eos_token_id == tokenizer.eos_token_id == 527


@pytest.mark.parametrize("name", CLIPS)
def test_clip_processor_ids_match_the_reference_tokenizer(name):
    # Lower-casing, whitespace runs, contractions, bytes of non-ASCII text, truncation at 77 tokens.
    _, processor = loaded(name)
    g = golden(name)
    batch = processor(text=texts(name))
    assert batch["input_ids"].shape[1] == 77 and g["attention_mask"].sum(1).max() == 77
    assert rows(batch["input_ids"], batch["attention_mask"]) == rows(g["input_ids"], g["attention_mask"])


def test_clip_processor_matches_transformers_clip_tokenizer():
    from transformers import AutoTokenizer

    _, processor = loaded("clip")
    hf = AutoTokenizer.from_pretrained(str(PARITY / "clip"))
    extra = ["Tab\tand\nnewline", "CAPS, ünïcödé & 123", "<|endoftext|> inside"]
    batch = processor(text=texts("clip") + extra)
    assert rows(batch["input_ids"], batch["attention_mask"]) == \
        hf(texts("clip") + extra, truncation=True, max_length=77)["input_ids"]


def test_clip_pads_with_its_pad_token_and_padding_does_not_change_the_embeddings():
    model, processor = loaded("clip")
    g = golden("clip")
    batch = processor(text=texts("clip")[:2])  # padded to a length bucket, with <|endoftext|>
    assert batch["input_ids"].shape[1] != g["input_ids"].shape[1]
    assert set(batch["input_ids"][batch["attention_mask"] == 0].tolist()) == {processor.tokenizer.pad_token_id}
    assert max_diff(model.encode_text(batch["input_ids"], batch["attention_mask"]), g["text_embeds"][:2]) <= TOL


def test_a_clip_config_dict_replaces_text_config_as_transformers_reads_it():
    from transformers import CLIPConfig

    d = {"model_type": "clip", "text_config": {"hidden_size": 64, "eos_token_id": 2, "num_attention_heads": 4},
         "text_config_dict": {"hidden_size": 32, "num_attention_heads": 4}}
    ours, theirs = TextConfig.from_hf(d), CLIPConfig(**d).text_config
    assert (ours.hidden_size, ours.eos_token_id) == (theirs.hidden_size, theirs.eos_token_id) == (32, 49407)


def test_clip_text_kind_has_only_eos_pooling():
    assert TextConfig(kind="clip").pooling == "eos" and TextConfig(kind="roberta").pooling == "pooler"
    with pytest.raises(ConfigError, match="unknown clip text pooling 'mean'; valid: eos"):
        TextConfig(kind="clip", pooling="mean")


def test_clip_model_round_trips_through_koclips_format(tmp_path):
    model, processor = loaded("clip_legacy")
    again, again_processor = koclip.load(str(koclip.save(model, tmp_path / "saved", processor)))
    assert again.config == model.config
    same_params(model, again)
    assert rows(**again_processor(text=texts("clip_legacy"))) == rows(**processor(text=texts("clip_legacy")))


# ---------------------------------------------------------------- M-CLIP, and M-CLIP + CLIP

def test_mclip_text_features_match_its_forward():
    # M-CLIP's forward: the attention-masked mean of XLM-R's last hidden state, then LinearTransformation.
    model, _ = mclip_with_clip()
    g = golden("mclip")
    assert g["attention_mask"].min() == 0  # the batch has padding
    assert max_diff(model.text_features(g["input_ids"], g["attention_mask"]), g["text_features"]) <= TOL
    assert max_diff(model.encode_text(g["input_ids"], g["attention_mask"]), g["text_embeds"]) <= TOL


def test_mclip_with_clips_image_tower_gives_the_reference_logits():
    model, processor = mclip_with_clip()
    g = golden("mclip")
    batch = processor(text=texts("mclip"))
    assert max_diff(model.encode_image(g["pixel_values"]), g["image_embeds"]) <= TOL
    assert max_diff(model(batch["input_ids"], batch["attention_mask"], g["pixel_values"]), g["logits_per_image"]) <= TOL


def test_mclip_processor_ids_match_xlmr_tokenizer():
    from transformers import AutoTokenizer

    _, processor = mclip_with_clip()
    g = golden("mclip")
    batch = processor(text=texts("mclip"))
    assert rows(batch["input_ids"], batch["attention_mask"]) == rows(g["input_ids"], g["attention_mask"])
    hf = AutoTokenizer.from_pretrained(str(PARITY / "mclip"))
    extra = ["Eine  Katze", "고양이와 강아지"]
    assert rows(**processor(text=extra)) == hf(extra)["input_ids"]
    assert processor.tokenizer.pad_token_id == 1  # RoBERTa's positions skip the pad id


def test_composed_processor_pairs_the_text_tokenizer_with_the_image_preset():
    model, processor = mclip_with_clip()
    _, clip_processor = loaded("clip")
    assert processor.image_spec == clip_processor.image_spec
    assert model.config.max_length == 38  # XLM-R's 40 positions, less the two RoBERTa numbering skips
    assert (model.config.tower_head("text"), model.config.tower_head("vision")) == ("affine", "linear")


def test_composed_model_records_both_sources():
    info = mclip_with_clip()[0].load_info
    assert info.text.startswith(str(PARITY / "mclip")) and info.vision.startswith(str(PARITY / "clip"))
    assert str(PARITY / "mclip") in info.name and str(PARITY / "clip") in info.name


def test_clip_text_with_clip_vision_is_the_clip_model():
    composed, _ = koclip.load(text=str(PARITY / "clip"), vision=str(PARITY / "clip"))
    same_params(composed, loaded("clip")[0])


def vision_with_projection(tmp_path) -> Path:
    """clip/'s image side saved as transformers' CLIPVisionModelWithProjection (no logit_scale)."""
    d = tmp_path / "clip_vision_projection"
    d.mkdir()
    config = json.loads((PARITY / "clip" / "config.json").read_text())
    config = {**config["vision_config"], "architectures": ["CLIPVisionModelWithProjection"],
              "projection_dim": config["projection_dim"]}
    (d / "config.json").write_text(json.dumps(config))
    items = safetensors_io.iter_tensors(PARITY / "clip" / "model.safetensors")
    safetensors_io.write(d / "model.safetensors",
                         ((n, x) for n, x in items if n.startswith(("vision_model.", "visual_projection."))))
    return d


def test_logit_scale_is_the_vision_clips_else_the_text_sides_else_the_default(tmp_path):
    vision = str(vision_with_projection(tmp_path))
    clip_scale = float(golden("clip")["logit_scale"])
    assert float(mclip_with_clip()[0].logit_scale[...]) == pytest.approx(clip_scale, abs=1e-6)
    text_clip, _ = koclip.load(text=str(PARITY / "clip"), vision=vision)
    assert float(text_clip.logit_scale[...]) == pytest.approx(clip_scale, abs=1e-6)
    neither, _ = koclip.load(text=str(PARITY / "mclip"), vision=vision)
    assert float(neither.logit_scale[...]) == pytest.approx(math.log(1 / 0.07), abs=1e-6)
    g = golden("mclip")
    assert max_diff(neither.encode_image(g["pixel_values"]), g["image_embeds"]) <= TOL


def test_mclip_alone_fails_saying_to_pass_vision():
    with pytest.raises(CheckpointError, match=r"text tower only.*koclip\.load\(text=.*mclip', "
                                              r"vision='openai/clip-vit-base-patch32'\)"):
        koclip.load(str(PARITY / "mclip"))


def test_mismatched_dimensions_fail_naming_both():
    with pytest.raises(CheckpointError, match=r"mclip \(text embeddings of 16 dimensions\) with .*clip_legacy "
                                              r"\(image embeddings of 12 dimensions\)"):
        koclip.load(text=str(PARITY / "mclip"), vision=str(PARITY / "clip_legacy"))


@pytest.mark.parametrize("text, vision, match", [
    ("towers/roberta", "clip", r"model_type 'roberta' gives no text tower with a pretrained projection.*from_towers"),
    ("clip", "mclip", r"model_type 'M-CLIP' gives no vision tower with a pretrained projection; valid for vision: "
                      r"clip, clip_vision_model"),
    ("clip", "towers/clip_vision", r"clip_vision_model checkpoint without its projection"),
])
def test_a_side_without_a_pretrained_projection_is_refused(text, vision, match):
    with pytest.raises(CheckpointError, match=match):
        koclip.load(text=str(PARITY / text), vision=str(PARITY / vision))


@pytest.mark.parametrize("kw", [dict(name="koclip-mini", text="a", vision="b"), dict(text="a"), dict(vision="b")])
def test_load_takes_a_name_or_both_sides(kw):
    with pytest.raises(TypeError, match="either a name"):
        koclip.load(kw.pop("name", None), **kw)


def mclip_copy(tmp_path) -> Path:
    d = tmp_path / "mclip"
    shutil.copytree(PARITY / "mclip", d)
    return d


def test_mclip_without_a_pooler_in_its_weights_loads_the_same(tmp_path):
    d = mclip_copy(tmp_path)
    sd = read_torch_state_dict(d / "pytorch_model.bin")
    assert any(".pooler." in n for n in sd)
    safetensors_io.write(d / "model.safetensors", ((n, x) for n, x in sd.items() if ".pooler." not in n))
    (d / "pytorch_model.bin").unlink()
    model, _ = koclip.load(text=str(d), vision=str(PARITY / "clip"))
    same_params(model, mclip_with_clip()[0])


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_mclip_base_model_may_be_a_local_path(tmp_path):
    d = mclip_copy(tmp_path)
    base = tmp_path / "elsewhere" / "base"
    shutil.move(d / "xlm-roberta-tiny", base)
    edit_config(d, modelBase=str(base))
    model, _ = koclip.load(text=str(d), vision=str(PARITY / "clip"))
    same_params(model, mclip_with_clip()[0])


def test_mclip_base_model_resolves_an_old_hub_id_under_its_current_name(tmp_path, hf_cache, monkeypatch):
    # The published config says modelBase "xlm-roberta-large": the hub now keeps it as FacebookAI/...
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    d = mclip_copy(tmp_path)
    hf_cache.put("FacebookAI/xlm-roberta-large", d / "xlm-roberta-tiny")
    shutil.rmtree(d / "xlm-roberta-tiny")
    edit_config(d, modelBase="xlm-roberta-large")
    model, _ = koclip.load(text=str(d), vision=str(PARITY / "clip"))
    same_params(model, mclip_with_clip()[0])


def test_mclip_base_width_must_be_its_transformer_dimensions(tmp_path):
    d = mclip_copy(tmp_path)
    edit_config(d, transformerDimensions=48)
    with pytest.raises(CheckpointError, match="transformerDimensions 48 differs from the hidden_size 32"):
        koclip.load(text=str(d), vision=str(PARITY / "clip"))


def test_composed_model_round_trips_through_koclips_format(tmp_path):
    model, processor = mclip_with_clip()
    again, again_processor = koclip.load(str(koclip.save(model, tmp_path / "saved", processor)))
    assert again.config == model.config
    same_params(model, again)
    assert rows(**again_processor(text=texts("mclip"))) == rows(**processor(text=texts("mclip")))


def test_registry_mclip_b32_loads_both_of_its_checkpoints_from_the_hub_cache(hf_cache, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    preset = koclip.registry.get("mclip-b32")
    hf_cache.put(preset.source, PARITY / "mclip")
    hf_cache.put(preset.vision, PARITY / "clip")
    model, processor = koclip.load("mclip-b32")
    assert model.load_info.name == "mclip-b32"
    assert preset.source in model.load_info.text and preset.vision in model.load_info.vision
    same_params(model, mclip_with_clip()[0])
    with pytest.raises(TypeError, match="two checkpoints"):
        koclip.load("mclip-b32", revision="v1")
