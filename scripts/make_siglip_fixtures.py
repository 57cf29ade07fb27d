"""Write tests/fixtures/parity/siglip_*: tiny SigLIP checkpoints with transformers' reference outputs.

Runs in the reference environment of scripts/make_parity_fixtures.py (transformers' PyTorch models),
which also needs sentencepiece (and protobuf) for SigLIP's tokenizer:

    /work/refenv/bin/pip install sentencepiece==0.2.3
    /work/refenv/bin/python scripts/make_siglip_fixtures.py

Two tiny `SiglipModel`s (transformers 5.24), their weights the reference's initialisation plus seeded
noise (make_parity_fixtures.perturb_torch), saved with save_pretrained (config.json + model.safetensors),
each with the processor files of the checkpoint family it stands for:

  siglip_spiece/   SigLIP v1, google/siglip-base-patch16-256-multilingual's layout: a sentencepiece
                   spiece.model (a unigram model trained here on a small Korean + English text) read by
                   transformers' SiglipTokenizer, whose tokenizer_config.json lists model_input_names
                   ["input_ids"] as the published checkpoints' do; text hidden = projection size.
  siglip2_gemma/   SigLIP 2 fixed-resolution, google/siglip2-base-patch16-224's layout: a Gemma-style BPE
                   tokenizer.json (byte fallback, trained here) saved by transformers' GemmaTokenizer with
                   the settings of transformers' convert_siglip2_to_hf.py (no <bos>, <eos> appended, padding
                   on the right, model_input_names ["input_ids"]); a text head narrower than the text
                   tower; config.json stripped of the keys that equal transformers' defaults, as SigLIP 2's
                   published config.json is (the golden outputs come from the model reloaded from it).

Both hold preprocessor_config.json of SiglipImageProcessorPil (bicubic resize to image_size, mean = std
= 0.5), the backend transformers picks without torchvision.  Each `golden.npz` holds what the reference
processor (AutoProcessor of the directory) makes of TEXTS and IMAGES (koclip's gallery photos):
`texts`, `images` (file names), `input_ids` (n_texts, 64) int32, padding="max_length", max_length=64,
truncation=True (SigLIP 2's texts lowercased first, as its docs say; checked against transformers'
Siglip2Tokenizer, which lowercases itself); `pixel_values` (n_images, S, S, 3) NHWC float32; and the
model's outputs for them: `text_embeds`, `image_embeds` (L2-normalised), `logits_per_image`.  The
processors return no attention mask, so the model saw every padding token.  For the masked path,
`masked_attention_mask` (the tokenizer's mask, 0 on padding) and `masked_text_embeds` (the model given
it).
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
from make_parity_fixtures import OUT, ROOT, fresh_dir, l2n, nchw, perturb_torch, save_golden

TEXTS = [
    "이것은 고양이 사진이다",
    "A Photo of a CAT!!",  # upper case and punctuation: SigLIP lowercases; v1 also drops punctuation
    "  빨간   자동차,  도로 위를 달린다... ",  # runs of spaces
    "바다 위의 배 한 척, 猫 ☃",  # characters the tiny vocabularies lack: <unk>, or Gemma's byte fallback
    "ＡＢＣ 사진 ①",  # full-width letters and a circled digit (sentencepiece's NFKC folds them)
    "the red car drives on the road.",
    "",
    "강아지가 공원에서 뛰어논다 " * 12,  # longer than 64 tokens: truncated, the eos kept
]
IMAGES = ["cat_chelsea.jpg", "grace_hopper.jpg", "space_shuttle.jpg"]
GALLERY = ROOT / "koclip" / "data" / "gallery"  # (not koclip.data.gallery_dir: koclip imports jax)
MAX_LENGTH = 64
# The text the tiny tokenizers are trained on.
CORPUS = """이것은 고양이 사진이다. 강아지가 공원에서 뛰어논다.
빨간 자동차가 도로 위를 달린다. 바다 위의 배 한 척이 떠 있다.
a photo of a cat. a dog runs in the park! the red car drives on the road.
한국어와 영어 문장을 섞은 작은 말뭉치입니다. 산과 강, 하늘과 구름, 나무와 꽃.
this is a small corpus mixing korean and english sentences, with numbers 1 2 3.
사람들이 시장에서 과일을 산다. 아이가 책을 읽고 있다. 눈 덮인 숲 속의 오두막.
a woman rides a bicycle down the street. two puppies sleep on a sofa.
우주 왕복선이 발사대에서 하늘로 날아오른다. 커피 한 잔과 책 한 권.
an astronaut floats in space above the earth. a cup of coffee on a wooden table.""".split("\n")


def spiece_model(rules_path) -> bytes:
    """A unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2), as SigLIP's.

    SigLIP's own models normalise with sentencepiece's nmt_nfkc rules, whose table alone is ~240 KB;
    this one folds only what TEXTS needs (full-width Latin letters, the circled 1, the ideographic
    space), so the committed file stays ~3 KB.  Normalising is sentencepiece's work on both sides.
    """
    import sentencepiece as spm

    folds = ([(0xFF21 + i, 0x41 + i) for i in range(26)] + [(0xFF41 + i, 0x61 + i) for i in range(26)]
             + [(0x2460, 0x31), (0x3000, 0x20)])
    rules_path.write_text("".join(f"{a:04X}\t{b:04X}\n" for a, b in folds))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=buf, vocab_size=300, hard_vocab_limit=False,
        model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", normalization_rule_tsv=str(rules_path),
        minloglevel=2)
    return buf.getvalue()


def gemma_tokenizer():
    """A Gemma-style BPE tokenizer (byte fallback; Gemma's special ids <pad> 0, <eos> 1, <bos> 2, <unk> 3,
    <mask> 4, then the 256 byte tokens) set up as convert_siglip2_to_hf.py sets up SigLIP 2's."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.train_from_iterator([t.lower() for t in CORPUS], trainers.BpeTrainer(
        vocab_size=480, special_tokens=specials, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return GemmaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=False, add_eos_token=True,
                          padding_side="right", model_input_names=["input_ids"], model_max_length=MAX_LENGTH)


def tiny_config(text: dict, vision: dict):
    from transformers import SiglipConfig

    common = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, attention_dropout=0.0)
    return SiglipConfig(text_config={**common, "max_position_embeddings": MAX_LENGTH, **text},
                        vision_config={**common, **vision})


def strip_defaults(d) -> None:
    """Drops from config.json the keys equal to transformers' defaults (SigLIP 2's published configs name
    little more than vocab_size and image_size)."""
    from transformers import SiglipTextConfig, SiglipVisionConfig

    path = d / "config.json"
    raw = json.loads(path.read_text())
    for key, cls in (("text_config", SiglipTextConfig), ("vision_config", SiglipVisionConfig)):
        default = cls().to_dict()
        raw[key] = {k: v for k, v in raw[key].items()
                    if k == "model_type" or k not in default or default[k] != v}
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def make(name: str, config, tokenizer, seed: int, *, lowercase_first: bool, strip: bool = False) -> None:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    d = fresh_dir(name)
    torch.manual_seed(seed)
    model = perturb_torch(SiglipModel(config), seed)
    with torch.no_grad():  # moderate values: sigmoid(exp(t) * cos + b) away from 0 and 1
        model.logit_scale.fill_(math.log(8.0))
        model.logit_bias.fill_(-2.5)
    model.save_pretrained(d)
    size = config.vision_config.image_size
    image_processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(d)
    if strip:
        strip_defaults(d)
        model = SiglipModel.from_pretrained(d).eval()  # what the stripped config.json builds

    processor = AutoProcessor.from_pretrained(d)
    assert type(processor.image_processor).__name__ == "SiglipImageProcessorPil", type(processor.image_processor)
    texts = [t.lower() for t in TEXTS] if lowercase_first else list(TEXTS)
    images = [Image.open(GALLERY / f).convert("RGB") for f in IMAGES]
    batch = processor(text=texts, images=images, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                      return_tensors="pt")
    assert sorted(batch) == ["input_ids", "pixel_values"], sorted(batch)  # no attention mask, as published
    ids = batch["input_ids"]
    assert ids.shape == (len(TEXTS), MAX_LENGTH), ids.shape
    if lowercase_first:  # transformers' Siglip2Tokenizer lowercases itself: same ids from the raw texts
        from transformers import Siglip2Tokenizer

        again = Siglip2Tokenizer.from_pretrained(d)(TEXTS, padding="max_length", max_length=MAX_LENGTH,
                                                   truncation=True)["input_ids"]
        assert again == ids.tolist(), "Siglip2Tokenizer disagrees with lowercase + GemmaTokenizer"
    masked = processor.tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                 return_attention_mask=True, return_tensors="pt")["attention_mask"]
    assert masked.min() == 0 and masked.max() == 1
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=batch["pixel_values"])
        masked_text = model.get_text_features(input_ids=ids, attention_mask=masked).pooler_output
    save_golden(
        d, texts=np.array(TEXTS), images=np.array(IMAGES), input_ids=ids.numpy().astype(np.int32),
        pixel_values=batch["pixel_values"].numpy().transpose(0, 2, 3, 1).astype(np.float32),
        text_embeds=out.text_embeds.numpy(), image_embeds=out.image_embeds.numpy(),
        logits_per_image=out.logits_per_image.numpy(),
        masked_attention_mask=masked.numpy().astype(np.int32), masked_text_embeds=l2n(masked_text.numpy()))
    # A single forward pass over NHWC pixels checks the transpose above.
    with torch.no_grad():
        again = model.get_image_features(pixel_values=nchw(batch["pixel_values"].numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(l2n(again.pooler_output.numpy()), out.image_embeds.numpy(), atol=1e-6)


def main():
    import torch
    from transformers import SiglipTokenizer

    torch.set_num_threads(1)
    spiece, rules = OUT / ".spiece.model", OUT / ".spiece_rules.tsv"
    try:
        spiece.write_bytes(spiece_model(rules))
        v1_tok = SiglipTokenizer(str(spiece), model_input_names=["input_ids"], model_max_length=MAX_LENGTH)
        assert v1_tok.vocab_size <= 192, v1_tok.vocab_size
        make("siglip_spiece", tiny_config(dict(vocab_size=192, hidden_size=16),
                                          dict(image_size=32, patch_size=8, hidden_size=16)),
             v1_tok, 21, lowercase_first=False)
    finally:
        spiece.unlink(missing_ok=True)
        rules.unlink(missing_ok=True)
    v2_tok = gemma_tokenizer()
    assert len(v2_tok) <= 480, len(v2_tok)
    make("siglip2_gemma", tiny_config(dict(vocab_size=480, hidden_size=24, projection_size=16),
                                      dict(image_size=24, patch_size=8, hidden_size=16)),
         v2_tok, 22, lowercase_first=True, strip=True)

    total = 0
    for d in ("siglip_spiece", "siglip2_gemma"):
        for f in sorted((OUT / d).iterdir()):
            total += f.stat().st_size
            print(f"{f.stat().st_size:>9}  {d}/{f.name}")
    print(f"{total:>9}  total bytes")


if __name__ == "__main__":
    main()
