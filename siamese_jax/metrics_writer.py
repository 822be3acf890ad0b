"""Training metrics to `metrics.jsonl` and TensorBoard event files (tensorboardX: no TensorFlow)."""
from __future__ import annotations

import contextlib
import logging
import os
import time

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
        self._tb_off = False  # set when tensorboardX's writer thread died (e.g. a full disk)
        self._tb_dir = os.path.join(workdir, "tensorboard")
        self._purge_step = None  # a resumed run's first step: TensorBoard hides older events from it on

    def truncate_after(self, step: int) -> None:
        """On resume: drop records newer than the restored checkpoint, so the curves don't double back."""
        if not self.enabled:
            return
        # The event files are append-only: tensorboardX's purge_step writes a marker from which
        # TensorBoard drops the events of the steps after `step` written before (a killed run's).
        # Written by every leg, the first (step 0) too: TensorBoard's Python loader ignores the first
        # marker of a run, and a run killed before its first checkpoint restarts at 0 (the review of
        # stop 38: each step twice in TensorBoard, none twice in metrics.jsonl).
        self._purge_step = step + 1
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
        tb = self._tensorboard(len(scalars))
        for k, v in scalars.items() if tb else ():
            tb.add_scalar(tensorboard_tag(k), v, int(step))

    def write_text(self, tag: str, text: str, step: int) -> None:
        """A text summary (the run's config) in TensorBoard's Text tab; nothing in metrics.jsonl."""
        tb = self._tensorboard(1) if self.enabled else None
        if tb:  # Markdown: indented by four spaces, the JSON shows as a code block.
            tb.add_text(tag, "\n".join("    " + line for line in text.splitlines()), int(step))

    def _tensorboard(self, events: int):
        """The event writer (opened on first use) once it has room for `events` more; None when
        TensorBoard is off for this run (its writer thread died: a full disk)."""
        if self._tb_off:
            return None
        if self._tb is None:
            self._tb = _summary_writer_class()(self._tb_dir, flush_secs=10, max_queue=100, purge_step=self._purge_step)
        if not _tensorboard_has_room(self._tb, events):
            self._tb_off, self._tb = True, None
            logging.getLogger(__name__).warning(
                "TensorBoard's event writer stopped (its error is printed above; a full disk?): TensorBoard is "
                "off for the rest of this run, metrics.jsonl keeps every value")
            return None
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            if _tensorboard_has_room(self._tb, 1):  # close() queues one more item and waits for the thread
                self._tb.close()
            self._tb = None


def tensorboard_tag(key: str) -> str:
    """TensorBoard's tag for a metrics.jsonl key: grouped by what it measures (TensorBoard draws one
    section per prefix); metrics.jsonl keeps the bare keys, which the plots and the divergence rule read.

    validation/  val_* (one-shot accuracy on the held-out classes, `config.val_episodes` episodes)
    speed/       steps_per_second, images_per_second (since the last log line, validation excluded)
    time/        validation_seconds, checkpoints_seconds (the run's total so far, one point per leg)
    train/       the loss and the statistics of each step's batch (loss, active_fraction, norms, distances)
    """
    if key.startswith("val_"):
        return "validation/" + key
    if key in ("steps_per_second", "images_per_second"):
        return "speed/" + key
    if key.endswith("_seconds"):
        return "time/" + key
    return "train/" + key


# results.json's keys that are counts or details, not scores (kept out of TensorBoard's eval/ section).
_NOT_SCORES = {"num_episodes", "num_trials", "num_queries", "num_lone_queries", "num_test_pairs",
               "ci95", "error_rate", "errors_per_run", "threshold"}


def evaluation_scalars(results: dict) -> dict:
    """results.json's scores as TensorBoard tags: eval/lake_20_runs/accuracy,
    eval/episodes/within_alphabet/20-way-1-shot, eval/retrieval/precision_at_1, eval/verification/..."""
    out = {}

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, path + [key])
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _NOT_SCORES:
                # an episode protocol's score is its "mean": named by the protocol alone
                out["/".join(["eval"] + path + ([] if key == "mean" else [key]))] = float(value)

    walk({k: v for k, v in results.items() if isinstance(v, dict)}, [])
    return out


def write_evaluation(workdir: str, step: int, results: dict) -> None:
    """The final evaluation's scores (`evaluation_scalars`) into the run's TensorBoard events, at the
    evaluated checkpoint's step, beside its validation curve. Best effort: results.json is the record.

    A re-evaluation (`siamese-evaluate --workdir`, with other test-time views, say) replaces the
    earlier evaluation's file once its own is written, as it replaces results.json: two files drew two
    points per tag at one step, and TensorBoard showed whichever it read last."""
    scalars = {k: v for k, v in evaluation_scalars(results).items() if v == v and abs(v) != float("inf")}
    if not scalars:
        return
    logdir = os.path.join(workdir, "tensorboard")
    this_file, written = None, False
    try:
        # Its own file name: tensorboardX names a file by the second it opens and truncates a file of
        # the same name, so a writer opened in the same second as the training's would erase its events.
        tb = _summary_writer_class()(logdir, flush_secs=10, max_queue=100, filename_suffix=".evaluation")
        this_file = _event_file_name(tb)  # (before close: a closed writer's accessor opens a new file)
        try:
            if _tensorboard_has_room(tb, len(scalars)):
                for tag, value in scalars.items():
                    tb.add_scalar(tag, value, int(step))
                written = True
        finally:
            if _tensorboard_has_room(tb, 1):
                tb.close()
            else:  # its writer thread died (a full disk): the file may hold part of the scores
                written = False
    except OSError as e:  # a read-only or full tensorboard/: results.json, already written, is the record
        logging.getLogger(__name__).warning("TensorBoard: the evaluation's scores were not written (%s)", e)
        written = False
    if not written:  # a partial file beside the earlier evaluation's would draw two points per tag
        if this_file is not None:
            with contextlib.suppress(OSError):
                os.remove(this_file)
        return
    if this_file is not None:  # (a failed close raised above: nothing is removed then)
        try:
            for name in os.listdir(logdir):
                path = os.path.join(logdir, name)
                if name.endswith(".evaluation") and os.path.abspath(path) != this_file:
                    os.remove(path)
        except OSError as e:
            logging.getLogger(__name__).warning(
                "TensorBoard: an earlier evaluation's event file was not removed (%s); it shows beside this one", e)


def _event_file_name(tb):
    """The absolute path of the event file a tensorboardX writer wrote (private fields; None if absent)."""
    try:
        return os.path.abspath(tb._get_file_writer().event_writer._ev_writer._file_name)
    except AttributeError:
        return None


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


def _tensorboard_has_room(tb, events: int) -> bool:
    """Waits until tensorboardX's event queue has room for `events` more; False if its writer thread
    has died instead.

    An OSError in that thread (a full disk) ends it and nothing reports it; the writes after it then
    blocked for ever on its full queue, and so did `close` and tensorboardX's own atexit close, so
    the run ignored SIGINT and SIGTERM (found by the review of 2026-12-04). Checking the thread only
    before a write was not enough: it can die while a put waits for room. So a put is made only when
    it cannot wait. A dead writer is marked closed, which makes its `add_event`, `flush` and `close`
    no-ops. Reads tensorboardX's private fields; with another layout nothing is checked."""
    try:
        event_writer = tb._get_file_writer().event_writer
        worker, queue = event_writer._worker, event_writer._event_queue
        capacity = queue._maxsize
    except AttributeError:
        return True
    if worker is None or queue is None:  # closed already
        return True
    while worker.is_alive():
        try:
            if queue.qsize() + min(events, capacity) <= capacity:
                return True
        except NotImplementedError:  # macOS has no qsize: the thread's liveness is all we check
            return True
        time.sleep(0.01)
    event_writer._closed = True
    return False
