"""Mechanical mapping between checkpoint names and koclip's parameter tree.

koclip's parameters are named as transformers' Flax modules name them, joined
by dots: `text_model.encoder.layer.0.attention.self.query.kernel`.  A PyTorch
state dict differs only by leaf names and layouts (`weight` of a Linear is the
transposed `kernel`, of a LayerNorm the `scale`, of an Embedding the
`embedding`; conv weights are OIHW instead of HWIO), so converting is a rule
applied per tensor, not a table per layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from koclip.errors import CheckpointError


def param_shapes(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flat '.'-joined name -> (shape, dtype) of every variable of `model` (abstract or real)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        out[".".join(map(str, path))] = (tuple(value.shape), np.dtype(value.dtype))
    return out


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """Flat '.'-joined name -> array of every variable of `model`."""
    return {".".join(map(str, p)): (v.get_value() if hasattr(v, "get_value") else v.value)
            for p, v in nnx.to_flat_state(nnx.state(model))}


def _torch_layout(x: np.ndarray) -> np.ndarray:
    """Linear (out, in) -> (in, out); conv (O, I, H, W) -> (H, W, I, O)."""
    if x.ndim == 2:
        return x.T
    if x.ndim == 4:
        return x.transpose(2, 3, 1, 0)
    return x


def torch_to_flax_names(items: Iterable[tuple[str, np.ndarray]], targets: Mapping[str, object],
                        ) -> Iterator[tuple[str, np.ndarray | None, str]]:
    """Maps (torch_name, array) pairs onto the names in `targets`.

    Yields (flax_name, array, torch_name); flax_name is None when no target fits,
    so that the caller decides whether the tensor may be ignored.
    """
    for name, x in items:
        base, _, leaf = name.rpartition(".")
        leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)
        prefix = base + "." if base else ""
        if leaf == "weight":
            for cand, fn in ((prefix + "kernel", _torch_layout), (prefix + "scale", None),
                             (prefix + "embedding", None), (name, None)):
                if cand in targets:
                    yield cand, (fn(x) if fn else x), name
                    break
            else:
                yield None, x, name
        elif leaf == "bias" and prefix + "bias" in targets:
            yield prefix + "bias", x, name
        elif name in targets:
            yield name, x, name
        else:
            yield None, x, name


def rename(items: Iterable[tuple[str, np.ndarray]], rules: list[tuple[str, str]]):
    """Applies regex substitutions (first match wins) to names; a rule with
    replacement None drops the tensor."""
    compiled = [(re.compile(p), r) for p, r in rules]
    for name, x in items:
        for pat, rep in compiled:
            if pat.match(name):
                if rep is None:
                    name = None
                else:
                    name = pat.sub(rep, name, count=1)
                break
        if name is not None:
            yield name, x


def assign(model: nnx.Module, items: Iterable[tuple[str, np.ndarray]], source: str, *,
           allow_missing: Callable[[str], bool] = lambda n: False,
           dtype_of: Callable[[str, np.dtype], np.dtype] | None = None) -> None:
    """Fills `model` (typically made by nnx.eval_shape) with arrays named by its flat names.

    Every variable must be given exactly once with its exact shape, unless
    `allow_missing(name)`, in which case it keeps its current (initialised) value.
    Arrays are moved to the device one at a time, each copy finished before the next
    array is taken, so that a caller streaming `items` keeps about one host copy alive.
    """
    shapes = param_shapes(model)
    values: dict[str, jax.Array] = {}
    for name, x in items:
        if name not in shapes:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} with shape {tuple(np.shape(x))}; "
                                  "it does not belong to this model's config")
        if name in values:
            raise CheckpointError(f"{source}: tensor {name!r} appears twice")
        shape, dtype = shapes[name]
        if tuple(np.shape(x)) != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(np.shape(x))}, "
                                  f"the config expects {shape}")
        want = dtype_of(name, dtype) if dtype_of else dtype
        # Wait for each copy: jax copies a host array asynchronously and lets go of it only once the
        # copy is done (at its next call), so copies left in flight would keep their sources alive:
        # while a big tensor's copy runs, the tensors read after it would pile up on the host.
        values[name] = jnp.asarray(x, dtype=want).block_until_ready()
        del x
    missing = [n for n in shapes if n not in values and not allow_missing(n)]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{source}: missing {len(missing)} tensor(s) the config needs: {shown}")
    state = nnx.state(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        if name in values:
            var = var.replace(values.pop(name))
        elif isinstance(var.get_value(), jax.ShapeDtypeStruct):
            raise CheckpointError(f"{source}: {name!r} has no value")
        flat.append((path, var))
    nnx.update(model, nnx.from_flat_state(flat))
