"""Resumable training state on disk, with orbax's CheckpointManager.

A checkpoint holds what changes during training: the step, the trainable
parameters and the optimiser state (frozen towers are rebuilt from their
source on restart, so LiT checkpoints stay small), plus JSON metadata.
Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoint as the latest.

Several processes: every process makes a `Checkpointer` and calls each of its
methods (they are collective), but only process 0 touches the directory, so
hosts need not share a disk.  Process 0 saves host (numpy) copies with an
orbax manager of its own (`active_processes={0}`: no barrier waits on the
others); on resume it reads the checkpoint and broadcasts the step, the
metadata and the arrays to the other processes, which never read a disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from koclip.train import parallel

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores `{"step", "params", "opt_state"}` trees under `directory` (on process 0)."""

    def __init__(self, directory, *, keep: int = 3):
        self.directory = Path(directory).resolve()
        self.primary = jax.process_index() == 0
        self.manager = None
        if self.primary:
            # orbax refuses create=True together with active_processes: make the folder here.
            self.directory.mkdir(parents=True, exist_ok=True)
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=False, cleanup_tmp_directories=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0}))
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete step in process 0's directory, or None (the same on every process)."""
        step = self.manager.latest_step() if self.primary else None
        return parallel.json_from_process_0(step)

    def save(self, step: int, tree, meta: dict) -> None:
        """Copies `tree` to host memory (a gather where it is sharded over processes), then starts
        writing it as step `step` in the background on process 0 (see `wait`)."""
        host = parallel.to_host(tree)
        if self.primary:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host),
                                                            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, like, step: int | None = None):
        """Returns (tree, meta) of `step` (default the latest), laid out like the tree `like`
        (same structure, shapes, dtypes and shardings) on every process."""
        step = self.latest_step() if step is None else step
        host = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), like)
        meta = None
        if self.primary:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(host),
                                                                     meta=ocp.args.JsonRestore()))
            host, meta = out.state, out.meta
        host = parallel.from_process_0(host)
        meta = parallel.json_from_process_0(meta)
        # Each process places its own shards of the (now identical) host copy.
        tree = jax.tree.map(lambda x, ref: jax.make_array_from_callback(x.shape, ref.sharding, x.__getitem__)
                            if isinstance(ref, jax.Array) else x, host, like)
        return tree, meta

    def wait(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
