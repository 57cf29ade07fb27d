"""Peak memory of loading full-size checkpoints, as a multiple of the checkpoint's size.

Synthesises full-size checkpoints with random fp32 weights (no model hub needed) in the layout
and size of the published ones, then loads each in a fresh process and reads the peak resident
memory above the process's baseline (jax and koclip imported, nothing loaded):

  hybrid-clip, vision-text-dual-encoder, koclip
                       koclip-base (klue/roberta-large + CLIP ViT-B/32) in each of these formats
  siglip-multilingual  google/siglip-base-patch16-256-multilingual: SiglipModel, model.safetensors
  siglip2              google/siglip2-base-patch16-224: SiglipModel, model.safetensors
  clip                 openai/clip-vit-base-patch32: CLIPModel, pytorch_model.bin as published
  mclip                M-CLIP/XLM-Roberta-Large-Vit-B-32 (XLM-R large + LinearTransformation,
                       pytorch_model.bin) composed with `clip`: koclip.load(text=mclip, vision=clip);
                       its ratio is against both files together, and also against the M-CLIP file alone

    python benchmarks/load_memory.py [--checkpoints siglip2,mclip] [--dir /tmp/koclip-mem] [--keep]
                                     [--precision bf16]

The tensors of the published layouts are koclip's parameters for the checkpoint's config.json
under the checkpoint's own names (koclip keeps them, so the mapping back is mechanical), plus the
buffers those files carry and koclip drops; the names are checked against the tiny checkpoints
that transformers wrote in tests/fixtures/parity.  `.bin` files are written in torch.save's zip
layout with the standard library (no torch).  The checkpoints a run uses are deleted at its
end unless --keep; a later run reuses kept ones.  Tokenizers are not part of the measurement (the
synthesised checkpoints have none): the process measured loads the weights only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity"
KOCLIP_BASE_FORMATS = ("hybrid-clip", "vision-text-dual-encoder", "koclip")
PUBLISHED = ("siglip-multilingual", "siglip2", "clip", "mclip")

# config.json as the published checkpoints have it, down to the keys koclip reads (transformers'
# defaults fill in the rest, as they do for the published SigLIP configs, which are this short).
_SIGLIP_VISION = {"model_type": "siglip_vision_model", "hidden_size": 768, "intermediate_size": 3072,
                  "num_attention_heads": 12, "num_hidden_layers": 12, "patch_size": 16}
_SIGLIP_TEXT = {"model_type": "siglip_text_model", "hidden_size": 768, "intermediate_size": 3072,
                "num_attention_heads": 12, "num_hidden_layers": 12, "max_position_embeddings": 64}
CONFIGS = {
    "siglip-multilingual": {  # google/siglip-base-patch16-256-multilingual
        "architectures": ["SiglipModel"], "initializer_factor": 1.0, "model_type": "siglip", "torch_dtype": "float32",
        "text_config": {**_SIGLIP_TEXT, "vocab_size": 250000},
        "vision_config": {**_SIGLIP_VISION, "image_size": 256}},
    "siglip2": {  # google/siglip2-base-patch16-224
        "architectures": ["SiglipModel"], "initializer_factor": 1.0, "model_type": "siglip", "torch_dtype": "float32",
        "text_config": {**_SIGLIP_TEXT, "vocab_size": 256000},
        "vision_config": {**_SIGLIP_VISION, "image_size": 224}},
    "clip": {  # openai/clip-vit-base-patch32: full sections, and the *_dict overrides older configs carry
        "architectures": ["CLIPModel"], "initializer_factor": 1.0, "logit_scale_init_value": 2.6592,
        "model_type": "clip", "projection_dim": 512,
        "text_config": {"model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 512,
                        "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12,
                        "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "projection_dim": 512},
        "text_config_dict": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                             "num_hidden_layers": 12},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072,
                          "num_attention_heads": 12, "num_hidden_layers": 12, "image_size": 224,
                          "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                          "num_channels": 3, "projection_dim": 512},
        "vision_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                               "num_hidden_layers": 12, "patch_size": 32}},
    "mclip": {  # M-CLIP/XLM-Roberta-Large-Vit-B-32
        "_name_or_path": "M-CLIP/XLM-Roberta-Large-Vit-B-32", "architectures": ["MultilingualCLIP"],
        "model_type": "M-CLIP", "modelBase": "xlm-roberta-large", "numDims": 512, "transformerDimensions": 1024,
        "torch_dtype": "float32"},
}
# FacebookAI/xlm-roberta-large's config.json: M-CLIP's modelBase.  The hub cannot be reached here, so it
# sits in a folder of that name inside the M-CLIP checkpoint, where koclip looks first.
XLM_ROBERTA_LARGE = {
    "architectures": ["XLMRobertaForMaskedLM"], "model_type": "xlm-roberta", "vocab_size": 250002,
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
    "hidden_act": "gelu", "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
# The tiny checkpoint whose tensor names each layout must match, and its weight file.
LAYOUT_FIXTURES = {"siglip-multilingual": "siglip_spiece/model.safetensors",
                   "siglip2": "siglip2_gemma/model.safetensors",
                   "clip": "clip_legacy/pytorch_model.bin", "mclip": "mclip/pytorch_model.bin"}


def _nested(flat: dict) -> dict:
    tree: dict = {}
    for name, x in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = x
    return tree


def synthesise(fmt: str, directory: Path) -> Path:
    """koclip-base in one of KOCLIP_BASE_FORMATS."""
    from flax import nnx

    from koclip.config import KOCLIP_BASE
    from koclip.formats import safetensors_io
    from koclip.formats.convert import param_shapes
    from koclip.model import KoCLIP

    directory.mkdir(parents=True, exist_ok=True)
    shapes = param_shapes(nnx.eval_shape(lambda: KoCLIP(KOCLIP_BASE, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def arrays():
        for name, (shape, _) in shapes.items():
            yield name, (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    cfg = KOCLIP_BASE.to_hf()
    if fmt == "koclip":
        (directory / "config.json").write_text(json.dumps(cfg))
        safetensors_io.write(directory / "model.safetensors", arrays())
        return directory / "model.safetensors"
    hf = {"model_type": "hybrid-clip" if fmt == "hybrid-clip" else "vision-text-dual-encoder",
          "projection_dim": 512, "text_config": {**cfg["text_config"], "model_type": "roberta"},
          "vision_config": cfg["vision_config"]}
    (directory / "config.json").write_text(json.dumps(hf))
    if fmt == "hybrid-clip":
        import flax.serialization

        flat = {}
        for name, x in arrays():
            if name.startswith("vision_model."):
                name = "vision_model." + name
            flat[name] = x
        path = directory / "flax_model.msgpack"
        path.write_bytes(flax.serialization.msgpack_serialize(_nested(flat)))
        return path
    # transformers' PyTorch layout in safetensors: Linear (out, in), conv OIHW, torch leaf names.
    def torch_named():
        for name, x in arrays():
            base, _, leaf = name.rpartition(".")
            if name.startswith("vision_model."):
                base = "vision_model." + base
            if leaf == "kernel":
                x = x.T if x.ndim == 2 else x.transpose(3, 2, 0, 1)
                leaf = "weight"
            elif leaf in ("scale", "embedding"):
                leaf = "weight"
            yield (f"{base}.{leaf}" if base else leaf), np.ascontiguousarray(x)

    path = directory / "model.safetensors"
    safetensors_io.write(path, torch_named())
    return path


# ---------------------------------------------------------------- the published checkpoints

def _torch_specs(shapes: dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """koclip's parameter shapes -> the PyTorch state dict's names and shapes (kernel (in, out) ->
    weight (out, in), HWIO -> OIHW; scale and embedding -> weight)."""
    out = {}
    for name, (shape, dtype) in shapes.items():
        base, _, leaf = name.rpartition(".")
        if leaf == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
            leaf = "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[f"{base}.{leaf}" if base else leaf] = (tuple(shape), np.dtype(dtype))
    return out


def layout(name: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The state dict (name -> (shape, dtype)) of published checkpoint `name`, from its CONFIGS entry."""
    from flax import nnx

    from koclip.config import ModelConfig, TextConfig
    from koclip.formats.convert import param_shapes
    from koclip.model import KoCLIP

    def shapes(config):
        return param_shapes(nnx.eval_shape(lambda: KoCLIP(config, rngs=nnx.Rngs(0))))

    i64 = np.dtype(np.int64)
    if name in ("siglip-multilingual", "siglip2"):
        specs = _torch_specs(shapes(ModelConfig.from_hf(CONFIGS[name])))
        specs.update(logit_scale=((1,), np.dtype(np.float32)), logit_bias=((1,), np.dtype(np.float32)))
        return specs
    if name == "clip":
        cfg = CONFIGS["clip"]
        specs = _torch_specs(shapes(ModelConfig.from_hf(cfg)))
        patches = (cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]) ** 2
        specs["text_model.embeddings.position_ids"] = ((1, cfg["text_config"]["max_position_embeddings"]), i64)
        specs["vision_model.embeddings.position_ids"] = ((1, patches + 1), i64)
        return specs
    if name == "mclip":
        text = TextConfig.from_hf(XLM_ROBERTA_LARGE)
        config = ModelConfig(text=text, projection_dim=CONFIGS["mclip"]["numDims"], text_head="affine")
        d = text.hidden_size
        specs = {}
        for key, spec in _torch_specs(shapes(config)).items():
            if key.startswith("text_model."):
                specs["transformer." + key[len("text_model."):]] = spec
            elif key.startswith("text_projection."):
                specs["LinearTransformation." + key[len("text_projection."):]] = spec
        # XLMRobertaModel's pooler (mean pooling never reads it) and position ids, as the file has them.
        f32 = np.dtype(np.float32)
        specs.update({"transformer.pooler.dense.weight": ((d, d), f32), "transformer.pooler.dense.bias": ((d,), f32),
                      "transformer.embeddings.position_ids": ((1, text.max_position_embeddings), i64)})
        return specs
    raise ValueError(f"unknown checkpoint {name!r}; valid: {', '.join(PUBLISHED)}")


def _template(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


def published_order(name: str, specs: dict) -> list[str]:
    """`specs`' names in the order the published file has them, after checking that they are the
    names of the tiny fixture transformers wrote in that layout (layer numbers aside).

    safetensors files are sorted by name; torch.save files keep the fixture's (the modules') order,
    its layer block repeated for every layer.
    """
    from koclip.formats import safetensors_io
    from koclip.formats.torch_zip import read_torch_state_dict

    path = FIXTURES / LAYOUT_FIXTURES[name]
    if path.suffix == ".safetensors":
        header, _ = safetensors_io.read_header(path)
        fixture = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    else:
        fixture = list(read_torch_state_dict(path))
    want, have = {_template(n) for n in fixture}, {_template(n) for n in specs}
    if want != have:
        raise SystemExit(f"{name}: the synthesised layout differs from {path}: "
                         f"missing {sorted(want - have)[:8]}, extra {sorted(have - want)[:8]}")
    if path.suffix == ".safetensors":
        return sorted(specs)
    first, stack = {}, {}
    for i, n in enumerate(fixture):
        first.setdefault(_template(n), i)
        m = re.search(r"\.\d+\.", n)
        if m:
            stack.setdefault(n[:m.start()], i)

    def key(n):
        m = re.search(r"\.(\d+)\.", n)
        t = first[_template(n)]
        return (t, -1, t) if m is None else (stack[n[:m.start()]], int(m.group(1)), t)

    return sorted(specs, key=key)


def _random(shape, dtype, rng):
    if dtype == np.int64:  # position_ids
        return np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= 0.02
    return x


def write_torch_zip(path: Path, specs: dict, order: list[str], rng) -> None:
    """torch.save's zip layout of a state dict, written with the standard library: `<stem>/data.pkl`
    (an OrderedDict of torch._utils._rebuild_tensor_v2 calls over persistent storage ids, written
    opcode by opcode so that it can name torch's globals without torch), `<stem>/byteorder`, and
    one stored (uncompressed) `<stem>/data/<key>` per tensor, filled one tensor at a time."""
    def value(x):
        return pickle.dumps(x, protocol=2)[2:-1]

    def glob(module, attr):
        return f"c{module}\n{attr}\n".encode()

    storage = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}
    items = []
    for key, name in enumerate(order):
        shape, dtype = specs[name]
        strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        pid = b"(" + value("storage") + glob("torch", storage[dtype]) + value(str(key)) + value("cpu") \
            + value(math.prod(shape)) + b"tQ"
        items.append(value(name) + glob("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + value(0)
                     + value(shape) + value(strides) + value(False) + glob("collections", "OrderedDict")
                     + b")RtR")
    pkl = b"\x80\x02" + glob("collections", "OrderedDict") + b")R(" + b"".join(items) + b"u."
    prefix = path.stem
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", pkl)
        zf.writestr(f"{prefix}/byteorder", "little")
        zf.writestr(f"{prefix}/version", "3\n")
        for key, name in enumerate(order):
            x = _random(*specs[name], rng)
            with zf.open(f"{prefix}/data/{key}", "w", force_zip64=x.nbytes >= 2**31) as f:
                f.write(memoryview(x.reshape(-1).view(np.uint8)))
            del x
    os.replace(tmp, path)


def synthesise_published(name: str, directory: Path) -> Path:
    from koclip.formats import safetensors_io

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIGS[name], indent=2))
    if name == "mclip":
        (directory / "xlm-roberta-large").mkdir(exist_ok=True)
        (directory / "xlm-roberta-large" / "config.json").write_text(json.dumps(XLM_ROBERTA_LARGE, indent=2))
    specs = layout(name)
    order = published_order(name, specs)
    rng = np.random.default_rng(0)
    if name.startswith("siglip"):
        path = directory / "model.safetensors"
        safetensors_io.write(path, ((n, _random(*specs[n], rng)) for n in order))
    else:
        path = directory / "pytorch_model.bin"
        write_torch_zip(path, specs, order, rng)
    return path


# ---------------------------------------------------------------- measuring

def measure(load_kwargs: dict, precision: str | None) -> dict:
    code = f"""
import time, json, gc
import jax, numpy as np
import koclip, koclip.loading as loading

class NoProcessor:  # the synthesised checkpoints have no tokenizer; weights are what is measured
    @staticmethod
    def for_config(config, tokenizer):
        return None

loading.Processor = NoProcessor
loading.tokenizer_for = lambda config, directory=None: None
gc.collect()
base = int(open('/proc/self/statm').read().split()[1]) * {os.sysconf('SC_PAGE_SIZE')}
t = time.perf_counter()
m, _ = koclip.load(**{load_kwargs!r}, precision={precision!r})
dt = time.perf_counter() - t
peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print(json.dumps(dict(base=base, peak=peak, seconds=dt)))
"""
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would inherit the parent's peak.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"loading {load_kwargs} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def weights_file(directory: Path) -> Path | None:
    return next((directory / f for f in ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin")
                 if (directory / f).exists()), None)


def prepare(name: str, root: Path) -> Path:
    d = root / name
    weights = weights_file(d)
    if weights is None:
        print(f"  synthesising {name} in {d} ...", file=sys.stderr, flush=True)
        weights = synthesise(name, d) if name in KOCLIP_BASE_FORMATS else synthesise_published(name, d)
    return weights


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", "--formats", default=",".join(KOCLIP_BASE_FORMATS + PUBLISHED),
                    help="comma-separated, of: " + ", ".join(KOCLIP_BASE_FORMATS + PUBLISHED))
    ap.add_argument("--dir", default="/tmp/koclip-mem")
    ap.add_argument("--keep", action="store_true", help="keep the synthesised checkpoints for a later run")
    ap.add_argument("--precision", default=None, help="passed to koclip.load (fp32 when not given)")
    args = ap.parse_args()
    names = args.checkpoints.split(",")
    for n in names:
        if n not in KOCLIP_BASE_FORMATS + PUBLISHED:
            ap.error(f"unknown checkpoint {n!r}; valid: {', '.join(KOCLIP_BASE_FORMATS + PUBLISHED)}")
    root = Path(args.dir)
    print(f"{'checkpoint':28s} {'size':>9s} {'peak-base':>10s} {'ratio':>6s} {'load s':>7s}")
    try:
        for name in names:
            weights = prepare(name, root)
            size = weights.stat().st_size
            if name == "mclip":
                vision = prepare("clip", root)
                kwargs = dict(text=str(weights.parent), vision=str(vision.parent))
                size += vision.stat().st_size
            else:
                kwargs = dict(name=str(weights.parent))
            r = measure(kwargs, args.precision)
            used = r["peak"] - r["base"]
            label = "mclip + clip" if name == "mclip" else name
            print(f"{label:28s} {size / 1e9:7.2f}GB {used / 1e9:8.2f}GB {used / size:6.2f} {r['seconds']:7.1f}",
                  flush=True)
            if name == "mclip":
                alone = weights.stat().st_size
                print(f"{'  vs the M-CLIP file alone':28s} {alone / 1e9:7.2f}GB {used / 1e9:8.2f}GB "
                      f"{used / alone:6.2f}", flush=True)
    finally:
        if not args.keep:  # what this run used; other folders under --dir are left alone
            for name in set(names) | ({"clip"} if "mclip" in names else set()):
                shutil.rmtree(root / name, ignore_errors=True)
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()


if __name__ == "__main__":
    main()
