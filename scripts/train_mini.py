"""Fits koclip-mini's heads from ImageNet class names and the CNN's classifier; no image-caption data.

    .venv/bin/python scripts/train_mini.py            # writes koclip/mini/heads.safetensors + koclip-mini.json
    .venv/bin/python scripts/train_mini.py --dry-run  # measures only

What it does, deterministically (fixed seed, closed-form fits, fixed batches):

1. Embeds with multilingual-e5-small every ImageNet class name in Korean and
   English in 8 templates each, the everyday parent categories
   (koclip.data.categories()) likewise, and the zero-shot labels.
2. Takes the image side from EfficientNet-Lite0: one prototype per class (its
   classifier row) and the ImageNet mean pooled feature (from BatchNorm stats).
3. Holds out 20% of the classes (seed 0) and compares routes on them:
   ridge maps (text -> prototype), ConSE, blends of the two, and a linear
   map trained with InfoNCE (optax).  A held-out class is scored by how well
   its name, prompt-ensembled with the app's templates, retrieves a pseudo
   image of it: the mean feature plus its prototype direction (scaled so the
   CNN gives the class probability 0.5 - see `pseudo_images`).
4. Picks the route with the best mean held-out R@5 over Korean and English,
   fits the temperature on the held-out classes, refits on all 1000 classes
   and writes the heads.

The gallery zero-shot accuracy of each route is printed and recorded for the
report only; it plays no part in the choice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from koclip import data  # noqa: E402
from koclip.formats import safetensors_io  # noqa: E402
from koclip.mini import build, heads  # noqa: E402
from koclip.towers import conse  # noqa: E402
from koclip.towers.layers import l2_normalize  # noqa: E402
from koclip.processing import ENGLISH_TEMPLATES, KOREAN_TEMPLATES, Processor  # noqa: E402

SEED = 0
HOLDOUT = 0.2
LANGS = ("ko", "en")
# Training texts: the app's templates, the bare name, and a few more.
TEMPLATES = {
    "ko": ("{}", *KOREAN_TEMPLATES, "{}을(를) 찍은 사진"),
    "en": ("{}", *ENGLISH_TEMPLATES, "a close-up photo of a {}.", "a photo of the {}.", "a good photo of a {}."),
}
# Held-out queries and zero-shot labels are prompt-ensembled over the app's templates.
EVAL_TEMPLATES = {"ko": KOREAN_TEMPLATES, "en": ENGLISH_TEMPLATES}
RIDGE_LAMBDAS = (1.0, 3.0, 10.0, 30.0)
CONSE = ((1.0, 10), (1.0, 50), (2.0, 10), (2.0, 50))  # (temperature, top k)
BLENDS = (0.3, 0.5, 0.7)
INFONCE = dict(steps=300, batch=512, lr=1e-2, weight_decay=1e-2, temperature=0.05)


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ features

def embed_texts(model, processor: Processor, texts: list[str], batch: int = 128) -> np.ndarray:
    """Mean-pooled e5 outputs (n, 384) of `texts` (the processor adds "query: ").

    Texts run sorted by length so that padding stays short; the order of the
    batches depends only on the texts, so the output is reproducible.
    """
    @nnx.jit
    def pooled(text_model, ids, mask):
        return text_model(ids, mask)[1]

    lengths = [len(ids) for ids in processor.tokenizer([processor.text_prefix + t for t in texts])["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(texts), model.config.text.output_dim), np.float32)
    for start in range(0, len(texts), batch):
        idx = order[start:start + batch]
        enc = processor.tokenize([texts[i] for i in idx])
        ids = np.full((batch, enc["input_ids"].shape[1]), processor.tokenizer.pad_token_id, np.int32)
        mask = np.zeros_like(ids)
        ids[:len(idx)], mask[:len(idx)] = enc["input_ids"], enc["attention_mask"]
        out[idx] = np.asarray(pooled(model.text_model, ids, mask))[:len(idx)]
    return out


def text_features(model, processor) -> dict:
    """{(kind, lang): (templates, n, 384)} for kind in cls (1000 classes), cat (categories), zs (labels)."""
    names = {
        "cls": {lang: data.imagenet_classes(lang) for lang in LANGS},
        "cat": {"ko": [c.ko for c in data.categories()], "en": [c.en for c in data.categories()]},
        "zs": {"ko": [k for k, _ in data.ZEROSHOT_LABELS], "en": [e for _, e in data.ZEROSHOT_LABELS]},
    }
    texts, slots = [], []
    for kind, by_lang in names.items():
        for lang, labels in by_lang.items():
            for t, template in enumerate(TEMPLATES[lang]):
                slots.append((kind, lang, t, len(texts), len(labels)))
                texts.extend(template.replace("{}", label) for label in labels)
    t0 = time.perf_counter()
    emb = embed_texts(model, processor, texts)
    log(f"embedded {len(texts)} texts in {time.perf_counter() - t0:.0f} s")
    out: dict = {}
    for kind, lang, t, start, n in slots:
        out.setdefault((kind, lang), [None] * len(TEMPLATES[lang]))[t] = emb[start:start + n]
    return {k: np.stack(v) for k, v in out.items()}


def gallery_features(model, processor) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (34, 1280) and logits (34, 1000) of the gallery photos."""
    @nnx.jit
    def run(vision_model, px):
        _, p = vision_model(px)
        return p, vision_model.classify(p)

    photos = data.gallery()
    px = processor.preprocess_images([p.path for p in photos])
    pooled, logits = run(model.vision_model, px)
    return np.asarray(pooled), np.asarray(logits)


# -------------------------------------------------------------- the routes

def template_index(lang: str) -> list[int]:
    return [TEMPLATES[lang].index(t) for t in EVAL_TEMPLATES[lang]]


def normalise(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def training_pairs(feats: dict, classes: np.ndarray):
    """Normalised texts (n, 384) and, per text, the classes whose mean prototype it names."""
    xs, targets = [], []
    keep = set(classes.tolist())
    for lang in LANGS:
        cls = feats[("cls", lang)]
        for c in classes:
            xs.append(cls[:, c])
            targets += [(int(c),)] * cls.shape[0]
        cat = feats[("cat", lang)]
        for j, category in enumerate(data.categories()):
            members = tuple(c for c in category.classes if c in keep)
            if members:  # a category of held-out classes only would leak them
                xs.append(cat[:, j])
                targets += [members] * cat.shape[0]
    return normalise(np.concatenate(xs)), targets


def fit(feats: dict, W: np.ndarray, m_img: np.ndarray, classes: np.ndarray, *, lam: float | None,
        temperature: float, k: int, blend: float, kernel=None) -> dict:
    """Head parameters for a route, fitted on `classes` only.

    lam: ridge strength (None when blend == 0: no ridge part).  kernel: a
    text -> prototype map (384, 1280) fitted elsewhere (InfoNCE), instead of ridge.
    Returns {"text": {mean, kernel, blend}, "image": {mean, kernel, class_embeddings,
    temperature, blend}, "k": k} as float32 numpy arrays.
    """
    x, targets = training_pairs(feats, classes)
    mean = x.mean(0)
    if kernel is None and lam is not None:
        protos = W - W[classes].mean(0)
        y = np.stack([protos[list(t)].mean(0) for t in targets])
        kernel = heads.ridge(x - mean, y, lam)
    if kernel is not None:
        text_kernel, image_kernel = heads.factor(kernel)
    else:
        text_kernel, image_kernel = np.eye(x.shape[1]), np.zeros((W.shape[1], x.shape[1]))
    # ConSE: each class's prompt-ensembled, centred text in both languages.
    class_emb = np.zeros((W.shape[0], x.shape[1]))
    for lang in LANGS:
        t = normalise(feats[("cls", lang)][:, classes]) - mean
        class_emb[classes] += t.mean(0)
    class_emb[classes] = normalise(class_emb[classes])
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return {
        "text": {"mean": f32(mean), "kernel": f32(text_kernel), "blend": f32(blend)},
        "image": {"mean": f32(m_img), "kernel": f32(image_kernel), "class_embeddings": f32(class_emb),
                  "temperature": f32(temperature), "blend": f32(blend)},
        "k": k,
    }


def encode_text(params: dict, pooled: np.ndarray) -> np.ndarray:
    p = params["text"]
    return np.asarray(l2_normalize(conse.text_embed(jnp.asarray(pooled), p["mean"], p["kernel"], p["blend"])))


def ensembled(params: dict, pooled: np.ndarray) -> np.ndarray:
    """Prompt ensembling: (templates, n, 384) -> (n, 768), the unit mean of each template's embedding."""
    return normalise(np.mean([encode_text(params, x) for x in pooled], axis=0))


def encode_image(params: dict, pooled: np.ndarray, logits: np.ndarray) -> np.ndarray:
    p = params["image"]
    z = conse.image_embed(jnp.asarray(pooled), jnp.asarray(logits), p["mean"], p["kernel"], p["class_embeddings"],
                          p["temperature"], p["blend"], params["k"])
    return np.asarray(l2_normalize(z))


def pseudo_images(W: np.ndarray, b: np.ndarray, m_img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One stand-in image feature per class: (1000, 1280) pooled and (1000, 1000) logits.

    The mean feature plus s times the class's centred, unit prototype; s is
    set so that, over all classes, the median probability the CNN gives the
    class is 0.5 - a confidently but not absurdly recognised image.  For a
    ridge route this is the same as comparing with the prototype itself.
    """
    u = normalise(W - W.mean(0))

    def median_p(s):
        z = (m_img + s * u) @ W.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return float(np.median(np.diag(p)))

    lo, hi = 0.01, 100.0
    for _ in range(60):  # bisection on a log scale: median_p grows with s
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if median_p(mid) < 0.5 else (lo, mid)
    pooled = m_img + lo * u
    return pooled, pooled @ W.T + b


def recall_at(sim: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of rows whose true column is among the k highest.  sim (q, n), truth (q,)."""
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return float(np.mean([t in row for t, row in zip(truth, top)]))


def heldout_scores(params, feats, pseudo, held: np.ndarray) -> dict:
    """Text-to-prototype recall of the held-out classes, per language.

    `{lang}_held_r1/_r5`: among the 200 held-out classes; `{lang}_all_r1/_r5`:
    among all 1000 (the 800 training classes compete too).  The CNN's scores
    for held-out classes are hidden from ConSE (it must not know them).
    """
    pooled, logits = pseudo
    logits = logits.copy()
    logits[:, held] = -1e9
    zimg = encode_image(params, pooled, logits)
    out = {}
    for lang in LANGS:
        ztxt = ensembled(params, feats[("cls", lang)][template_index(lang)][:, held])
        sim = ztxt @ zimg.T
        truth_held = np.arange(len(held))
        out[f"{lang}_held_r1"] = recall_at(sim[:, held], truth_held, 1)
        out[f"{lang}_held_r5"] = recall_at(sim[:, held], truth_held, 5)
        out[f"{lang}_all_r1"] = recall_at(sim, held, 1)
        out[f"{lang}_all_r5"] = recall_at(sim, held, 5)
    out["select"] = (out["ko_held_r5"] + out["en_held_r5"]) / 2
    return out


def gallery_scores(params, feats, gallery) -> dict:
    """Zero-shot top-1 on the gallery photos against ZEROSHOT_LABELS (for the report, not the choice)."""
    pooled, logits = gallery
    zimg = encode_image(params, pooled, logits)
    photos = data.gallery()
    out = {}
    for lang, col in (("ko", 0), ("en", 1)):
        labels = [pair[col] for pair in data.ZEROSHOT_LABELS]
        truth = np.array([labels.index(p.label_ko if lang == "ko" else p.label_en) for p in photos])
        ztxt = ensembled(params, feats[("zs", lang)][template_index(lang)])
        out[f"{lang}_zeroshot"] = float(np.mean(np.argmax(zimg @ ztxt.T, 1) == truth))
    return out


def fit_infonce(feats, W, classes: np.ndarray, seed: int = SEED) -> np.ndarray:
    """A text -> prototype map (384, 1280) trained with InfoNCE over the training prototypes (optax AdamW)."""
    import optax

    x, targets = training_pairs(feats, classes)
    x = x - x.mean(0)
    keys = sorted(set(targets))
    index = {t: i for i, t in enumerate(keys)}
    protos = W - W[classes].mean(0)
    p = jnp.asarray(normalise(np.stack([protos[list(t)].mean(0) for t in keys])), jnp.float32)
    y = np.array([index[t] for t in targets])
    cfg = INFONCE
    tx = optax.adamw(cfg["lr"], weight_decay=cfg["weight_decay"])
    m = jax.random.normal(jax.random.PRNGKey(seed), (x.shape[1], W.shape[1])) * 0.02
    state = tx.init(m)

    def loss(m, xb, yb):
        t = l2_normalize(xb @ m)
        return optax.softmax_cross_entropy_with_integer_labels(t @ p.T / cfg["temperature"], yb).mean()

    @jax.jit
    def step(m, state, xb, yb):
        value, grad = jax.value_and_grad(loss)(m, xb, yb)
        updates, state = tx.update(grad, state, m)
        return optax.apply_updates(m, updates), state, value

    rng = np.random.default_rng(seed)
    xj = jnp.asarray(x, jnp.float32)
    for _ in range(cfg["steps"]):
        idx = rng.choice(len(x), cfg["batch"], replace=False)
        m, state, value = step(m, state, xj[idx], jnp.asarray(y[idx]))
    log(f"  infonce final batch loss {float(value):.3f}")
    return np.asarray(m, np.float64)


def fit_logit_scale(params, feats, pseudo, held) -> float:
    """The temperature exp(s) that best predicts held-out classes from their names (cross-entropy)."""
    pooled, logits = pseudo
    logits = logits.copy()
    logits[:, held] = -1e9
    zimg = encode_image(params, pooled[held], logits[held])
    sims = []
    for lang in LANGS:
        sims.append(ensembled(params, feats[("cls", lang)][template_index(lang)][:, held]) @ zimg.T)
    sim = np.concatenate(sims)
    truth = np.tile(np.arange(len(held)), len(LANGS))
    best = None
    for s in np.linspace(0.0, math.log(500.0), 200):
        z = sim * math.exp(s)
        z = z - z.max(1, keepdims=True)
        ce = float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), truth]))
        if best is None or ce < best[0]:
            best = (ce, s)
    return float(best[1])


# --------------------------------------------------------------- writing

def head_tensors(params: dict, logit_scale: float) -> dict[str, np.ndarray]:
    out = {f"text_projection.{k}": v for k, v in params["text"].items()}
    out.update({f"visual_projection.{k}": v for k, v in params["image"].items()})
    out["logit_scale"] = np.asarray(logit_scale, np.float32)
    return out


def write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def data_digest() -> str:
    h = hashlib.sha256()
    for name in ("imagenet_en.txt", "imagenet_ko.txt", "categories.tsv"):
        h.update((Path(data.__file__).parent / name).read_bytes())
    return h.hexdigest()


def routes():
    """(name, fit kwargs) of every route compared, ridge and ConSE alone first."""
    out = [(f"ridge(lam={lam:g})", dict(lam=lam, temperature=1.0, k=10, blend=1.0)) for lam in RIDGE_LAMBDAS]
    out += [(f"conse(T={t:g},k={k})", dict(lam=None, temperature=t, k=k, blend=0.0)) for t, k in CONSE]
    out += [(f"blend(lam={lam:g},T={t:g},k={k},a={a:g})", dict(lam=lam, temperature=t, k=k, blend=a))
            for lam in RIDGE_LAMBDAS for t, k in CONSE for a in BLENDS]
    return out


def fmt(scores: dict) -> str:
    return " ".join(f"{k}={100 * v:5.1f}" for k, v in scores.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    ap.add_argument("--skip-infonce", action="store_true", help="leave the (slow) InfoNCE baseline out")
    ap.add_argument("--features", type=Path, help="an .npz to keep the text features in between runs "
                    "(read when it exists, else written); for development")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    config = build.base_config()
    params, tokenizer, _, status = build.load_towers()
    model = build.assemble(config, params, build.default_heads(config))
    del params
    processor = Processor.for_config(config, tokenizer)
    log(f"towers ready ({status}) in {time.perf_counter() - t0:.0f} s")

    if args.features and args.features.is_file():
        with np.load(args.features) as z:
            feats = {tuple(k.split("/")): z[k] for k in z.files}
        log(f"text features from {args.features}")
    else:
        feats = text_features(model, processor)
        if args.features:
            np.savez(args.features, **{"/".join(k): v for k, v in feats.items()})
    fc = model.vision_model.fc
    W = np.asarray(fc.kernel[...], np.float64).T          # (1000, 1280): one prototype per class
    b = np.asarray(fc.bias[...], np.float64)
    bn = model.vision_model.bn1
    m_img = np.asarray(heads.pooled_mean(bn.scale[...], bn.bias[...]), np.float64)
    gallery = gallery_features(model, processor)
    pseudo = pseudo_images(W, b, m_img)

    n = W.shape[0]
    perm = np.random.default_rng(SEED).permutation(n)
    held, train = np.sort(perm[:int(HOLDOUT * n)]), np.sort(perm[int(HOLDOUT * n):])
    allc = np.arange(n)

    table = []
    for name, kw in routes():
        scores = heldout_scores(fit(feats, W, m_img, train, **kw), feats, pseudo, held)
        info = gallery_scores(fit(feats, W, m_img, allc, **kw), feats, gallery)
        table.append({"route": name, **kw, "heldout": scores, "gallery": info})
        log(f"{name:36s} {fmt(scores)} | gallery {fmt(info)}")
    if not args.skip_infonce:
        kw = dict(lam=None, temperature=1.0, k=10, blend=1.0)
        scores = heldout_scores(fit(feats, W, m_img, train, kernel=fit_infonce(feats, W, train), **kw),
                                feats, pseudo, held)
        info = gallery_scores(fit(feats, W, m_img, allc, kernel=fit_infonce(feats, W, allc), **kw), feats, gallery)
        table.append({"route": "infonce", **kw, "infonce": INFONCE, "heldout": scores, "gallery": info})
        log(f"{'infonce':36s} {fmt(scores)} | gallery {fmt(info)}")

    # Best mean held-out R@5; ties go to the earlier (simpler) route.
    best = max(range(len(table)), key=lambda i: (round(table[i]["heldout"]["select"], 6), -i))
    chosen = table[best]
    if chosen["route"] == "infonce":
        raise SystemExit("InfoNCE won; shipping it is not implemented (it never has: see the table)")
    kw = {k: chosen[k] for k in ("lam", "temperature", "k", "blend")}
    scale = fit_logit_scale(fit(feats, W, m_img, train, **kw), feats, pseudo, held)
    final = fit(feats, W, m_img, allc, **kw)
    log(f"chosen: {chosen['route']}  logit scale {math.exp(scale):.1f}  "
        f"gallery (all classes) {fmt(gallery_scores(final, feats, gallery))}")
    if args.dry_run:
        return 0

    ship = config.replace(conse_top_k=kw["k"], logit_scale_init=scale)
    tensors = head_tensors(final, scale)
    safetensors_io.write(build.HEADS_FILE, sorted(tensors.items()), metadata={"format": "koclip-mini-heads"})
    os.chmod(build.HEADS_FILE, 0o644)  # a committed file, not a private temp file
    spec = {
        "config": ship.to_hf(),
        "route": chosen["route"],
        "fit": kw,
        "training": {
            "seed": SEED, "holdout": HOLDOUT, "heldout_classes": int(len(held)),
            "templates": TEMPLATES, "eval_templates": EVAL_TEMPLATES,
            "data_sha256": data_digest(), "sources": {name: {k: v for k, v in fp.items() if k != "mtime_ns"}
                        for name, fp in build.fingerprint(build.source_files()).items()},
            "heads_sha256": hashlib.sha256(build.HEADS_FILE.read_bytes()).hexdigest(),
            "logit_scale": scale,
        },
        "routes": table,
    }
    write_json(build.CONFIG_FILE, spec)
    log(f"wrote {build.HEADS_FILE} ({build.HEADS_FILE.stat().st_size} bytes) and {build.CONFIG_FILE} "
        f"in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
