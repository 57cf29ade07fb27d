"""Resumable training state on disk, with orbax's CheckpointManager.

A checkpoint holds what changes during training: the step, the trainable
parameters and the optimiser state (frozen towers are rebuilt from their
source on restart, so LiT checkpoints stay small), plus JSON metadata.
Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores `{"step", "params", "opt_state"}` trees under `directory`."""

    def __init__(self, directory, *, keep: int = 3):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, tree, meta: dict) -> None:
        """Starts writing step `step` in the background (see `wait`)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, like, step: int | None = None):
        """Returns (tree, meta) of `step` (default the latest), laid out like the tree `like`
        (same structure, shapes, dtypes and shardings)."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
