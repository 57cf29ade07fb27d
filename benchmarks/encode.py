"""Embedding speed on this machine's CPU: koclip (JAX/XLA) against PyTorch, ONNX Runtime and OpenVINO.

For koclip-base's architecture (CLIP ViT-B/32 + roberta-large, random weights)
and for koclip-mini (or, until `koclip.load("koclip-mini")` works, its
architecture with random weights: multilingual-e5-small + EfficientNet-Lite0) it measures

  image throughput  img/s     batch 32, 224x224
  image latency     ms        batch 1
  text throughput   texts/s   batch 32, --text-len tokens
  text latency      ms        batch 1

for koclip in fp32 / bf16 / int8 (`koclip.quantize`) and ort-fp32 / ort-int8 (koclip's own export of
the tower, from its weights, served by ONNX Runtime: `koclip.onnx_runtime`), with its default marked:
what `precision="auto"` picks for each tower on this machine (`koclip.autotune`,
measured afresh at the start of each architecture), and for the peers, each
computing projected, L2-normalised embeddings of the same architecture:

  torch fp32 / bf16  transformers' models (weights and inputs cast with `.to(torch.bfloat16)`),
                     with all threads and with one
  ort fp32 / int8    the torch fp32 encoder exported with torch.onnx.export, run by ONNX Runtime
                     as it is and after onnxruntime.quantization.quantize_dynamic (int8 weights,
                     activations quantised per call)
  openvino           the same ONNX file through openvino.convert_model, compiled for "CPU" in its
                     default precision (printed: bf16 where the CPU has it, else f32)

It prints the CPU model and flags, and the peak of one large matmul
(1600x768 @ 768x3072, ViT-B/32's fc1 at batch 32) in each runtime and precision;
beside every side's speed it shows the GFLOP/s it reaches on the model (FLOP per item from
XLA's cost analysis of the fp32 model, 2 per multiply-add) and that as a share of its own
runtime's matmul peak in its precision.  The machine is shared, so every side runs once per
round, in turn (each timed call right after an untimed one of the same side, so that no side
is timed while another runtime's threads still spin), and the table shows the best round (least
disturbed) with the median beside it; ratios compare best rounds.  It also shows process CPU
seconds per call, and ratios by them: wall ratios on a busy machine also measure how each
runtime's threads cope when another job takes a core, while CPU seconds (the work done) move
much less with the load.  The last lines say, per tower, koclip's default against the best peer
at each batch.

Threads: PyTorch runs with torch.set_num_threads(os.cpu_count()) and with one thread (its per-op
thread hand-offs stall when other jobs hold the cores); ONNX Runtime with os.cpu_count() intra-op
threads; XLA's CPU client and OpenVINO use every core by default.

Needs requirements-bench.txt (torch, onnx, onnxruntime, openvino): `make bench`.

    python benchmarks/encode.py             # full run
    python benchmarks/encode.py --quick     # fewer rounds, smaller throughput batch
    python benchmarks/encode.py --peers torch          # PyTorch only
    python benchmarks/encode.py --peers ort --modes ort-int8   # koclip's default against ONNX
                                            # Runtime alone (PyTorch only exports the encoder)
    python benchmarks/encode.py --startup   # fresh process -> first embedding, with and
                                            # without the persistent compilation cache
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

JAX_MODES = ("fp32", "bf16", "int8")
KOCLIP_MODES = JAX_MODES + ("ort-fp32", "ort-int8")


# ---------------------------------------------------------------- timing

def race(sides: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Calls every side in turn, round by round, after one warm-up call each; in every round a
    side's timed call comes right after an untimed one of its own.

    The untimed call takes the place of the previous side's: runtimes whose worker threads spin
    on after a call (PyTorch's OpenMP, ONNX Runtime by default, OpenVINO) would otherwise hold
    the cores during the next side's timed call, a cost no user of one runtime pays.  Each side
    is timed as it runs in a loop of its own calls.

    Returns (wall seconds, process CPU seconds) per call, by side.  CPU seconds
    count the work a side did on all its threads; unlike wall time they barely
    move when other jobs take the cores away.
    """
    for f in sides.values():
        f()
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(rounds):
        for k, f in sides.items():
            f()
            c, t = time.process_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return wall, cpu


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"


# ---------------------------------------------------------------- models

def random_koclip(config, seed: int = 0):
    """A KoCLIP of `config` filled with N(0, 0.02) weights, He-scaled conv kernels,
    LayerNorm/BatchNorm scales 1 and biases 0."""
    from flax import nnx

    from koclip.formats.convert import assign, param_shapes
    from koclip.model import KoCLIP

    model = nnx.eval_shape(lambda: KoCLIP(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)

    def items():
        for name, (shape, dtype) in param_shapes(model).items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("scale", "var"):
                x = np.ones(shape, dtype)
            elif leaf in ("bias", "mean"):
                x = np.zeros(shape, dtype)
            elif name == "logit_scale":
                x = np.full(shape, config.logit_scale_init, dtype)
            elif len(shape) == 4:  # conv kernels (kh, kw, in, out): He scale keeps a CNN's activations alive
                x = (rng.standard_normal(shape, dtype=np.float32) * np.sqrt(2 / np.prod(shape[:3]))).astype(dtype)
            else:
                x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
            yield name, x

    assign(model, items(), "random")
    return model


class TorchEncoder:
    """A transformers tower + a projection + L2 normalisation, in fp32 or bf16."""

    def __init__(self, tower, pool, n_in: int, n_out: int, dtype):
        import torch

        self.tower = tower.eval().to(dtype)
        self.proj = torch.nn.Linear(n_in, n_out, bias=False).eval().to(dtype)
        self.pool = pool
        self.dtype = dtype

    def __call__(self, **inputs):
        import torch

        inputs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.inference_mode():
            z = self.proj(self.pool(self.tower, inputs))
            return torch.nn.functional.normalize(z.float(), dim=-1)


def _pooler_output(tower, inputs):
    return tower(**inputs).pooler_output


def _mean_pool(tower, inputs):
    hidden = tower(**inputs).last_hidden_state
    m = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def _efficientnet_pool(tower, inputs):
    return tower.extract_features(inputs["pixel_values"]).mean(dim=(2, 3))


def torch_towers(arch: str, config):
    """(image encoder factory, text encoder factory), each `factory(dtype) -> TorchEncoder`."""
    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, RobertaConfig, RobertaModel

    t, v, p = config.text, config.vision, config.projection_dim
    if v.kind == "clip":
        vcfg = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                                image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act)

        def image(dtype):
            return TorchEncoder(CLIPVisionModel(vcfg), _pooler_output, v.hidden_size, p, dtype)
    elif v.kind == "efficientnet":
        from efficientnet_lite_pytorch import EfficientNet

        def image(dtype):
            return TorchEncoder(EfficientNet.from_name(f"efficientnet-{v.variant}"), _efficientnet_pool,
                                v.output_dim, p, dtype)
    else:
        raise ValueError(f"{arch}: no PyTorch counterpart for vision kind {v.kind!r}")
    cls, tcls = (RobertaConfig, RobertaModel) if t.kind == "roberta" else (BertConfig, BertModel)
    tcfg = cls(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
               num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
               max_position_embeddings=t.max_position_embeddings, type_vocab_size=t.type_vocab_size,
               layer_norm_eps=t.layer_norm_eps, pad_token_id=t.pad_token_id, hidden_act=t.hidden_act)
    pool = _pooler_output if t.pooling == "pooler" else _mean_pool

    def text(dtype):
        return TorchEncoder(tcls(tcfg, add_pooling_layer=t.pooling == "pooler"), pool, t.hidden_size, p, dtype)

    return image, text


# ---------------------------------------------------------------- one architecture

def inputs(config, batch: int, text_len: int, seed: int = 0):
    """Random pixels (batch, S, S, 3) and token ids/mask (batch, text_len) within the vocabulary."""
    rng = np.random.default_rng(seed)
    s = config.vision.image_size
    pixels = rng.standard_normal((batch, s, s, 3), dtype=np.float32)
    ids = rng.integers(5, min(config.text.vocab_size, 30000), (batch, text_len)).astype(np.int32)
    ids[:, 0] = 0
    mask = np.ones_like(ids)
    return pixels, ids, mask


# ---------------------------------------------------------------- peers: ONNX Runtime, OpenVINO

class _Exportable:
    """A TorchEncoder (fp32) as a torch.nn.Module with positional inputs, for torch.onnx.export."""

    @staticmethod
    def build(enc, names):
        import torch

        class Module(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.tower, self.proj = enc.tower, enc.proj

            def forward(self, *xs):
                z = self.proj(enc.pool(self.tower, dict(zip(names, xs))))
                return torch.nn.functional.normalize(z.float(), dim=-1)

        return Module().eval()


class Peers:
    """ONNX Runtime (fp32, and int8 by dynamic quantisation) and OpenVINO (its default precision)
    serving the same PyTorch fp32 encoder, exported once to ONNX with a dynamic batch axis.

    `sides(feeds, batch)` -> {name: call}; feeds are the numpy inputs by ONNX input name.
    """

    def __init__(self, kind: str, enc, example: dict, directory: Path, which: set[str]):
        import torch

        self.names = list(example)
        self.fp32 = directory / f"{kind}.onnx"
        module = _Exportable.build(enc, self.names)
        args = tuple(torch.from_numpy(v) for v in example.values())
        with torch.inference_mode():
            torch.onnx.export(module, args, str(self.fp32), input_names=self.names, output_names=["z"],
                              dynamic_axes={n: {0: "batch"} for n in [*self.names, "z"]}, opset_version=17,
                              dynamo=False)
        self.sessions, self.ov, self.notes = {}, {}, []
        if which & {"ort", "onnxruntime"}:
            import onnxruntime as ort

            int8 = directory / f"{kind}.int8.onnx"
            _quiet_quantize_dynamic(self.fp32, int8)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = os.cpu_count()
            for name, path in (("ort fp32", self.fp32), ("ort int8", int8)):
                self.sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self.notes.append(f"onnxruntime {ort.__version__}: {os.cpu_count()} intra-op threads, "
                              "int8 = quantize_dynamic(weight_type=QInt8)")
        if which & {"openvino", "ov"}:
            import openvino as ov

            self.core = ov.Core()
            self.ov_model = ov.convert_model(str(self.fp32))
            self.notes.append(f"openvino {ov.__version__}")

    def sides(self, feeds: dict, batch: int) -> dict:
        out = {}
        for name, sess in self.sessions.items():
            out[name] = (lambda sess: lambda: sess.run(None, feeds)[0])(sess)
        if hasattr(self, "ov_model"):
            if batch not in self.ov:
                m = self.ov_model.clone()
                m.reshape({n: list(feeds[n].shape) for n in self.names})
                compiled = self.core.compile_model(m, "CPU")
                self.ov[batch] = (compiled, compiled.create_infer_request())
                hint = compiled.get_property("INFERENCE_PRECISION_HINT")
                note = f"openvino inference precision (its default here): {hint}"
                if note not in self.notes:
                    self.notes.append(note)
            compiled, req = self.ov[batch]
            out["openvino"] = (lambda req: lambda: next(iter(req.infer(feeds).values())))(req)
        return out


def _quiet_quantize_dynamic(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic int8 quantisation (int8 weights per tensor, activations quantised per
    call), without its advice to pre-process first on the root logger."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def peer_precision(name: str) -> tuple[str, str]:
    """(runtime, precision) of a side, the key of its matmul peak."""
    if name.startswith("koclip ort-"):
        return "ONNX Runtime", name.split("-")[-1]
    if name.startswith("koclip"):
        return "XLA", name.split()[1]
    if name.startswith("torch"):
        return "PyTorch", name.split()[1]
    if name.startswith("ort"):
        return "ONNX Runtime", name.split()[1]
    return "OpenVINO", "default"


# ---------------------------------------------------------------- matmul peaks

MATMUL = (1600, 768, 3072)  # M, K, N: ViT-B/32's fc1 at batch 32 (32 x 50 tokens)


def _best_seconds(f, rounds: int) -> float:
    f()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peaks(which: set[str], rounds: int = 10, directory: Path | None = None) -> dict:
    """(runtime, precision) -> GFLOP/s (2 M N K per product) of one MATMUL-shaped product, weights
    held by the runtime as a model's are, activations fed each call."""
    import jax
    import jax.numpy as jnp

    m, k, n = MATMUL
    flop = 2 * m * k * n
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02)
    out: dict = {}
    dims = (((1,), (0,)), ((), ()))
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    for prec, (a, b, acc) in {"fp32": (xj, wj, jnp.float32),
                              "bf16": (xj.astype(jnp.bfloat16), wj.astype(jnp.bfloat16), jnp.float32),
                              "int8": (jnp.asarray(np.clip(np.rint(x * 30), -127, 127).astype(np.int8)),
                                       jnp.asarray(np.clip(np.rint(w * 3000), -127, 127).astype(np.int8)),
                                       jnp.int32)}.items():
        f = jax.jit(lambda a, b, acc=acc: jax.lax.dot_general(a, b, dims, preferred_element_type=acc))
        out["XLA", prec] = flop / _best_seconds(lambda: f(a, b).block_until_ready(), rounds) / 1e9
    if "torch" in which:
        import torch

        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        with torch.inference_mode():
            out["PyTorch", "fp32"] = flop / _best_seconds(lambda: tx @ tw, rounds) / 1e9
            bx, bw = tx.bfloat16(), tw.bfloat16()
            out["PyTorch", "bf16"] = flop / _best_seconds(lambda: bx @ bw, rounds) / 1e9
            try:
                ix, iw = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))  # int8 from above
                out["PyTorch", "int8"] = flop / _best_seconds(lambda: torch._int_mm(ix, iw), rounds) / 1e9
            except (RuntimeError, AttributeError, NotImplementedError):
                pass
    if which & {"ort", "openvino"} and directory is not None:
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                                  [numpy_helper.from_array(w, "w")])
        path = directory / "matmul.onnx"
        # IR version 9: what onnxruntime 1.31 reads (onnx 1.23 writes 14 by default).
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
        if "ort" in which:
            import onnxruntime as ort

            int8 = directory / "matmul.int8.onnx"
            _quiet_quantize_dynamic(path, int8)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = os.cpu_count()
            for prec, pth in (("fp32", path), ("int8", int8)):
                sess = ort.InferenceSession(str(pth), opts, providers=["CPUExecutionProvider"])
                out["ONNX Runtime", prec] = flop / _best_seconds(lambda: sess.run(None, {"x": x}), rounds) / 1e9
        if "openvino" in which:
            import openvino as ov

            core = ov.Core()
            for prec, config in (("default", {}), ("fp32", {"INFERENCE_PRECISION_HINT": "f32"})):
                req = core.compile_model(ov.convert_model(str(path)), "CPU", config).create_infer_request()
                out["OpenVINO", prec] = flop / _best_seconds(lambda: req.infer({"x": x}), rounds) / 1e9
    return out


def print_peaks(peaks: dict, when: str = "measured now") -> None:
    m, k, n = MATMUL
    print(f"\nmatmul peak ({when}): {m}x{k} @ {k}x{n} (2MNK = {2 * m * k * n / 1e9:.2f} GFLOP), best of 10, "
          "GFLOP/s (int8: GOP/s, int32 accumulation; ONNX Runtime's int8 includes quantising the activations)")
    for (runtime, prec), v in peaks.items():
        print(f"  {runtime:13s} {prec:8s} {v:8.1f}")


# ---------------------------------------------------------------- one architecture

def flop_per_item(model, kind: str, text_len: int) -> float:
    """FLOP (2 per multiply-add, XLA's cost analysis) of one image or one text of `model` (fp32)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    s = model.config.vision.image_size
    if kind == "image":
        f = jax.jit(lambda st, px: nnx.merge(graphdef, st).image_features(px))
        lowered = f.lower(state, jax.ShapeDtypeStruct((1, s, s, 3), np.float32))
    else:
        f = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st).text_features(ids, mask))
        spec = jax.ShapeDtypeStruct((1, text_len), np.int32)
        lowered = f.lower(state, spec, spec)
    return float(lowered.cost_analysis()["flops"])


def measure(arch: str, model, args, peaks: dict, workdir: Path) -> list[dict]:
    """Rows of the result table for one architecture; `model` is its fp32 KoCLIP."""
    import torch

    from koclip import autotune, onnx_runtime
    from koclip.quantize import quantize

    config = model.config
    jax_models = {m: (model if m == "fp32" else quantize(model, m)) for m in args.modes if m in JAX_MODES}
    # koclip's default: precision="auto", measured now for this model on this machine (not read back).
    plan = autotune.measure(model)
    print(f"\n{arch}: precision='auto' measured: " + "\n  ".join(plan.details()), flush=True)
    for tower in autotune.TOWERS:
        mode = plan.mode(tower)
        if mode not in jax_models and mode in JAX_MODES:
            jax_models[mode] = quantize(model, mode)
    image_factory, text_factory = torch_towers(arch, config)
    rows = []
    for kind, factory in (("image", image_factory), ("text", text_factory)):
        default = f"koclip {plan.mode(kind)}"
        # koclip's ONNX Runtime modes for this tower only (a session holds its own copy of the weights).
        ort_modes = [m for m in dict.fromkeys([*args.modes, plan.mode(kind)]) if m in autotune.ORT_CANDIDATES]
        ort_models = {}
        if ort_modes and onnx_runtime.available() and onnx_runtime.exportable(config, kind):
            ort_models = {m: onnx_runtime.attach(quantize(model, "fp32"), kind, m) for m in ort_modes}
        # Without torch among the peers, only its fp32 encoder is built: the one the others export.
        precisions = (("fp32", torch.float32),) + ((("bf16", torch.bfloat16),) if args.race_torch else ())
        torch_models = {f"torch {n}": factory(d) for n, d in precisions}
        s = config.vision.image_size
        example = ({"pixel_values": np.zeros((1, 3, s, s), np.float32)} if kind == "image" else
                   {"input_ids": np.zeros((1, args.text_len), np.int64),
                    "attention_mask": np.ones((1, args.text_len), np.int64)})
        peers = None
        if args.peer_set - {"torch"}:
            try:
                peers = Peers(kind, torch_models["torch fp32"], example, workdir, args.peer_set)
                for note in peers.notes:
                    print(f"  {note}")
            except Exception as e:  # noqa: BLE001 - a peer that cannot export or load is reported, not fatal
                print(f"  ONNX Runtime / OpenVINO peers unavailable for {arch} {kind}: {type(e).__name__}: {e}")
        flop = flop_per_item(model, kind, args.text_len)
        for label, batch, rounds in ((f"{kind} throughput", args.batch, args.rounds),
                                     (f"{kind} latency", 1, args.latency_rounds)):
            pixels, ids, mask = inputs(config, batch, args.text_len)
            sides = {}
            for name, m in {**jax_models, **ort_models}.items():
                if kind == "image":
                    call = (lambda m: lambda: np.asarray(m.encode_image(pixels)))(m)
                else:
                    call = (lambda m: lambda: np.asarray(m.encode_text(ids, mask)))(m)
                sides[f"koclip {name}"] = call
            tp = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
            ti, tm = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
            for name, enc in (torch_models.items() if args.race_torch else ()):
                if kind == "image":
                    sides[name] = (lambda enc: lambda: enc(pixel_values=tp))(enc)
                else:
                    sides[name] = (lambda enc: lambda: enc(input_ids=ti, attention_mask=tm))(enc)
                # PyTorch's per-op thread hand-offs stall when other jobs hold the cores, so one
                # thread can beat two on a shared machine: race both and compare with the faster.
                sides[f"{name} 1 thread"] = one_thread(sides[name])
            if peers is not None:
                feeds = ({"pixel_values": tp.numpy()} if kind == "image" else
                         {"input_ids": ti.numpy(), "attention_mask": tm.numpy()})
                known = len(peers.notes)
                sides.update(peers.sides(feeds, batch))
                for note in peers.notes[known:]:
                    print(f"  {note}")
            times, cpu = race(sides, rounds)
            outputs = {name: np.asarray(f()) for name, f in sides.items() if not name.endswith("1 thread")}
            # Quality beside speed: each koclip precision against koclip fp32, each peer against the
            # PyTorch fp32 encoder it was exported from (the two sides have different random weights).
            agree = {}
            for n, o in outputs.items():
                ref = "koclip fp32" if n.startswith("koclip") else "torch fp32"
                if n != ref and ref in outputs and n != "torch bf16":
                    agree[n] = float(np.min(np.sum(outputs[ref] * o, -1)))
            rows.append(dict(arch=arch, kind=kind, label=label, batch=batch, times=times, cpu=cpu, agree=agree,
                             load=os.getloadavg()[0], default=default, flop=flop, peaks=peaks,
                             plan=plan.mode(kind)))
            print_row(rows[-1], flush=True)
        del torch_models, peers, ort_models
        gc.collect()
    return rows


def one_thread(f):
    """`f` run with torch.set_num_threads(1), restoring the thread count afterwards."""
    import torch

    def call():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return f()
        finally:
            torch.set_num_threads(n)

    return call


def best_peer(times: dict) -> tuple[str, float]:
    """(name, best seconds) of the fastest side that is not koclip."""
    name = min((n for n in times if not n.startswith("koclip")), key=lambda n: min(times[n]))
    return name, min(times[name])


def print_row(row: dict, flush: bool = False) -> None:
    times, cpu, batch = row["times"], row["cpu"], row["batch"]
    latency = batch == 1
    unit = "ms" if latency else ("img/s" if row["label"].startswith("image") else "texts/s")
    peer, peer_t = best_peer(times)
    peer_c = min(cpu[peer])

    def value(t):
        return 1e3 * t if latency else batch / t

    print(f"\n{row['arch']}: {row['label']} (batch {batch}, {len(next(iter(times.values())))} rounds, "
          f"load {row['load']:.1f}; {row['flop'] / 1e9:.2f} GFLOP per item)")
    print(f"  {'side':21s} {'best ' + unit:>13s} {'median':>9s} {'cpu-s/call':>11s} "
          f"{'vs best peer':>13s} {'by cpu-s':>9s} {'GFLOP/s':>8s} {'of peak*':>8s}")
    for name, ts in times.items():
        best, med, c = min(ts), statistics.median(ts), min(cpu[name])
        rate = row["flop"] * batch / best / 1e9
        peak = row["peaks"].get(peer_precision(name))
        mark = " (default)" if name == row["default"] else ""
        print(f"  {name:21s} {value(best):13.1f} {value(med):9.1f} {c:11.3f} {peer_t / best:12.2f}x "
              f"{peer_c / c:8.2f}x {rate:8.1f} {f'{100 * rate / peak:7.0f}%' if peak else '      -'}{mark}")
    print(f"  best peer: {peer}; *of the matmul peak measured at the start in that runtime and precision")
    if row["agree"]:
        print("  min cosine (koclip sides to koclip fp32, peers to torch fp32): "
              + ", ".join(f"{k} {v:.5f}" for k, v in row["agree"].items()))
    if flush:
        sys.stdout.flush()


def summary(rows: list[dict], peaks: dict) -> None:
    print("\nShare of the matmul peak (the better of the two measurements) that each tower's koclip default and "
          "best peer reach on the model:")
    for row in rows:
        t = row["times"]
        peer, peer_t = best_peer(t)
        shares = []
        for name, secs in ((row["default"], min(t[row["default"]])), (peer, peer_t)):
            rate = row["flop"] * row["batch"] / secs / 1e9
            peak = peaks.get(peer_precision(name))
            shares.append(f"{name} {rate:.0f} GFLOP/s" + (f" = {100 * rate / peak:.0f}%" if peak else ""))
        print(f"  {row['arch']:12s} {row['kind']:5s} batch {row['batch']:2d}: " + ", ".join(shares))
    print("\nSummary: koclip's default (precision='auto' as measured above) against the best peer "
          "(PyTorch fp32/bf16 with 1 or all threads, ONNX Runtime fp32/int8, OpenVINO), best rounds, "
          "peer time / koclip time (>1: koclip is faster), by wall time and [by CPU seconds]")
    towers: dict = {}
    for row in rows:
        towers.setdefault((row["arch"], row["kind"]), []).append(row)
    for (arch, kind), rs in towers.items():
        parts = []
        for row in rs:
            t, c = row["times"], row["cpu"]
            peer, peer_t = best_peer(t)
            mine = min(t[row["default"]])
            parts.append(f"batch {row['batch']} {peer_t / mine:.2f}x vs {peer} "
                         f"[{min(c[peer]) / min(c[row['default']]):.2f}x]")
        print(f"  {arch} {kind} tower, koclip {rs[0]['plan']}: " + "; ".join(parts))


def mini_architecture():
    """koclip-mini's architecture (multilingual-e5-small + EfficientNet-Lite0, affine heads)."""
    from koclip.config import ModelConfig, TextConfig, VisionConfig
    from koclip.mini.e5 import E5_CONFIG

    return ModelConfig(text=TextConfig(kind="bert", pooling="mean", **E5_CONFIG),
                       vision=VisionConfig(kind="efficientnet", image_size=224, patch_size=1, variant="lite0"),
                       head="affine", tokenizer="e5")


def mini_model():
    """(label, fp32 model): koclip-mini itself, or its architecture with random weights when it
    does not load yet (speed does not depend on the weights; quality numbers then mean little)."""
    import koclip

    try:
        model, _ = koclip.load("koclip-mini")
        return "koclip-mini", model
    except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"; say why and go on
        print(f"\nkoclip.load('koclip-mini') failed ({type(e).__name__}: {e});\n"
              "measuring koclip-mini's architecture with random weights instead", flush=True)
    return "mini (random)", random_koclip(mini_architecture())


# ---------------------------------------------------------------- start-up time

CHILD = r"""
import json, sys, time
t0 = time.time()
import koclip, numpy as np
from koclip import compile_cache
ckpt, cache, precision = sys.argv[1], sys.argv[2], sys.argv[3]
if cache:
    compile_cache.enable(cache)
t_import = time.time()
model, processor = koclip.load(ckpt, precision=precision)
t_load = time.time()
s = model.config.vision.image_size
np.asarray(model.encode_image(np.zeros((1, s, s, 3), np.float32)))
t_image = time.time()
batch = processor(text=["이것은 고양이 이다"])
np.asarray(model.encode_text(batch["input_ids"], batch["attention_mask"]))
t_text = time.time()
print(json.dumps(dict(t0=t0, imported=t_import, loaded=t_load, image=t_image, text=t_text)))
"""


def write_checkpoint(directory: Path, config) -> Path:
    """A random-weight koclip checkpoint of `config` with a tiny word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    import koclip

    model = random_koclip(config)
    koclip.save(model, directory)
    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", "이것은", "고양이", "이다"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "unk_token": "<unk>",
         "bos_token": "<s>", "eos_token": "</s>"}))
    return directory


def startup(args) -> None:
    """Fresh processes: import -> load -> first image embedding -> first text embedding."""
    from koclip.config import KOCLIP_BASE

    with tempfile.TemporaryDirectory(prefix="koclip-startup-") as tmp:
        tmp = Path(tmp)
        if args.startup_model == "base":
            print("writing a random koclip-base checkpoint ...", flush=True)
            source = str(write_checkpoint(tmp / "ckpt", KOCLIP_BASE))
        else:
            source = args.startup_model
        cache = tmp / "jax-cache"
        print(f"\nstart-up of {args.startup_model} (precision={args.precision}), seconds since process start; "
              f"{load_note()}")
        print(f"  {'run':22s} {'import':>7s} {'load':>7s} {'1st image':>10s} {'1st text':>9s} {'total':>7s}")
        for label, cache_dir in (("no persistent cache", ""), ("cache, cold (empty)", str(cache)),
                                 ("cache, warm", str(cache)), ("cache, warm again", str(cache))):
            t_spawn = time.time()
            out = subprocess.run([sys.executable, "-c", CHILD, source, cache_dir, args.precision],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"  {label}: child failed:\n{out.stderr[-2000:]}")
                return
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {label:22s} {r['imported'] - t_spawn:7.1f} {r['loaded'] - t_spawn:7.1f} "
                  f"{r['image'] - t_spawn:10.1f} {r['text'] - t_spawn:9.1f} {r['text'] - t_spawn:7.1f}",
                  flush=True)
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        print(f"  cache: {sum(1 for _ in cache.rglob('*'))} files, {size / 2**20:.1f} MiB; {load_note()}")


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, batch 8: a smoke run")
    ap.add_argument("--models", default="base,mini", help="comma-separated: base, mini")
    ap.add_argument("--modes", default=",".join(KOCLIP_MODES), help="koclip precisions to race")
    ap.add_argument("--batch", type=int, default=32, help="batch size for throughput")
    ap.add_argument("--rounds", type=int, default=5, help="rounds at the throughput batch")
    ap.add_argument("--latency-rounds", type=int, default=20, help="rounds at batch 1")
    ap.add_argument("--text-len", type=int, default=16, help="tokens per text")
    ap.add_argument("--startup", action="store_true", help="measure process start -> first embedding instead")
    ap.add_argument("--startup-model", default="base",
                    help="'base' (a random koclip-base checkpoint) or a name/dir for koclip.load")
    ap.add_argument("--precision", default="auto", help="precision for --startup")
    ap.add_argument("--peers", default="torch,ort,openvino",
                    help="comma-separated peers to race: torch, ort (ONNX Runtime fp32 + int8), openvino; "
                         "without torch, PyTorch only exports the encoder the others run (no spinning "
                         "OpenMP threads of its own in the race)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.latency_rounds, args.batch = 2, 5, 8
    args.modes = tuple(args.modes.split(","))
    args.race_torch = "torch" in args.peers.split(",")
    args.peer_set = set(args.peers.split(",")) | {"torch"}

    import jax
    import torch

    torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads, XLA with its default one worker per core; {load_note()}")
    if args.startup:
        startup(args)
        return
    from koclip import autotune
    from koclip.config import KOCLIP_BASE
    from koclip.quantize import cpu_flags

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    print(f"CPU: {autotune.cpu_model()}, {os.cpu_count()} cores; flags: {' '.join(flags)}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="koclip-encode-") as tmp:
        peaks = matmul_peaks(args.peer_set, directory=Path(tmp))
        print_peaks(peaks)
        for arch in args.models.split(","):
            if arch == "base":
                label, model = "koclip-base", random_koclip(KOCLIP_BASE)
            elif arch == "mini":
                label, model = mini_model()
            else:
                raise SystemExit(f"unknown --models entry {arch!r}; valid: base, mini")
            rows += measure(label, model, args, peaks, Path(tmp))
            del model
            gc.collect()
        # The machine is shared: measure the peaks again and keep the better of the two.
        again = matmul_peaks(args.peer_set, directory=Path(tmp))
    best = {k: max(v, again.get(k, 0.0)) for k, v in peaks.items()}
    print_peaks(best, "the better of two measurements, at the start and at the end")
    summary(rows, best)
    print(f"\nCPU: {autotune.cpu_model()}; {load_note()}")


if __name__ == "__main__":
    main()
