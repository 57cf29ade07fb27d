"""Compiling less: JAX's persistent compilation cache, and a cheap way to call a jitted model.

    compile_cache.enable()          # compiled programs persist in ~/.cache/koclip/jax

`enable` makes a fresh process reuse the XLA executables that an earlier one
compiled, so a restarted server reaches its first embedding sooner.

`model_jit(fn)` is `nnx.jit` for inference entry points `fn(model, *arrays)`:
`nnx.jit` flattens and rebuilds the whole module graph on every call, which for
koclip-base (~600 variables) cost 0.3-0.4 s per call on two busy CPU cores,
more than a batch-1 forward pass.  `model_jit` splits a model once, keeps its
Variables in order, and at each call hands their current arrays, as a flat
list, to a `jax.jit` (~0.2 ms for koclip-base).
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from pathlib import Path

import jax
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache as cc

from koclip.files import cache_root

# Compiles shorter than this are not written: reading an entry back costs a
# few milliseconds, about what XLA:CPU needs for the smallest programs.
MIN_COMPILE_SECONDS = 0.02
_enabled: Path | None = None
_lock = threading.Lock()


def default_dir() -> Path:
    """`koclip.files.cache_root()` / "jax": $KOCLIP_CACHE/jax, else $XDG_CACHE_HOME/koclip/jax,
    else ~/.cache/koclip/jax."""
    return cache_root() / "jax"


def enable(path: str | os.PathLike | None = None, *,
           min_compile_seconds: float = MIN_COMPILE_SECONDS) -> Path:
    """Turns on JAX's persistent compilation cache in `path` (default: `default_dir()`).

    Safe to call more than once and after JAX has already compiled something.
    Returns the cache directory.
    """
    global _enabled
    target = Path(path).expanduser() if path is not None else default_dir()
    with _lock:
        if _enabled == target and jax.config.jax_compilation_cache_dir == str(target):
            return target
        target.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
        # -1: cache entries of any size (the default lets JAX pick a floor).
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        cc.set_cache_dir(str(target))
        # JAX decides once per process whether to use the cache, at the first
        # compile; forget that decision so a late `enable` still takes effect.
        cc.reset_cache()
        _enabled = target
    return target


def enabled_dir() -> Path | None:
    """The directory `enable` set, or None."""
    return _enabled


# ---------------------------------------------------------------- jit without per-call graph walks

class _Split:
    """A model's (graphdef, treedef) and its Variables in the order of the flat array list."""

    def __init__(self, model: nnx.Module):
        self.graphdef, state = nnx.split(model)
        _, self.treedef = jax.tree.flatten(state)
        # The state holds the model's own Variable objects: reading their values at
        # each call sees every update (optimizer steps, nnx.update, loading) and
        # keeps no replaced array alive.
        self.variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        if self.treedef.num_leaves != len(self.variables):
            raise TypeError(f"{type(model).__name__}: a Variable holds more than one array; "
                            "model_jit needs one array per Variable")
        self.compiled: dict = {}  # fn -> its jax.jit for this structure

    def run(self, fn, args):
        f = self.compiled.get(fn)
        if f is None:
            try:
                f = _compiled(fn, self.graphdef, self.treedef)
            except TypeError:  # an unhashable static attribute: compile for this model alone
                f = _compiled.__wrapped__(fn, self.graphdef, self.treedef)
            self.compiled[fn] = f
        return f([v.get_raw_value() for v in self.variables], *args)


_splits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _split(model: nnx.Module) -> _Split:
    with _lock:
        s = _splits.get(model)
        if s is None:
            s = _splits[model] = _Split(model)
        return s


def clear() -> None:
    """Drops every program compiled in this process from memory: `model_jit`'s and JAX's own caches
    (`jax.clear_caches`).  Each function compiles again at its next call, from the persistent cache
    where `enable` is on.  For a burst of compiles never needed again (`koclip.autotune.measure`
    compiles each candidate precision on the timing copy and on the quality gates' inputs)."""
    with _lock:
        _compiled.cache_clear()
        for split in list(_splits.values()):
            split.compiled.clear()
    jax.clear_caches()


def forget(model: nnx.Module) -> None:
    """Drops `model`'s split, so the next call sees its current structure (after in-place surgery)."""
    with _lock:
        _splits.pop(model, None)


@functools.lru_cache(maxsize=64)
def _compiled(fn, graphdef, treedef):
    # Keyed by the graph's structure, not the model object: two models with the
    # same architecture share compiled programs, as they do under nnx.jit.
    def run(leaves, *args):
        return fn(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), *args)

    return jax.jit(run)


def model_jit(fn):
    """`fn(model, *arrays)` -> a compiled function with the same signature.

    For inference only: changes `fn` makes to the model's Variables are dropped.
    New values of the model's Variables are seen; replacing submodules or
    Variables in place after the first call is not: call `forget(model)`
    afterwards, as `quantize(..., copy=False)` does.
    """

    @functools.wraps(fn)
    def call(model, *args):
        return _split(model).run(fn, args)

    return call
