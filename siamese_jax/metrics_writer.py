"""Training metrics to `metrics.jsonl` and TensorBoard event files (tensorboardX: no TensorFlow)."""
from __future__ import annotations

import os

from siamese_jax.files import append_jsonl, read_jsonl, rewrite_jsonl


def _has_unparsed_lines(path: str, parsed: int) -> bool:
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        data = f.read()
    return data.count(b"\n") != parsed or (bool(data) and not data.endswith(b"\n"))


class MetricsWriter:
    """Every `write` goes to metrics.jsonl; to TensorBoard, the per-step training metrics
    (`every_step=True`) only every `tensorboard_every_steps` steps: serialising 7 scalars to
    TensorBoard protos was ~40% of the training loop's host-thread time (py-spy), and on a 2-core
    machine that thread shares the cores with the step (BUILD_NOTES, "Loop overhead")."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard_every_steps: int = 10):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self.tensorboard_every_steps = max(int(tensorboard_every_steps), 1)
        self._tb = None
        self._tb_dir = os.path.join(workdir, "tensorboard")

    def truncate_after(self, step: int) -> None:
        """On resume: drop records newer than the restored checkpoint, so the curves don't double back."""
        if not self.enabled:
            return
        records = read_jsonl(self.path)
        kept = [r for r in records if r.get("step", 0) <= step]
        # Rewritten also when a line did not parse (a torn last line from a kill mid-write): the next
        # append would otherwise be glued onto it and lost with it.
        if len(kept) != len(records) or _has_unparsed_lines(self.path, len(records)):
            rewrite_jsonl(self.path, kept)

    def write(self, step: int, scalars: dict, every_step: bool = False) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        append_jsonl(self.path, dict(scalars, step=int(step)))
        if every_step and step % self.tensorboard_every_steps:
            return
        if self._tb is None:
            self._tb = _summary_writer_class()(self._tb_dir, flush_secs=10)
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported lazily (protobuf's import cost only when training) and
    without PyTorch: tensorboardX imports torch at module level when it is installed (the `bench`
    extra, CI), only to accept torch tensors, which nothing here passes; that import was ~1 s of every
    training's start-up. `None` in `sys.modules` makes `import torch` raise ImportError, which
    tensorboardX catches; the entry is removed at once, so a later `import torch` works as usual."""
    import sys

    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter
