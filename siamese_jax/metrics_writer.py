"""Training metrics to `metrics.jsonl` and TensorBoard event files (tensorboardX: no TensorFlow)."""
from __future__ import annotations

import os

from siamese_jax.files import append_jsonl, read_jsonl, rewrite_jsonl


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        self._tb_dir = os.path.join(workdir, "tensorboard")

    def truncate_after(self, step: int) -> None:
        """On resume: drop records newer than the restored checkpoint, so the curves don't double back."""
        if not self.enabled:
            return
        records = read_jsonl(self.path)
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records) or (records and not os.path.getsize(self.path)):
            rewrite_jsonl(self.path, kept)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        append_jsonl(self.path, dict(scalars, step=int(step)))
        if self._tb is None:
            from tensorboardX import SummaryWriter  # lazy: protobuf import cost only when training

            self._tb = SummaryWriter(self._tb_dir, flush_secs=10)
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
