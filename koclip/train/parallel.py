"""Data parallelism with `jax.sharding`: one mesh axis 'data' over every device.

The global batch is one array sharded along its rows; parameters are
replicated (or, above a size threshold, sharded along one axis so each
device holds a slice).  XLA inserts the collectives, so the loss sees the
whole global batch and the gradients come out already averaged.

Several processes (hosts) need not share a disk: only process 0 reads and
writes files, and the others receive what it read (`from_process_0`,
`json_from_process_0`, `arrays_from_process_0`; collective, like every
computation over the mesh).
"""

from __future__ import annotations

import json
import logging
import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

AXIS = "data"


# XLA:CPU's concurrency-optimised scheduler let two processes run the train step's collectives
# in different orders once the step came from JAX's persistent compilation cache (a Gloo size
# mismatch at the first step, every time, jax 0.10.2); with XLA's default scheduler they agree.
_CPU_SCHEDULER = "xla_cpu_enable_concurrency_optimized_scheduler"


def _same_collective_order_on_cpu() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if _CPU_SCHEDULER not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --{_CPU_SCHEDULER}=false".strip()


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when launched as one of several processes.

    Recognises JAX's own JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID)
    and the SLURM / Open MPI launchers that JAX detects by itself.  Returns whether it did.
    Must run before anything starts a JAX backend (it also sets an XLA:CPU flag).
    """
    if jax.distributed.is_initialized():
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        _same_collective_order_on_cpu()
        kw = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"]}
        if "JAX_NUM_PROCESSES" in os.environ:
            kw["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in os.environ:
            kw["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kw)
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            _same_collective_order_on_cpu()
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


def to_host(tree):
    """Device arrays -> numpy, also for arrays spread over several processes.

    Collective when a leaf is sharded over devices of several processes: every process must call it."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def from_process_0(tree):
    """Process 0's values of a pytree of numpy arrays, on every process.

    Collective: every process passes a tree of the same structure, shapes and dtypes
    (the values of the others are ignored).  One process: `tree` itself, as numpy."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    out = multihost_utils.broadcast_one_to_all(tree)
    # The broadcast is a sum in which the others add zeros: bools come back as integers.
    return jax.tree.map(lambda y, x: np.asarray(y).astype(np.asarray(x).dtype), out, tree)


def json_from_process_0(value):
    """Process 0's `value` (anything json.dumps takes; the others' is ignored) on every process."""
    if jax.process_count() == 1:
        return value
    data = json.dumps(value).encode() if jax.process_index() == 0 else b""
    n = int(from_process_0(np.int32(len(data))))
    buf = np.zeros(n, np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    return json.loads(from_process_0(buf).tobytes().decode())


def arrays_from_process_0(arrays: dict | None) -> dict | None:
    """Process 0's dict of numpy arrays (or None), on every process; others may pass None."""
    if jax.process_count() == 1:
        return arrays
    header = json_from_process_0(None if arrays is None else
                                 {k: [list(np.shape(v)), np.asarray(v).dtype.str] for k, v in arrays.items()})
    if header is None:
        return None
    like = {k: np.zeros(shape, np.dtype(dt)) for k, (shape, dt) in header.items()}
    return from_process_0(arrays if jax.process_index() == 0 else like)


# What the runtime says when a collective's peer is gone: Gloo (CPU) and NCCL (GPU) transport
# errors, the coordination service's missed heartbeats and failed barriers.
_LOST_PEER = re.compile(r"gloo|nccl|connection (reset|closed|refused)|broken pipe|heartbeat|"
                        r"unavailable|deadline.?exceeded|barrier|peer", re.IGNORECASE)


def lost_peer(error: BaseException) -> bool:
    """Whether `error` (raised in a run of several processes) says another process is gone."""
    return (jax.process_count() > 1 and isinstance(error, jax.errors.JaxRuntimeError)
            and bool(_LOST_PEER.search(str(error))))


def peer_description() -> str:
    """'training process 1 of 2' (the other one, when there are two) or 'one of the other N-1 ...'."""
    n, me = jax.process_count(), jax.process_index()
    if n == 2:
        return f"training process {1 - me} of 2"
    return f"one of the other {n - 1} training processes (this is process {me} of {n})"
