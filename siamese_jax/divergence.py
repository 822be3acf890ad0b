"""Stops a diverging run: non-finite metrics, loss / gradient norm / parameter norm that explode,
and a network that has collapsed.

The rule, in one line (`rule()` returns it with the configured numbers):

    stop when any metric is non-finite, or the loss, gradient norm or parameter norm exceeds
    FACTOR x max(its first value, its median over the last WINDOW healthy steps), or the gradient
    is exactly 0 while the loss is not for WINDOW steps in a row

"First value" (the first positive one; on resume, the run's own first recorded value) anchors the
scale, so a loss or gradient that has been near zero for a while (a trained model, a batch with no
active triplets) cannot trip the rule on ordinary noise; the median
over recent healthy steps follows the run as it trains. The parameter norm is seeded with the
norm of the starting state (before the first update), so an update that blows the parameters up in
the first step is caught at once. Checking is host-side on metrics the train loop reads anyway (one
step behind the device), so it adds no device synchronisation.

The last clause is a collapse: a learning rate too high for the network (30 on the tiny MNIST test
net) can, instead of exploding, kill every ReLU in a few steps, so that every image embeds to the
same point. The loss then sits at its value for identical embeddings (the margin, for the triplet
losses), its gradient is exactly 0, and nothing can move the weights again: such a run trained for
its whole schedule at chance (validation 0.10 on MNIST), with finite, calm metrics. A healthy run's
gradient is exactly 0 only where its loss is too (a batch with no active triplet), which does not
count.
"""
from __future__ import annotations

import collections
import math
import os
import statistics
from typing import Mapping, Optional

from siamese_jax import checkpoints as ckpt_lib

WATCHED = ("loss", "grad_norm", "param_norm")
DEFAULT_FACTOR = 100.0
DEFAULT_WINDOW = 50


class DivergenceError(RuntimeError):
    """Training diverged at `step`; `metric`, `value` and `reference` say how. `start_step` is the
    step this process started (resumed) from."""

    def __init__(self, message: str, step: int, metric: str, value: float, reference: Optional[float],
                 start_step: int = 0):
        super().__init__(message)
        self.step, self.metric, self.value, self.reference = step, metric, value, reference
        self.start_step = start_step


def rule(factor: float = DEFAULT_FACTOR, window: int = DEFAULT_WINDOW) -> str:
    if not factor:
        return "stop when any metric is non-finite"
    return (f"stop when any metric is non-finite, or the loss, gradient norm or parameter norm exceeds "
            f"{factor:g}x max(its first value, its median over the last {window} healthy steps), or the "
            f"gradient is exactly 0 while the loss is not for {window} steps in a row")


class DivergenceDetector:
    """`check(step, metrics)` raises DivergenceError or records the step as healthy.

    `factor=0` checks only for non-finite values.
    """

    def __init__(self, factor: float = DEFAULT_FACTOR, window: int = DEFAULT_WINDOW, start_step: int = 0):
        self.factor, self.window, self.start_step = float(factor), int(window), int(start_step)
        self._recent = {k: collections.deque(maxlen=self.window) for k in WATCHED}
        self._first: dict[str, float] = {}
        self._stuck_since: Optional[int] = None  # first step of the current run of "loss > 0, gradient 0"
        self.last_healthy_step: Optional[int] = None

    def seed(self, metric: str, value: float) -> None:
        """A known-healthy value before the first step (e.g. the starting state's parameter norm)."""
        value = float(value)
        if math.isfinite(value):
            self._note_first(metric, value)
            self._recent[metric].append(value)

    def seed_first(self, metric: str, value: float) -> None:
        """The run's own first value, from before a resume (metrics.jsonl): the scale anchor, not a
        recent value. Resumed without it, a well-trained run's tiny first loss anchored the scale and
        ordinary noise could trip the rule."""
        value = float(value)
        if math.isfinite(value) and value > 0:
            self._first[metric] = value

    def _note_first(self, metric: str, value: float) -> None:
        # The first POSITIVE value: a first loss of exactly 0 (no active triplet in the batch) would
        # anchor nothing, and the noise of the next near-zero losses would read as an explosion.
        if value > 0:
            self._first.setdefault(metric, value)

    def reference(self, metric: str) -> Optional[float]:
        recent = self._recent[metric]
        if not recent:
            return None
        return max(self._first.get(metric, 0.0), statistics.median(recent))  # 6 us; np.median of a deque: 76 us

    def check(self, step: int, metrics: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            k = "loss" if "loss" in bad else bad[0]
            raise DivergenceError(
                f"training diverged at step {step}: non-finite {', '.join(bad)} ({k}={values[k]})",
                step, k, values[k], self.reference(k) if k in WATCHED else None, self.start_step)
        if self.factor:
            for k in WATCHED:
                if k not in values:
                    continue
                ref = self.reference(k)
                if ref is not None and ref > 0 and values[k] > self.factor * ref:
                    raise DivergenceError(
                        f"training diverged at step {step}: {k} {values[k]:.3g} is more than "
                        f"{self.factor:g}x its reference {ref:.3g}", step, k, values[k], ref, self.start_step)
            if "grad_norm" in values and "loss" in values:  # a training step's metrics (not validation's)
                if values["grad_norm"] == 0.0 and values["loss"] > 0.0:
                    self._stuck_since = step if self._stuck_since is None else self._stuck_since
                    if step - self._stuck_since + 1 >= self.window:
                        raise DivergenceError(
                            f"training collapsed at step {step}: the gradient has been exactly 0 since step "
                            f"{self._stuck_since} while the loss stayed at {values['loss']:.4g} (the network "
                            f"embeds every image to the same point and can no longer learn)",
                            step, "grad_norm", 0.0, None, self.start_step)
                else:
                    self._stuck_since = None
        for k in WATCHED:
            if k in values:
                self._note_first(k, values[k])
                self._recent[k].append(values[k])
        self.last_healthy_step = step


def from_config(config, start_step: int = 0) -> DivergenceDetector:
    """The detector a config asks for (`divergence_factor`, `divergence_window`; defaults if absent)."""
    return DivergenceDetector(config.get("divergence_factor", DEFAULT_FACTOR),
                              config.get("divergence_window", DEFAULT_WINDOW), start_step)


def stop_diverged_run(error: DivergenceError, config, workdir: str) -> DivergenceError:
    """After a divergence (the run's checkpoint managers closed): moves checkpoints saved within
    `divergence_window` steps before it into `<workdir>/diverged/` (they may hold a state that was
    already going wrong), and returns the error with one line saying which step a re-run resumes from."""
    window = int(config.get("divergence_window", DEFAULT_WINDOW))
    factor = float(config.get("divergence_factor", DEFAULT_FACTOR))
    keep_up_to = max(error.step - window, error.start_step)
    ckpts = ckpt_lib.Checkpoints(workdir, keep=config.get("keep_checkpoints", 2))
    try:
        moved = ckpts.discard_newer_than(keep_up_to)
        # Filtered, not re-listed: with several processes only process 0 moves the newer ones.
        steps = [s for s in ckpts.all_periodic_steps() if s <= keep_up_to]
    finally:
        ckpts.close()
    lr = config.get("learning_rate")
    advice = f"lower --config.learning_rate (now {lr:g})" if isinstance(lr, (int, float)) else "lower the learning rate"
    if steps:
        resume = (f"{advice} and re-run with the same workdir: it resumes from step {steps[-1]}, saved before "
                  f"the divergence ({os.path.join(workdir, 'checkpoints', str(steps[-1]))})")
    else:
        resume = f"{advice} and re-run: there is no checkpoint from before the divergence, so it starts from scratch"
    aside = (f"; {len(moved)} checkpoint(s) saved less than {window} steps before it moved to "
             f"{os.path.join(workdir, 'diverged')}" if moved else "")
    message = f"{error} (rule: {rule(factor, window)}){aside}; {resume}"
    return DivergenceError(message, error.step, error.metric, error.value, error.reference, error.start_step)
