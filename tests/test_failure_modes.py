"""Issue #10's Deliver list, one section per bullet: what a user's bad input or a broken run gets.

1. Every error path of every entry point: exit code 2 and ONE line naming the input and the problem
   (exit 1 is only compare's DIFFERENT, tests/test_inference.py); unexpected errors too, with a hint.
2. The whole config is validated before any data is loaded, each message naming the key and range.
3. Divergence (non-finite or exploding loss/gradient/parameter norm) stops within seconds, saves no
   diverged state, leaves no temp dirs and names a checkpoint that really resumes.
4. Checkpoints heal: an unreadable step is moved aside and written afresh; best/ falls back to
   checkpoints/; one warning line each, no tracebacks.
5. One run per workdir: the second run exits 2 at once naming the holder's PID; SIGKILL frees it.
6. Entry points after `pip install`: the siamese-train / siamese-evaluate console scripts, from any
   directory (the end-to-end test of section 3 trains and evaluates with them outside the checkout).
7. The output hygiene the issue lists: no PIL bomb warning, no absl "Restoring pure python logging"
   line before an error (asserted in section 2), file names that are not UTF-8 printed escaped.

Subprocesses only where the exit code and stderr are the point; they get a data root that does not
exist wherever an error must come before the data is read (had it been read, the error would be the
missing data, not the one asserted). Tests over ~20 s are marked slow (CI runs them).
"""
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import sys
import time
import struct
import zipfile
import zlib

import jax
import ml_collections
import numpy as np
import optax
import pytest

import child_env

from siamese_jax import checkpoints as C
from siamese_jax import config_check, console, divergence, embedding, inference, models
from siamese_jax import train_step as ts
from siamese_jax.configs import default
from siamese_jax.workdir_lock import WorkdirLock, WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # where pip put the console scripts of this environment
# Tiny MNIST runs: a 2-block 8-channel encoder, 8x2 P x K / 16 pairs, few validation episodes.
TINY = ["--dataset=mnist", "--config.widths=(8,8)", "--config.embedding_dim=16", "--config.val_episodes=10",
        "--config.classes_per_batch=8", "--config.images_per_class=2", "--config.batch_size=16",
        "--config.log_every_seconds=0", "--config.plots=False"]


def _env(data_dir="/nonexistent/siamese-data", **extra):
    e = dict(os.environ, SIAMESE_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    e["XLA_FLAGS"] = child_env.xla_flags()  # the CLI picks its CPU devices as a user's run would
    e.pop(console.TRACEBACK_ENV, None)
    # Nor the checkout on the path (conftest puts it there for other modules' subprocesses): the
    # console scripts run outside it must work as installed, without `experiments`.
    path = [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != os.path.abspath(REPO)]
    if path:
        e["PYTHONPATH"] = os.pathsep.join(path)
    else:
        e.pop("PYTHONPATH", None)
    return e


def _run(argv, *, cwd=REPO, env=None, timeout=300):
    return subprocess.run(argv, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _script(name):
    path = os.path.join(BIN, name)
    assert os.path.isfile(path), f"console script {name} is not installed in {BIN} (pip install -e .)"
    return path


def _train(*args, **kw):
    return _run([sys.executable, "-m", "experiments.train", *args], **kw)


def _one_error_line(r, needle=None):
    """Exit code 2 and stderr that is exactly one line, `error: ...` (returned)."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    if needle is not None:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def pngs(data_dir, tmp_path_factory):
    """Two Omniglot evaluation characters x 3 drawings as PNG files, one sub-folder per character."""
    root = tmp_path_factory.mktemp("pngs")
    with zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip") as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        chars = sorted({os.path.dirname(n) for n in names})[:2]
        for i, c in enumerate(chars):
            (root / f"char{i}").mkdir()
            for f in sorted(n for n in names if os.path.dirname(n) == c)[:3]:
                (root / f"char{i}" / os.path.basename(f)).write_bytes(z.read(f))
    return root


# =================================================================================================
# 1. Every error path of every entry point ends in exit 2 and one line
# =================================================================================================
def _edited_model_file(path, edit):
    """The shipped model file with its JSON metadata changed by `edit(meta)`, written to `path`."""
    from flax import serialization

    with open(inference.PRETRAINED_FILE, "rb") as f:
        blob = serialization.msgpack_restore(f.read())
    meta = json.loads(blob["meta"])
    edit(meta)
    blob["meta"] = json.dumps(meta)
    path.write_bytes(serialization.msgpack_serialize(blob))
    return str(path)


@pytest.mark.parametrize("case, needle", [
    ("widths_edited", "weights do not match its metadata's config"),  # was ScopeParamShapeError
    ("no_config", "metadata has no config"),  # was KeyError
    ("calibration_unknown_key", "unusable model metadata"),  # was TypeError
])
def test_model_file_whose_metadata_does_not_fit_is_one_line(case, needle, pngs, tmp_path):
    edits = {
        "widths_edited": lambda m: m["config"].update(widths=[8, 8, 8, 8]),
        "no_config": lambda m: m.pop("config"),
        "calibration_unknown_key": lambda m: m["calibration"].update(colour="blue"),
    }
    model = _edited_model_file(tmp_path / f"{case}.msgpack", edits[case])
    a, b = sorted(str(p) for p in pngs.rglob("*.png"))[:2]
    r = _run([_script("siamese-compare"), a, b, "--model", model])
    line = _one_error_line(r, needle)
    assert model in line


@pytest.mark.parametrize("pairs", ["0", "-5"])
def test_calibrate_pairs_below_2_is_refused_before_any_work(pairs, tmp_path):
    # The folder does not exist: the --pairs check must come first (before listing or embedding).
    r = _run([_script("siamese-calibrate"), str(tmp_path / "nowhere"), "--pairs", pairs,
              "--out", str(tmp_path / "m.msgpack")])
    _one_error_line(r, f"--pairs must be at least 2 (half same-class, half different-class pairs); got {pairs}")


def test_calibrate_pretrained_without_out_is_refused_before_embedding(tmp_path):
    r = _run([_script("siamese-calibrate"), str(tmp_path / "nowhere")])
    _one_error_line(r, "--out is required")


def test_unexpected_exception_is_one_line_with_a_hint_or_the_traceback_on_request(capsys, monkeypatch):
    def bug():
        raise KeyError("deep inside")

    monkeypatch.delenv(console.TRACEBACK_ENV, raising=False)
    assert console.guarded(bug) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: KeyError: 'deep inside' (unexpected; set {console.TRACEBACK_ENV}=1 for the traceback)"]
    monkeypatch.setenv(console.TRACEBACK_ENV, "1")
    assert console.guarded(bug) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in bug" in err
    assert console.guarded(lambda: None) == 0 and console.guarded(lambda: 1) == 1  # compare's DIFFERENT


def test_an_interrupt_turned_into_another_error_on_its_way_out_is_still_an_interrupt(capsys):
    # A Ctrl-C inside C code surfaces as SystemError("... returned a result with an exception set")
    # caused by it; `check_weights` turned that into "its config does not describe a buildable
    # model" (exit 2) when `compare` was interrupted while loading the shipped model (the port
    # review of 2026-12-07). Any error raised in the course of an interrupt now exits as one.
    from siamese_jax.inference import ModelError

    def c_call():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ki:
            raise SystemError("<built-in method> returned a result with an exception set") from ki

    def load_model():
        try:
            c_call()
        except Exception as e:  # as inference.check_weights does
            raise ModelError(f"model.msgpack: its config does not describe a buildable model ({e})") from None

    assert console.guarded(load_model, user_errors=(ModelError,)) == console.EXIT_INTERRUPTED
    assert console.guarded(c_call) == console.EXIT_INTERRUPTED  # unexpected errors too
    assert capsys.readouterr().err.splitlines() == ["error: interrupted", "error: interrupted"]
    assert console.guarded(lambda: (_ for _ in ()).throw(ValueError("plain"))) == 2  # others unchanged


def _child(code, tmp_path, env=None, timeout=120):
    """`code` run in a fresh interpreter with Python's own SIGINT / SIGTERM handling (a runner may
    have started this one with SIGINT ignored, which a child inherits)."""
    prelude = ("import os, signal, sys\n"
               "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
               "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n")
    env = dict(env or _env())
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return _run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=tmp_path, env=env, timeout=timeout)


def test_an_entry_point_stops_on_sigterm_as_on_ctrl_c(tmp_path):
    """SIGTERM (`timeout`, a job's time limit) to siamese-train outside its loop, siamese-evaluate
    or siamese-export was Python's default: exit -15 (143 from a shell) and no word. `run_app` makes
    it what a Ctrl-C is: one line, 130."""
    r = _child("""
        import time
        from siamese_jax import cli
        def main(argv):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
            raise AssertionError("not stopped")
        cli.run_app(main)
    """, tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (130, ["error: terminated"]), r.stderr


@pytest.mark.slow  # a training (~10 s)
def test_sigterm_in_the_final_evaluation_stops_the_training_in_one_line_with_130(data_dir, tmp_path):
    """The training loop saves and stops on SIGTERM; in the final evaluation, after it, a SIGTERM killed
    the run with Python's default (exit -15, no word; the reproducibility review of stop 51). Now one
    line and 130: the loop's own handler gives SIGTERM back to the entry point's, not to the default.
    The checkpoint is kept and no results.json written, so the same command evaluates again."""
    r = _child(f"""
        import time
        from siamese_jax import protocols
        def evaluate(*args, **kwargs):  # SIGTERM while the final evaluation runs
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
            raise AssertionError("not stopped")
        protocols.evaluate_workdir = evaluate
        sys.argv = ["siamese-train", "--workdir=run", *{TINY!r}, "--config.num_steps=2", "--config.eval_every_steps=2"]
        from siamese_jax.cli import train
        train.run()
    """, tmp_path, env=_env(data_dir), timeout=300)
    assert r.returncode == 130 and r.stderr.splitlines()[-1] == "error: terminated", r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "step 2/2" in r.stderr
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["2"]
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("platform", ["posix", "windows"])
def test_a_ctrl_c_that_lands_in_a_garbage_collection_callback_still_stops_the_command(tmp_path, platform):
    """jax runs a callback at every garbage collection, and Python prints a KeyboardInterrupt raised
    there as "Exception ignored in ..." and goes on: a Ctrl-C in the first second of `compare` or
    `calibrate` (importing jax collects often) printed 6 lines of traceback, then the command ran to
    its end, wrote its output and exited 0 (the kill review of 2026-12-07). Windows has no SIGALRM
    (nor setitimer), which raised it again: there it was still swallowed (the port review)."""
    windows = "        for name in ('setitimer', 'SIGALRM', 'ITIMER_REAL'): delattr(signal, name)\n"
    r = _child((windows if platform == "windows" else "") + """
        import gc, time
        from siamese_jax import console
        armed, fired = [], []
        def callback(phase, info):  # a Ctrl-C while it runs: the handler raises in here
            if armed and not fired:  # (armed: not a collection before the command, outside its guard)
                fired.append(1)
                os.kill(os.getpid(), signal.SIGINT)
        gc.callbacks.append(callback)
        def work():
            armed.append(1)
            gc.collect()
            for _ in range(2000):  # two seconds of work after the interrupt
                time.sleep(0.001)
            print("wrote the output")
        code = console.guarded(work)
        gc.callbacks.remove(callback)
        print("exit code", code)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["exit code 130"], r.stdout
    assert r.stderr.splitlines() == ["error: interrupted"], r.stderr


@pytest.mark.parametrize("work", ["done", "interrupted"])
def test_a_ctrl_c_as_the_handler_restores_the_signals_is_no_traceback(tmp_path, work):
    """A Ctrl-C after the work returned, while `interrupts_stop` was restoring the signal handlers,
    escaped the top-level handler: a 20-line traceback and exit -2 (1 of 8 presses as `siamese-export`
    printed its last line; the leftovers review of stop 55). Now the work's own exit code when it was
    over (3 here), and one line and 130 when it was not."""
    r = _child(f"""
        import contextlib
        from siamese_jax import console
        real = console.interrupts_stop
        @contextlib.contextmanager
        def late(signals):
            with real(signals):
                yield
                os.kill(os.getpid(), signal.SIGINT)  # our handler is still the one installed
        console.interrupts_stop = late
        if {work!r} == "interrupted":  # the work never returned: an interrupt as any other
            console._guarded = lambda *args: os.kill(os.getpid(), signal.SIGINT)
        print("exit code", console.guarded(lambda: 3))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    if work == "done":
        assert (r.stdout, r.stderr) == ("exit code 3\n", ""), r.stderr
    else:
        assert (r.stdout, r.stderr) == ("exit code 130\n", "error: interrupted\n"), r.stderr


# A stand-in for jax's atexit clean-up (registered when jax is imported) during which the user
# presses Ctrl-C `presses` times.
_CLEAN_UP_WITH_CTRL_C = """
        import atexit, time
        from siamese_jax import console
        def clean_up():
            for _ in range({presses}):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            print("clean-up done")
        atexit.register(clean_up)
"""


@pytest.mark.parametrize("presses", [1, 2])
def test_a_ctrl_c_in_the_atexit_clean_up_after_the_work_is_no_traceback(tmp_path, presses):
    """A Ctrl-C in the ~10 ms after a command's last line landed in jax's atexit clean-up
    (`clear_backends`): "Exception ignored in atexit callback" and 9 lines of traceback, after the
    work was done (17 of 50 presses near the end of `compare`; the leftovers review of stop 55). Now
    a first one lets the clean-up finish and the command keep its exit code; a second one still
    ends the process at once (130), as a hanging clean-up needs."""
    r = _child(_CLEAN_UP_WITH_CTRL_C.format(presses=presses) + """
        print("verdict       DIFFERENT")
        console.exit_process(1)
    """, tmp_path)
    if presses == 1:
        assert (r.returncode, r.stderr) == (1, ""), r.stderr
        assert r.stdout.splitlines() == ["verdict       DIFFERENT", "clean-up done"]
    else:
        assert (r.returncode, r.stderr, r.stdout) == (130, "", "verdict       DIFFERENT\n"), r.stderr


@pytest.mark.parametrize("work, code, line", [
    ("raise console.StoppedBySignal('SIGINT: stopped at step 4 (saved)')", 130, "SIGINT: stopped at step 4 (saved)"),
    ("console.fail('--model=x: no such model file')", 2, "error: --model=x: no such model file")],
    ids=["stopped_training", "error_exit"])
def test_a_ctrl_c_in_the_atexit_clean_up_after_a_stopped_training_or_an_error_exit_is_no_traceback(
        tmp_path, work, code, line):
    """A training stopped by a Ctrl-C (`StoppedBySignal`: saved, exit 130) leaves by `sys.exit`, and an
    entry point's `cli.fail` (siamese-evaluate's "--model=x: no such model file", after jax was
    imported) by SystemExit from inside the handler, neither by `exit_process`: the hold of a Ctrl-C
    in jax's clean-up was not registered, and the user's press as the process exited printed
    "Exception ignored in atexit callback" and a traceback after the one line."""
    r = _child(_CLEAN_UP_WITH_CTRL_C.format(presses=1) + f"""
        def work():
            {work}
        console.exit_process(console.guarded(work))
    """, tmp_path)
    assert (r.returncode, r.stderr, r.stdout) == (code, line + "\n", "clean-up done\n"), r.stderr


def test_a_ctrl_c_while_the_command_imports_its_error_types_is_one_line_and_130(tmp_path):
    """`compare`'s error types import jax (a second): a Ctrl-C then escaped the top-level handler,
    a 50-line traceback and exit code -2."""
    r = _child("""
        class Interrupted:  # a Ctrl-C while siamese_jax.checkpoints is imported
            def find_spec(self, name, path=None, target=None):
                if name == "siamese_jax.checkpoints":
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Interrupted())
        from siamese_jax import commands
        commands.compare_main(["a.png", "b.png"])
    """, tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (130, ["error: interrupted"]), r.stderr


def test_sigterm_stops_embed_in_one_line_with_130_and_leaves_no_temporary_file(tmp_path):
    """SIGTERM (`timeout`, the end of a job) killed `siamese-embed` (exit -15, no message) and, while
    the index was being written, left its `.index.npz.<random>.tmp` behind. It is now what a Ctrl-C
    is: the temporary file removed, an older index kept, "error: terminated" and 130."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.png").write_bytes(b"not read: the model and the index are stand-ins")
    (tmp_path / "index.npz").write_bytes(b"the old index")
    r = _child("""
        import numpy as np
        from siamese_jax import commands, index, inference
        inference.load_model = lambda source: None
        index.build_index = lambda model, paths, skip_unreadable=None: index.EmbeddingIndex(
            np.zeros((1, 4), np.float32), ["a.png"], "0123")
        def savez(f, **arrays):  # SIGTERM halfway through the write
            f.write(b"PK\x03\x04 half an index")
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("not stopped")
        index.np.savez = savez
        commands.embed_main(["folder", "--out", "index.npz"])
    """, tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (130, ["error: terminated"]), r.stderr
    assert sorted(os.listdir(tmp_path)) == ["folder", "index.npz"]
    assert (tmp_path / "index.npz").read_bytes() == b"the old index"


@pytest.mark.parametrize("returned, code", [({"lake_20_runs": {"accuracy": 0.9}}, 0), (None, 0), (3, 3), (True, 0)])
def test_run_as_process_exits_0_when_main_returns_train_and_evaluates_results(returned, code, capsys):
    """README (d): `return train_and_evaluate(config, workdir)` in `main` returns the results dict;
    `run_as_process` exited 2 with "error: TypeError: int() argument must be ..., not 'dict'"
    after the whole run had succeeded. Only an int is an exit code."""
    from siamese_jax import cli

    with pytest.raises(SystemExit) as exit_:
        cli.run_as_process(lambda: returned)
    assert exit_.value.code == code
    assert capsys.readouterr().err == ""


# =================================================================================================
# 2. The whole config is validated before loading data, naming the key and the allowed range
# =================================================================================================
BAD_VALUES = [  # (override, the start of the one line it must give)
    ("--config.image_size=0", "config.image_size=0: must be an integer from 8 to 512"),  # was ZeroDivisionError
    ("--config.image_size=-5", "config.image_size=-5: must be an integer from 8 to 512"),  # was TypeError
    ("--config.embedding_dim=0", "config.embedding_dim=0: must be an integer from 1"),
    ("--config.batch_size=0", "config.batch_size=0: must be an integer from 2 to 65536"),
    ("--config.batch_size=-4", "config.batch_size=-4: must be an integer from 2 to 65536"),  # was a cut-off vmap message
    ("--config.classes_per_batch=0", "config.classes_per_batch=0: must be an integer >= 2"),
    ("--config.images_per_class=-1", "config.images_per_class=-1: must be an integer from 2 to 20"),
    ("--config.num_steps=0", "config.num_steps=0: must be an integer from 1"),  # was "no checkpoint in ..."
    ("--config.learning_rate=-1.0", "config.learning_rate=-1.0: must be a finite number > 0"),
    ("--config.cpu_devices=0", "config.cpu_devices=0: must be an integer from 1 to 1024"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o.split("=", 1)[0][9:] + "=" + o.split("=")[1]
                                                                 for o, _ in BAD_VALUES])
def test_bad_config_value_is_one_line_before_any_data_is_read(override, message, tmp_path):
    t0 = time.time()
    r = _train(override, f"--workdir={tmp_path / 'run'}")
    line = _one_error_line(r, message)
    assert line.startswith(f"error: {message}")
    assert "Restoring pure python logging" not in r.stderr  # absl's line, once printed before the error
    assert time.time() - t0 < 60  # seconds (the imports), not a data load and a compile
    assert not (tmp_path / "run").exists()  # rejected before the workdir was even created


def test_a_plain_dict_config_trains_like_its_config_dict_and_other_types_are_one_line(tmp_path):
    """A library user's `train_and_evaluate(dict(...), workdir)` was an AttributeError on the first
    key (a FrozenConfigDict one on `num_classes`): a dict is read as a ConfigDict, a frozen one thawed.
    The run writes into a copy (ArcFace's `num_classes` written into the caller's config refused the
    next run of it edited for another dataset)."""
    import ml_collections

    from siamese_jax import train

    c = default.get_config("mnist")
    for given in (c.to_dict(), ml_collections.FrozenConfigDict(c), c):
        got = train._as_config_dict(given)
        assert type(got) is ml_collections.ConfigDict and got.to_dict() == c.to_dict()
        got.num_classes = 10  # what a run writes into it ...
    assert c.num_classes is None  # ... into its own copy: the caller's config can be edited and trained again
    for bad in ([("loss", "triplet")], "experiments/configs/omniglot_pretrained.py"):
        with pytest.raises(config_check.ConfigError, match=r"^config must be an ml_collections.ConfigDict or a "
                                                           r"dict \(e.g. .*\), got (list|str)$"):
            train.train_and_evaluate(bad, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_processes_given_different_configs_are_one_error_on_every_process(monkeypatch):
    """Each process of a multi-process run gets its own flags: processes started with other
    num_steps ran until the shorter finished (reporting success) while the other waited ~300 s in a
    collective (the multi-process review of 2026-12-06). The processes' config digests are gathered
    (here a second process is simulated: its rows are another config's digests)."""
    from siamese_jax import train

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    mine = default.get_config("mnist")

    def check_beside(peer):  # process_allgather: this process's row over the peer's same row
        _, *rows = train._config_digests(peer)
        train._check_processes_run_one_config(mine, gather=lambda x: np.stack([x, rows.pop(0)]))

    peer = default.get_config("mnist")
    peer.update(archive_dir="/elsewhere", cache_dir="/tmp/c", log_every_seconds=1.0)  # per host: fine
    check_beside(peer)
    peer = default.get_config("mnist")
    peer.update(num_steps=45, margin=0.3)
    with pytest.raises(config_check.ConfigError, match=r"^the 2 processes were given different configs, this is "
                                                       r"process 0: margin, num_steps \(here: margin=None, "
                                                       r"num_steps=\d+\); start every process with the same"):
        check_beside(peer)
    peer = default.get_config("mnist")
    peer.new_key = 1  # another version of the code
    with pytest.raises(config_check.ConfigError, match="other keys"):
        check_beside(peer)


def test_processes_whose_configs_name_other_keys_of_the_same_count_are_told_so(monkeypatch):
    """A key renamed between two versions of the code keeps the key count: the per-key digests are
    then of other keys, and comparing them named keys that do not differ, with this process's values."""
    import ml_collections

    from siamese_jax import train

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    mine = default.get_config("mnist")
    peer = ml_collections.ConfigDict({("margin_renamed" if k == "margin" else k): v for k, v in mine.items()})
    _, *rows = train._config_digests(peer)
    with pytest.raises(config_check.ConfigError, match=r"process 0: other keys \(another version of the code"):
        train._check_processes_run_one_config(mine, gather=lambda x: np.stack([x, rows.pop(0)]))


def test_data_checks_refuse_only_the_validation_sets_and_alphabets_that_cannot_work():
    """Known once the data is loaded: a held-out class of one image (or one class alone) cannot make
    a 1-shot episode, refused before any step; P x K batches from one alphabet need an alphabet of P
    classes, and one of exactly P classes is enough."""
    import types

    from siamese_jax import train
    from siamese_jax.data.dataset import ImageDataset

    c = default.get_config("omniglot")

    def validation_set(labels):
        labels = np.asarray(labels, np.int32)
        return ImageDataset(images=np.zeros((len(labels), 4, 4), np.uint8), labels=labels, name="omniglot", split="v")

    for labels in ([0, 0, 1], [0, 0, 0]):
        with pytest.raises(config_check.ConfigError, match=r"config.val_alphabets=.*needs 2 classes and 2 images"):
            train._check_validation_set(c, validation_set(labels))
    train._check_validation_set(c, validation_set([0, 0, 1, 1]))
    c.pk_within_alphabet, c.classes_per_batch = True, 55
    train._check_within_alphabet_batches(c, types.SimpleNamespace(max_classes_per_alphabet=55))
    with pytest.raises(config_check.ConfigError, match=r"config.classes_per_batch=55: .* at most 54"):
        train._check_within_alphabet_batches(c, types.SimpleNamespace(max_classes_per_alphabet=54))


def test_config_combinations_the_fuzz_review_found_are_refused_or_take_effect(tmp_path, monkeypatch, caplog):
    # The config-space review of 2026-12-05: values that each passed alone but did nothing, failed
    # after the training, or failed late naming no key.
    import types

    from siamese_jax import cli, parallel, train

    def refused(message, **overrides):
        c = default.get_config(overrides.pop("dataset", "omniglot"))
        for k, v in overrides.items():
            c[k] = v
        with pytest.raises(config_check.ConfigError, match=message):
            config_check.validate_config(c)

    # l2_normalize is the network's, for any encoder (it was the small encoder's only, and Koch's run
    # recorded the key and ignored it; then it was refused): Koch's net with it is a valid config.
    koch = default.get_config("omniglot")
    koch.model, koch.image_size, koch.l2_normalize = "koch", 105, True
    config_check.validate_config(koch)
    # A workdir from the time Koch's net ignored it (no l2_normalize_koch: models.l2_normalizes reads
    # it unnormalised) still evaluates; new training that would ignore it again is refused.
    old_koch = {k: v for k, v in koch.to_dict().items() if k != "l2_normalize_koch"}
    config_check.validate_model_config(ml_collections.ConfigDict(old_koch))
    # A hand-made Koch config without the key at all is off, as before the key was the network's
    # (it was then checked for the small encoder only; the diff review of stop 56).
    bare_koch = {k: v for k, v in old_koch.items() if k != "l2_normalize"}
    config_check.validate_model_config(ml_collections.ConfigDict(bare_koch))
    refused(r"config.l2_normalize_koch=False: Koch's net would ignore l2_normalize=True", model="koch",
            image_size=105, l2_normalize=True, l2_normalize_koch=False)
    # eval_seed=-1 trained to the end, then failed ("expected non-negative integer") at every evaluate.
    refused(r"config.eval_seed=-1: must be an integer from 0", eval_seed=-1)
    refused(r"config.eval_seed=18446744073709551616", eval_seed=2**64)
    # One episode printed "80.0% ± 0.0": an interval over episodes needs two.
    refused(r"config.eval_episodes=1: must be an integer >= 2", eval_episodes=1)
    # A workdir as config.resume loaded the data, then "no checkpoint found in <workdir>".
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    refused(r"is a training workdir: give its checkpoint directory, .*run/best or .*run/checkpoints",
            resume=str(tmp_path / "run"))
    # MNIST with rotations as classes has 40 classes; P = 20 was refused as "MNIST has 10 classes".
    c = default.get_config("mnist")
    c.loss, c.rotation_classes, c.classes_per_batch = "batch_hard", True, 20
    config_check.validate_config(c)
    refused(r"config.classes_per_batch=41: .*40 with rotation_classes", dataset="mnist", loss="batch_hard",
            rotation_classes=True, classes_per_batch=41)
    # P x K from one alphabet with more classes per batch than any alphabet has: named, not
    # "no alphabet has 64 classes".
    c = default.get_config("omniglot")
    c.pk_within_alphabet, c.classes_per_batch = True, 64
    with pytest.raises(config_check.ConfigError, match=r"config.classes_per_batch=64: with pk_within_alphabet=True .* at most 55"):
        train._check_within_alphabet_batches(c, types.SimpleNamespace(max_classes_per_alphabet=55))
    # A tuple given twice was appended: --config.widths=(8,8) ... --config.widths=(16,16) built (8, 8, 16, 16).
    argv = ["train", "--config.widths=(8,8)", "--workdir=w", "--config.seed=1", "--config.widths=(16,16)"]
    assert cli.last_override_of_each_key(argv) == ["train", "--workdir=w", "--config.seed=1", "--config.widths=(16,16)"]
    # config.cpu_devices under XLA_FLAGS' device count: silently ignored (config.json said 4, the run had 1).
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    with caplog.at_level(logging.WARNING):
        assert parallel.use_cpu_cores_as_devices(16, 4) is None
    assert any("config.cpu_devices=4 has no effect" in r.getMessage() for r in caplog.records)


def test_arcface_settings_that_cannot_work_are_one_line_config_errors():
    from siamese_jax import train as train_lib

    c = default.get_config("mnist")
    c.loss, c.classes_per_batch = "arcface", 10
    with pytest.raises(config_check.ConfigError, match="l2_normalize=True"):  # it learns directions
        config_check.validate_config(c)
    c.l2_normalize = True
    config_check.validate_config(c)
    for key, value, message in (("margin", 2.0, "config.margin=2.0: must be a finite number"),
                                ("arcface_scale", 0.0, "config.arcface_scale=0.0: must be a finite number > 0"),
                                ("num_classes", 1, "config.num_classes=1: must be an integer >= 2")):
        bad = c.copy_and_resolve_references()
        bad[key] = value
        with pytest.raises(config_check.ConfigError, match=re.escape(message)):
            config_check.validate_config(bad)
    # The class-centre count is the training data's; a different one set by hand is refused.
    c.num_classes = 12
    with pytest.raises(config_check.ConfigError, match="config.num_classes=12: the training data has 10 classes"):
        train_lib._set_num_classes(c, 10)
    c.num_classes = None
    train_lib._set_num_classes(c, 10)
    assert c.num_classes == 10


def test_multi_similarity_settings_that_cannot_work_are_one_line_config_errors():
    c = default.get_config("omniglot")
    c.loss = "multi_similarity"
    with pytest.raises(config_check.ConfigError, match="l2_normalize=True"):  # it compares cosines
        config_check.validate_config(c)
    c.l2_normalize = True
    config_check.validate_config(c)
    for key, value, message in (("margin", 2.5, "config.margin=2.5: must be a number from 0.0 to 2.0"),
                                ("ms_alpha", 0.0, "config.ms_alpha=0.0: must be a finite number > 0"),
                                ("ms_beta", -50.0, "config.ms_beta=-50.0: must be a finite number > 0"),
                                ("ms_lambda", 1.5, "config.ms_lambda=1.5: must be a finite number in [-1.0, 1.0]"),
                                ("images_per_class", 1, "config.images_per_class=1: must be an integer from 2")):
        bad = c.copy_and_resolve_references()
        bad[key] = value
        with pytest.raises(config_check.ConfigError, match=re.escape(message)):
            config_check.validate_config(bad)
    bad = c.copy_and_resolve_references()
    bad.margins["multi_similarity"] = 3.0
    with pytest.raises(config_check.ConfigError, match=re.escape("config.margins.multi_similarity=3.0: must be a number from 0.0 to 2.0")):
        config_check.validate_config(bad)


def test_distillation_settings_that_cannot_work_are_one_line_config_errors(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    c = default.get_config("omniglot")
    c.distill_teachers = str(teacher)
    config_check.validate_config(c)  # the default triplet loss mines P x K batches: fine
    # A teacher may also be an exported model file or a shipped model by name (its workdir gone).
    model_file = tmp_path / "teacher.msgpack"
    model_file.write_bytes(b"")
    for teachers in (f"{teacher},{model_file}", "pretrained", f"pretrained,{teacher}"):
        ok = c.copy_and_resolve_references()
        ok.distill_teachers = teachers
        config_check.validate_config(ok)
    from siamese_jax import inference
    assert set(config_check.SHIPPED_MODELS) == set(inference.PRETRAINED_FILES)
    for key, value, message in (
            ("loss", "contrastive", "needs a P x K loss"),  # pair batches carry no image indices
            ("distill_teachers", f"{teacher},{tmp_path}", f"({tmp_path} has no config.json)"),
            ("distill_teachers", f"{teacher},{tmp_path / 'nowhere.msgpack'}", "nowhere.msgpack: no such workdir or file; "
                                                                               "shipped: pretrained, pretrained-mnist)"),
            ("distill_weight", -1.0, "config.distill_weight=-1.0: must be a finite number >= 0")):
        bad = c.copy_and_resolve_references()
        bad[key] = value
        with pytest.raises(config_check.ConfigError, match=re.escape(message)):
            config_check.validate_config(bad)


def test_a_shipped_teacher_of_another_dataset_is_refused_before_any_data_loads(tmp_path):
    """An Omniglot student told to learn from the shipped MNIST model: one config error naming the
    teacher, raised before the teacher's (here: absent) data would be read."""
    from siamese_jax import distillation
    c = default.get_config("omniglot")
    c.distill_teachers = "pretrained-mnist"
    c.archive_dir = str(tmp_path / "no-data-here")
    config_check.validate_config(c)
    with pytest.raises(config_check.ConfigError, match=re.escape(
            "config.distill_teachers: pretrained-mnist was trained on another training set")):
        distillation.teacher_embeddings(c, train_ds=None)


def test_triplet_with_one_image_per_class_is_refused_not_trained_at_zero_loss(tmp_path):
    """P x K mining with K = 1 has no positive pair: loss and gradient 0 at every step, exit 0, before."""
    r = _train("--loss=triplet", "--config.images_per_class=1", f"--workdir={tmp_path / 'run'}")
    _one_error_line(r, "config.images_per_class=1: must be an integer from 2 to 20 (P x K mining needs 2+ "
                       "images per class for positive pairs")
    # The same rule for every loss that mines P x K batches; pair losses do not need it.
    for loss in ("batch_hard", "batch_all", "semihard"):
        c = default.get_config("omniglot")
        c.loss, c.images_per_class = loss, 1
        with pytest.raises(config_check.ConfigError, match="images_per_class=1"):
            config_check.validate_config(c)
    c = default.get_config("mnist")
    c.loss, c.images_per_class = "contrastive", 1
    config_check.validate_config(c)


def test_config_file_that_does_not_exist_or_does_not_parse_is_one_readable_line(tmp_path):
    _one_error_line(_train("--config=/path/that/does/not/exist.py"),
                    "--config=/path/that/does/not/exist.py: no such file (shipped configs: default, mnist_pairs, omniglot_distilled, omniglot_gpu, omniglot_koch, omniglot_pretrained)")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n    pass\n")
    line = _one_error_line(_train(f"--config={broken}"))
    assert "invalid syntax" in line and "broken.py" in line  # was cut to "Error whilst parsing config file:"
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    return 1 / 0\n")
    _one_error_line(_train(f"--config={raising}"), f"--config={raising}: division by zero")
    _one_error_line(_train(f"--config={tmp_path}"), f"--config={tmp_path}: is a directory, not a config file")


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    _one_error_line(_train(f"--workdir={a_file}"), f"workdir {a_file}: exists and is not a directory")


def test_a_tilde_after_the_equals_sign_is_the_home_folder_not_a_folder_named_tilde(tmp_path):
    """bash leaves `--workdir=~/runs/a` alone (it expands a `~` only at the start of a word): the run
    trained into `./~/runs/a`, a folder named `~` in the current directory. Expanded as the shell
    would expand `--workdir ~/runs/a` (`--data_dir=~/...` was expanded already)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / "a_file").write_text("")
    env = _env(HOME=str(home))
    env["PYTHONPATH"] = REPO  # (run from elsewhere than the checkout)
    r = _run([sys.executable, "-m", "experiments.train", "--workdir=~/a_file", *TINY], cwd=cwd, env=env)
    _one_error_line(r, f"workdir {home / 'a_file'}: exists and is not a directory")
    assert os.listdir(cwd) == []
    mine = os.path.expanduser("~")  # the other entry points' flags, and what is left alone
    assert console.expand_home(["--out=~/i.npz", "--config.resume=~/r/best", "a=~/x", "~/y", "--k=a~"]) == [
        f"--out={mine}/i.npz", f"--config.resume={mine}/r/best", "a=~/x", "~/y", "--k=a~"]


def test_every_teacher_of_a_list_gets_its_home_expanded(monkeypatch, tmp_path):
    """`--config.distill_teachers=~/a,~/b`: the shell and `console.expand_home` expand only the
    first `~`, and the second teacher was looked for in a folder named `~` of the current directory."""
    from ml_collections import ConfigDict
    monkeypatch.setenv("HOME", str(tmp_path))
    config = ConfigDict({"distill_teachers": "~/a, ~/b,pretrained"})
    assert config_check.distill_teacher_sources(config) == [
        str(tmp_path / "a"), str(tmp_path / "b"), "pretrained"]


def test_a_url_workdir_is_one_line_and_creates_nothing(tmp_path):
    """`--workdir=gs://bucket/run` used to load the data, train, and fail at the first TensorBoard
    write with a traceback, leaving a local `gs:/bucket/run/` with a lock and checkpoints behind."""
    r = _run([_script("siamese-train"), "--workdir=gs://bucket/run"], cwd=tmp_path)
    _one_error_line(r, "workdir gs://bucket/run: URLs are not supported")
    assert os.listdir(tmp_path) == []


def test_a_results_file_that_is_a_folder_is_an_error_before_any_work(tmp_path):
    # It failed only after the run: evaluate spent its whole evaluation, rewrote plots/, then said so.
    from siamese_jax import config_check

    for name in ("results.json", "metrics.jsonl", "config.json"):
        workdir = tmp_path / name.split(".")[0]
        (workdir / name).mkdir(parents=True)
        with pytest.raises(config_check.ConfigError, match=f"{name} is a folder"):
            config_check.check_workdir(str(workdir))
    for name in ("plots", "tensorboard", "checkpoints", "best"):  # and the run's folders as files
        workdir = tmp_path / f"{name}_file"
        workdir.mkdir()
        (workdir / name).write_text("")
        with pytest.raises(config_check.ConfigError, match=f"{name} is a file"):
            config_check.check_workdir(str(workdir))
    assert config_check.check_workdir(str(tmp_path / "fresh")) == str(tmp_path / "fresh")


def test_read_only_workdir_is_one_line_before_any_data_is_read(tmp_path):
    workdir = tmp_path / "ro"
    workdir.mkdir()
    try:
        cmd = _read_only_as_it_is(workdir)([sys.executable, "-m", "experiments.train", f"--workdir={workdir}"])
        t0 = time.time()
        line = _one_error_line(_run(cmd), f"workdir {workdir}: not writable")
        assert time.time() - t0 < 60, line  # was a PermissionError after 10 s of data loading
    finally:
        os.chmod(workdir, 0o755)


# =================================================================================================
# 3. Divergence: detected, stopped within seconds, nothing diverged saved, a resume that works
# =================================================================================================
def test_divergence_scale_is_the_first_positive_value_and_survives_a_resume():
    """A first loss of exactly 0 (no active triplet) anchored nothing: 0.05 after losses of 1e-4
    read as a 500x explosion. A resumed run's detector starts from the run's own first values
    (metrics.jsonl), not from the well-trained loss at the resume step."""
    det = divergence.DivergenceDetector(factor=100, window=50)
    det.check(1, {"loss": 0.0})
    det.check(2, {"loss": 0.9})  # the first positive loss: the scale
    for step in range(3, 42):
        det.check(step, {"loss": 1e-4})
    det.check(42, {"loss": 0.05})  # noise, not divergence
    with pytest.raises(divergence.DivergenceError, match="loss 1e\\+03 is more than 100x its reference 0.9"):
        det.check(43, {"loss": 1e3})
    resumed = divergence.DivergenceDetector(factor=100, window=50, start_step=9000)
    resumed.seed_first("loss", 1.2)  # step 1's loss, from metrics.jsonl
    for step in range(9001, 9020):
        resumed.check(step, {"loss": 1e-4})
    resumed.check(9020, {"loss": 0.05})
    fresh = divergence.DivergenceDetector(factor=100, window=50, start_step=9000)  # without it: a false stop
    for step in range(9001, 9020):
        fresh.check(step, {"loss": 1e-4})
    with pytest.raises(divergence.DivergenceError):
        fresh.check(9020, {"loss": 0.05})


def test_a_model_that_embeds_validation_images_as_nan_stops_as_diverged_not_scored_as_chance():
    # NaN embeddings (e.g. a BatchNorm statistic gone to Inf while the loss stayed finite) were scored
    # as chance, 1/20, and the first such validation was saved as the best model.
    import types

    import jax.numpy as jnp

    from siamese_jax import parallel, sampling, train
    from siamese_jax.data.dataset import ImageDataset

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(25, dtype=np.int32), 2)
    ds = ImageDataset(images=rng.integers(0, 255, (50, 8, 8), dtype=np.uint8), labels=labels, name="mnist", split="test")
    dds = sampling.to_device_dataset(ds, image_size=8)
    config = default.get_config("mnist")
    config.val_episodes = 4
    state = types.SimpleNamespace(params=None, batch_stats=None)
    mesh = parallel.make_data_mesh()
    nan_model = lambda params, stats, x: jnp.full((x.shape[0], 4), jnp.nan)
    acc = train.validation_accuracy(config, state, nan_model, dds, np.asarray(dds.images), mesh)
    assert np.isnan(acc)
    detector = divergence.DivergenceDetector()
    with pytest.raises(divergence.DivergenceError, match="non-finite val_one_shot_accuracy"):
        detector.check(3000, {"val_one_shot_accuracy": acc})
    finite_model = lambda params, stats, x: x.reshape(x.shape[0], -1)[:, :4]
    assert 0.0 <= train.validation_accuracy(config, state, finite_model, dds, np.asarray(dds.images), mesh) <= 1.0


def test_validation_is_nan_when_one_image_embeds_as_nan_and_keeps_to_an_alphabet_of_exactly_20_classes():
    """One NaN embedding among the validation images makes the score NaN (the divergence stop), not a
    score of the other images. Omniglot's 20-way episodes are drawn within one alphabet whenever one
    has the 20 classes they need, exactly 20 included (Alphabet_of_the_Magi has 20): here the other
    alphabet's characters copy one of its characters, so a mixed episode would confuse them."""
    import types

    import jax.numpy as jnp

    from siamese_jax import parallel, sampling, train
    from siamese_jax.data.dataset import ImageDataset

    rng = np.random.default_rng(0)
    own = rng.integers(0, 255, (20, 8, 8), dtype=np.uint8)
    characters = np.concatenate([own, np.repeat(own[:1], 5, axis=0)])  # classes 20-24: copies of class 0
    labels = np.repeat(np.arange(25, dtype=np.int32), 2)
    ds = ImageDataset(images=characters[labels], labels=labels, name="omniglot", split="background",
                      alphabets=(labels >= 20).astype(np.int32), alphabet_names=("Magi", "Copies"))
    dds = sampling.to_device_dataset(ds, image_size=8)
    config = default.get_config("omniglot")
    config.val_episodes = 10
    state = types.SimpleNamespace(params=None, batch_stats=None)
    mesh = parallel.make_data_mesh()
    pixels = lambda params, stats, x: x.reshape(x.shape[0], -1)
    assert train.validation_accuracy(config, state, pixels, dds, np.asarray(dds.images), mesh) == 1.0
    one_nan = lambda params, stats, x: pixels(params, stats, x).at[3].set(jnp.nan)
    assert np.isnan(train.validation_accuracy(config, state, one_nan, dds, np.asarray(dds.images), mesh))


def test_divergence_rule_catches_non_finite_and_exploding_values_but_not_noise():
    det = divergence.DivergenceDetector(factor=100, window=5)
    det.seed("param_norm", 7.0)  # the starting state's norm
    rng = np.random.default_rng(0)
    for step in range(1, 40):  # a noisy but healthy run whose loss falls 10x and sometimes hits 0
        loss = max(0.0, 1.0 / step ** 0.7 + rng.normal(0, 0.05))
        det.check(step, {"loss": loss, "grad_norm": 2 * loss + 1e-3, "param_norm": 7.0 + 0.01 * step})
    assert det.last_healthy_step == 39
    first_step = divergence.DivergenceDetector()
    first_step.seed("param_norm", 7.0)
    with pytest.raises(divergence.DivergenceError, match="param_norm 2.99e\\+06 is more than 100x"):
        first_step.check(1, {"loss": 1.0, "param_norm": 2.99e6})  # one update blew the parameters up
    with pytest.raises(divergence.DivergenceError, match="non-finite loss"):
        det.check(40, {"loss": float("nan"), "grad_norm": 1.0, "param_norm": 7.4})
    with pytest.raises(divergence.DivergenceError, match="loss 1e\\+11 is more than 100x") as e:
        det.check(40, {"loss": 1e11, "grad_norm": 1.0, "param_norm": 7.4})  # the issue's ~1e11 loss
    assert e.value.step == 40 and e.value.metric == "loss"
    # factor 0: only non-finite values stop a run.
    only_nan = divergence.DivergenceDetector(factor=0)
    only_nan.check(1, {"loss": 1.0})
    only_nan.check(2, {"loss": 1e11})
    assert divergence.rule(100, 50) == ("stop when any metric is non-finite, or the loss, gradient norm or "
                                        "parameter norm exceeds 100x max(its first value, its median over "
                                        "the last 50 healthy steps), or the gradient norm stays below 1e-06x "
                                        "its first value while the loss does not fall to 0, 50 steps in a row")


def test_a_collapsed_network_stops_but_a_run_of_batches_with_nothing_to_learn_does_not():
    """The collapse of a too-high learning rate (lr 30 on the tiny MNIST net, measured: every
    distance 0 and the gradient exactly 0 from step 12, the batch-hard loss at its margin 0.5, on to
    the schedule's end at chance; the prototypical loss at lr 3: the gradient 1e-9-1e-5, rounding
    noise around 0) against its look-alikes that must not stop a run."""
    det = divergence.DivergenceDetector(factor=100, window=5)
    det.check(1, {"loss": 0.66, "grad_norm": 6.3, "param_norm": 7.0})  # the first gradient: the scale
    for step in range(2, 6):  # a trained model's batches with no active triplet: loss 0, gradient 0
        det.check(step, {"loss": 0.0, "grad_norm": 0.0, "param_norm": 7.0})
    for step in range(6, 10):  # four stuck steps, a validation between them, then one that moves
        det.check(step, {"loss": 0.5, "grad_norm": 0.0, "param_norm": 7.0})
        det.check(step, {"val_one_shot_accuracy": 0.1})  # validation rows do not end a streak ...
    det.check(10, {"loss": 0.5, "grad_norm": 1e-3, "param_norm": 7.0})  # ... a small real gradient does
    for step, noise in zip(range(11, 15), (0.0, 3e-6, 0.0, 6e-6)):  # rounding noise is still stuck
        det.check(step, {"loss": 0.5, "grad_norm": noise, "param_norm": 7.0})
    with pytest.raises(divergence.DivergenceError,
                       match=r"collapsed at step 15: the gradient norm has stayed below 1e-06x its first "
                             r"value \(6\.3\) since step 11 while the loss stayed at 0\.5 ") as e:
        det.check(15, {"loss": 0.5, "grad_norm": 0.0, "param_norm": 7.0})
    assert e.value.step == 15 and e.value.metric == "grad_norm" and e.value.collapsed_since == 11
    only_nan = divergence.DivergenceDetector(factor=0, window=5)  # factor 0: non-finite values only
    for step in range(1, 20):
        only_nan.check(step, {"loss": 0.5, "grad_norm": 0.0})
    # Resumed in the middle of a streak (preempted legs shorter than the window): the streak goes on.
    history = [{"step": 1, "loss": 0.66, "grad_norm": 6.3}, {"step": 2, "loss": 0.5, "grad_norm": 1.0},
               {"step": 2, "val_one_shot_accuracy": 0.1}, {"step": 3, "loss": 0.5, "grad_norm": 0.0},
               {"step": 4, "loss": 0.5, "grad_norm": 2e-6}]
    resumed = divergence.DivergenceDetector(factor=100, window=5, start_step=4)
    resumed.seed_first("grad_norm", 6.3)
    resumed.seed_streak(history)
    resumed.check(5, {"loss": 0.5, "grad_norm": 0.0})
    resumed.check(6, {"loss": 0.5, "grad_norm": 0.0})
    with pytest.raises(divergence.DivergenceError, match="collapsed at step 7: .* since step 3 "):
        resumed.check(7, {"loss": 0.5, "grad_norm": 0.0})
    healthy_end = divergence.DivergenceDetector(factor=100, window=5, start_step=4)
    healthy_end.seed_first("grad_norm", 6.3)
    healthy_end.seed_streak(history[:2] + [{"step": 3, "loss": 0.0, "grad_norm": 0.0}])  # ends on no streak
    for step in range(4, 8):
        healthy_end.check(step, {"loss": 0.5, "grad_norm": 0.0})


def test_a_collapse_distrusts_every_checkpoint_from_a_window_before_its_streak_the_resumed_one_included(
        monkeypatch, tmp_path):
    """A divergence keeps the checkpoints up to `window` steps before it, and always the one its leg
    resumed from; a collapse keeps only those from before `window` steps ahead of its stuck streak.
    (A review resumed a collapse at step 169 from its step-119 checkpoint, the step before the
    streak, with the default learning rate: it collapsed again at 169, and the advice looped.)"""
    saved = [20, 60, 100, 119, 140]

    class FakeCheckpoints:
        def __init__(self, workdir, keep):
            pass

        def discard_newer_than(self, step):
            moved = [s for s in saved if s > step]
            saved[:] = [s for s in saved if s <= step]
            return [f"checkpoints-{s}" for s in moved]

        def all_periodic_steps(self):
            return list(saved)

        def close(self):
            pass

    monkeypatch.setattr(divergence.ckpt_lib, "Checkpoints", FakeCheckpoints)
    config = {"divergence_window": 50, "divergence_factor": 100.0, "learning_rate": 0.003}
    collapse = divergence.DivergenceError("training collapsed at step 169: ...", 169, "grad_norm", 0.0, 6.3,
                                          start_step=119, collapsed_since=120)
    message = str(divergence.stop_diverged_run(collapse, config, str(tmp_path)))
    assert saved == [20, 60]
    assert "3 checkpoint(s) saved from 50 steps before the collapse began on moved to" in message
    assert "it resumes from step 60, saved before the collapse" in message
    saved[:] = [20, 60, 100, 119, 140]
    diverged = divergence.DivergenceError("training diverged at step 169: ...", 169, "loss", 1e3, 1.0,
                                          start_step=140)
    message = str(divergence.stop_diverged_run(diverged, config, str(tmp_path)))
    assert saved == [20, 60, 100, 119, 140] and "it resumes from step 140, saved before the divergence" in message


@pytest.mark.slow
def test_learning_rate_1e6_stops_in_seconds_and_the_named_checkpoint_resumes(data_dir, tmp_path):
    """The issue's run: --config.learning_rate=1e6 grew the loss to ~1e11 and exited 0; a NaN hung 5
    minutes in orbax and left a -tmp dir; the advised checkpoint hit the NaN again at once. Here it
    all goes through the console scripts, run from a directory that is not the checkout."""
    env = _env(data_dir, SIAMESE_CACHE_DIR=str(tmp_path / "cache"))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    train = [_script("siamese-train"), *TINY, "--workdir=run", "--config.checkpoint_every_steps=2",
             "--config.eval_every_steps=4"]
    r = _run([*train, "--config.num_steps=4"], cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pair accuracy (test)" in r.stdout  # a whole run: trained, evaluated, table printed

    t0 = time.time()
    r = _run([*train, "--config.num_steps=40", "--config.learning_rate=1e6"], cwd=cwd, env=env)
    seconds = time.time() - t0
    line = _one_error_line_among_logs(r)
    assert "training diverged at step 5" in line and "(rule: stop when any metric is non-finite" in line
    assert "lower --config.learning_rate (now 1e+06)" in line
    assert f"it resumes from step 4, saved before the divergence ({os.path.join('run', 'checkpoints', '4')})" in line
    assert seconds < 60, seconds  # seconds of startup and 1 step, not orbax's 5-minute wait
    workdir = cwd / "run"
    leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(workdir) for n in dirs + files if "tmp" in n]
    assert leftovers == []
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # nothing after the divergence
    assert max(int(s) for s in os.listdir(workdir / "best")) <= 4
    losses = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any(m["step"] == 5 and "param_norm" in m for m in losses)  # the values that stopped it are kept

    # The advice, followed: the default learning rate, same workdir, resumes at 4 and trains on
    # (not evaluated: the siamese-evaluate below prints the table from what this resume saved).
    r = _run([*train, "--config.num_steps=8", "--noevaluate"], cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step 4 of run" in r.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == ["6", "8"]

    r = _run([_script("siamese-evaluate"), "--workdir=run", "--nowrite"], cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pair accuracy (test)" in r.stdout


def _one_error_line_among_logs(r):
    """Exit 2, and among stderr's progress lines exactly one `error:` line and no traceback."""
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


# =================================================================================================
# 4. Checkpoints heal
# =================================================================================================
def _tiny_config():
    c = default.get_config("omniglot")
    c.widths, c.embedding_dim, c.image_size = (8, 8), 16, 16
    return c


def _states(config, n):
    """n successive train states of the tiny model (each one real optimizer step further)."""
    model = models.build_model(config)
    tx = ts.make_optimizer(config)
    state = ts.create_train_state(model, tx, jax.random.PRNGKey(0), config.image_size)
    out = []
    for step in range(n):
        grads = jax.tree.map(lambda p: np.full(np.shape(p), 0.01 * (step + 1), np.float32), state.params)
        updates, opt = tx.update(grads, state.opt_state, state.params)
        state = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt, step=state.step + 1)
        out.append(state)
    return out, ts.create_train_state(model, tx, jax.random.PRNGKey(1), config.image_size)


def _truncate_state_files(step_dir):
    """What a crash mid-copy or a full disk leaves: every data file of the step cut to a third."""
    cut = 0
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            if "state" in path and os.path.getsize(path) > 0:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)
                cut += 1
    assert cut


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(x, y)


def test_truncated_newest_checkpoint_is_moved_aside_and_written_afresh(tmp_path, caplog, capfd):
    config = _tiny_config()
    (s1, s2), fresh = _states(config, 2)
    ck = C.Checkpoints(str(tmp_path))
    ck.save(s1, {})
    ck.save(s2, {})
    ck.close()
    _truncate_state_files(tmp_path / "checkpoints" / "2")

    ck = C.Checkpoints(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        restored, _ = ck.restore_latest(fresh)
    assert int(restored.step) == 1
    _assert_same(restored.params, s1.params)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "checkpoint step 2" in warnings[0] and "falling back to step 1" in warnings[0]
    assert f"moved to {tmp_path / 'unreadable' / 'checkpoints-2'}" in warnings[0]
    assert "Traceback" not in capfd.readouterr().err  # was 593 lines with 11 asyncio tracebacks
    # Step 2 is out of the manager's sight, so the re-run's save of step 2 writes it afresh ...
    assert ck.all_periodic_steps() == [1]
    assert ck.save(s2, {})
    ck.close()
    # ... and the next run restores it, with no warning.
    caplog.clear()
    ck = C.Checkpoints(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        restored, _ = ck.restore_latest(fresh)
    ck.close()
    assert int(restored.step) == 2 and not caplog.records
    _assert_same(restored.params, s2.params)


def test_truncated_best_falls_back_to_the_newest_periodic_checkpoint(tmp_path, caplog):
    """`evaluate` and `--model <workdir>` both load through this path; they failed with 'no readable
    checkpoint in .../best' although protocols.load_workdir_model documents this fallback."""
    config = _tiny_config()
    (s1, s2), _ = _states(config, 2)
    ck = C.Checkpoints(str(tmp_path))
    ck.save_best(s1, {}, {"val_one_shot_accuracy": 0.5})
    ck.save(s1, {})
    ck.save(s2, {})
    ck.close()
    _truncate_state_files(tmp_path / "best" / "1")
    with caplog.at_level(logging.WARNING):
        loaded, step = embedding.load_workdir_model(config, str(tmp_path))
    assert step == 2
    _assert_same(loaded.state.params, s2.params)
    assert any("best" in r.getMessage() and "trying the next checkpoint directory" in r.getMessage()
               for r in caplog.records)
    # The model-file path of compare/embed/search (`--model <workdir>`) too.
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    model = inference.load_model(str(tmp_path))
    _assert_same(model.params, s2.params)


def test_a_best_step_replaced_while_being_read_reads_the_new_best_not_a_periodic_step(tmp_path, caplog, monkeypatch):
    # `evaluate`, `export` or `--model W` while W trains: orbax removed the best step being read when
    # the training saved a better one. The reader called it damage ("unreadable") and quietly fell
    # back to the newest *periodic* checkpoint (1.6% of loads in the concurrency review's loop).
    config = _tiny_config()
    (s1, s2, s3), _ = _states(config, 3)
    ck = C.Checkpoints(str(tmp_path))
    ck.save_best(s1, {}, {"val_one_shot_accuracy": 0.5})
    ck.save(s3, {})
    ck.wait()
    real = C.restore_step

    def training_saves_a_new_best_meanwhile(manager, step, target, weights_only=False):
        if step == 1 and "best" in str(manager.directory):
            ck.save_best(s2, {}, {"val_one_shot_accuracy": 0.9})  # orbax keeps one: step 1 goes
            ck.wait()
            assert not (tmp_path / "best" / "1").exists()
            raise ValueError("Checkpoint directory does not exist")  # what orbax raises then
        return real(manager, step, target, weights_only)

    monkeypatch.setattr(C, "restore_step", training_saves_a_new_best_meanwhile)
    with caplog.at_level(logging.INFO):
        loaded, step = embedding.load_workdir_model(config, str(tmp_path))
    ck.close()
    assert step == 2  # the new best, not periodic step 3
    _assert_same(loaded.state.params, s2.params)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert any("replaced while being read" in r.getMessage() for r in caplog.records)


def test_loading_a_workdir_model_initialises_no_parameters(tmp_path, monkeypatch):
    """evaluate, compare/embed/search and the final evaluation restore into shapes only: building
    real initial parameters just to overwrite them compiled every initializer (seconds per process)."""
    config = _tiny_config()
    (s1,), _ = _states(config, 1)
    ck = C.Checkpoints(str(tmp_path))
    ck.save(s1, {})
    ck.close()
    traced_only = []
    real = ts.create_train_state

    def spy(model, tx, key, image_size):
        traced_only.append(isinstance(key, jax.core.Tracer))
        return real(model, tx, key, image_size)

    monkeypatch.setattr(ts, "create_train_state", spy)
    loaded, step = embedding.load_workdir_model(config, str(tmp_path))
    assert traced_only == [True]  # called once, under jax.eval_shape
    assert step == 1
    _assert_same(loaded.state.params, s1.params)
    _assert_same(loaded.state.batch_stats, s1.batch_stats)
    assert isinstance(loaded.state.opt_state[0], optax.ScaleByAdamState)  # optax types, not dicts


def _finished_workdir(workdir, config):
    """A training workdir as `load_model` reads it: a best checkpoint (one real step) and config.json."""
    (s1,), _ = _states(config, 1)
    ck = C.Checkpoints(str(workdir))
    ck.save_best(s1, {}, {"val_one_shot_accuracy": 0.5})
    ck.close()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    return workdir


@pytest.mark.slow  # two commands that read data
def test_evaluate_and_export_read_the_data_from_another_source_and_machine_than_the_run_trained_from(data_dir, tmp_path):
    # A run trained from TFDS, evaluated or exported where only the original archives are: the data
    # messages advise --source=archives, which only siamese-train had. And a workdir copied from the
    # machine it trained on: its recorded data folders overrode SIAMESE_DATA_DIR (an error naming the
    # first machine's path) and its cache folder was created and written here (stop 54).
    config = _tiny_config()
    config.source = "tfds"
    config.tfds_data_dir = str(tmp_path / "no-tfds-here")
    config.archive_dir = str(tmp_path / "first-machine-data")
    config.cache_dir = str(tmp_path / "first-machine-cache")
    workdir = _finished_workdir(tmp_path / "run", config)
    env = _env(data_dir, SIAMESE_CACHE_DIR=str(tmp_path / "cache-here"))
    for script, extra in (("siamese-evaluate", ["--nowrite", "--episodes=2"]),
                          ("siamese-export", [f"--out={tmp_path / 'm.msgpack'}", "--pairs=20"])):
        r = _run([_script(script), f"--workdir={workdir}", "--source=archives", *extra], env=env)
        assert r.returncode == 0, (script, r.stderr[-2000:])
        assert "first-machine-data" in r.stderr and "not used" in r.stderr, (script, r.stderr[-2000:])
    assert json.loads((workdir / "config.json").read_text())["source"] == "tfds"  # the run's record unchanged
    assert not (tmp_path / "first-machine-cache").exists()  # nothing written to the first machine's path
    assert any((tmp_path / "cache-here").iterdir())
    # The exported file does not carry the first machine's folders on.
    assert inference.load_model(str(tmp_path / "m.msgpack")).config.cache_dir is None


def test_a_run_from_another_machine_does_not_use_its_recorded_data_folders(tmp_path, caplog, monkeypatch):
    # A workdir (or its exported file) copied from the machine it trained on records that machine's
    # archive_dir / cache_dir: they overrode SIAMESE_DATA_DIR here (an error naming the first
    # machine's path, no word of --data_dir) and the cache was written to that path on this one.
    config = _tiny_config()
    config.archive_dir = "/content/drive/MyDrive/omniglot-data"  # not on this machine
    config.cache_dir = str(tmp_path / "first-machine-cache")  # not here either
    config.tfds_data_dir = str(tmp_path)  # a folder that is here: kept
    workdir = _finished_workdir(tmp_path / "run", config)
    with monkeypatch.context() as m:  # a model file written before stop 55, which carried them
        m.setattr(config_check, "DATA_FOLDER_KEYS", ())
        inference.load_model(str(workdir)).save(str(tmp_path / "run.msgpack"))
    for source in (workdir, tmp_path / "run.msgpack"):
        caplog.clear()
        loaded, _ = inference.load_run(str(source))
        assert loaded.config.archive_dir is None and loaded.config.cache_dir is None, source
        assert loaded.config.tfds_data_dir == str(tmp_path)
        assert "archive_dir=/content/drive/MyDrive/omniglot-data" in caplog.text and "not used" in caplog.text
        # A folder given on this machine (--data_dir, a student's data keys) is the user's: kept.
        loaded, _ = inference.load_run(str(source), {"archive_dir": "/given/here"})
        assert loaded.config.archive_dir == "/given/here" and loaded.config.cache_dir is None


def test_a_model_file_carries_no_data_folders_of_the_machine_that_wrote_it(tmp_path, caplog):
    """`siamese-export --data_dir=...` (or a workdir's recorded folders, through export or `calibrate
    --out`) wrote that machine's data folders into the model file, which is shared with others: on
    another machine evaluating from it warned about a folder that is not there (where the path was a
    folder, it was read over $SIAMESE_DATA_DIR). Its config now has none; the run's other keys stay."""
    config = _tiny_config()
    config.archive_dir = str(tmp_path)  # folders that exist on the writing machine
    config.cache_dir = str(tmp_path)
    config.tfds_data_dir = str(tmp_path)
    workdir = _finished_workdir(tmp_path / "run", config)
    model = inference.load_model(str(workdir))
    model.save(str(tmp_path / "run.msgpack"))
    assert model.config.archive_dir == str(tmp_path)  # the model in memory is left as it was
    saved = inference.load_model(str(tmp_path / "run.msgpack")).config
    assert (saved.archive_dir, saved.cache_dir, saved.tfds_data_dir) == (None, None, None)
    assert tuple(saved.widths) == tuple(config.widths) and saved.dataset == config.dataset and saved.source == config.source
    caplog.clear()
    loaded, _ = inference.load_run(str(tmp_path / "run.msgpack"))
    assert loaded.config.archive_dir is None and "not used" not in caplog.text


def test_a_workdir_and_its_exported_file_load_as_the_same_run(tmp_path):
    """`inference.load_run` is how distillation teachers and validation_recheck read a run: its
    workdir and its exported model file give the same embeddings and step; anything else is one
    ModelError line."""
    config = _tiny_config()
    workdir = _finished_workdir(tmp_path / "run", config)
    inference.load_model(str(workdir)).save(str(tmp_path / "run.msgpack"))
    images = np.random.default_rng(0).integers(0, 256, (6, config.image_size, config.image_size), dtype=np.uint8)
    from_dir, step_dir = inference.load_run(str(workdir), {"archive_dir": "/elsewhere"})
    from_file, step_file = inference.load_run(str(tmp_path / "run.msgpack"), {"archive_dir": "/elsewhere"})
    assert step_dir == step_file == 1
    assert from_dir.config.archive_dir == from_file.config.archive_dir == "/elsewhere"
    np.testing.assert_allclose(from_file.embed_u8(images), from_dir.embed_u8(images), rtol=1e-5, atol=1e-6)
    (tmp_path / "empty").mkdir()
    for source, message in ((tmp_path / "empty", "not a finished training workdir (no readable config.json"),
                            (tmp_path / "nowhere.msgpack", "no such model file or workdir")):
        with pytest.raises(inference.ModelError, match=re.escape(message)):
            inference.load_run(str(source))


def test_a_distilled_run_resumes_with_the_teachers_it_started_with(tmp_path, monkeypatch, caplog):
    """At a distilled run's first start its teachers are written into its workdir (`teachers/`); a
    resume distills from that snapshot, whatever became of the sources: before, a resume loaded them
    again, so a gone teacher refused it and a replaced one changed the run silently."""
    from siamese_jax import distillation

    config = _tiny_config()
    config.archive_dir = str(tmp_path)  # where the data were: not carried into the snapshot's files
    teacher_dir = _finished_workdir(tmp_path / "teacher", config)
    _, other = _states(config, 1)  # other weights: the second teacher, a model file
    teacher_file = tmp_path / "teacher.msgpack"
    inference.SiameseModel(config, other.params, other.batch_stats).save(str(teacher_file))
    student = _tiny_config()
    student.distill_teachers = f"{teacher_dir},{teacher_file}"
    images = np.random.default_rng(0).integers(0, 256, (6, config.image_size, config.image_size), dtype=np.uint8)
    checked = []  # the check against the student's training set runs on every start

    def check(config, teacher, name, train_ds):
        checked.append((name, teacher.dataset))
        return images
    monkeypatch.setattr(distillation, "_teacher_train_images", check)

    run = tmp_path / "student"
    caplog.set_level(logging.INFO)
    # A process that does not write the run's files snapshots nothing; process 0 does.
    distillation.teacher_embeddings(student, None, str(run), resuming=False, write_snapshot=False)
    assert not (run / "teachers").exists()
    started = distillation.teacher_embeddings(student, None, str(run), resuming=False)
    assert sorted(os.listdir(run / "teachers")) == ["0.msgpack", "1.msgpack", "teachers.json"]
    assert inference.load_model(str(run / "teachers" / "0.msgpack")).config.archive_dir is None
    # The snapshot embeds as its sources do, to float precision.
    np.testing.assert_allclose(started, distillation.teacher_embeddings(student, None), rtol=1e-6, atol=1e-7)

    # The run has checkpointed; then its teacher workdir is removed and its teacher file replaced.
    (run / "checkpoints" / "2").mkdir(parents=True)
    inference.load_model(str(teacher_dir)).save(str(teacher_file))
    shutil.rmtree(teacher_dir)
    config_check.validate_config(student, workdir=str(run))  # the sources are not needed
    checked.clear()
    caplog.clear()
    resumed = distillation.teacher_embeddings(student, None, str(run), resuming=True)
    np.testing.assert_array_equal(resumed, started)
    assert f"the teachers are loaded from {run / 'teachers'}, the snapshot taken at the run's first start" in caplog.text
    assert [name for name, _ in checked] == [f"{teacher_dir} (its snapshot {run / 'teachers' / '0.msgpack'})",
                                             f"{teacher_file} (its snapshot {run / 'teachers' / '1.msgpack'})"]
    assert {dataset for _, dataset in checked} == {"omniglot"}
    # A resume that names other teachers gets the run's own, and its config says so again.
    moved = student.copy_and_resolve_references()
    moved.distill_teachers = "pretrained"
    np.testing.assert_array_equal(distillation.teacher_embeddings(moved, None, str(run), resuming=True), started)
    assert moved.distill_teachers == student.distill_teachers and "config.distill_teachers=pretrained is not used" in caplog.text
    # The same teachers spelled another way (through a symlink to their folder): no warning.
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    respelled = student.copy_and_resolve_references()
    respelled.distill_teachers = f"{tmp_path / 'link' / 'teacher'},{tmp_path / 'link' / 'teacher.msgpack'}"
    caplog.clear()
    np.testing.assert_array_equal(distillation.teacher_embeddings(respelled, None, str(run), resuming=True), started)
    assert "is not used" not in caplog.text and respelled.distill_teachers == student.distill_teachers

    # A damaged snapshot: one line naming it and what to do; nothing removed or rewritten.
    for name, damage in (("1.msgpack", b"\x00" * 10), ("teachers.json", b"{")):
        kept = (run / "teachers" / name).read_bytes()
        (run / "teachers" / name).write_bytes(damage)
        with pytest.raises(config_check.ConfigError, match=r"^the snapshot of this run's teachers is damaged \(.*"
                           + re.escape(name) + r".*\); nothing was changed: put .*teachers back from a copy") as e:
            distillation.teacher_embeddings(student, None, str(run), resuming=True)
        assert "\n" not in str(e.value) and (run / "teachers" / name).read_bytes() == damage
        (run / "teachers" / name).write_bytes(kept)

    # A run from before snapshots (checkpoints, no teachers/): its sources, as before, with a warning.
    old = tmp_path / "old"
    (old / "checkpoints" / "2").mkdir(parents=True)
    student.distill_teachers = str(teacher_file)
    caplog.clear()
    distillation.teacher_embeddings(student, None, str(old), resuming=True)
    assert "has no snapshot of its teachers" in caplog.text and not (old / "teachers").exists()
    (old / "config.json").write_text(json.dumps({"distill_teachers": str(teacher_file)}))  # it had teachers
    caplog.clear()
    distillation.teacher_embeddings(student, None, str(old), resuming=True)
    assert "has no snapshot of its teachers" in caplog.text and not (old / "teachers").exists()
    # A run that trained without teachers and is given some at a resume: these are its first
    # teachers, snapshotted now as at a first start (the warning said it "started before runs took
    # one", and every later resume read the sources again; the multi-process review).
    (old / "config.json").write_text(json.dumps({"distill_teachers": ""}))
    caplog.clear()
    distillation.teacher_embeddings(student, None, str(old), resuming=True)
    assert "trained without teachers so far: from this resume on it distills from" in caplog.text
    assert "has no snapshot" not in caplog.text
    assert sorted(os.listdir(old / "teachers")) == ["0.msgpack", "teachers.json"]
    (old / "config.json").write_text(json.dumps({"distill_teachers": str(teacher_file)}))  # as the run then records
    (old / "checkpoints" / "3").mkdir()  # ... and trains with them to its next checkpoint
    caplog.clear()
    distillation.teacher_embeddings(student, None, str(old), resuming=True)
    assert "the snapshot taken at the run's first start" in caplog.text


def test_a_snapshot_left_by_a_start_the_run_did_not_train_from_is_not_its_teachers(tmp_path, monkeypatch, caplog):
    """A first start with teachers that stopped before its first checkpoint leaves a snapshot; the run
    then started again without teachers (its config.json says so) and trained. Given teachers at a
    resume, those are its first, snapshotted now: it distilled from the stale snapshot instead, with a
    warning that it "resumes with the teachers it started with" (the review of stop 56)."""
    from siamese_jax import distillation

    config = _tiny_config()
    (first_state,), other_state = _states(config, 1)
    files = []
    for name, state in zip("ab", (first_state, other_state)):  # two teachers with other weights
        files.append(str(tmp_path / f"{name}.msgpack"))
        inference.SiameseModel(config, state.params, state.batch_stats).save(files[-1])
    images = np.random.default_rng(0).integers(0, 256, (6, config.image_size, config.image_size), dtype=np.uint8)
    monkeypatch.setattr(distillation, "_teacher_train_images", lambda *args: images)

    run = tmp_path / "student"
    first = _tiny_config()
    first.distill_teachers = files[0]
    distillation.teacher_embeddings(first, None, str(run), resuming=False)  # the start that stopped early
    distillation.set_aside_unused_snapshot(str(run))  # ... then started without teachers (train.py)
    assert not (run / "teachers" / "teachers.json").exists()
    (run / "checkpoints" / "2").mkdir(parents=True)  # ... and trained
    (run / "config.json").write_text(json.dumps({"distill_teachers": ""}))
    given = _tiny_config()
    given.distill_teachers = str(tmp_path / "gone.msgpack")  # checked at once, as at a first start (it was skipped)
    with pytest.raises(config_check.ConfigError, match=r"config.distill_teachers=.*gone.msgpack: no such workdir or file"):
        config_check.validate_config(given, workdir=str(run))
    given.distill_teachers = files[1]
    config_check.validate_config(given, workdir=str(run))
    of_given, of_first = (distillation.teacher_embeddings(c, None) for c in (given, first))
    assert not np.allclose(of_given, of_first)  # (the teachers differ)
    caplog.set_level(logging.INFO)
    resumed = distillation.teacher_embeddings(given, None, str(run), resuming=True)
    np.testing.assert_array_equal(resumed, of_given)
    assert given.distill_teachers == files[1] and "is not used" not in caplog.text
    assert json.loads((run / "teachers" / "teachers.json").read_text())["sources"] == [files[1]]


def test_whether_a_snapshot_is_the_runs_teachers_follows_its_checkpoints_not_its_last_start(tmp_path, monkeypatch,
                                                                                              caplog):
    """Whether a resume distills from `teachers/` was read from config.json, which every start
    rewrites: teachers dropped at one resume and given again at a later one were loaded from their
    sources (changed since: other teachers, silently; gone: the resume refused); teachers added at a
    resume that stopped before its next checkpoint won over the ones given next; an unreadable
    config.json let a leftover snapshot win (the last review of stop 56). Now the snapshot records
    the student's step, and it is the run's teachers once a later checkpoint exists."""
    from siamese_jax import distillation

    config = _tiny_config()
    (s0,), s1 = _states(config, 1)
    a, b = str(tmp_path / "a.msgpack"), str(tmp_path / "b.msgpack")
    for path, state in ((a, s0), (b, s1)):
        inference.SiameseModel(config, state.params, state.batch_stats).save(path)
    images = np.random.default_rng(0).integers(0, 256, (6, config.image_size, config.image_size), dtype=np.uint8)
    monkeypatch.setattr(distillation, "_teacher_train_images", lambda *args: images)
    with_a, with_b = _tiny_config(), _tiny_config()
    with_a.distill_teachers, with_b.distill_teachers = a, b
    of_a, of_b = (distillation.teacher_embeddings(c, None) for c in (with_a, with_b))
    caplog.set_level(logging.INFO)

    # Teachers A from the first start, trained to a checkpoint; a resume without teachers (config.json
    # says none; the snapshot stays); then A again, its source replaced by other weights, then gone.
    run = tmp_path / "dropped"
    distillation.teacher_embeddings(with_a, None, str(run), resuming=False)
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"distill_teachers": ""}))
    distillation.set_aside_unused_snapshot(str(run))
    assert (run / "teachers" / "teachers.json").exists()
    saved_a = tmp_path / "a.saved"
    shutil.copy(a, saved_a)
    shutil.copy(b, a)
    np.testing.assert_array_equal(distillation.teacher_embeddings(with_a, None, str(run), resuming=True), of_a)
    os.remove(a)
    config_check.validate_config(with_a, workdir=str(run))  # its source is not needed
    np.testing.assert_array_equal(distillation.teacher_embeddings(with_a, None, str(run), resuming=True), of_a)
    shutil.copy(saved_a, a)

    # A run without teachers, resumed with A, stopped before its next checkpoint, resumed with B: B.
    run = tmp_path / "added"
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"distill_teachers": ""}))
    distillation.teacher_embeddings(with_a, None, str(run), resuming=True)
    (run / "config.json").write_text(json.dumps({"distill_teachers": a}))  # train.py writes it
    caplog.clear()
    np.testing.assert_array_equal(distillation.teacher_embeddings(with_b, None, str(run), resuming=True), of_b)
    assert "is not used" not in caplog.text and with_b.distill_teachers == b
    assert json.loads((run / "teachers" / "teachers.json").read_text())["sources"] == [b]
    # ... and once a checkpoint was trained with B, B is the run's, whatever a command names.
    (run / "checkpoints" / "3").mkdir()
    other = _tiny_config()
    other.distill_teachers = a
    np.testing.assert_array_equal(distillation.teacher_embeddings(other, None, str(run), resuming=True), of_b)

    # A leftover snapshot (a first start that stopped early), set aside by the start without teachers
    # that followed, is not taken for the run's teachers even where config.json cannot be read.
    run = tmp_path / "leftover"
    distillation.teacher_embeddings(with_a, None, str(run), resuming=False)
    distillation.set_aside_unused_snapshot(str(run))
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "config.json").write_text("{")
    np.testing.assert_array_equal(distillation.teacher_embeddings(with_b, None, str(run), resuming=True), of_b)

    # A first start with A and B that stopped before its first checkpoint, started again with B alone:
    # the snapshot is B's, and A's file is not left beside it (1.msgpack stayed, named by no list).
    run = tmp_path / "fewer"
    both = _tiny_config()
    both.distill_teachers = f"{a},{b}"
    distillation.teacher_embeddings(both, None, str(run), resuming=False)
    assert sorted(os.listdir(run / "teachers")) == ["0.msgpack", "1.msgpack", "teachers.json"]
    (run / "teachers" / "notes.txt").write_text("a user's own file")  # not the snapshot's: kept
    np.testing.assert_array_equal(distillation.teacher_embeddings(with_b, None, str(run), resuming=False), of_b)
    assert sorted(os.listdir(run / "teachers")) == ["0.msgpack", "notes.txt", "teachers.json"]


@pytest.mark.parametrize("listed", ["..", "."])
def test_a_snapshot_list_that_names_a_file_outside_the_snapshot_is_damaged(tmp_path, monkeypatch, listed):
    """teachers.json names the snapshot's own files, which its first start wrote. A bare name such
    as `..` passed the check ("its own files, none elsewhere") and resolved to the student's own
    workdir: the run distilled from its own best checkpoint, silently (the multi-process review of
    the snapshot change)."""
    from siamese_jax import distillation

    config = _tiny_config()
    run = _finished_workdir(tmp_path / "student", config)  # a best checkpoint of its own: loadable as a teacher
    config.distill_teachers = "pretrained"  # (what its config.json records: it distilled)
    (run / "config.json").write_text(config.to_json_best_effort())
    (run / "checkpoints" / "2").mkdir(parents=True, exist_ok=True)
    (run / "teachers").mkdir()
    (run / "teachers" / "teachers.json").write_text(json.dumps(
        {"distill_teachers": "pretrained", "sources": ["pretrained"], "files": [listed], "steps": [-1]}))
    student = _tiny_config()
    student.distill_teachers = "pretrained"
    images = np.zeros((6, config.image_size, config.image_size), np.uint8)
    monkeypatch.setattr(distillation, "_teacher_train_images", lambda *args: images)
    with pytest.raises(config_check.ConfigError, match=r"^the snapshot of this run's teachers is damaged \(.*"
                       r"teachers\.json: ValueError: not a list of teachers and their files\)"):
        distillation.teacher_embeddings(student, None, str(run), resuming=True)



@pytest.mark.parametrize("content", ['{"threshold": 1.0}', '{"threshold": "x", "slope": 1, "method": "m", '
                                     '"accuracy": 1, "false_accept_rate": 0, "num_pairs": 2}', "[1, 2]", "{not json"])
def test_a_damaged_calibration_json_is_one_model_error_naming_it(tmp_path, content):
    config = _tiny_config()
    workdir = _finished_workdir(tmp_path / "run", config)
    (workdir / "calibration.json").write_text(content)
    # The advice is what works: `siamese-calibrate` loads the model too, so it cannot run until the
    # file is gone (the message said "run `calibrate` again or remove it").
    with pytest.raises(inference.ModelError, match=r"calibration.json: unusable calibration \(.*\); remove it, then run "
                                                  r"`siamese-calibrate FOLDER --model=.*` again"):
        inference.load_model(str(workdir))
    (workdir / "calibration.json").unlink()
    assert inference.load_model(str(workdir)).calibration is None


def _read_only_as_it_is(path):
    """A function that makes a command's argv see directory `path`, with what is in it, read-only (a
    shared model folder someone else owns). Root writes through permission bits, so as root `path`
    is bound read-only onto itself in a private mount namespace; the caller restores the mode."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda argv: argv
    bind = f"mount --bind '{path}' '{path}' && mount -o remount,ro,bind '{path}' '{path}'"
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "sh", "-c", bind], capture_output=True).returncode:
        why = "running as root without mount namespaces: no way to make a read-only directory"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why + " (CI must run this test)")
        pytest.skip(why)
    return lambda argv: ["unshare", "-m", "sh", "-c", bind + ' && exec "$0" "$@"', *argv]


def test_evaluate_writing_into_a_read_only_workdir_names_nowrite(tmp_path):
    # A shared model folder someone else owns: the error said "not writable", not that --nowrite
    # evaluates it without writing (checked before any data is read: no data here).
    workdir = _finished_workdir(tmp_path / "run", _tiny_config())
    ro = _read_only_as_it_is(workdir)
    try:
        line = _one_error_line(_run(ro([sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}"])),
                               f"workdir {workdir}: not writable")
        assert "--nowrite" in line, line
    finally:
        os.chmod(workdir, 0o755)


def test_calibrate_into_a_read_only_workdir_is_one_line_before_any_work_naming_out(tmp_path):
    # A shared model folder someone else owns: calibrate embedded every pair, then failed at the
    # final write ("[Errno 30] cannot write .../calibration.json: Read-only file system"), without
    # saying that --out writes the calibrated model elsewhere.
    from PIL import Image

    workdir = _finished_workdir(tmp_path / "run", _tiny_config())
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "pairs" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / "pairs" / f"class{c}" / f"{i}.png")
    calibrate = [sys.executable, "-m", "experiments.calibrate", str(tmp_path / "pairs"), f"--model={workdir}", "--pairs=8"]
    ro = _read_only_as_it_is(workdir)
    try:
        line = _one_error_line(_run(ro(calibrate)), f"cannot write {workdir / 'calibration.json'}")
        assert "--out=" in line, line
        r = _run(ro([*calibrate, f"--out={tmp_path / 'calibrated.msgpack'}"]))
        assert r.returncode == 0 and (tmp_path / "calibrated.msgpack").is_file(), r.stderr[-2000:]
    finally:
        os.chmod(workdir, 0o755)
    assert not (workdir / "calibration.json").exists()


def test_a_workdir_calibration_fitted_to_an_earlier_best_checkpoint_is_not_used(tmp_path, capsys):
    # `calibrate --model W` while W trained (or before it was resumed): calibration.json stayed, and
    # `compare` used its threshold with the later best checkpoint's weights, silently (accuracy 0.55
    # where a fresh threshold gave 0.78; the concurrency review of 2026-12-05).
    from PIL import Image

    from siamese_jax import commands

    config = _tiny_config()
    workdir = _finished_workdir(tmp_path / "run", config)
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "pairs" / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / "pairs" / f"class{c}" / f"{i}.png")
    assert commands._calibrate([str(tmp_path / "pairs"), "--model", str(workdir), "--pairs", "20"]) == 0
    saved = json.loads((workdir / "calibration.json").read_text())
    assert saved["checkpoint_step"] == 1 and len(saved["model_fingerprint"]) == 16
    a, b = str(tmp_path / "pairs" / "class0" / "0.png"), str(tmp_path / "pairs" / "class1" / "0.png")
    inference.load_model(str(workdir)).compare(a, b)  # fitted to this checkpoint: used

    (_, s2), _ = _states(config, 2)  # training went on: a new best, step 2
    ck = C.Checkpoints(str(workdir))
    ck.save_best(s2, {}, {"val_one_shot_accuracy": 0.9})
    ck.close()
    model = inference.load_model(str(workdir))
    assert model.provenance["step"] == 2 and model.calibration is None
    with pytest.raises(inference.ModelError, match=r"calibration.json was fitted to the model of step 1; this "
                                                   r"workdir's model is now step 2: run `siamese-calibrate"):
        model.compare(a, b)
    assert model.embed([a]).shape == (1, config.embedding_dim)  # embedding needs no threshold
    # search --sheet then draws distances without verdicts, and says why (it said nothing).
    index, sheet = str(tmp_path / "idx.npz"), str(tmp_path / "sheet.png")
    assert commands._embed([str(tmp_path / "pairs"), "--out", index, "--model", str(workdir)]) == 0
    capsys.readouterr()
    assert commands._search([index, a, "-k", "2", "--sheet", sheet, "--model", str(workdir)]) == 0
    assert "note: no verdicts on the sheet: " in capsys.readouterr().err and os.path.getsize(sheet) > 1000
    legacy = {k: v for k, v in saved.items() if k not in inference.CALIBRATED_MODEL_KEYS}
    # Written before the fingerprint was recorded: which weights it fits cannot be known (it was used
    # as current, also after the run trained on: the upgrade review of 2026-12-06).
    (workdir / "calibration.json").write_text(json.dumps(legacy))
    model = inference.load_model(str(workdir))
    assert model.calibration is None
    with pytest.raises(inference.ModelError, match=r"calibration.json does not record the model it was fitted to "
                                                   r"\(written before 2026-12-05.*\): run `siamese-calibrate FOLDER"):
        model.compare(a, b)
    # The same step with other embeddings (another test-time shift set, another way of reading files):
    # refused, and said so, not "fitted to step 2; the model is now step 2".
    (workdir / "calibration.json").write_text(json.dumps(dict(legacy, model_fingerprint="0" * 16, checkpoint_step=2)))
    with pytest.raises(inference.ModelError, match=r"step 2 too\) has other weights, embeds with another test-time "
                                                   r"shift set, or reads image files differently"):
        inference.load_model(str(workdir)).compare(a, b)
    # Calibrated again: used.
    assert commands._calibrate([str(tmp_path / "pairs"), "--model", str(workdir), "--pairs", "20"]) == 0
    assert inference.load_model(str(workdir)).calibration is not None
    # --out of a workdir: a model file of the workdir's weights with the new threshold; the workdir's
    # own calibration.json stays as it was.
    before, out = (workdir / "calibration.json").read_text(), tmp_path / "calibrated.msgpack"
    assert commands._calibrate([str(tmp_path / "pairs"), "--model", str(workdir), "--pairs", "20", "--seed", "1",
                                "--out", str(out)]) == 0
    assert (workdir / "calibration.json").read_text() == before
    from_file = inference.load_model(str(out))
    assert from_file.fingerprint() == inference.load_model(str(workdir)).fingerprint()
    # (seed 1's pairs give another threshold: an --out run that also wrote the workdir's file would show)
    assert from_file.calibration.num_pairs == 20 and from_file.calibration.threshold != json.loads(before)["threshold"]
    assert from_file.provenance["calibrated_on"] == f"20 pairs of 3 classes in {tmp_path / 'pairs'}"
    from_file.compare(a, b)


def test_export_refuses_test_numbers_of_another_checkpoint(tmp_path):
    # A finished workdir resumed with --noevaluate (or exported while it trains): results.json still
    # holds the first evaluation, and the model file carried its Lake score for another checkpoint.
    workdir = _finished_workdir(tmp_path / "run", _tiny_config())  # best: step 1
    (workdir / "results.json").write_text(json.dumps({"checkpoint_step": 10, "test_time_shifts": "square9",
                                                      "lake_20_runs": {"accuracy": 0.2175}}))
    r = _run([sys.executable, "-m", "experiments.export", f"--workdir={workdir}", f"--out={tmp_path / 'm.msgpack'}"])
    _one_error_line(r, "describes checkpoint step 10, the workdir's best checkpoint is now step 1: run siamese-evaluate")
    assert not (tmp_path / "m.msgpack").exists()

    for damaged, says in (('{"checkpoint_step": 1, "test_ti', "not readable JSON (Unterminated string"),
                          ("[1, 2]", "not a results file (a JSON list)")):
        (workdir / "results.json").write_text(damaged)  # by hand: siamese-evaluate writes it whole
        r = _run([sys.executable, "-m", "experiments.export", f"--workdir={workdir}", f"--out={tmp_path / 'm.msgpack'}"])
        _one_error_line(r, f"{workdir / 'results.json'}: {says}")
    (workdir / "results.json").unlink()
    (workdir / "results.json").mkdir()
    r = _run([sys.executable, "-m", "experiments.export", f"--workdir={workdir}", f"--out={tmp_path / 'm.msgpack'}"])
    _one_error_line(r, f"{workdir / 'results.json'}: cannot read it (Is a directory)")
    assert not (tmp_path / "m.msgpack").exists()


def test_evaluate_checkpoint_names_a_step_of_the_workdir_not_a_path_in_the_current_directory(tmp_path, monkeypatch):
    """`siamese-evaluate --checkpoint=2`, `--checkpoint=<workdir>/checkpoints/2` (the step directory
    the help names) and `--checkpoint=<workdir>/checkpoints` load the step they name; both of the first
    two used to fail ("no checkpoint in 2"), the number being read as a path relative to the caller's
    directory, the step directory as a checkpoint directory."""
    from siamese_jax import embedding

    config = _tiny_config()
    s1, s2 = _states(config, 2)[0]
    workdir = tmp_path / "run"
    ck = C.Checkpoints(str(workdir), keep=3)
    ck.save(s1, {})
    ck.save(s2, {})
    ck.save_best(s1, {}, {"val_one_shot_accuracy": 0.5})
    ck.close()
    monkeypatch.chdir(tmp_path)  # not the workdir: a step number must not be a path from here
    for which, step in (("best", 1), ("2", 2), ("1", 1), (str(workdir / "checkpoints" / "2"), 2),
                        (str(workdir / "checkpoints" / "1"), 1), (str(workdir / "checkpoints"), 2),
                        (str(workdir / "best"), 1)):
        loaded, got = embedding.load_workdir_model(config, str(workdir), which)
        assert got == step, which
        want = s1 if step == 1 else s2
        np.testing.assert_array_equal(jax.tree.leaves(jax.device_get(loaded.state.params))[0],
                                      jax.tree.leaves(jax.device_get(want.params))[0])
    with pytest.raises(C.CheckpointError, match=r"no checkpoint of step 7 in .*run \(steps there: 1, 2\)"):
        embedding.load_workdir_model(config, str(workdir), "7")
    with pytest.raises(C.CheckpointError, match=r"checkpoint 'elsewhere' is not a directory"):
        embedding.load_workdir_model(config, str(workdir), "elsewhere")


def _restore_one_step_with(tmp_path, other, message):
    """One step of the tiny config saved in `tmp_path`, restored with the config `other`: a
    CheckpointError matching `message`, and the step left where it was (nothing moved aside)."""
    (s1,), _ = _states(_tiny_config(), 1)
    ck = C.Checkpoints(str(tmp_path))
    ck.save(s1, {})
    ck.close()
    _, other_fresh = _states(other, 0)
    ck = C.Checkpoints(str(tmp_path))
    with pytest.raises(C.CheckpointError, match=message):
        ck.restore_latest(other_fresh)
    ck.close()
    assert os.listdir(tmp_path / "checkpoints") == ["1"] and not (tmp_path / "unreadable").exists()


def test_checkpoint_of_another_model_is_an_error_and_left_alone(tmp_path):
    """Not damage: the same workdir re-run with another encoder. Moving the steps aside would throw
    the other run's work away; the message says what differs."""
    other = _tiny_config()
    other.widths = (8, 16)
    _restore_one_step_with(tmp_path, other, r"checkpoint step 1 .* was written by a different model "
                                            r"\(params/.* is \(.*\) in the checkpoint, \(.*\) for this config\)")


@pytest.mark.parametrize("change", ["weight_decay", "ema_decay"])
def test_checkpoint_of_another_optimizer_state_is_an_error_and_left_alone(tmp_path, change):
    """The same model re-run on its workdir with an optimizer whose state has another tree (AdamW's
    or the weight average's): orbax's "tree structures do not match" is a config mismatch, not
    damage. It used to be read as damage, so every step was moved aside and the next run started
    again from step 0."""
    other = _tiny_config()
    other[change] = 1e-4 if change == "weight_decay" else 0.99
    _restore_one_step_with(tmp_path, other, r"checkpoint step 1 .* holds another state structure than this "
                                            r"config's \(a different optimizer config")
    ck = C.Checkpoints(str(tmp_path))  # the run's own config still resumes
    state, _ = ck.restore_latest(_states(_tiny_config(), 0)[1])
    ck.close()
    assert int(state.step) == 1


def test_config_resume_reads_the_weights_whatever_optimizer_state_they_were_saved_with(tmp_path):
    """`config.resume` (start from another run's weights) keeps only params and batch_stats, so a
    run with another optimizer (AdamW, the weight average) can start from them; it used to restore
    the whole state and fail ("tree structures do not match") when the optimizer state differed."""
    config = _tiny_config()
    (s1,), _ = _states(config, 1)
    ck = C.Checkpoints(str(tmp_path / "first"))
    ck.save(s1, {})
    ck.close()
    other = _tiny_config()
    other.ema_decay = 0.99
    _, fresh = _states(other, 0)
    state, _ = C.restore_from_directory(str(tmp_path / "first" / "checkpoints"), fresh, weights_only=True)
    _assert_same(state.params, s1.params)
    _assert_same(state.batch_stats, s1.batch_stats)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(fresh.opt_state)  # the new optimizer's
    assert os.listdir(tmp_path / "first" / "checkpoints") == ["1"]


def test_a_workdir_with_its_own_checkpoint_does_not_need_its_config_resume_source(tmp_path):
    # It resumes from its own checkpoint and never reads config.resume: a fine-tuned run copied to
    # another machine (or whose source was removed) was refused by the same command that started it.
    config = _tiny_config()
    config.resume = str(tmp_path / "gone" / "best")
    (tmp_path / "run" / "checkpoints" / "30").mkdir(parents=True)
    config_check.validate_config(config, workdir=str(tmp_path / "run"))
    with pytest.raises(config_check.ConfigError, match=r"config.resume=.*gone/best.*: must be an existing checkpoint"):
        config_check.validate_config(config, workdir=str(tmp_path / "new"))  # a new run needs it


@pytest.mark.slow  # three tiny trainings
def test_a_fine_tuned_run_resumes_with_the_same_command_after_its_source_is_gone(data_dir, tmp_path):
    env = _env(data_dir, SIAMESE_CACHE_DIR=str(tmp_path / "cache"))
    common = [*TINY, "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2", "--noevaluate"]
    r = _train(f"--workdir={tmp_path / 'source'}", "--config.num_steps=2", *common, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    fine_tune = [f"--workdir={tmp_path / 'tuned'}", f"--config.resume={tmp_path / 'source' / 'best'}", *common]
    r = _train(*fine_tune, "--config.num_steps=2", env=env)
    assert r.returncode == 0 and "initialised from" in r.stderr, r.stderr[-2000:]
    shutil.rmtree(tmp_path / "source")  # (or the tuned workdir copied to a laptop without it)
    r = _train(*fine_tune, "--config.num_steps=4", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from step 2" in r.stderr
    assert C.saved_steps(str(tmp_path / "tuned" / "checkpoints"))[-1] == 4


def test_temporary_dirs_of_unfinished_saves_are_removed(tmp_path):
    leftover = tmp_path / "checkpoints" / f"3{C.TMP_MARKER}-1732"
    leftover.mkdir(parents=True)
    (leftover / "partial").write_bytes(b"x")
    ck = C.Checkpoints(str(tmp_path))
    assert not leftover.exists() and ck.latest.all_steps() == []
    ck.close()


# =================================================================================================
# 5. One run per workdir
# =================================================================================================
@pytest.mark.slow
def test_a_sigterm_while_the_final_checkpoint_is_written_lets_it_finish_and_stops_as_asked(data_dir, tmp_path):
    """After the last step orbax writes the final checkpoint in the background while the loop waits
    for it. That wait ran with the default handlers back: a SIGTERM there killed the process
    mid-write (exit -15, no message) and the re-run trained again from the save before. Here the
    SIGTERM arrives as the wait starts (the process sends it to itself: the only way to hit that
    window every time); the save completes and the run stops as a stopped run does."""
    env = _env(data_dir, SIAMESE_CACHE_DIR=str(tmp_path / "cache"))
    workdir = tmp_path / "run"
    args = [*TINY, f"--workdir={workdir}", "--config.num_steps=4", "--config.eval_every_steps=2",
            "--config.checkpoint_every_steps=2", "--noevaluate"]
    script = textwrap.dedent(f"""
        import os, runpy, signal, sys
        from siamese_jax import checkpoints
        wait = checkpoints.Checkpoints.wait
        def wait_after_a_sigterm(self):  # the loop's one wait: after its last step
            os.kill(os.getpid(), signal.SIGTERM)
            return wait(self)
        checkpoints.Checkpoints.wait = wait_after_a_sigterm
        sys.argv = ["train", *{args!r}]
        runpy.run_module("experiments.train", run_name="__main__")
        """)
    r = _run([sys.executable, "-c", script], env=env)
    assert r.returncode == 130, (r.returncode, r.stderr[-2000:])
    assert "SIGTERM received: saved a checkpoint at step 4" in r.stderr
    assert C.saved_steps(str(workdir / "checkpoints"))[-1] == 4  # whole: a re-run trains nothing


def test_second_run_on_a_workdir_exits_2_at_once_naming_the_holder_and_sigkill_frees_it(data_dir, tmp_path):
    env = _env(data_dir, SIAMESE_CACHE_DIR=str(tmp_path / "cache"))
    workdir = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-m", "experiments.train", *TINY, f"--workdir={workdir}",
                              "--config.num_steps=100000", "--config.eval_every_steps=100000",
                              "--config.checkpoint_every_steps=100000"],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (workdir / "metrics.jsonl").exists():  # training, lock held
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.2)
        # Stopped, it still holds the lock (a flock belongs to the open file, not to a running
        # process), without training on at one core's worth while the second run starts (~4 CPU-s).
        first.send_signal(signal.SIGSTOP)
        t0 = time.time()
        # Another config: the lock is per workdir, whatever the run.
        r = _train("--config.embedding_dim=32", *TINY, f"--workdir={workdir}", env=env)
        line = _one_error_line(r, f"workdir {workdir} is in use by another run (PID {first.pid} on host ")
        assert "training" in line and time.time() - t0 < 60
        rows = (workdir / "metrics.jsonl").read_text().splitlines()
        assert all(json.loads(x)["step"] >= 1 for x in rows)  # only the first run writes there
        assert json.loads((workdir / "config.json").read_text())["embedding_dim"] == 16  # the first run's
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # SIGKILL runs no cleanup: the lock file stays, but the kernel dropped the lock with the process.
    assert (workdir / ".lock").exists()
    with WorkdirLock(str(workdir)) as lock:
        assert lock.held
        with pytest.raises(WorkdirLockedError, match=f"PID {os.getpid()}"):  # and it works again
            WorkdirLock(str(workdir)).acquire()


def test_a_run_that_fails_on_its_data_leaves_no_lock_file(tmp_path):
    # The run takes the workdir's lock before it reads its data; it used to leave a workdir that held
    # nothing but an empty `.lock` behind.
    workdir = tmp_path / "run"
    r = _train(*TINY, f"--workdir={workdir}")  # _env's SIAMESE_DATA_DIR does not exist
    assert r.returncode == 2, r.stderr[-2000:]
    assert not (workdir / ".lock").exists()


def test_a_workdir_on_a_filesystem_without_locks_trains_unguarded_and_says_so(tmp_path, monkeypatch, caplog):
    # flock on an NFS mount without its lock daemon (ENOLCK) or a FUSE mount that has no locks
    # (EOPNOTSUPP) made every run there fail with a bare OSError: it now goes on without the guard.
    import errno
    import logging

    from siamese_jax import workdir_lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(workdir_lock.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger=workdir_lock.log.name):
        with WorkdirLock(str(tmp_path), purpose="training") as lock:
            assert not lock.held
    assert "does not support file locks" in caplog.text and "training goes on without the guard" in caplog.text
    assert not (tmp_path / ".lock").exists()
    # A lock file that names a holder (a client of the same mount with working locks) is not ours
    # to remove, and the warning names it.
    (tmp_path / ".lock").write_text("PID 4242 on host elsewhere, training\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=workdir_lock.log.name):
        WorkdirLock(str(tmp_path)).acquire().release()
    assert "its lock file names PID 4242 on host elsewhere" in caplog.text
    assert (tmp_path / ".lock").read_text() == "PID 4242 on host elsewhere, training\n"
    (tmp_path / ".lock").unlink()

    def io_error(fd, operation):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(workdir_lock.fcntl, "flock", io_error)
    with pytest.raises(OSError, match="Input/output error"):  # any other failure is still an error
        WorkdirLock(str(tmp_path)).acquire()


def test_without_fcntl_windows_a_run_goes_on_unguarded_and_says_so(tmp_path):
    # Windows has no fcntl: `import fcntl` at the top of workdir_lock made every `siamese-train` and
    # `siamese-evaluate` there fail before training with "ImportError: No module named 'fcntl'".
    code = textwrap.dedent(f"""
        import logging, sys
        sys.modules["fcntl"] = None  # `import fcntl` raises ImportError, as on Windows
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        from siamese_jax.workdir_lock import WorkdirLock
        with WorkdirLock({str(tmp_path)!r}) as lock:
            assert not lock.held
        print("trained")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "trained"
    assert r.stderr.count("\n") == 1 and "file locks are not supported on this platform" in r.stderr
    assert "training goes on without the guard" in r.stderr
    assert not (tmp_path / ".lock").exists()


def _after_the_first_open(monkeypatch, between):
    """Makes the workdir lock's first `os.open` run `between()` once the file is open (before its
    flock: the race the lock guards against); returns the list of the descriptors opened."""
    from siamese_jax import workdir_lock

    real_open, opened = os.open, []

    def open_then(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        opened.append(fd)
        if len(opened) == 1:
            between()
        return fd

    monkeypatch.setattr(workdir_lock.os, "open", open_then)
    return opened


def test_a_contender_that_locked_the_lock_file_as_its_holder_removed_it_locks_the_new_one(tmp_path, monkeypatch):
    # The holder removes `.lock` when it lets go. A contender that opened the file just before that
    # gets its flock on a file no one else can see any more; a third run would then create and lock
    # a new `.lock` too, and two runs would share the workdir. The contender must notice and retry.
    holder = WorkdirLock(str(tmp_path)).acquire()
    opened = _after_the_first_open(monkeypatch, holder.release)  # between the contender's open and its flock
    contender = WorkdirLock(str(tmp_path)).acquire()
    monkeypatch.undo()
    assert len(opened) == 2  # it opened the file again: the new one
    with pytest.raises(WorkdirLockedError, match=f"PID {os.getpid()}"):
        WorkdirLock(str(tmp_path)).acquire()  # one holder only
    contender.release()
    assert not (tmp_path / ".lock").exists()
    WorkdirLock(str(tmp_path)).acquire().release()


def test_the_lock_file_names_only_its_holder_and_a_release_leaves_another_runs_lock_file_alone(tmp_path):
    """A SIGKILLed run leaves its lock file naming it: the next holder's shorter line replaces it
    whole (the tail of the old one named a host and purpose that were not the holder's). A holder
    whose workdir was replaced meanwhile (removed and started again by another run) lets go of its
    own lock only: the lock file at the path now is the other run's, and removing it would let a
    third run in beside that one."""
    (tmp_path / ".lock").write_text("PID 4242424 on host a-much-longer-host-name.example.org, evaluation\n")
    with WorkdirLock(str(tmp_path)):
        assert (tmp_path / ".lock").read_text() == f"PID {os.getpid()} on host {socket.gethostname()}, training\n"
    holder = WorkdirLock(str(tmp_path / "w"))
    (tmp_path / "w").mkdir()
    holder.acquire()
    os.rename(tmp_path / "w", tmp_path / "w-old")
    (tmp_path / "w").mkdir()
    with WorkdirLock(str(tmp_path / "w")):  # the new run's lock
        holder.release()
        assert (tmp_path / "w" / ".lock").exists()
        with pytest.raises(WorkdirLockedError):
            WorkdirLock(str(tmp_path / "w")).acquire()


def test_a_contender_that_locked_a_removed_lock_file_sees_a_third_runs_new_one_and_stops(tmp_path, monkeypatch):
    # Between the contender's open and its flock, the holder lets go and a third run creates and
    # locks a new `.lock` (the same filesystem, another inode): the contender holds a file nobody
    # else can see, and must find the third run holding the workdir.
    holder = WorkdirLock(str(tmp_path)).acquire()
    third = WorkdirLock(str(tmp_path))
    _after_the_first_open(monkeypatch, lambda: (holder.release(), third.acquire()))
    with pytest.raises(WorkdirLockedError, match=f"PID {os.getpid()}"):
        WorkdirLock(str(tmp_path)).acquire()
    monkeypatch.undo()
    third.release()


def test_every_process_of_a_job_raises_the_first_failing_processs_error(tmp_path, monkeypatch):
    """Two processes failed the workdir check (process 1 is this one): both raise process 0's error,
    so the job's processes print one error, not each its own."""
    from jax.experimental import multihost_utils

    from siamese_jax import workdir_lock

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)

    def gather(row):  # process 0's message over this process's
        other = np.zeros_like(row)
        text = b"workdir /w is read-only on process 0"
        other[:len(text)] = np.frombuffer(text, np.uint8)
        return np.stack([other, row])

    monkeypatch.setattr(multihost_utils, "process_allgather", gather)

    def check():
        raise config_check.ConfigError("workdir /w is read-only on process 1")

    with pytest.raises(WorkdirLockedError, match=r"^process 0: workdir /w is read-only on process 0$"):
        with workdir_lock.lock_workdir(str(tmp_path), check=check):
            pass


@pytest.mark.parametrize("purpose, instead", [("training", "or use another --workdir"),
                                              ("evaluation", "or pass --nowrite")])
def test_a_held_workdir_says_what_to_do_instead_of_waiting(tmp_path, purpose, instead):
    # An evaluation told to "use another --workdir" would evaluate another run; --nowrite evaluates
    # this one without taking its lock.
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirLockedError, match=f"in use by another run .*; wait for it to finish {instead}"):
            WorkdirLock(str(tmp_path), purpose).acquire()


# =================================================================================================
# 6. Entry points after `pip install`
# =================================================================================================
def test_console_scripts_run_outside_the_checkout(tmp_path):
    """No `experiments` package there (python -m experiments.train failed with 'No module named
    experiments'); the scripts take the modules' flags. Section 3's slow test runs them for real."""
    assert _run([sys.executable, "-c", "import experiments"], cwd=tmp_path).returncode != 0
    r = _run([_script("siamese-train"), "--config=omniglot_koch", "--config.num_steps=0", "--workdir=w"], cwd=tmp_path)
    _one_error_line(r, "config.num_steps=0")  # the shipped config found by name, its override checked
    for script, flag in (("siamese-train", "--config.num_steps=5000"), ("siamese-evaluate", "--checkpoint")):
        r = _run([_script(script), "--help"], cwd=tmp_path)  # its own docstring and flags, exit 0
        assert r.returncode == 0 and flag in r.stdout and "--coordinator_address" in r.stdout, r.stdout
    r = _run([_script("siamese-evaluate"), f"--workdir={tmp_path}"], cwd=tmp_path)
    _one_error_line(r, f"{tmp_path} is not a training workdir (no config.json)")
    # Export too: README named only `python -m experiments.export`, which needs the checkout.
    r = _run([_script("siamese-export"), "--help"], cwd=tmp_path)
    assert r.returncode == 0 and "--pairs" in r.stdout and "--test_time_shifts" in r.stdout, r.stdout
    _one_error_line(_run([_script("siamese-export"), f"--workdir={tmp_path}", "--out=m.msgpack"], cwd=tmp_path))


@pytest.mark.parametrize("module, flag", [("mnist_tta", "--model"), ("profile_step", "--steps"),
                                          ("conv_microbench", "threads"), ("step_memory", "--contestant")])
def test_the_developer_tools_help_exits_0_and_a_bad_argument_is_one_line(module, flag):
    # absl's own --help exits 1 (loss_sweep and benchmark were mended in stop 33, these three were not);
    # conv_microbench read any argument but "threads" as "run the whole benchmark".
    r = _run([sys.executable, "-m", f"experiments.{module}", "--help"])
    assert r.returncode == 0 and flag in r.stdout, (r.returncode, r.stdout[-1000:], r.stderr[-1000:])
    _one_error_line(_run([sys.executable, "-m", f"experiments.{module}", "--bogus"]))


# =================================================================================================
# 7. Output hygiene
# =================================================================================================
def _png_header_only(path, width, height):
    """A PNG whose header claims width x height (no pixel data): what a decompression bomb looks like
    to Image.open, which reads only the header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return str(path)


def test_huge_image_is_one_line_without_pils_bomb_warning(pngs, tmp_path):
    bomb = _png_header_only(tmp_path / "bomb.png", 10_000, 10_000)  # 1e8 px: above PIL's warning level
    r = _run([_script("siamese-compare"), bomb, str(sorted(pngs.rglob("*.png"))[0])])
    _one_error_line(r, "bomb.png: 10000x10000 pixels is too large")
    assert "DecompressionBombWarning" not in r.stderr


def test_non_utf8_file_names_are_searched_and_printed_escaped(pngs, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    src = sorted(pngs.rglob("*.png"))
    odd = os.fsdecode(b"caf\xe9-\xff.png")  # Latin-1 bytes, not UTF-8: Python keeps them as surrogates
    shutil.copy(src[0], os.path.join(folder, odd))
    shutil.copy(src[3], folder / "plain.png")
    env = _env(PYTHONIOENCODING="utf-8")  # the issue's setting: strict UTF-8 output
    r = _run([_script("siamese-embed"), str(folder), "--out", str(tmp_path / "i.npz")], env=env)
    assert r.returncode == 0, r.stderr
    r = _run([_script("siamese-search"), str(tmp_path / "i.npz"), str(src[0]), "-k", "2"], env=env)
    assert r.returncode == 0, r.stderr  # was a UnicodeEncodeError traceback
    first = r.stdout.splitlines()[0]
    assert first.endswith("caf\\xe9-\\xff.png") and float(first.split()[1]) < 1e-2, r.stdout


def test_a_reader_that_leaves_early_ends_the_command_quietly_with_its_own_exit_code(pngs, tmp_path):
    """`siamese-compare a b | head -0`, `siamese-search ... | head -1`, `siamese-train ... 2>&1 |
    head -3`: the pipe's reader has gone when the command writes. Python ignores SIGPIPE, so the
    write raised BrokenPipeError: `error: [Errno 32] Broken pipe` and exit 2 once the work was done
    (the index written, the training finished; with stderr in the same pipe, a traceback and exit 1).
    Now the output goes to /dev/null and the command ends with its own exit code, saying nothing."""
    a, b = (str(p) for p in sorted(pngs.rglob("*.png"))[::3][:2])  # two characters
    compare = [sys.executable, "-m", "experiments.compare", a, b]
    plain = _run(compare)
    assert plain.returncode in (0, 1) and plain.stdout.startswith("distance"), plain.stderr
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first write
    try:
        r = subprocess.run(compare, cwd=REPO, env=_env(), stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert (r.returncode, r.stderr) == (plain.returncode, ""), r.stderr  # compare's verdict, not 2
    # The same for any stream: a write into a gone reader's pipe goes to /dev/null, a full disk still fails.
    read, write = os.pipe()
    os.close(read)
    with open(write, "w") as raw:
        stream = console._ReaderMayLeave(raw)
        stream.write("x" * 200_000)  # more than a pipe holds: written through, not only buffered
        stream.flush()
        print("after", file=stream, flush=True)
    with open("/dev/full", "w") as full:
        with pytest.raises(OSError, match="No space left"):
            console._ReaderMayLeave(full).write("x" * 200_000)


def test_commands_run_again_in_one_process_wrap_stdout_and_stderr_once(monkeypatch):
    """A second command in the same process (a test, a notebook, a sweep calling `run()` in a loop)
    found checkpoints' stderr filter on top of `_ReaderMayLeave` and wrapped again, and so did the
    filter: two more layers per call, and after ~250 calls every write to stderr raised
    RecursionError (review 50, found by calling siamese-export's `run()` 400 times)."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    for _ in range(3):  # what run_app's guarded_main and then main's cli.setup_logging install
        console.quiet_when_reader_leaves()
        C.install_stderr_filter()
    assert type(sys.stdout) is console._ReaderMayLeave and sys.stdout._stream is out
    assert type(sys.stderr) is C._DropEventLoopClosed
    assert type(sys.stderr._stream) is console._ReaderMayLeave and sys.stderr._stream._stream is err
    print("one line", file=sys.stderr, flush=True)
    assert err.getvalue() == "one line\n"


def test_noevaluate_names_a_results_json_left_from_an_earlier_evaluation(tmp_path):
    """`siamese-train --noevaluate` on a workdir an evaluated run left: its results.json describes an
    earlier checkpoint, and the run says so instead of leaving it to look current."""
    from siamese_jax import cli

    assert cli.stale_results_warning(str(tmp_path)) is None
    (tmp_path / "results.json").write_text(json.dumps({"checkpoint_step": 8}))
    assert cli.stale_results_warning(str(tmp_path)) == (
        f"warning: {tmp_path / 'results.json'} is from an earlier evaluation (checkpoint step 8); "
        "--noevaluate did not update it")
    (tmp_path / "results.json").write_text("{truncated")
    assert cli.stale_results_warning(str(tmp_path)).startswith(f"warning: {tmp_path / 'results.json'} is from an earlier evaluation;")


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan")])
def test_a_moving_average_decay_outside_0_1_is_a_one_line_config_error(decay):
    c = default.get_config("omniglot")
    c.ema_decay = 0.999
    config_check.validate_config(c)
    bad = c.copy_and_resolve_references()
    with bad.unlocked():
        bad.ema_decay = decay
    with pytest.raises(config_check.ConfigError, match=re.escape(f"config.ema_decay={decay!r}: must be a finite number in [0.0, 1.0)")):
        config_check.validate_config(bad)


@pytest.mark.parametrize("key, value, suggestion", [
    ("embeding_dim", 16, "embedding_dim"), ("l2_normalise", True, "l2_normalize"), ("width", 32, "widths"),
    ("learningrate", 0.01, "learning_rate"), ("my_own_key", 1, None)])
def test_a_key_no_code_reads_is_a_one_line_config_error(key, value, suggestion):
    # A config file (or a notebook's config) starting from the default takes any new key: a misspelled
    # one trained with the default value without a word (the review of stop 55, "extend").
    c = default.get_config("omniglot")
    with c.unlocked():
        c[key] = value
    hint = f"did you mean {suggestion}? " if suggestion else ""
    with pytest.raises(config_check.ConfigError, match=re.escape(
            f"config.{key}={value!r}: not a config key ({hint}the keys are those of siamese_jax/configs/default.py)")):
        config_check.validate_config(c)
    # The keys the code reads beyond the default's pass: the divergence rule's, and the widths of
    # configs from before per-block widths (only without `widths`).
    ok = default.get_config("omniglot")
    ok.divergence_factor, ok.divergence_window = 50.0, 10
    config_check.validate_config(ok)
    legacy = default.get_config("omniglot")
    del legacy["widths"]
    legacy.width, legacy.num_blocks = 16, 3
    config_check.validate_config(legacy)



def test_a_margin_filed_under_a_name_that_is_no_loss_is_a_one_line_config_error():
    # `c.margins["batchhard"] = 0.3` in a config file left batch_hard at its default margin, silently.
    c = default.get_config("omniglot")
    c.loss = "batch_hard"
    c.margins["batchhard"] = 0.3
    with pytest.raises(config_check.ConfigError, match=re.escape(
            "config.margins.batchhard=0.3: not a loss (did you mean batch_hard? config.margins holds one margin "
            "per loss: contrastive, triplet, ")):
        config_check.validate_config(c)


@pytest.mark.parametrize("steps", [0, -1, 10**10])
def test_a_learning_rate_schedule_length_out_of_range_is_a_one_line_config_error(steps):
    c = default.get_config("omniglot")  # num_steps 12000
    for fine in (300000, 11999, 1):  # longer, or shorter than the training (it then ends at its final rate)
        c.lr_schedule_steps = fine
        config_check.validate_config(c)
    bad = c.copy_and_resolve_references()
    with bad.unlocked():
        bad.lr_schedule_steps = steps
    with pytest.raises(config_check.ConfigError, match=re.escape(
            f"config.lr_schedule_steps={steps!r}: must be an integer from 1 to 1000000000 (the learning-rate "
            "schedule's length; unset: num_steps)")):
        config_check.validate_config(bad)


@pytest.mark.parametrize("loss, value, message", [
    ("triplet", -0.5, r"config.margins.triplet=-0.5: must be a number >= 0"),
    ("arcface", 3.0, r"config.margins.arcface=3.0: must be a number from 0.0 to below 1.57"),
])
def test_a_loss_default_margin_out_of_range_is_refused_like_an_explicit_one(loss, value, message):
    """The margin a loss takes from config.margins was never range-checked (an explicit --config.margin
    was): ArcFace trained on a degenerate objective with margins.arcface=3.0 rad."""
    from siamese_jax.configs import default

    c = default.get_config("omniglot")
    c.loss = loss
    if loss == "arcface":
        c.l2_normalize = True
    c.margins[loss] = value
    with pytest.raises(config_check.ConfigError, match=message):
        config_check.validate_config(c)
    c.margins[loss] = 0.3
    config_check.validate_config(c)


def test_a_write_that_fails_names_the_file_not_its_temporary_and_keeps_the_old_one(tmp_path, monkeypatch):
    # A full disk or a read-only folder said "[Errno 28] No space left on device" (which disk?) or
    # named `.calibration.json.g6zfdbmd.tmp`, a file the user never asked for.
    import errno

    from siamese_jax import files

    target = tmp_path / "results.json"
    files.atomic_write_json(str(target), {"good": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device") as caught:
        files.atomic_write_json(str(target), {"good": 0})
    assert caught.value.errno == errno.ENOSPC
    assert json.loads(target.read_text()) == {"good": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    with pytest.raises(PermissionError, match=f"cannot write {tmp_path / 'calibration.json'}: Read-only file system"):
        files.atomic_write_json(str(tmp_path / "calibration.json"), {})
    monkeypatch.undo()
    (tmp_path / "metrics.jsonl").mkdir()  # appending where a folder is: named too
    with pytest.raises(OSError, match="cannot write .*metrics.jsonl"):
        files.append_jsonl(str(tmp_path / "metrics.jsonl"), {"step": 1})
    # A write larger than the buffer fails inside the caller's block (a model file, an index, a plot).
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'model.msgpack'}: File too large"):
        with files.atomic_open(str(tmp_path / "model.msgpack"), "wb"):
            raise OSError(errno.EFBIG, "File too large")
    with pytest.raises(FileNotFoundError, match="elsewhere.bin"):  # an error naming its own file keeps it
        with files.atomic_open(str(tmp_path / "model.msgpack"), "wb"):
            open(tmp_path / "elsewhere.bin", "rb")
    # A mount that refuses chmod (some FUSE, CIFS, NFS): the temporary file was left behind, unnamed.
    def no_chmod(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(files.os, "chmod", no_chmod)
    with pytest.raises(PermissionError, match=f"cannot write {target}: Operation not permitted"):
        files.atomic_write_json(str(target), {"good": 0})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"good": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "results.json"]


def test_jax_logging_level_is_kept_and_each_jax_record_printed_once():
    # JAX_LOGGING_LEVEL=INFO: JAX adds its own stderr handler to its logger, so each of its records
    # was printed twice (once unformatted), and the commands then raised the logger to WARNING,
    # hiding the INFO records the user asked for.
    script = (
        "import logging\n"
        "from siamese_jax import cli\n"
        "cli.setup_logging()\n"
        "logging.getLogger('jax._src.dispatch').warning('a jax warning')\n"
        "logging.getLogger('jax._src.dispatch').info('a jax info record')\n"
        "logging.getLogger('orbax.checkpoint').info('an orbax info record')\n")
    r = _run([sys.executable, "-c", script], env=dict(_env(), JAX_LOGGING_LEVEL="INFO"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("a jax warning") == 1, r.stderr
    assert r.stderr.count("a jax info record") == 1, r.stderr
    assert "an orbax info record" not in r.stderr  # the other libraries stay quiet
    r = _run([sys.executable, "-c", script])  # no JAX_LOGGING_LEVEL: JAX's records from WARNING up
    assert r.stderr.count("a jax warning") == 1 and "a jax info record" not in r.stderr, r.stderr
    # DEBUG: the records JAX logs while it is imported (inside setup_logging) were printed twice too.
    r = _run([sys.executable, "-c", script], env=dict(_env(), JAX_LOGGING_LEVEL="DEBUG"))
    # JAX's own format "DEBUG:<date> <time>:<logger>:<line>: <message>", ours "<HH:MM:SS> <message>".
    messages = [re.sub(r"^[A-Z]+:[^:]*:[^:]*:[^:]*:[^:]*:\d+: |^\d\d:\d\d:\d\d ", "", line)
                for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 0 and len(messages) == len(set(messages)), r.stderr


def test_library_error_records_keep_their_line_and_lose_their_traceback():
    # A full disk during a checkpoint save: orbax's background threads logged ~430 lines of stacks
    # before the run's one error line. Their message lines stay; our own records keep tracebacks.
    script = (
        "import logging\n"
        "from siamese_jax import cli\n"
        "cli.setup_logging()\n"
        "try:\n"
        "    raise OSError(28, 'No space left on device')\n"
        "except OSError:\n"
        "    logging.getLogger('absl').error('Failed to run 4 Handler Commit operations', exc_info=True)\n"
        "    logging.getLogger('orbax.checkpoint').error('save failed', exc_info=True)\n"
        "    logging.getLogger('siamese_jax.train').error('ours', exc_info=True)\n")
    r = _run([sys.executable, "-c", script])
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.splitlines()
    assert any(line.endswith("Failed to run 4 Handler Commit operations") for line in lines)
    assert any(line.endswith("save failed") for line in lines)
    assert r.stderr.count("Traceback (most recent call last)") == 1  # ours only
    assert r.stderr.index("Traceback") > r.stderr.index(" ours")
    # SIAMESE_TRACEBACK=1 (the debugging switch of every command) keeps every stack.
    r = _run([sys.executable, "-c", script], env=dict(_env(), SIAMESE_TRACEBACK="1"))
    assert r.stderr.count("Traceback (most recent call last)") == 3, r.stderr[-2000:]


# ------------------------------------------------------------------ the mutation review of 2026-12-06
# Each test below failed on a mutant of the code that every earlier test passed (stop 47).

def test_divergence_rule_stops_above_the_factor_not_at_it():
    # Guards the rule's "exceeds 100x" (divergence.rule's text): a value of exactly factor x the
    # reference is healthy, anything above stops. ">=" passed every existing test.
    at = divergence.DivergenceDetector(factor=100, window=5)
    at.seed("loss", 2.0)
    at.check(1, {"loss": 200.0})
    assert at.last_healthy_step == 1
    above = divergence.DivergenceDetector(factor=100, window=5)
    above.seed("loss", 2.0)
    with pytest.raises(divergence.DivergenceError, match="more than 100x"):
        above.check(1, {"loss": 200.5})


# ------------------------------------------------------ the mutation review of 2026-12-06, round 2
# Each test below failed on a mutant of the code that every earlier test passed (stop 47).

def test_rewriting_metrics_jsonl_is_atomic(tmp_path):
    # Guards files.rewrite_jsonl (used by MetricsWriter.truncate_after on resume): records that fail
    # half way (a full disk, a kill) must leave the old metrics.jsonl whole. Kills fil03 (rewrite_jsonl
    # through a plain open(path, "w"): the file was truncated to the records written before the failure).
    from siamese_jax import files

    path = str(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        files.append_jsonl(path, {"step": step})

    def records():
        yield {"step": 1}
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        files.rewrite_jsonl(path, records())
    assert [r["step"] for r in files.read_jsonl(path)] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]



def test_a_write_removes_what_killed_writes_of_the_same_file_left_and_only_that(tmp_path):
    """SIGKILL runs no `finally`: a killed evaluation left `plots/.<name>.png.<random>.tmp` in its
    plots folder for good (stop 49's crash fuzz). The next write of the same file removes such
    leftovers once they are STALE_TMP_SECONDS old (a write in progress is seconds old); another file's
    temporaries and a recent one stay."""
    from siamese_jax import files

    child = textwrap.dedent(f"""
        import os, signal
        from siamese_jax import files
        with files.atomic_open({str(tmp_path / "plot.png")!r}, "wb") as f:
            f.write(b"half a plot")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        """)
    assert _run([sys.executable, "-c", child], env=_env()).returncode == -signal.SIGKILL
    [left] = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert left.startswith(".plot.png.")
    # Another file's stale leftovers stay, also one whose name starts with this one's (plot.png.json)
    others = [".other.png.abcd1234.tmp", ".plot.png.json.abcd1234.tmp"]
    recent = ".plot.png.recent01.tmp"
    old = time.time() - files.STALE_TMP_SECONDS - 60
    for name in others:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (old, old))
    os.utime(tmp_path / left, (old, old))
    (tmp_path / recent).write_bytes(b"x")

    with files.atomic_open(str(tmp_path / "plot.png"), "wb") as f:
        f.write(b"a whole plot")
    assert sorted(os.listdir(tmp_path)) == sorted([*others, recent, "plot.png"])
    assert (tmp_path / "plot.png").read_bytes() == b"a whole plot"

# ------------------------------------------------------ the mutation review of 2026-12-06, round 3
# Each test below failed on a mutant of the code that every earlier test passed.

def test_dataset_flag_keeps_the_overrides_and_refuses_a_contradicting_default_argument(tmp_path):
    """`--dataset=mnist` swaps in MNIST's preset and applies the --config.x= overrides to it again (without
    that, num_steps=0 trained MNIST's default); `--config=default:mnist --dataset=omniglot` is a
    contradiction, not a silent Omniglot run (that case was checked only by a slow end-to-end test)."""
    _one_error_line(_train("--dataset=mnist", "--config.num_steps=0", f"--workdir={tmp_path / 'run'}"),
                    "config.num_steps=0: must be an integer from 1")
    _one_error_line(_train("--config=default:mnist", "--dataset=omniglot", f"--workdir={tmp_path / 'run'}"),
                    "--dataset=omniglot contradicts the config file's dataset 'mnist'")
    assert not (tmp_path / "run").exists()


def test_evaluate_and_export_refuse_counts_that_cannot_work_before_any_work(tmp_path):
    # The ± of every row is a 95% interval over episodes (one episode cannot give it); a false-accept
    # rate of 1 accepts every pair. Refused before the model or the data are read (neither is here).
    (tmp_path / "config.json").write_text(default.get_config("mnist").to_json_best_effort())
    # (`python -m` from the checkout: the module under test, not the installed console script's copy)
    r = _run([sys.executable, "-m", "siamese_jax.cli.evaluate", f"--workdir={tmp_path}", "--episodes=1", "--nowrite"])
    _one_error_line(r, "--episodes=1: must be at least 2")
    r = _run([sys.executable, "-m", "siamese_jax.cli.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'm.msgpack'}",
              "--far=1.0"])
    _one_error_line(r, "--far=1.0: must be between 0 and 1")
    # An --out that is a folder is named by its flag, before the model or the data are read (it
    # failed at the final write, as "output=<folder>: is a folder").
    r = _run([sys.executable, "-m", "siamese_jax.cli.export", f"--workdir={tmp_path}", f"--out={tmp_path}"])
    _one_error_line(r, f"--out={tmp_path}: is a folder; give a file name")


def test_an_out_without_a_file_name_fails_before_any_work(tmp_path):
    """`--out=` and `--out=new/` (a folder not made yet) passed check_output_file: the command did
    its work and failed at the rename with a message naming the temporary file (`--out=` made it
    in the parent of the current folder). Now one line naming the flag, before any work."""
    from siamese_jax import files

    new = f"{tmp_path / 'new'}{os.sep}"
    r = _run([sys.executable, "-m", "experiments.embed", str(tmp_path), f"--out={new}"])
    _one_error_line(r, f"--out={new}: names a folder; give a file name")
    r = _run([sys.executable, "-m", "siamese_jax.cli.export", f"--workdir={tmp_path}", "--out="])
    _one_error_line(r, "--out= is empty; give a file name")
    for bad in ("", new, os.path.join(new, "."), os.path.join(new, "..")):
        with pytest.raises(OSError, match="give a file name"):
            with files.atomic_open(bad) as f:
                f.write("x")
    assert os.listdir(tmp_path) == []


def test_an_override_of_a_key_a_config_file_lacks_names_the_flag_and_the_key(tmp_path):
    # With --config=FILE, ml_collections applies the overrides later, and an unknown key came out as
    # `error: --config=mnist_pairs: "'no_such'"`, or with a literal backslash-n before its "Did you
    # mean" (the review of stop 55, "extend"); without --config it was already readable.
    mine = tmp_path / "my_config.py"
    mine.write_text("from siamese_jax.configs import default\n\n\ndef get_config():\n"
                    "    c = default.get_config()\n    c.embedding_dim = 16\n    return c\n")
    line = _one_error_line(_train(f"--config={mine}", "--config.embeding_dim=8"))
    assert line.startswith("error: --config.embeding_dim: the config has no key 'embeding_dim' (Did you mean "
                           '"embedding_dim" instead of "embeding_dim"?)'), line
    assert "\\" not in line and str(mine) in line
    line = _one_error_line(_train("--config=mnist_pairs", "--config.margins.batchhard=0.3"))
    assert line.startswith("error: --config.margins.batchhard: the config has no key 'batchhard'"), line
    _one_error_line(_train("--config=mnist_pairs", "--config.no_such=1"),
                    "error: --config.no_such: the config has no key 'no_such' (--config=mnist_pairs)")
    # Without --config (the default config, whose overrides ml_collections applies at once) the same
    # words; it read `bad --config override or file: AttributeError: no_such` (stop 56).
    _one_error_line(_train("--config.no_such=1"), "error: --config.no_such: the config has no key 'no_such'")
    line = _one_error_line(_train("--config.embeding_dim=8"))
    assert line == ("error: --config.embeding_dim: the config has no key 'embeding_dim' (Did you mean "
                    '"embedding_dim" instead of "embeding_dim"?)'), line


def test_a_config_file_error_that_ml_collections_wraps_is_read_as_its_last_line():
    # Some ml_collections versions wrap the config module's own error in a traceback ("Error whilst
    # parsing config file:" ...); the installed one raises it bare, so the CLI tests cannot see this.
    from siamese_jax import cli

    wrapped = ValueError('Error whilst parsing config file:\nTraceback (most recent call last):\n  File "c.py", '
                         'line 1\nSyntaxError: invalid syntax')
    assert cli.config_error_message(wrapped) == "SyntaxError: invalid syntax"
    missing = OSError("Failed loading config file c.py\n  [Errno 2] No such file or directory: 'c.py'")
    assert cli.config_error_message(missing) == "[Errno 2] No such file or directory: 'c.py'"
    assert cli.config_error_message(ValueError("the line\n  detail")) == "the line"
    assert cli.config_error_message(KeyError()) == "KeyError"


def test_the_rows_of_a_step_must_split_evenly_over_the_devices():
    """validate_config(num_devices=N): P x K rows for mining losses, batch_size for pair losses;
    nothing else checked it before the data were loaded and the step compiled."""
    c = default.get_config("omniglot")  # triplet, online selection: P x K batches
    c.classes_per_batch, c.images_per_class = 6, 3
    config_check.validate_config(c, num_devices=2)
    with pytest.raises(config_check.ConfigError, match=re.escape(
            "classes_per_batch x images_per_class = 18 is not divisible by the 4 devices")):
        config_check.validate_config(c, num_devices=4)
    c.loss, c.batch_size = "contrastive", 30
    config_check.validate_config(c, num_devices=3)
    with pytest.raises(config_check.ConfigError, match=re.escape("batch_size = 30 is not divisible by the 4 devices")):
        config_check.validate_config(c, num_devices=4)


def test_config_bounds_that_no_earlier_test_reached_are_refused(tmp_path):
    """Each value below passed the check and failed later (or trained on nonsense): a scale range
    upside down, no background alphabet left to train on, an MNIST split with nothing to train on,
    a resume from nowhere, a Koch net below its 65 px."""
    def refused(message, dataset="omniglot", **overrides):
        c = default.get_config(dataset)
        for k, v in overrides.items():
            c[k] = v
        with pytest.raises(config_check.ConfigError, match=re.escape(message)):
            config_check.validate_config(c)

    refused("config.augment_scale_max=0.9: must be a finite number >= 1.1", augment=True,
            augment_scale_min=1.1, augment_scale_max=0.9)
    refused("config.val_alphabets=30: must be an integer from 1 to 29", val_alphabets=30)
    refused("config.val_fraction=1.0: must be a finite number in (0.0, 1.0)", dataset="mnist", val_fraction=1.0)
    refused("must be an existing checkpoint directory", resume=str(tmp_path / "nowhere"))
    refused("config.image_size=64: the koch encoder cannot take this input size", model="koch", image_size=64)


def test_a_killed_suites_cache_dirs_are_removed_by_the_next_suite(tmp_path, monkeypatch):
    """A SIGTERMed or SIGKILLed pytest runs no atexit: its session's XLA and data cache folders
    stayed in $TMPDIR, one pair per killed run. The next session removes those of dead controllers,
    and keeps a live one's (a suite running beside it) and folders not named by a pid."""
    import conftest

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    prefix = "siamese-jax-tests-xla-cache-"
    for name in (f"{prefix}{dead.pid}-abc", f"{prefix}{os.getpid()}-def", f"{prefix}xyz", "other-1-x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "entry").write_bytes(b"x")
    conftest._remove_dead_sessions_dirs(prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-1-x", f"{prefix}{os.getpid()}-def", f"{prefix}xyz"]
