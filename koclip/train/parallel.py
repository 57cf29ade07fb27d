"""Data parallelism with `jax.sharding`: one mesh axis 'data' over every device.

The global batch is one array sharded along its rows; parameters are
replicated (or, above a size threshold, sharded along one axis so each
device holds a slice).  XLA inserts the collectives, so the loss sees the
whole global batch and the gradients come out already averaged.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

AXIS = "data"


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when launched as one of several processes.

    Recognises JAX's own JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID)
    and the SLURM / Open MPI launchers that JAX detects by itself.  Returns whether it did.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kw = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"]}
        if "JAX_NUM_PROCESSES" in os.environ:
            kw["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in os.environ:
            kw["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kw)
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            jax.distributed.initialize()
            return True
    return False


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh named 'data' over `devices` (default: all of them)."""
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh) -> NamedSharding:
    """Rows split over 'data', other axes whole."""
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(x, mesh, min_size: int = 0) -> NamedSharding:
    """Replicated, unless `min_size` > 0 and `x` has at least that many elements and an
    axis divisible by the device count: then split along the largest such axis."""
    n = mesh.shape[AXIS]
    shape = np.shape(x)
    if min_size <= 0 or n == 1 or int(np.prod(shape)) < min_size:
        return replicated(mesh)
    axes = [a for a in np.argsort(shape)[::-1] if shape[a] % n == 0]
    if not axes:
        return replicated(mesh)
    spec = [None] * len(shape)
    spec[int(axes[0])] = AXIS
    return NamedSharding(mesh, P(*spec))


def state_shardings(state, mesh, min_size: int = 0):
    """A pytree of shardings for a train state: see `param_sharding`."""
    return jax.tree.map(lambda x: param_sharding(x, mesh, min_size), state)


def global_batch(local: dict, mesh) -> dict:
    """This process's rows of the batch (numpy) -> global arrays sharded over 'data'."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
