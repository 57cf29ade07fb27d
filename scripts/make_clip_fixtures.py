"""Write tests/fixtures/parity/{clip,clip_legacy,mclip,clip_flax}: tiny OpenAI-CLIP and M-CLIP checkpoints
in their published layouts, with reference outputs from transformers' own models.

    /work/refenv/bin/python scripts/make_clip_fixtures.py          # transformers==5.24.0, torch, sentencepiece
    /tmp/flaxenv/bin/python scripts/make_clip_fixtures.py --flax   # then clip_flax/, with Flax:

    python3.11 -m venv /tmp/flaxenv
    /tmp/flaxenv/bin/pip install transformers==4.57.6 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8

(transformers' Flax models end with 4.57; openai/clip-vit-base-patch32 ships flax_model.msgpack, which koclip
prefers to its pytorch_model.bin.)  Every weight is the reference's initialisation plus seeded noise, so
LayerNorm scales are not all ones and biases not all zeros (the seeded noise, pixels, fresh directories and
the size report are scripts/make_parity_fixtures.py's).  Writes, replacing only these:

  clip/          CLIPModel, model.safetensors (save_pretrained), eos_token_id = the tokenizer's
                 <|endoftext|>: pooled at its first position
  clip_legacy/   CLIPModel as openai/clip-vit-base-patch32 ships it: pytorch_model.bin (torch.save, with
                 the position_ids buffers), eos_token_id 2, pooled at the highest token id; projection_dim
                 12, not 16, so that pairing it with M-CLIP's 16 fails
  mclip/         M-CLIP as M-CLIP/XLM-Roberta-Large-Vit-B-32 ships it: config.json (model_type M-CLIP,
                 modelBase, transformerDimensions, numDims), pytorch_model.bin with `transformer.*` (an
                 XLMRobertaModel with its pooler) and `LinearTransformation.*`, and XLM-R's tokenizer
                 (tokenizer.json, sentencepiece.bpe.model); its base model's config.json in
                 mclip/xlm-roberta-tiny/ (modelBase "xlm-roberta-tiny")
  clip_flax/     FlaxCLIPModel's params as flax_model.msgpack (eos_token_id 2), clip_legacy/'s tokenizer and
                 inputs; golden `text_embeds`, `image_embeds`, `logit_scale`, and `probe_text_features`
                 (get_text_features of the probe rows: the projection of the pooled state)

Both CLIP fixtures share one tiny byte-level BPE tokenizer (CLIPTokenizer from a 500-odd token vocab and a
few merges; the model's embedding table has 2 rows more than the tokenizer, as padded tables do).  The XLM-R
tokenizer is a SentencePiece unigram model trained here on a few sentences (identity normalisation, to
keep the file small).

golden.npz: `texts`; `input_ids`, `attention_mask` (int32) from the reference tokenizer, padded to the
longest as CLIP's examples and M-CLIP's forward do (CLIP: truncation at 77 tokens too); `pixel_values`
(NHWC float32).  CLIP: `text_embeds`, `image_embeds` (get_*_features, L2-normalised), `logits_per_image`,
`logit_scale`, and a probe of the text tower's pooling: `probe_ids`, `probe_mask` (rows holding the
end-of-text id, id 2 and the highest id at three different places) and the text model's `probe_pooled`.
M-CLIP: `text_features` (its forward: attention-masked mean of the last hidden state, then the linear map),
`text_embeds` (the same, L2-normalised), and for M-CLIP text + clip/ vision, `image_embeds` and
`logits_per_image` = exp(clip's logit_scale) * image_embeds @ text_embeds.T.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
from make_parity_fixtures import OUT, fresh_dir, l2n, nchw, perturb_flax, perturb_torch, pixels, report, torch_ids

CLIP_CAPTIONS = [
    "a photo of the cat",
    "A  Photo of THE dog!",  # lower-cased; runs of spaces are one
    "it's a café, isn't it?",  # contractions split off; é as two bytes
    "고양이 사진 2장",  # Korean, one byte-level token per byte
    "the cat and the dog " * 20,  # past 77 tokens: truncated, the end-of-text token kept
]
MCLIP_CAPTIONS = [
    "이것은 고양이 이다",
    "Three blind horses listening to Mozart.",
    "Älgen är skogens konung!",
    "a  photo of a cat 猫",  # 猫 was never seen: <unk>
]
SPM_CORPUS = MCLIP_CAPTIONS[:3] + ["빨간 자동차가 도로 위를 달린다", "a photo of a dog", "바다 위의 배 한 마리",
                                   "Wie leben Eisbären in der Antarktis?"]
VISION = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=37, hidden_act="quick_gelu", layer_norm_eps=1e-5)
PROJECTION_DIM = 16
MCLIP_BASE = "xlm-roberta-tiny"


def tokens(tok, texts, **kw) -> dict:
    enc = tok(texts, padding=True, return_tensors="np", **kw)
    return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32)}


def clip_tokenizer():
    """A tiny CLIPTokenizer: every byte alone and word-final, a few merges, then the two special tokens
    last (as in OpenAI's vocabulary)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"),
              ("phot", "o</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("a", "n"),
              ("an", "d</w>"), ("i", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def pooling_probe(vocab_size: int, eos: int, seed: int) -> dict:
    """Token rows where the end-of-text id, id 2 and the highest id sit at three different places, so that
    pooling at the first `eos`, at the first 2 and at the argmax give three different answers."""
    rng = np.random.default_rng(seed)
    top = vocab_size - 1
    ids = rng.integers(3, top, (4, 12)).astype(np.int32)
    ids[ids == eos] = 3
    mask = np.zeros_like(ids)
    for r, (two, e, m) in enumerate([(1, 4, 7), (2, 9, 5), (0, 6, 10), (3, 11, 8)]):
        ids[r, two], ids[r, e], ids[r, m] = 2, eos, top
        mask[r, : max(e, m) + 1] = 1  # padding after both
    return {"probe_ids": ids, "probe_mask": mask}


def make_clip(name: str, tok, *, legacy: bool, seed: int):
    """A CLIPModel fixture; returns the model (the vision side of the M-CLIP pairing)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    d = fresh_dir(name)
    tok.save_pretrained(d)
    vocab_size = len(tok) + 2
    eos = 2 if legacy else tok.eos_token_id
    text = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1 if legacy else 2, num_attention_heads=4,
                intermediate_size=37, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                bos_token_id=0 if legacy else tok.bos_token_id, eos_token_id=eos, pad_token_id=1)
    cfg = CLIPConfig(text_config=text, vision_config=VISION, projection_dim=12 if legacy else PROJECTION_DIM)
    torch.manual_seed(seed)
    model = perturb_torch(CLIPModel(cfg), seed)
    cfg.save_pretrained(d)
    if legacy:  # as the published checkpoint: torch.save of the state dict, buffers included
        sd = dict(model.state_dict())
        sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        sd["vision_model.embeddings.position_ids"] = torch.arange(model.vision_model.embeddings.num_positions)[None]
        torch.save(sd, d / "pytorch_model.bin")
    else:
        model.save_pretrained(d)
    batch = tokens(tok, CLIP_CAPTIONS, truncation=True, max_length=77)
    px = pixels(seed)
    probe = pooling_probe(vocab_size, eos, seed)
    ids, mask = torch_ids(batch)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=nchw(px))
        pooled = model.text_model(input_ids=torch.from_numpy(probe["probe_ids"].astype(np.int64)),
                                  attention_mask=torch.from_numpy(probe["probe_mask"].astype(np.int64))).pooler_output
    np.savez_compressed(d / "golden.npz", texts=np.array(CLIP_CAPTIONS), **batch, pixel_values=px,
                        text_embeds=out.text_embeds.numpy(), image_embeds=out.image_embeds.numpy(),
                        logits_per_image=out.logits_per_image.numpy(), logit_scale=model.logit_scale.detach().numpy(),
                        **probe, probe_pooled=pooled.numpy())
    return model, px


def xlmr_tokenizer(work: pathlib.Path):
    """XLM-R's tokenizer around a tiny SentencePiece unigram model (trained with SentencePiece's own ids,
    <unk> 0, <s> 1, </s> 2, as XLM-R's was; the tokenizer adds fairseq's offset)."""
    import sentencepiece as spm
    from transformers import XLMRobertaTokenizer

    work.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SPM_CORPUS * 10), model_prefix=str(work / "sentencepiece.bpe"),
                                   vocab_size=120, model_type="unigram", character_coverage=1.0,
                                   normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2)
    return XLMRobertaTokenizer.from_pretrained(str(work), model_max_length=512), work / "sentencepiece.bpe.model"


def make_mclip(tok, spm_model: pathlib.Path, clip_model, px, seed: int) -> None:
    import torch
    import transformers
    from transformers import XLMRobertaConfig, XLMRobertaModel

    d = fresh_dir("mclip")
    tok.save_pretrained(d)
    shutil.copy(spm_model, d / "sentencepiece.bpe.model")
    base = XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
                            bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    base.save_pretrained(d / MCLIP_BASE)
    torch.manual_seed(seed)
    transformer = XLMRobertaModel(base)  # what AutoModel.from_pretrained(modelBase) builds: with its pooler
    linear = torch.nn.Linear(32, PROJECTION_DIM)
    perturb_torch(transformer, seed)
    perturb_torch(linear, seed + 1)
    sd = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    sd["transformer.embeddings.position_ids"] = torch.arange(40)[None]  # transformers 4.8 saved the buffer
    sd.update({f"LinearTransformation.{k}": v for k, v in linear.state_dict().items()})
    torch.save(sd, d / "pytorch_model.bin")
    config = {"architectures": ["SentenceModelWithLinearTransformation"], "modelBase": MCLIP_BASE,
              "model_type": "M-CLIP", "numDims": PROJECTION_DIM, "transformerDimensions": 32,
              "transformers_version": transformers.__version__}
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # M-CLIP's forward: pad to the longest, mean of the last hidden state over the mask, linear map.
    batch = tokens(tok, MCLIP_CAPTIONS)
    ids, mask = torch_ids(batch)
    with torch.no_grad():
        embs = transformer(input_ids=ids, attention_mask=mask)[0]
        feats = linear((embs * mask.unsqueeze(2)).sum(dim=1) / mask.sum(dim=1)[:, None]).numpy()
        image = l2n(clip_model.get_image_features(pixel_values=nchw(px)).pooler_output.numpy())
        scale = float(clip_model.logit_scale.exp())
    text = l2n(feats)
    np.savez_compressed(d / "golden.npz", texts=np.array(MCLIP_CAPTIONS), **batch, text_features=feats,
                        text_embeds=text, pixel_values=px, image_embeds=image,
                        logits_per_image=(scale * image.astype(np.float64) @ text.T.astype(np.float64))
                        .astype(np.float32))


def make_clip_flax(seed: int = 24) -> None:
    """clip_flax/: FlaxCLIPModel (transformers 4.57), on clip_legacy/'s tokenizer and inputs."""
    import flax.serialization
    import transformers
    from transformers import CLIPConfig, FlaxCLIPModel

    d = fresh_dir("clip_flax")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(OUT / "clip_legacy" / f, d / f)
    g = dict(np.load(OUT / "clip_legacy" / "golden.npz"))
    vocab_size = int(g["probe_ids"].max()) + 1
    text = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0,
                eos_token_id=2, pad_token_id=1)
    cfg = CLIPConfig(text_config=text, vision_config={**VISION, "num_hidden_layers": 1}, projection_dim=PROJECTION_DIM)
    model = FlaxCLIPModel(cfg, seed=seed)
    model.params = perturb_flax(model.params, seed)
    (d / "flax_model.msgpack").write_bytes(flax.serialization.to_bytes(model.params))
    config = {**cfg.to_dict(), "architectures": ["CLIPModel"], "transformers_version": transformers.__version__}
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    batch = {k: g[k] for k in ("texts", "input_ids", "attention_mask", "pixel_values", "probe_ids", "probe_mask")}
    text_embeds = model.get_text_features(batch["input_ids"], batch["attention_mask"])
    image_embeds = model.get_image_features(batch["pixel_values"].transpose(0, 3, 1, 2))  # NCHW, as PyTorch
    probe = model.get_text_features(batch["probe_ids"], batch["probe_mask"])
    np.savez_compressed(d / "golden.npz", **batch, text_embeds=l2n(text_embeds), image_embeds=l2n(image_embeds),
                        logit_scale=np.asarray(model.params["logit_scale"]), probe_text_features=np.asarray(probe))


def main():
    import sys
    import tempfile

    if "--flax" in sys.argv[1:]:
        make_clip_flax()
        report("clip_flax")
        return

    import torch

    torch.set_num_threads(1)
    # A fresh tokenizer each: encoding leaves padding and truncation set in the one saved next.
    clip_model, px = make_clip("clip", clip_tokenizer(), legacy=False, seed=21)
    make_clip("clip_legacy", clip_tokenizer(), legacy=True, seed=22)
    with tempfile.TemporaryDirectory() as tmp:
        make_mclip(*xlmr_tokenizer(pathlib.Path(tmp)), clip_model, px, seed=23)
    for name in ("clip", "clip_legacy", "mclip"):
        report(name)


if __name__ == "__main__":
    main()
