"""Metrics out: one JSON object per line in WORKDIR/metrics.jsonl, and TensorBoard event files."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricWriter:
    """`write(step, {"name": number, ...})` appends to metrics.jsonl and to TensorBoard under WORKDIR/tb.

    Only process 0 of a multi-process run should make one (`enabled=False` elsewhere).
    """

    def __init__(self, workdir, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                # Deferred: only a process that writes TensorBoard files loads tensorboardX (and protobuf).
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(workdir) / "tb"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "dtype") else v)
                 for k, v in metrics.items()}
        row = {"step": int(step), **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                     for k, v in clean.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    self._tb.add_scalar(k.replace("@", "_at_"), v, int(step))  # TensorBoard refuses '@'
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
