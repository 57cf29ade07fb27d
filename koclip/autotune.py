"""`precision="auto"` by measurement: which precision each tower runs fastest in on this machine,
among those that keep the quality gates, decided once and remembered.

    plan = autotune.plan_for(model)    # a float32 model: the remembered decision, or measured now
    autotune.apply(model, plan)        # quantises each tower in place as decided
    plan.summary()                     # "image bf16, text bf16 (measured here in 9.1 s)"

Measuring, per tower (image, text), over the candidates fp32, bf16 and int8 (`koclip.quantize`), and
where onnxruntime is installed and the tower can be exported, ort-fp32 and ort-int8 (the tower exported
to ONNX and run by ONNX Runtime: `koclip.onnx_runtime`):

  speed    a copy of the model cut to `TIMING_LAYERS` transformer layers and to the first
           `TIMING_VOCAB` rows of its word-embedding table (sharing the float32 arrays;
           EfficientNet cannot be cut and runs whole) is quantised in each candidate and
           timed through `encode_image` / `encode_text`, the path the app serves, at batch 1 and
           at `THROUGHPUT_BATCH` (the model's image size; `TEXT_LENGTH` tokens, or the fixed
           length of a model that pads every text to it), the candidates
           taking turns round by round; a candidate's score is the geometric mean of its two best
           times relative to fp32's.
  quality  from the fastest candidate down, the first to score at least `MIN_GAIN` better than
           fp32 and to keep the quality gates on the whole model wins; fp32 is the fallback.
           (A tower that cannot be cut costs as much to time as to check, so there the gates
           come first and only the candidates that keep them are timed.)  Towers whose layers
           hold under `MIN_TOWER_WEIGHTS` weights stay fp32 untimed.
           The gates, as tests/test_quantize.py defines them: every embedding keeps cosine >=
           `COSINE_GATE` to float32, and zero-shot top-1 agrees with float32's on >= `AGREEMENT_GATE`
           of the images whose float32 top-2 margin is at least `TIE`.  The images are the
           gallery that ships with koclip (`koclip.data.gallery()`, the model's own preprocessing);
           the texts are `N_LABELS` fixed synthetic token sequences of 3 to `TEXT_LENGTH` tokens
           (ids drawn from the vocabulary: no tokenizer is needed).  A JAX candidate runs as
           `koclip.quantize.simulate` builds it: the same arithmetic from the float32 kernels, so
           checking costs no memory beyond the float32 model that `load` holds anyway.  ort-int8
           is checked the same way, as int8: it is koclip's int8 arithmetic (the same weight codes,
           activations quantised per row the same way, an exact integer product), and differs from
           it in the rounding of the float32 operations around the products.  On real weights
           that difference grows through the layers as int8's own rounding noise does (a row comes
           out identical or about as far from int8 as int8 is from float32), so the check is of the
           same noise, not of the same numbers: tests/test_onnx_runtime.py bounds the two gate
           figures' gap on koclip-mini's real text tower.  A whole-tower
           session is built only once it has won, from the int8 codes (see `apply`).  An ort-fp32
           candidate (only when asked for: AUTO_ORT) runs in its own session of the whole tower.
  both     the two winners together must keep the agreement gate too (else the smaller gain
           falls back to fp32).

The decision is written as JSON (atomically) to `cache_root()/precision/<key>.json`, keyed by the
model (config and sampled weight digest), the CPU (model name, a digest of its flags, core count),
jax's version and backend, onnxruntime's version (or none), and `VERSION` of this procedure; a later
load reads it back without timing anything.  `KOCLIP_PRECISION=fp32|bf16|int8|ort-fp32|ort-int8`
overrides the measurement for both towers (`auto` or unset: measure; an ort mode on a tower that
cannot be exported runs that tower in JAX at the same precision).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from koclip import compile_cache, data, onnx_runtime
from koclip.compile_cache import model_jit
from koclip.errors import ConfigError
from koclip.files import atomic_write_text, cache_root
from koclip.fingerprint import model_digest
from koclip.images import preprocess
from koclip.model import KoCLIP
from koclip.processing import image_spec_for
from koclip.quantize import cpu_flags, quantize, replaceable_weights, simulate, trim_heap
from koclip.towers.layers import l2_normalize

log = logging.getLogger(__name__)

ENV = "KOCLIP_PRECISION"
JAX_CANDIDATES = ("fp32", "bf16", "int8")
ORT_CANDIDATES = onnx_runtime.MODES  # ("ort-fp32", "ort-int8"), where onnxruntime is installed
CANDIDATES = JAX_CANDIDATES + ORT_CANDIDATES
# What `measure` times of them: ort-int8 only.  ort-fp32 beat XLA's fp32 by under 10% where measured
# and holds a second float32 copy of its tower (the JAX one stays for traces): it is there to be asked for.
AUTO_ORT = ("ort-int8",)
# An ort mode forced on a tower that cannot be exported: the JAX mode of the same precision.
JAX_EQUIVALENT = {"ort-fp32": "fp32", "ort-int8": "int8"}
TOWERS = ("image", "text")
# Layer paths of each tower, its head included.
TOWER_PATHS = {"image": r"^(vision_model|visual_projection)(/|$)", "text": r"^(text_model|text_projection)(/|$)"}
_OTHER = {"image": "text", "text": "image"}

COSINE_GATE = 0.995
AGREEMENT_GATE = 0.99
TIE = 1e-3
# Towers whose replaceable layers hold fewer weights stay fp32 untimed: too small for precision to matter
# (the test checkpoints' towers; koclip-mini's smallest, EfficientNet-Lite0, has 5.1M).
MIN_TOWER_WEIGHTS = 1_000_000
# A lower precision must be this much faster than fp32 (score <= 1 - MIN_GAIN) to be worth its rounding.
MIN_GAIN = 0.05
TIMING_LAYERS = 2
# Rows of the word-embedding table the timing copy keeps: a text looks up its few rows at the same cost
# in any table, and the ONNX Runtime candidates' sessions each hold a copy of it (koclip-base's whole
# table is 131 MB, two layers of roberta-large 100 MB in float32).
TIMING_VOCAB = 1024
THROUGHPUT_BATCH = 8
TEXT_LENGTH = 16
N_LABELS = 16
ROUNDS = {1: 7, THROUGHPUT_BATCH: 3}
# Bump when the measurement or the candidates change: older decisions are then measured again.
VERSION = 4  # 2: ONNX Runtime candidates; 3: ort-int8 quantises with QuantizeLinear, rescales in the matmul;
# 4: blocked QuantizeLinear, a first-token-pooled last layer computed for that token alone

# timer(tower, mode, batch) -> seconds per call: replaces the timing (tests inject one).
Timer = Callable[[str, str, int], float]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The precision of each tower, and how it was decided.

    image, text: "fp32", "bf16", "int8", "ort-fp32" or "ort-int8".  source: "measured" (here, now), "cached" (read from
    `path`), "KOCLIP_PRECISION" or "requested" (`load(precision=...)`).  seconds: what measuring
    cost.  timings: tower -> mode -> {batch: best seconds per call on the timing copy}.
    quality: tower -> mode -> {"cosine": worst cosine to fp32, "agreement": top-1 agreement}.
    """

    image: str
    text: str
    source: str
    seconds: float = 0.0
    timings: dict = dataclasses.field(default_factory=dict)
    quality: dict = dataclasses.field(default_factory=dict)
    path: str = ""

    def mode(self, tower: str) -> str:
        return getattr(self, tower)

    def summary(self) -> str:
        """One line, e.g. "image bf16, text int8 (measured here in 9.1 s)"."""
        modes = self.image if self.image == self.text else f"image {self.image}, text {self.text}"
        how = {"measured": f"measured here in {self.seconds:.1f} s", "cached": "measured earlier on this CPU"}
        how = how.get(self.source, self.source)
        if self.source in ("measured", "cached") and not self.timings:
            how = "towers too small for precision to matter"
        return f"{modes} ({how})"

    def details(self) -> list[str]:
        """Lines for `koclip info`: per tower the choice, each candidate's times (ms per call on the
        timing copy, and its score: geometric mean of the two times relative to fp32) and quality."""
        lines = [self.summary()]
        for tower in TOWERS:
            times = self.timings.get(tower, {})
            lines.append(f"{tower}: {self.mode(tower)}")
            for mode in CANDIDATES:
                parts = []
                if mode in times:
                    parts.append(", ".join(f"batch {b} {1e3 * s:.1f} ms" for b, s in times[mode].items()))
                    score = _score(times, mode)
                    if score is not None:
                        parts.append(f"score {score:.2f}")
                q = self.quality.get(tower, {}).get(mode)
                if q and "cosine" in q:
                    parts.append(f"cosine >= {q['cosine']:.5f}, agreement {q['agreement']:.3f}"
                                 + ("" if q.get("passed", True) else " (fails the gates)"))
                elif q:
                    parts.append(q.get("note", "fails the gates"))
                if parts:
                    lines.append(f"  {mode:8s} " + "; ".join(parts))
        if self.path:
            lines.append(f"decision file: {self.path}")
        return lines


def plan_for(model: KoCLIP, *, timer: Timer | None = None, use_cache: bool = True) -> Plan:
    """The precision plan `precision="auto"` applies to `model` (float32, as loaded).

    KOCLIP_PRECISION set to fp32/bf16/int8 decides; else the decision remembered for this model
    on this machine; else `measure(model, timer=timer)`, remembered for next time (`use_cache=False`:
    neither read nor written).
    """
    forced = forced_mode()
    if forced is not None:
        return Plan(*(runnable(model, t, forced) for t in TOWERS), ENV)
    key = decision_key(model)
    path = decision_path(model, key)
    if use_cache:
        cached = read_plan(path)
        if cached is not None:
            return cached
    log.info("choosing each tower's precision by measurement (once for this model on this machine)")
    plan = measure(model, timer=timer)
    log.info("precision: %s", plan.summary())
    if use_cache:
        plan = dataclasses.replace(plan, path=str(path))
        try:
            write_plan(path, plan, key)
        except OSError as e:
            log.warning("could not remember the precision decision in %s: %s", path, e)
    return plan


def forced_mode() -> str | None:
    """KOCLIP_PRECISION's mode, None when it is unset, empty or "auto"."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    value = {"float32": "fp32", "bfloat16": "bf16"}.get(value, value)
    if value not in CANDIDATES:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r} is not a precision; valid: {', '.join(CANDIDATES)}, auto")
    if value in ORT_CANDIDATES and not onnx_runtime.available():
        raise ConfigError(f"{ENV}={os.environ[ENV]!r} needs onnxruntime and onnx: pip install 'koclip[onnx]'")
    return value


def runnable(model: KoCLIP, tower: str, mode: str) -> str:
    """`mode` for `tower` of `model`, or for an ort mode on a tower that cannot be exported, the JAX
    mode of the same precision (logged)."""
    if mode in ORT_CANDIDATES and not onnx_runtime.exportable(model.config, tower):
        log.warning("%s: the %s tower cannot be exported to ONNX; it runs in JAX %s", mode, tower,
                    JAX_EQUIVALENT[mode])
        return JAX_EQUIVALENT[mode]
    return mode


def candidates(model: KoCLIP, tower: str) -> list[str]:
    """The modes `measure` times for `tower`: fp32, bf16, int8, and ort-int8 where onnxruntime is
    installed and the tower can be exported (AUTO_ORT)."""
    ort = onnx_runtime.available() and onnx_runtime.exportable(model.config, tower)
    return list(JAX_CANDIDATES + (AUTO_ORT if ort else ()))


def apply(model: KoCLIP, plan: Plan) -> KoCLIP:
    """Runs `model`'s towers as `plan` says: quantises a JAX tower in place, or serves an ort one
    from an ONNX Runtime session (`koclip.onnx_runtime.attach`).  The JAX tower stays for traces
    and image_features / text_features: in int8 beside an ort-int8 session (its codes are the
    session's), in float32 beside ort-fp32.  Returns `model`."""
    ort = {t: plan.mode(t) for t in TOWERS if plan.mode(t) in ORT_CANDIDATES}
    # A tower served in ort-int8 is quantised in place first: its JAX copy then holds the int8 codes
    # that the session is built from (the same codes, see onnx_runtime), not a second float32 copy.
    # ort-fp32 reads the float32 weights, which stay.
    for tower in TOWERS:
        if plan.mode(tower) not in ("fp32", "ort-fp32"):
            quantize(model, JAX_EQUIVALENT.get(plan.mode(tower), plan.mode(tower)),
                     exclude=TOWER_PATHS[_OTHER[tower]], copy=False)
    for tower, mode in ort.items():
        onnx_runtime.attach(model, tower, mode)
    return model


# ---------------------------------------------------------------- the measurement

def measure(model: KoCLIP, *, timer: Timer | None = None) -> Plan:
    """Times the candidates per tower and checks the fastest against the quality gates (see the
    module's docstring).  `model` is float32 and is not changed."""
    t0 = time.perf_counter()
    gates = _Gates(model)
    timings: dict = {}
    choice = {t: "fp32" for t in TOWERS}
    short = None
    for tower in TOWERS:
        modes = candidates(model, tower)
        if timer is None:
            if replaceable_weights(model, exclude=TOWER_PATHS[_OTHER[tower]]) < MIN_TOWER_WEIGHTS:
                continue
            if not _cut(model.config, tower):
                # Timing the whole tower costs about what checking it does: check first, time what passes.
                modes = ["fp32"] + [m for m in modes if m != "fp32" and gates.check(tower, m)]
                if modes == ["fp32"]:
                    continue
            short = short or timing_copy(model)
            timings[tower] = time_tower(short, tower, modes)
        else:
            timings[tower] = {m: {b: float(timer(tower, m, b)) for b in ROUNDS} for m in modes}
        for mode in sorted(modes, key=lambda m: _score(timings[tower], m)):
            if mode == "fp32" or _score(timings[tower], mode) > 1 - MIN_GAIN:
                break
            if gates.check(tower, mode):
                choice[tower] = mode
                break
        if timer is None:  # it compiled the candidates (an injected timer compiles none)
            _release_compiled()
    # Each tower kept the gates against the other's float32 embeddings; check the pair as well.
    if "fp32" not in choice.values() and not gates.pair(choice["image"], choice["text"]):
        weaker = max(TOWERS, key=lambda t: _score(timings[t], choice[t]))
        choice[weaker] = "fp32"
    return Plan(choice["image"], choice["text"], "measured", time.perf_counter() - t0, timings, gates.quality)


def _release_compiled() -> None:
    """Frees what a tower's measurement compiled (its candidates on the timing copy, the gates' programs
    on the whole model; none is used again) before the next tower's: the first load of koclip-base
    peaked at 1.32x its checkpoint instead of 1.40x (benchmarks/load_memory.py, Zen 4).  Other
    programs of the process compile again."""
    compile_cache.clear()
    trim_heap()


def _score(times: dict, mode: str) -> float | None:
    """Geometric mean over batches of mode's time relative to fp32's (None without fp32)."""
    if mode not in times or "fp32" not in times:
        return None
    ratios = [times[mode][b] / times["fp32"][b] for b in times[mode] if b in times["fp32"]]
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None


def _cut(config, tower: str) -> bool:
    """Whether `timing_copy` makes `tower` smaller (transformers deeper than TIMING_LAYERS)."""
    cfg = config.text if tower == "text" else config.vision
    return cfg.kind != "efficientnet" and cfg.num_hidden_layers > TIMING_LAYERS


def text_shape(config) -> tuple[int, bool]:
    """(tokens per text, whether every position is a token) as the processor serves `config`: a
    length bucket (TEXT_LENGTH) with padding, or the fixed max_length of SigLIP-style models."""
    if getattr(config, "text_padding", "bucket") == "max_length":
        return config.max_length, True
    return TEXT_LENGTH, False


def time_tower(short: KoCLIP, tower: str, modes=CANDIDATES, rounds: dict[int, int] = ROUNDS) -> dict:
    """mode -> {batch: best seconds per call} of `tower` of `short` (a `timing_copy`) quantised in each
    of `modes`, through encode_image / encode_text, the modes taking turns round by round."""
    config = short.config
    s = config.vision.image_size
    variants = {m: _variant(short, tower, m) for m in modes}
    out: dict = {m: {} for m in modes}
    for batch, n in rounds.items():
        if tower == "image":
            pixels = np.random.default_rng(0).standard_normal((batch, s, s, 3), dtype=np.float32)
            calls = {m: functools.partial(_run_image, v, pixels) for m, v in variants.items()}
        else:
            ids, mask = synthetic_tokens(config.text, batch, full=True, length=text_shape(config)[0])
            calls = {m: functools.partial(_run_text, v, ids, mask) for m, v in variants.items()}
        _compile_all(calls.values())
        best = {m: math.inf for m in calls}
        for _ in range(n):
            for m, f in calls.items():
                t = time.perf_counter()
                f()
                best[m] = min(best[m], time.perf_counter() - t)
        for m in calls:
            out[m][batch] = best[m]
    del variants, calls
    trim_heap()
    return out


def _variant(short: KoCLIP, tower: str, mode: str) -> KoCLIP:
    """`short` with `tower` in `mode`: quantised (a copy sharing the other arrays), or a float32 copy
    whose tower an ONNX Runtime session serves."""
    if mode in ORT_CANDIDATES:
        return onnx_runtime.attach(quantize(short, "fp32"), tower, mode)
    return quantize(short, mode, exclude=TOWER_PATHS[_OTHER[tower]])


def _compile_all(calls) -> None:
    """Calls each of `calls` once, one per two cores at a time: XLA compiles without holding the GIL,
    so on a machine with cores to spare the compiles overlap.  On 2 cores they run one by one: there
    two at a time took the same time within the noise (koclip-base's first load, Zen 4), and 0.06 GB
    more at the peak of the load, each compile's scratch memory beside the other's."""
    calls = list(calls)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(calls), (os.cpu_count() or 1) // 2))) as pool:
        for f in [pool.submit(c) for c in calls]:
            f.result()


def _run_image(model, pixels):
    return np.asarray(model.encode_image(pixels))


def _run_text(model, ids, mask):
    return np.asarray(model.encode_text(ids, mask))


def timing_copy(model: KoCLIP, layers: int = TIMING_LAYERS, vocab: int = TIMING_VOCAB) -> KoCLIP:
    """`model` cut to its first `layers` transformer layers per tower and to the first `vocab` rows of
    its word-embedding table (its config's vocab_size; never below the padding id's row), sharing its
    arrays (no copy but the table's rows kept).

    Candidates are timed on this copy: the layers are all alike, so their ranking is the whole
    tower's, at a fraction of the compile and run time and of the memory a quantised copy costs.
    """
    cfg = model.config
    text = dataclasses.replace(cfg.text, num_hidden_layers=min(layers, cfg.text.num_hidden_layers),
                               vocab_size=min(cfg.text.vocab_size, max(vocab, cfg.text.pad_token_id + 2)))
    vision = cfg.vision
    if vision.kind != "efficientnet":
        vision = dataclasses.replace(vision, num_hidden_layers=min(layers, vision.num_hidden_layers))
    short = nnx.eval_shape(lambda: KoCLIP(cfg.replace(text=text, vision=vision), rngs=nnx.Rngs(0)))
    values = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}

    def kept(path, var):
        value, shape = values[path], var.get_value().shape
        return var.replace(value if value.shape == shape else value[:shape[0]])  # the word table, cut

    flat = nnx.to_flat_state(nnx.state(short))
    nnx.update(short, nnx.from_flat_state([(path, kept(path, var)) for path, var in flat]))
    return short


def synthetic_tokens(cfg, n: int, *, full: bool = False, length: int = TEXT_LENGTH,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), both (n, length) int32: fixed random ids from the vocabulary of text config
    `cfg` (never the padding id), each row 3 to `length` tokens long (all of it when `full`), padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (n, length)).astype(np.int32)
    ids[ids == cfg.pad_token_id] = (cfg.pad_token_id + 1) % cfg.vocab_size
    lengths = np.full(n, length) if full else rng.integers(3, length + 1, n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return np.where(mask > 0, ids, cfg.pad_token_id).astype(np.int32), mask


@functools.lru_cache(maxsize=4)
def gallery_pixels(spec) -> np.ndarray:
    """The bundled gallery photos preprocessed by `spec`: (n, S, S, 3) float32."""
    return preprocess([p.path for p in data.gallery()], spec)


@model_jit
def _image_embeddings(model, pixels):
    return l2_normalize(model.image_features(pixels).astype(jnp.float32))


@model_jit
def _text_embeddings(model, ids, mask):
    return l2_normalize(model.text_features(ids, mask).astype(jnp.float32))


def rows_cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def agreement(s0, s) -> float:
    """Share of rows whose top-1 in `s` matches `s0`'s, over rows whose `s0` top-2 margin is at
    least TIE (closer ones are ties that any rounding may flip); 1.0 when every row is a tie."""
    s0, s = np.asarray(s0), np.asarray(s)
    top2 = np.sort(s0, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= TIE
    return float(np.mean(s0.argmax(-1)[clear] == s.argmax(-1)[clear])) if clear.any() else 1.0


class _Gates:
    """The quality gates of one float32 model, its reference embeddings computed on first use."""

    def __init__(self, model: KoCLIP):
        self.model = model
        self.quality: dict = {t: {} for t in TOWERS}
        self._ref: dict | None = None
        self._got: dict = {}

    def _inputs(self):
        cfg = self.model.config
        length, full = text_shape(cfg)
        return gallery_pixels(image_spec_for(cfg)), synthetic_tokens(cfg.text, N_LABELS, full=full, length=length)

    def _embed(self, tower: str, mode: str) -> np.ndarray:
        pixels, (ids, mask) = self._inputs()
        if mode == "ort-int8":
            # Checked as koclip's int8 (see the module's docstring): a session of the whole tower
            # beside the float32 model would cost half of the tower again in memory.
            mode = "int8"
        if mode in ORT_CANDIDATES:
            runner = onnx_runtime.session(self.model, tower, mode)
            return np.asarray(runner(pixels) if tower == "image" else runner(ids, mask))
        m = self.model if mode == "fp32" else simulate(self.model, mode, exclude=TOWER_PATHS[_OTHER[tower]])
        z = _image_embeddings(m, pixels) if tower == "image" else _text_embeddings(m, ids, mask)
        del m
        trim_heap()
        return np.asarray(z)

    def ref(self) -> dict:
        if self._ref is None:
            self._ref = {t: self._embed(t, "fp32") for t in TOWERS}
        return self._ref

    def check(self, tower: str, mode: str) -> bool:
        if mode in self.quality[tower]:
            return self.quality[tower][mode]["passed"]
        if mode == "int8" and not self.quality[tower].get("bf16", {"passed": True})["passed"]:
            # int8 keeps 8 significant bits relative to a row's or column's largest entry, bf16 8 of
            # every entry: a tower that bf16 already moves past the gates, int8 moves further.
            self.quality[tower][mode] = {"passed": False, "note": "not checked: bf16 failed"}
            return False
        if mode == "ort-int8" and "int8" in self.quality[tower] and (tower, "int8") in self._got:
            self._got[tower, mode] = self._got[tower, "int8"]  # the same check (see _embed)
            self.quality[tower][mode] = self.quality[tower]["int8"]
            return self.quality[tower][mode]["passed"]
        ref = self.ref()
        z = self._got[tower, mode] = self._embed(tower, mode)
        cosine = float(rows_cosine(z, ref[tower]).min())
        zimg, ztxt = (z, ref["text"]) if tower == "image" else (ref["image"], z)
        agree = agreement(ref["image"] @ ref["text"].T, zimg @ ztxt.T)
        passed = cosine >= COSINE_GATE and agree >= AGREEMENT_GATE
        self.quality[tower][mode] = {"cosine": cosine, "agreement": agree, "passed": passed}
        trim_heap()  # the compile's and the run's scratch memory
        return passed

    def pair(self, image_mode: str, text_mode: str) -> bool:
        ref = self.ref()
        agree = agreement(ref["image"] @ ref["text"].T,
                          self._got["image", image_mode] @ self._got["text", text_mode].T)
        return agree >= AGREEMENT_GATE


# ---------------------------------------------------------------- remembering

def machine() -> dict:
    """What the decision depends on besides the model: CPU model name, a digest of its flags, cores,
    jax's version, backend and device kind, and onnxruntime's version ("" when not installed)."""
    flags = sorted(cpu_flags())
    return {"cpu": cpu_model(), "flags": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
            "cores": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "onnxruntime": onnx_runtime.version()}


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def decision_key(model: KoCLIP) -> dict:
    config = json.dumps(model.config.to_hf(), sort_keys=True, default=str)
    return {"version": VERSION, "config": hashlib.sha256(config.encode()).hexdigest()[:16],
            "weights": model_digest(model), **machine()}


def decision_path(model: KoCLIP, key: dict | None = None) -> Path:
    key = key or decision_key(model)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "precision" / f"{digest}.json"


def write_plan(path: Path, plan: Plan, key: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"key": key, "image": plan.image, "text": plan.text, "seconds": plan.seconds,
              "timings": {t: {m: {str(b): s for b, s in bs.items()} for m, bs in ms.items()}
                          for t, ms in plan.timings.items()},
              "quality": plan.quality, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


def read_plan(path: Path) -> Plan | None:
    """The decision remembered in `path`, or None when there is none or it cannot be used."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        image, text = record["image"], record["text"]
        if image not in CANDIDATES or text not in CANDIDATES:
            raise ValueError(f"unknown modes {image!r}, {text!r}")
        timings = {t: {m: {int(b): float(s) for b, s in bs.items()} for m, bs in ms.items()}
                   for t, ms in record.get("timings", {}).items()}
        return Plan(image, text, "cached", float(record.get("seconds", 0.0)), timings,
                    record.get("quality", {}), str(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring the precision decision in %s (%s: %s); measuring again", path, type(e).__name__, e)
        return None
