"""`python -m experiments.train` as 2 processes x 2 simulated CPU devices on JAX's distributed runtime.

Real processes, real cross-process collectives (gloo over localhost), real orbax checkpoints written by
both processes together. One scenario, in order:

1. 2 x 2, a long run; SIGTERM to process 1 only (a pre-empted host) once training is under way:
   both processes agree on a step, save one checkpoint together and exit 130.
2. 2 x 2 again on the same workdir: resumes from that checkpoint, finishes, evaluates; both exit 0;
   metrics.jsonl, results.json, config.json, plots and the results table are written ONCE (process 0).
3. 1 x 4 (one process, four devices), uninterrupted, same config: the same losses. Both
   runs use the same 4-device program; only the collectives differ (XLA's in-process ones vs gloo
   across processes) and may sum in another order, so results agree to rounding, not bit for bit:
   the first steps differ by ~1 float32 ulp (~1e-7 relative), and Adam lets that grow. Usually it
   stays below 1e-5 over 100 steps, but once the rounding flips a near-tie in batch-hard mining (a
   discrete choice) the two runs follow slightly different paths: CI saw 2.4e-4 at step 54. So the
   first EARLY_STEPS steps must agree to EARLY_RTOL, where a flip is very unlikely and where every
   real data-parallel bug shows at once (batch statistics or mining per device change step 1; a lost
   or N-times gradient changes step 2 by percents). After a flip the two runs are two different
   paths of the same training, step for step apart by percents (here: the flip at step 54 grew to
   1.2e-2 at step 66 and 8e-2 at step 81), so the later steps are compared as a whole: their MEAN
   loss must agree to LATE_RTOL (4e-3 after that flip), which still catches a run that drifts away,
   and the validation and test accuracies to the noise of two such paths. Other metrics are not
   compared: the embedding's final bias gets a mathematically zero gradient under distance losses,
   Adam turns its rounding noise into lr-sized steps, and the embedding norm drifts (5e-4 after 6 steps) while every distance, hence the loss,
   stays equal.
4. `experiments.evaluate` on 1 process restores the 2-process checkpoint: same results.

A hung peer cannot hang CI: every wait has a deadline, after which both processes are killed.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import child_env

from siamese_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# MNIST keeps data loading and the evaluation short; batch_hard mines negatives over the GLOBAL batch,
# so the embeddings are all-gathered across processes inside the step. Every run has the same
# num_steps (the learning-rate schedule depends on it); the pre-empted run stops long before it.
STEPS = 100
TINY = ["--dataset=mnist", "--loss=batch_hard", "--config.widths=(8,8)", "--config.embedding_dim=16",
        "--config.classes_per_batch=8", "--config.images_per_class=2", "--config.val_episodes=10",
        f"--config.num_steps={STEPS}", "--config.log_every_seconds=1", "--config.eval_every_steps=100000",
        "--config.checkpoint_every_steps=100000",
        "--config.test_time_shifts=cross5"]  # the final evaluation's shift average is a collective too
EARLY_STEPS, EARLY_RTOL, LATE_RTOL = 20, 1e-4, 2e-2


@pytest.fixture(scope="module")
def env(data_dir):
    # The session's data cache (conftest): every module decoded the archives again into its own.
    e = dict(os.environ, SIAMESE_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    e["XLA_FLAGS"] = child_env.xla_flags()
    return e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# The pieces gloo's connection message is written in (words, rank counts, punctuation).
_GLOO_PIECES = re.compile(r"\[Gloo\]|Rank|is connected to|peer ranks|Expected number of connected|is :|[\d.:\s]")


class Launch:
    """`num_processes` processes of one command, each with its own log files; killed on exit."""

    def __init__(self, module, args, env, tmp_path, name, num_processes, devices_per_process):
        self.logs, self.procs = [], []
        port = _free_port()
        for i in range(num_processes):
            cmd = [sys.executable, "-m", module, *args]
            if num_processes > 1:
                cmd += [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
                        f"--process_id={i}"]
            e = dict(env, XLA_FLAGS=child_env.xla_flags(devices_per_process))
            out, err = tmp_path / f"{name}.{i}.out", tmp_path / f"{name}.{i}.err"
            self.logs.append((out, err))
            with open(out, "w") as fo, open(err, "w") as fe:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=e, stdout=fo, stderr=fe))

    def wait(self, timeout):
        deadline = time.time() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"timed out after {timeout} s; killed all processes. stderr of process 0:\n"
                        + self.stderr(0)[-3000:])
        return [p.returncode for p in self.procs]

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def stdout(self, i):
        # gloo (C++) prints "[Gloo] Rank r is connected to N peer ranks. ..." on stdout when it sets up
        # a collective, piece by piece from several threads at once, so a line can hold a piece of
        # another thread's message: a lone "3" once failed the one-table check below.
        return "".join(line for line in self.logs[i][0].read_text().splitlines(keepends=True)
                       if "[Gloo]" not in line and _GLOO_PIECES.sub("", line).strip())

    def stderr(self, i):
        return self.logs[i][1].read_text()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def _train(env, tmp_path, name, workdir, num_processes, devices, *args):
    # ml_collections keeps the FIRST of two overrides of one key, so a test's own value replaces TINY's.
    overridden = {a.split("=")[0] for a in args}
    tiny = [a for a in TINY if a.split("=")[0] not in overridden]
    return Launch("experiments.train", [f"--workdir={workdir}", *tiny, *args], env, tmp_path, name,
                  num_processes, devices)


def _losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return records, {r["step"]: r["loss"] for r in records if "loss" in r}


def _fail_msg(run, rcs):
    return f"exit codes {rcs}\n" + "\n".join(f"--- process {i} stderr:\n{run.stderr(i)[-2500:]}" for i in range(len(rcs)))


@pytest.mark.slow
def test_two_processes_preempt_resume_and_match_one_process(env, tmp_path):
    workdir = tmp_path / "two"

    # 1. Pre-empt one host of an endless run.
    with _train(env, tmp_path, "preempted", workdir, 2, 2) as run:
        deadline = time.time() + 240
        while time.time() < deadline and len(_losses(workdir)[1] if (workdir / "metrics.jsonl").exists() else ()) < 3:
            if any(p.poll() is not None for p in run.procs):
                break
            time.sleep(0.2)
        assert all(p.poll() is None for p in run.procs), _fail_msg(run, [p.poll() for p in run.procs])
        run.procs[1].send_signal(signal.SIGTERM)
        rcs = run.wait(180)
        assert rcs == [130, 130], _fail_msg(run, rcs)
        saved = re.search(r"saved a checkpoint at step (\d+)", run.stderr(0))
        assert saved, run.stderr(0)[-3000:]
        assert "saved a checkpoint" in run.stderr(1)  # process 1 warns too (warnings reach every log)
    stop = int(saved.group(1))
    assert 3 <= stop < STEPS
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [stop]

    # 2. The rerun resumes there, finishes and evaluates.
    total = STEPS
    with _train(env, tmp_path, "resumed", workdir, 2, 2) as run:
        rcs = run.wait(300)
        assert rcs == [0, 0], _fail_msg(run, rcs)
        assert f"resuming from step {stop}" in run.stderr(0)
        assert "pair accuracy (test)" in run.stdout(0) and run.stdout(1).strip() == ""  # one table
        progress = re.compile(r"step \d+/\d+  loss")  # (a one-step leg's line has no steps/s)
        assert not progress.search(run.stderr(1)) and progress.search(run.stderr(0))  # process 0 only
    records, two = _losses(workdir)
    assert sorted(two) == list(range(1, total + 1))  # every step once: only process 0 writes
    assert sum("val_one_shot_accuracy" in r for r in records) == 1
    results = json.loads((workdir / "results.json").read_text())
    assert results["processes"] == 2 and results["devices"] == 4 and results["checkpoint_step"] == total
    for name in ("pairs", "curves", "distances", "embedding_map"):
        assert (workdir / "plots" / f"{name}.png").stat().st_size > 1000, name
    assert sorted(p.name for p in workdir.iterdir() if not p.name.startswith(".")) == [
        "best", "checkpoints", "config.json", "metrics.jsonl", "plots", "results.json", "tensorboard"]
    # one event file per training leg and one of the final evaluation's scores, from process 0 only
    assert len(os.listdir(workdir / "tensorboard")) == 3

    # 3. One process, four devices, uninterrupted: the same losses at every step. (No plots: the
    # two-process run's are checked above, and these cost ~3 CPU-s of matplotlib.)
    one_dir = tmp_path / "one"
    with _train(env, tmp_path, "one", one_dir, 1, 4, "--config.plots=False") as run:
        rcs = run.wait(300)
        assert rcs == [0], _fail_msg(run, rcs)
    one_records, one = _losses(one_dir)
    assert sorted(one) == sorted(two)
    for step in range(1, EARLY_STEPS + 1):
        assert two[step] == pytest.approx(one[step], rel=EARLY_RTOL), f"step {step}: {two[step]} vs {one[step]}"
    late = [step for step in one if step > EARLY_STEPS]
    mean = lambda losses: sum(losses[step] for step in late) / len(late)  # noqa: E731
    assert mean(two) == pytest.approx(mean(one), rel=LATE_RTOL), f"mean loss after step {EARLY_STEPS}"
    # 10 validation episodes and 20,000 test pairs of two paths 50 steps apart (0.59 vs 0.56 and
    # 0.797 vs 0.798 after the step-54 flip): a broken run is far outside these bounds.
    val = lambda recs: [r["val_one_shot_accuracy"] for r in recs if "val_one_shot_accuracy" in r]  # noqa: E731
    assert val(records) == pytest.approx(val(one_records), abs=0.1)
    one_results = json.loads((one_dir / "results.json").read_text())
    assert results["verification"]["test_accuracy"] == pytest.approx(one_results["verification"]["test_accuracy"], abs=0.01)

    # 4. The 2-process checkpoint restores in 1 process (another process count).
    with Launch("experiments.evaluate", [f"--workdir={workdir}", "--nowrite"], env, tmp_path, "eval", 1, 4) as run:
        rcs = run.wait(300)
        assert rcs == [0], _fail_msg(run, rcs)
        assert f"{100 * results['verification']['test_accuracy']:.2f}%" in run.stdout(0)


def test_distributed_flags_are_jax_initialize_arguments():
    assert cli.distributed_init_args(None, None, None) is None  # one process
    assert cli.distributed_init_args("10.0.0.1:1234", 4, 3) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert cli.distributed_init_args("auto", None, None) == {}  # jax.distributed.initialize() detects
    assert cli.distributed_init_args("auto", 2, 1) == {"num_processes": 2, "process_id": 1}


@pytest.mark.parametrize("address, n, i, needle", [
    (None, None, 1, "--process_id needs --coordinator_address"),
    (None, 2, None, "--num_processes needs --coordinator_address"),
    ("localhost:1234", 2, None, "needs --process_id"),
    ("localhost:1234", None, None, "needs --num_processes and --process_id"),
    ("localhost:1234", 2, 2, "--process_id=2 must be below --num_processes=2"),
    ("localhost:1234", 0, 0, "--num_processes=0 must be at least 1"),
    ("localhost", 2, 0, "is not host:port"),
    ("localhost:http", 2, 0, "is not host:port"),
])
def test_bad_distributed_flags_are_one_line_errors(address, n, i, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        cli.distributed_init_args(address, n, i)


@pytest.mark.slow
def test_two_processes_resume_past_a_damaged_newest_checkpoint(env, tmp_path):
    """The newest checkpoint is damaged (its state files cut to a third): process 0 moves it aside,
    both fall back to the step before and train on. Both managers must forget the moved step:
    where only process 0's did, process 1 skipped the re-save of that step number and process 0
    waited for it in orbax's barrier for ever (a hang, found by review on 2026-12-04)."""
    workdir = tmp_path / "run"
    own = ["--config.num_steps=10", "--config.checkpoint_every_steps=5", "--config.test_time_shifts=none", "--noevaluate"]

    def launch(name):
        return _train(env, tmp_path, name, workdir, 2, 2, *own)

    with launch("first") as run:
        rcs = run.wait(240)
        assert rcs == [0, 0], _fail_msg(run, rcs)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "5"]
    for root, _, files in os.walk(workdir / "checkpoints" / "10"):  # what a crash mid-copy leaves
        for name in files:
            path = os.path.join(root, name)
            if "state" in path and os.path.getsize(path) > 0:
                os.truncate(path, os.path.getsize(path) // 3)
    with launch("second") as run:
        rcs = run.wait(240)
        assert rcs == [0, 0], _fail_msg(run, rcs)
        assert "falling back to step 5" in run.stderr(0)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "5"]  # step 10 saved afresh
    assert os.listdir(workdir / "unreadable") == ["checkpoints-10"]


@pytest.mark.slow
def test_a_distilled_run_on_two_processes_equals_one_process_and_resumes_from_its_snapshot(env, tmp_path):
    """Distillation across processes: every process embeds the training set with the teacher and
    its half of each batch carries the teacher's rows of its own images; process 0 alone writes the
    snapshot of the teacher; at a resume both processes read that snapshot, the teacher's workdir
    being gone by then. A row taken for another image, or a process distilling from other
    embeddings, changes the loss from step 1 on: the 1 x 4 run is the reference, and the 2 x 2 run is
    stopped at step 6 and resumed to step 12."""
    teacher = tmp_path / "teacher"
    # One view: a teacher embeds the training set as it embeds at test time (TINY's cross5: 5 views, ~8 s more).
    with _train(env, tmp_path, "teacher", teacher, 1, 2, "--config.num_steps=4", "--config.test_time_shifts=none",
                "--noevaluate") as run:
        rcs = run.wait(240)
        assert rcs == [0], _fail_msg(run, rcs)
    # One schedule for both legs of the 2 x 2 run (12 steps long) and the reference.
    student = ["--config.lr_schedule_steps=12", f"--config.distill_teachers={teacher}", "--config.distill_weight=1.0",
               "--noevaluate"]
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    with _train(env, tmp_path, "one", one_dir, 1, 4, "--config.num_steps=12", *student) as run:
        rcs = run.wait(240)
        assert rcs == [0], _fail_msg(run, rcs)
    with _train(env, tmp_path, "first", two_dir, 2, 2, "--config.num_steps=6", *student) as run:
        rcs = run.wait(240)
        assert rcs == [0, 0], _fail_msg(run, rcs)
    assert sorted(os.listdir(two_dir / "teachers")) == ["0.msgpack", "teachers.json"]
    teacher.rename(tmp_path / "teacher-moved")  # a resume that loaded the source on any process fails
    with _train(env, tmp_path, "resumed", two_dir, 2, 2, "--config.num_steps=12", *student) as run:
        rcs = run.wait(240)
        assert rcs == [0, 0], _fail_msg(run, rcs)
        assert "resuming from step 6" in run.stderr(0) and "the teachers are loaded from" in run.stderr(0)
    records = {name: {r["step"]: r for r in _losses(d)[0] if "loss" in r} for name, d in (("one", one_dir),
                                                                                            ("two", two_dir))}
    assert sorted(records["two"]) == sorted(records["one"]) == list(range(1, 13))
    for step in range(1, 13):
        for key in ("loss", "distill_loss"):
            two, one = records["two"][step][key], records["one"][step][key]
            assert two > 0 and two == pytest.approx(one, rel=EARLY_RTOL), f"step {step} {key}: {two} vs {one}"


@pytest.mark.slow
def test_one_failed_process_ends_the_job_within_seconds(env, tmp_path):
    """Process 0 alone fails (here: it cannot write its TensorBoard log, a file is in the way) while
    process 1 waits in the next collective. The failed process used to run jax's atexit shutdown,
    whose barrier waited 300 s for process 1 and then aborted both with a C++ stack dump; now it
    exits 2 with its one-line error at once and process 1 fails as soon as its peer is gone."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "tensorboard").write_text("")
    args = [a for a in TINY if not a.startswith("--config.num_steps=")] + ["--config.num_steps=100000"]
    started = time.time()
    with Launch("experiments.train", [f"--workdir={workdir}", *args], env, tmp_path, "fail", 2, 1) as run:
        rcs = run.wait(200)
    assert time.time() - started < 150, "the job took as long as jax's shutdown barrier"
    assert rcs[0] == 2, _fail_msg(run, rcs)
    assert rcs[1] != 0, _fail_msg(run, rcs)
    last = run.stderr(0).strip().splitlines()[-1]
    assert last.startswith("error: ") and "tensorboard" in last, _fail_msg(run, rcs)
    assert "Barrier timed out" not in run.stderr(0) + run.stderr(1)


_SCRIPT_ONE_PROCESS_FAILS = r'''
import sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
address, pid = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(address, 2, pid)
from jax.experimental import multihost_utils
from siamese_jax import cli

def main():
    multihost_utils.process_allgather(np.int32(pid))  # under way together (gloo connected) ...
    if pid == 1:
        raise ValueError("process 1 cannot go on")
    multihost_utils.process_allgather(np.int32(pid))  # ... then process 0 waits for process 1, gone

cli.run_as_process(main)
'''


@pytest.mark.slow
def test_a_users_script_under_run_as_process_ends_within_seconds_when_one_process_fails(env, tmp_path):
    """A user's own 2-process script: process 1 fails while process 0 waits in a collective. A plain
    exception waited ~300 s in jax's shutdown barrier, then aborted both (the multi-process review of
    2026-12-06); under `cli.run_as_process`, as the CLIs run, the job ends within seconds with one
    line from the failed process."""
    started = time.time()
    rcs, outs = _two_processes_of_script(_SCRIPT_ONE_PROCESS_FAILS, lambda i, port: [f"localhost:{port}", str(i)],
                                         env, tmp_path, timeout=200)
    assert time.time() - started < 60, "the job took as long as jax's shutdown barrier"
    assert rcs[1] == 2 and rcs[0] != 0, (rcs, outs)
    assert outs[1][1].strip().splitlines()[-1] == "error: process 1 cannot go on", outs[1][1]


def _two_processes_of_script(source, argv_of, env, tmp_path, timeout):
    """`source` written to a file and run as 2 processes of 1 CPU device each, with this checkout's
    code; argv_of(process, port) is each one's arguments. Returns (exit codes, [(stdout, stderr)])."""
    script = tmp_path / "two_process_script.py"
    script.write_text(source)
    port = _free_port()
    e = dict(env, XLA_FLAGS=child_env.xla_flags(1), PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, str(script), *argv_of(i, port)], cwd=REPO, env=e,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"hung: killed both processes after {timeout} s")
    return [p.returncode for p in procs], outs


# Two processes of one job (argv: coordinator address, process id, workdir, ...) with a tiny model's
# replicated train state `state` and the workdir's `ck = Checkpoints(workdir)`.
_TWO_PROCESSES_TINY_STATE = r'''
import os
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
address, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(address, 2, pid)
import jax.numpy as jnp
from siamese_jax import checkpoints as C, models, parallel, train as T, train_step as ts
from siamese_jax.configs import default

c = default.get_config("omniglot")
c.widths, c.embedding_dim, c.image_size = (8, 8), 16, 16
mesh = parallel.make_data_mesh()
model, tx = models.build_model(c), ts.make_optimizer(c)
state = parallel.put_replicated(ts.create_train_state(model, tx, jax.random.PRNGKey(0), 16), mesh)
ck = C.Checkpoints(workdir)
'''

_FLAKY_RESTORE = _TWO_PROCESSES_TINY_STATE + r'''
failing = int(sys.argv[4])
for step in (1, 2):
    ck.save(state.replace(step=parallel.put_replicated(jnp.int32(step), mesh)), {})
    ck.wait()
ck.close()
real = C.restore_step
def flaky(manager, step, target, weights_only=False):  # a read error on one process only
    if pid == failing and step == 2:
        raise OSError("injected transient read error")
    return real(manager, step, target, weights_only)
C.restore_step = flaky
ck = C.Checkpoints(workdir)
try:
    got, _ = ck.restore_latest(state)
    print("RESTORED", int(got.step), flush=True)
except C.CheckpointError as e:
    print("ERROR", e, flush=True)
ck.close()
'''


@pytest.mark.slow
@pytest.mark.parametrize("failing", [1, 0])
def test_a_step_unreadable_on_one_process_only_is_an_error_on_every_process(env, tmp_path, failing):
    """Process 1 cannot read the newest step (a transient error) while process 0 can. Process 1 used
    to fall back to the older step and then wait alone in the barrier meant for moved-aside steps (a
    hang); had it not waited, the two would have trained on from different states. Now every process
    meets in that barrier and they compare the step each restored: one CheckpointError everywhere.
    With the error on process 0, the step process 1 read used to be moved aside before the
    comparison, so "run again" lost it: nothing is moved until the processes agree."""
    _, outs = _two_processes_of_script(
        _FLAKY_RESTORE, lambda i, port: [f"localhost:{port}", str(i), str(tmp_path / "run"), str(failing)],
        env, tmp_path, timeout=150)
    for i, (out, err) in enumerate(outs):
        assert "ERROR the processes read different checkpoint steps" in out, f"process {i}:\n{out}\n{err[-2000:]}"
        assert ("process 0: 2, process 1: 1" if failing == 1 else "process 0: 1, process 1: 2") in out
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2"]
    assert not (tmp_path / "run" / "unreadable").exists()


_FLAKY_EVALUATION_READS = _TWO_PROCESSES_TINY_STATE + r'''
for step, score in ((1, 0.25), (2, 0.5)):
    s = state.replace(step=parallel.put_replicated(jnp.int32(step), mesh))
    ck.save(s, {})
    ck.save_best(s, {}, {"val_one_shot_accuracy": score})
    ck.wait()
real_metrics = ck.best.metrics
def flaky_metrics(step):  # process 1 cannot read best/'s metrics
    if pid == 1:
        raise OSError("injected transient read error")
    return real_metrics(step)
ck.best.metrics = flaky_metrics
print("BEST", T._best_metric(ck), flush=True)
ck.close()

real = C.restore_step
def flaky(manager, step, target, weights_only=False):  # process 1 cannot read the newest step
    if pid == 1 and step == 2:
        raise OSError("injected transient read error")
    return real(manager, step, target, weights_only)
C.restore_step = flaky
try:  # what siamese-evaluate and export restore from: read-only, nothing moved aside
    got, _, where = C.restore_first_readable([os.path.join(workdir, "checkpoints")], state)
    print("RESTORED", int(got.step), flush=True)
except C.CheckpointError as e:
    print("ERROR", e, flush=True)
'''


@pytest.mark.slow
def test_evaluation_reads_on_several_processes_agree_or_fail_everywhere(env, tmp_path):
    """Two reads that went on separately on each process. (a) The best validation score so far,
    read from `best/` on each process: process 1 could not read it and took None, so at the next
    validation it alone would save a new best and wait in orbax's barrier for ever; now every
    process uses process 0's reading. (b) `siamese-evaluate` and `export` restore read-only, and
    there the processes never compared steps: process 1 evaluated step 1 while process 0 evaluated
    step 2, silently. Now both stop with one error."""
    _, outs = _two_processes_of_script(
        _FLAKY_EVALUATION_READS, lambda i, port: [f"localhost:{port}", str(i), str(tmp_path / "run")],
        env, tmp_path, timeout=150)
    for i, (out, err) in enumerate(outs):
        assert "BEST 0.5" in out, f"process {i}:\n{out}\n{err[-2000:]}"
        assert "ERROR the processes read different checkpoint steps" in out, f"process {i}:\n{out}\n{err[-2000:]}"
        assert "process 0: 2, process 1: 1" in out
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["run", "run\udcff"])  # the second: a workdir whose name is not UTF-8
def test_a_workdir_in_use_is_the_same_one_line_error_on_every_process(env, tmp_path, name):
    """Another run holds the workdir's lock. Process 0 alone took the lock and failed; process 1
    failed later at its first collective with an "unexpected" gloo error about its peer. Now every
    process learns process 0's outcome and exits 2 naming the holder."""
    import fcntl

    workdir = tmp_path / name
    workdir.mkdir()
    with open(workdir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("PID 4242 on host elsewhere, training\n")
        held.flush()
        with _train(env, tmp_path, "locked", workdir, 2, 1) as run:
            rcs = run.wait(120)
    assert rcs == [2, 2], _fail_msg(run, rcs)
    for i, prefix in enumerate(("error: workdir", "error: process 0: workdir")):
        last = run.stderr(i).strip().splitlines()[-1]
        assert last.startswith(prefix) and "is in use by another run (PID 4242 on host elsewhere" in last, last


@pytest.mark.slow
def test_a_diverged_multi_process_run_keeps_its_tensorboard_events(env, tmp_path):
    """A run that diverges (here: learning rate 1e6) stops on every process with exit 2. Since a failed
    process of a distributed job leaves with os._exit, tensorboardX's atexit flush no longer ran and
    the events file was empty: the curve was lost exactly when it was needed. The writer is now
    closed on every exit.

    (Learning rate 30 diverged here with jax 0.10 and collapsed instead with jax 0.12 on Python 3.12:
    every embedding equal, the loss at the margin, finite for ever; 1e6 explodes at the first steps.)"""
    workdir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("--config.num_steps=")] + ["--config.num_steps=100000",
                                                                          "--config.learning_rate=1e6"]
    with Launch("experiments.train", [f"--workdir={workdir}", *args], env, tmp_path, "diverge", 2, 1) as run:
        rcs = run.wait(200)
    assert rcs == [2, 2], _fail_msg(run, rcs)
    assert "diverged" in run.stderr(0).strip().splitlines()[-1]
    events = list((workdir / "tensorboard").glob("events.out.tfevents*"))
    assert events and sum(e.stat().st_size for e in events) > 500, [(e.name, e.stat().st_size) for e in events]


_CHECK_FAILS_ON_PROCESS_0 = r'''
import sys
from siamese_jax import config_check
real = config_check.check_workdir
def check_workdir(workdir):  # as on a host whose mount of the workdir is read-only
    import jax
    if jax.process_index() == 0:
        raise config_check.ConfigError(f"workdir {workdir}: not writable (Read-only file system)")
    return real(workdir)
config_check.check_workdir = check_workdir
from siamese_jax.cli import evaluate
evaluate.run()
'''


@pytest.mark.slow
def test_a_workdir_check_failing_on_one_host_only_is_one_error_on_every_process(env, tmp_path):
    """`siamese-evaluate` as 2 processes; the workdir is not writable from process 0's host only.
    Process 0 failed alone and process 1 aborted (exit 134) in the collective that followed; now
    every process checks, the outcomes are gathered, and both exit 2 naming the failure."""
    from siamese_jax.configs import default

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(default.get_config("mnist").to_json_best_effort())
    rcs, outs = _two_processes_of_script(
        _CHECK_FAILS_ON_PROCESS_0, lambda i, port: [f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
                                                    "--num_processes=2", f"--process_id={i}"], env, tmp_path, timeout=120)
    assert rcs == [2, 2], (rcs, [o[1][-1500:] for o in outs])
    last = [o[1].strip().splitlines()[-1] for o in outs]
    said = f"workdir {workdir}: not writable (Read-only file system); --nowrite evaluates it without writing"
    assert last[0].startswith(f"error: {said}"), last
    assert last[1].startswith(f"error: process 0: {said}"), last


# ------------------------------------------------------ the mutation review of 2026-12-06, round 3
# Each test below failed on a mutant of the code that every earlier test passed. In process: the
# multi-process runs above are slow, and these are the numbers they depend on.

def test_process_0_and_the_last_port_are_valid_distributed_flags():
    # Process 0 is the coordinator every job has; ports run from 1 to 65535.
    assert cli.distributed_init_args("localhost:65535", 2, 0) == {
        "coordinator_address": "localhost:65535", "num_processes": 2, "process_id": 0}
    for address in ("localhost:65536", "localhost:0"):
        with pytest.raises(ValueError, match="is not host:port"):
            cli.distributed_init_args(address, 2, 0)


def test_init_distributed_returns_this_process_then_the_count_and_keeps_a_chosen_cpu_collective(monkeypatch):
    """(process_index, process_count) from the flags, without starting JAX's backends; CPU
    collectives default to gloo when unset, and a user's own choice (mpi) is kept."""
    import jax

    joined = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: joined.append(kw))
    monkeypatch.setattr(jax, "process_index", lambda: pytest.fail("started the backends"))
    before = jax.config.jax_cpu_collectives_implementation
    try:
        jax.config.update("jax_cpu_collectives_implementation", None)
        assert cli.init_distributed("localhost:1234", 3, 1) == (1, 3)
        assert joined == [{"coordinator_address": "localhost:1234", "num_processes": 3, "process_id": 1}]
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
        jax.config.update("jax_cpu_collectives_implementation", "mpi")
        assert cli.init_distributed("localhost:1234", 2, 0) == (0, 2)
        assert jax.config.jax_cpu_collectives_implementation == "mpi"
    finally:
        jax.config.update("jax_cpu_collectives_implementation", before)
    assert cli.init_distributed(None, None, None) == (0, 1) and len(joined) == 2  # one process: no join


def test_only_process_0_logs_progress_and_the_others_tag_their_warnings(monkeypatch):
    import logging

    from siamese_jax import checkpoints

    monkeypatch.setattr(checkpoints, "install_stderr_filter", lambda: None)  # (pytest's own stderr)
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    # setup_logging also sets these loggers' levels; left at WARNING for the rest of the session.
    quieted = {name: logging.getLogger(name).level for name in ("absl", "jax", "jaxlib", "orbax", "tensorstore", "etils")}
    try:
        cli.setup_logging(1, 2)
        assert root.level == logging.WARNING
        assert "[process 1/2] " in root.handlers[0].formatter._fmt
        cli.setup_logging(0, 2)
        assert root.level == logging.INFO
        cli.setup_logging()
        assert root.level == logging.INFO and "[process" not in root.handlers[0].formatter._fmt
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        for name, level in quieted.items():
            logging.getLogger(name).setLevel(level)


@pytest.mark.slow
def test_a_sigint_while_the_final_checkpoint_is_written_interrupts_the_job_once_it_is_whole(env, tmp_path):
    """Ctrl-C as the last step's checkpoint is written. Several processes cannot stop there
    together (JAX's preemption notice, which the SIGINT is re-sent as, is read at steps, and none is
    left), and the loop's handler kept it: the SIGINT was lost and the job evaluated and exited 0.
    Now the interrupted process leaves once the save is whole (130, as a Ctrl-C during the
    evaluation would), and its peer fails within seconds."""
    from siamese_jax.checkpoints import saved_steps

    (tmp_path / "train_sigint_at_the_final_wait.py").write_text(
        "import os, runpy, signal, sys\n"
        "from siamese_jax import checkpoints\n"
        "wait = checkpoints.Checkpoints.wait\n"
        "def wait_after_a_sigint(self):  # the loop's one wait: after its last step\n"
        "    if '--process_id=0' in sys.argv:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return wait(self)\n"
        "checkpoints.Checkpoints.wait = wait_after_a_sigint\n"
        "runpy.run_module('experiments.train', run_name='__main__')\n")
    e = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), REPO, env.get("PYTHONPATH")])))
    workdir = tmp_path / "run"
    with Launch("train_sigint_at_the_final_wait", [f"--workdir={workdir}", *TINY, "--config.num_steps=4"], e,
                tmp_path, "sigint", 2, 1) as run:
        rcs = run.wait(240)
    assert rcs[0] == 130 and rcs[1] != 0, _fail_msg(run, rcs)
    assert "error: SIGINT received after the last step (saved at step 4)" in run.stderr(0), _fail_msg(run, rcs)
    assert saved_steps(str(workdir / "checkpoints")) == [4]  # whole: a re-run evaluates it
    assert not (workdir / "results.json").exists()
