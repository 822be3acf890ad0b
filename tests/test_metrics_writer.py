"""metrics.jsonl gets every write; TensorBoard the per-step training metrics every N steps and
everything else (validation, speed, overhead) always."""
import json

from siamese_jax.metrics_writer import MetricsWriter


class _RecordingTensorBoard:
    def __init__(self):
        self.calls = []

    def add_scalar(self, name, value, step):
        self.calls.append((name, step))

    def close(self):
        pass


def test_every_step_metrics_reach_tensorboard_every_n_steps_and_the_rest_always(tmp_path):
    writer = MetricsWriter(str(tmp_path), tensorboard_every_steps=10)
    writer._tb = tb = _RecordingTensorBoard()
    for step in range(1, 26):
        writer.write(step, {"loss": 1.0 / step, "grad_norm": 2.0}, every_step=True)
    writer.write(7, {"val_one_shot_accuracy": 0.5})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 26))  # the file keeps every step
    assert sorted({s for n, s in tb.calls if n == "train/loss"}) == [10, 20]
    assert ("validation/val_one_shot_accuracy", 7) in tb.calls


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path), enabled=False)
    writer.write(10, {"loss": 1.0}, every_step=True)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_after_a_torn_last_line_keeps_the_next_record(tmp_path):
    """Killed mid-write: the last line has no newline. Resuming at a step after every parsed record
    must not append the next record onto the torn line (both were lost to read_jsonl before)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"loss": 0.1, "step": s}) + "\n" for s in range(1, 11)) + '{"loss": 0.09, "st')
    writer = MetricsWriter(str(tmp_path), tensorboard_every_steps=1000)
    writer.truncate_after(10)
    writer.write(11, {"loss": 0.0909})
    writer.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 12))


def _python(script):
    """`script` in a fresh interpreter (what it imports, or a hang, stays out of this process)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_the_tensorboard_writer_does_not_import_pytorch(tmp_path, require):
    # tensorboardX imports torch at module level when it is installed (~1 s of every training's start);
    # the writer keeps it out, and torch stays importable after. Without torch there is nothing to
    # keep out (the check would pass trivially): skipped, or a failure under CI=true.
    require("torch")
    script = (
        "import sys, importlib.util\n"
        "from siamese_jax.metrics_writer import MetricsWriter\n"
        f"w = MetricsWriter({str(tmp_path)!r}); w.write(1, {{'loss': 1.0}}); w.close()\n"
        "assert 'tensorboardX' in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)[:5]\n"
        "if importlib.util.find_spec('torch') is not None:\n"
        "    import torch; torch.zeros(1)\n"
        "print('ok')\n")
    r = _python(script)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "tensorboard").iterdir())


def test_a_dead_tensorboard_writer_turns_tensorboard_off_instead_of_blocking_for_ever(tmp_path):
    # A full disk ends tensorboardX's writer thread with an OSError; the writes after it used to block
    # for ever on its full queue (and SIGTERM with them). Here the thread's file write fails the same way.
    script = (
        "import errno, time, logging\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from siamese_jax.metrics_writer import MetricsWriter\n"
        f"w = MetricsWriter({str(tmp_path)!r}, tensorboard_every_steps=1)\n"
        "w.write(1, {'loss': 1.0})\n"
        "def full(*a):  # slow, then failing: the writes fill the queue while the thread still lives\n"
        "    time.sleep(0.3)\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "w._tb._get_file_writer().event_writer._ev_writer.write_event = full\n"
        "for step in range(2, 2000):\n"
        "    w.write(step, {'loss': 1.0 / step, 'a': 1.0, 'b': 2.0, 'c': 3.0, 'd': 4.0, 'e': 5.0, 'f': 6.0})\n"
        "w.close()\n"
        "print('done')\n")
    r = _python(script)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr[-2000:]
    assert "TensorBoard is off for the rest of this run" in r.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 2000))  # metrics.jsonl kept every value


def _events(directory):
    """Every Event record of the TensorBoard files in `directory` (TFRecord framing: length, its
    CRC, the data, its CRC), in file order."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(directory.iterdir()):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
            at += 12 + length + 4
    return events


def test_a_resumed_run_tells_tensorboard_to_drop_the_killed_runs_later_events(tmp_path):
    # A run killed at step 25 after its checkpoint at 20 resumes from 20: metrics.jsonl is cut back,
    # but the event files are append-only, and TensorBoard drew steps 21-25 twice (backwards from 25
    # to 21). tensorboardX's purge_step writes the marker from which TensorBoard drops them.
    from tensorboardX.proto import event_pb2

    first = MetricsWriter(str(tmp_path), tensorboard_every_steps=1)
    for step in range(1, 26):
        first.write(step, {"loss": 1.0})
    first.close()
    resumed = MetricsWriter(str(tmp_path), tensorboard_every_steps=1)
    resumed.truncate_after(20)
    resumed.write(21, {"loss": 0.5})
    resumed.close()
    starts = [e.step for e in _events(tmp_path / "tensorboard") if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [21]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    writer = MetricsWriter(str(fresh))
    writer.truncate_after(0)  # a run from step 0 marks its start too: TensorBoard's Python loader
    writer.write(1, {"loss": 1.0})  # ignores a run's first marker, so the next leg's must not be it
    writer.close()
    starts = [e.step for e in _events(fresh / "tensorboard") if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [1]


def test_a_run_killed_before_its_first_checkpoint_restarts_with_its_old_steps_dropped(tmp_path):
    # Killed at step 15 with no checkpoint: the rerun starts at 0. Both legs write a start marker, so
    # TensorBoard (its Python loader ignores a run's first marker) drops the first leg's steps 1-15
    # at the second leg's marker instead of drawing every step twice.
    from tensorboardX.proto import event_pb2

    import time

    for last in (15, 30):
        time.sleep(1.1)  # an event file is named by its second: a leg per file, as two real legs are
        leg = MetricsWriter(str(tmp_path), tensorboard_every_steps=1)
        leg.truncate_after(0)
        for step in range(1, last + 1):
            leg.write(step, {"loss": 1.0 / step})
        leg.close()
    events = _events(tmp_path / "tensorboard")
    starts = [i for i, e in enumerate(events) if e.session_log.status == event_pb2.SessionLog.START]
    assert [events[i].step for i in starts] == [1, 1]
    # What TensorBoard keeps: at the last marker, everything before it from step 1 on is dropped.
    kept = [e.step for e in events[starts[-1]:] if e.summary.value]
    assert kept == list(range(1, 31))


def test_tensorboard_tags_group_the_metrics_by_what_they_measure():
    from siamese_jax.metrics_writer import tensorboard_tag

    assert [tensorboard_tag(k) for k in ("loss", "active_fraction", "val_one_shot_accuracy",
                                         "val_one_shot_accuracy_live", "steps_per_second",
                                         "images_per_second", "validation_seconds", "checkpoints_seconds")] == [
        "train/loss", "train/active_fraction", "validation/val_one_shot_accuracy",
        "validation/val_one_shot_accuracy_live", "speed/steps_per_second", "speed/images_per_second",
        "time/validation_seconds", "time/checkpoints_seconds"]


def test_the_final_evaluation_reaches_tensorboard_at_the_evaluated_step(tmp_path):
    from siamese_jax.metrics_writer import write_evaluation

    results = {"dataset": "omniglot", "checkpoint_step": 400, "train_seconds": 12.0,
               "lake_20_runs": {"accuracy": 0.975, "error_rate": 2.5, "num_trials": 400, "errors_per_run": [0, 1]},
               "episodes": {"within_alphabet": {"20-way-1-shot": {"mean": 0.87, "ci95": 0.006, "num_episodes": 1000}}},
               "retrieval": {"precision_at_1": 0.89, "mean_average_precision_at_r": 0.63, "num_queries": 10},
               "verification": {"test_accuracy": 0.99, "roc_auc": float("nan"), "threshold": 0.6,
                                "threshold_chosen_on": "text"}}
    write_evaluation(str(tmp_path), 400, results)
    got = {v.tag: (e.step, round(v.simple_value, 6)) for e in _events(tmp_path / "tensorboard") for v in e.summary.value}
    assert got == {"eval/lake_20_runs/accuracy": (400, 0.975),
                   "eval/episodes/within_alphabet/20-way-1-shot": (400, 0.87),
                   "eval/retrieval/precision_at_1": (400, 0.89),
                   "eval/retrieval/mean_average_precision_at_r": (400, 0.63),
                   "eval/verification/test_accuracy": (400, 0.99)}  # counts, a distance, text and NaN left out


def test_the_final_evaluation_is_not_failed_by_an_unwritable_tensorboard_folder(tmp_path, caplog):
    from siamese_jax.metrics_writer import write_evaluation

    (tmp_path / "tensorboard").write_text("a file where the folder should be")
    write_evaluation(str(tmp_path), 400, {"lake_20_runs": {"accuracy": 0.975}})  # no exception
    assert "TensorBoard: the evaluation's scores were not written" in caplog.text


def test_a_re_evaluation_whose_writer_dies_leaves_the_earlier_evaluation_alone(tmp_path, monkeypatch):
    # A full disk ends tensorboardX's writer thread: the new file held part of the scores and stayed
    # beside the earlier complete one, two points per tag at one step (stop 45's write audit).
    from siamese_jax import metrics_writer

    logdir = tmp_path / "tensorboard"
    metrics_writer.write_evaluation(str(tmp_path), 400, {"lake_20_runs": {"accuracy": 0.97}})
    (first,) = logdir.iterdir()
    first.rename(logdir / "events.out.tfevents.1000000000.host.evaluation")
    monkeypatch.setattr(metrics_writer, "_tensorboard_has_room", lambda tb, events: False)  # the thread died
    opened, writer_class = [], metrics_writer._summary_writer_class()
    monkeypatch.setattr(metrics_writer, "_summary_writer_class",
                        lambda: lambda *a, **kw: opened.append(writer_class(*a, **kw)) or opened[-1])
    try:
        metrics_writer.write_evaluation(str(tmp_path), 400, {"lake_20_runs": {"accuracy": 0.98}})
    finally:  # its thread only seemed dead: unclosed, it ran on for the session, holding its file open
        for tb in opened:
            tb.close()
    assert [p.name for p in logdir.iterdir()] == ["events.out.tfevents.1000000000.host.evaluation"]
    got = {v.tag: (e.step, round(v.simple_value, 6)) for e in _events(logdir) for v in e.summary.value}
    assert got == {"eval/lake_20_runs/accuracy": (400, 0.97)}


def test_a_re_evaluation_replaces_the_earlier_evaluation_in_tensorboard(tmp_path):
    from siamese_jax.metrics_writer import write_evaluation

    logdir = tmp_path / "tensorboard"
    write_evaluation(str(tmp_path), 400, {"lake_20_runs": {"accuracy": 0.97}})
    (first,) = logdir.iterdir()  # named as if written a while ago (the writers name files by the second)
    first.rename(logdir / "events.out.tfevents.1000000000.host.evaluation")
    writer = MetricsWriter(str(tmp_path))
    writer.write(400, {"val_one_shot_accuracy": 0.7})
    writer.close()
    write_evaluation(str(tmp_path), 400, {"lake_20_runs": {"accuracy": 0.98}})
    names = sorted(p.name for p in logdir.iterdir())
    assert len(names) == 2 and sum(name.endswith(".evaluation") for name in names) == 1, names
    got = {v.tag: (e.step, round(v.simple_value, 6)) for e in _events(logdir) for v in e.summary.value}
    assert got == {"eval/lake_20_runs/accuracy": (400, 0.98), "validation/val_one_shot_accuracy": (400, 0.7)}
