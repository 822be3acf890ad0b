"""Stops a diverging run: non-finite metrics, loss / gradient norm / parameter norm that explode,
and a network that has collapsed.

The rule, in one line (`rule()` returns it with the configured numbers):

    stop when any metric is non-finite, or the loss, gradient norm or parameter norm exceeds
    FACTOR x max(its first value, its median over the last WINDOW healthy steps), or the gradient
    norm stays below 1e-6x its first value while the loss does not fall to 0, WINDOW steps in a row

"First value" (the first positive one; on resume, the run's own first recorded value) anchors the
scale, so a loss or gradient that has been near zero for a while (a trained model, a batch with no
active triplets) cannot trip the rule on ordinary noise; the median
over recent healthy steps follows the run as it trains. The parameter norm is seeded with the
norm of the starting state (before the first update), so an update that blows the parameters up in
the first step is caught at once. Checking is host-side on metrics the train loop reads anyway (one
step behind the device), so it adds no device synchronisation.

The last clause is a collapse: a learning rate too high for the network (3-30 on the tiny MNIST
test net) can, instead of exploding, kill every ReLU in a few steps, so that every image embeds to
the same point. The loss then sits at its value for identical embeddings (the margin for the
triplet losses, log P for the prototypical one) and its gradient is 0, or rounding noise around 0
(1e-9-1e-5 against a first gradient norm of ~6); only Adam's fading momentum still moves the
weights, and it rarely wakes the network. Such a run trained for its whole schedule at chance
(validation 0.10 on MNIST) with finite, calm metrics. Healthy runs of every loss stayed above 5e-3x
their first gradient norm (a review's 1,000-step runs; stop 39), and a gradient of 0 with a loss of 0
(a batch with no active triplet) does not count.

The checkpoints to distrust differ: a divergence spoils the steps just before it, a collapse every
step from a little before its stuck streak began (the gradient was mostly 0 already; a re-run from
the step before the streak, even at the default learning rate, collapsed again). So a collapse moves
aside every checkpoint from WINDOW steps before its streak on, the one the run resumed from included.
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
# A gradient norm below this fraction of the run's first one, with a positive loss, is a stuck step.
COLLAPSE_GRADIENT_RATIO = 1e-6


class DivergenceError(RuntimeError):
    """Training diverged at `step`; `metric`, `value` and `reference` say how. `start_step` is the
    step this process started (resumed) from; `collapsed_since` the first step of a collapse's
    stuck streak (None for a divergence)."""

    def __init__(self, message: str, step: int, metric: str, value: float, reference: Optional[float],
                 start_step: int = 0, collapsed_since: Optional[int] = None):
        super().__init__(message)
        self.step, self.metric, self.value, self.reference = step, metric, value, reference
        self.start_step, self.collapsed_since = start_step, collapsed_since


def rule(factor: float = DEFAULT_FACTOR, window: int = DEFAULT_WINDOW) -> str:
    if not factor:
        return "stop when any metric is non-finite"
    return (f"stop when any metric is non-finite, or the loss, gradient norm or parameter norm exceeds "
            f"{factor:g}x max(its first value, its median over the last {window} healthy steps), or the "
            f"gradient norm stays below {COLLAPSE_GRADIENT_RATIO:g}x its first value while the loss does "
            f"not fall to 0, {window} steps in a row")


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

    def seed_streak(self, rows) -> None:
        """A collapse's stuck streak from before a resume (metrics.jsonl's rows up to the resumed
        step, after `seed_first`), so that legs shorter than the window still add up to one."""
        since = None
        for row in rows:
            if "grad_norm" in row and "loss" in row:
                since = (row["step"] if since is None else since) if self._stuck(row) else None
        self._stuck_since = since

    def _stuck(self, values: Mapping[str, float]) -> bool:
        """A training step with a positive loss and (next to) no gradient: one step of a collapse."""
        first = self._first.get("grad_norm", 0.0)
        return values["grad_norm"] <= COLLAPSE_GRADIENT_RATIO * first and values["loss"] > 0.0

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
                if self._stuck(values):
                    first = self._first.get("grad_norm", 0.0)
                    self._stuck_since = step if self._stuck_since is None else self._stuck_since
                    if step - self._stuck_since + 1 >= self.window:
                        raise DivergenceError(
                            f"training collapsed at step {step}: the gradient norm has stayed below "
                            f"{COLLAPSE_GRADIENT_RATIO:g}x its first value ({first:.3g}) since step "
                            f"{self._stuck_since} while the loss stayed at {values['loss']:.4g} (every image "
                            f"embeds to about the same point, and no gradient reaches the weights)",
                            step, "grad_norm", values["grad_norm"], first, self.start_step, self._stuck_since)
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
    already going wrong; for a collapse, every one from `divergence_window` steps before its stuck
    streak on: the module's docstring says why), and returns the error with one line saying which
    step a re-run resumes from."""
    window = int(config.get("divergence_window", DEFAULT_WINDOW))
    factor = float(config.get("divergence_factor", DEFAULT_FACTOR))
    if error.collapsed_since is not None:  # not even the step this leg resumed from: it may be collapsed
        keep_up_to = error.collapsed_since - 1 - window
        event, before = "collapse", f"saved from {window} steps before the collapse began on"
    else:
        keep_up_to = max(error.step - window, error.start_step)
        event, before = "divergence", f"saved less than {window} steps before it"
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
                  f"the {event} ({os.path.join(workdir, 'checkpoints', str(steps[-1]))})")
    else:
        resume = f"{advice} and re-run: there is no checkpoint from before the {event}, so it starts from scratch"
    aside = f"; {len(moved)} checkpoint(s) {before} moved to {os.path.join(workdir, 'diverged')}" if moved else ""
    message = f"{error} (rule: {rule(factor, window)}){aside}; {resume}"
    return DivergenceError(message, error.step, error.metric, error.value, error.reference, error.start_step,
                           error.collapsed_since)
