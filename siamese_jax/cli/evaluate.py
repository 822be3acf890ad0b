"""Evaluate a trained workdir: `siamese-evaluate --workdir=runs/omniglot-triplet` (in a checkout also
`python -m experiments.evaluate ...`).

Uses the run's own config.json and its best checkpoint (or --checkpoint=<step number or step dir>); writes
results.json and plots/ into the workdir (or only prints, with --nowrite) and prints a table.

`siamese-evaluate --model=pretrained` (or `pretrained-mnist`, or a .msgpack file from siamese-export)
runs the same protocols on a model file, with the config it carries, and only prints: the numbers of
a model whose workdir is gone, or of the shipped ones, from the files alone.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

from siamese_jax import cli  # noqa: E402
from siamese_jax.test_time import SHIFT_SETS  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir written by siamese-train.")
flags.DEFINE_string("model", None, "Instead of --workdir: a model file (siamese-export's .msgpack) or a shipped "
                    "model (pretrained, pretrained-mnist), evaluated with its own config; prints, writes nothing.")
flags.DEFINE_string("checkpoint", "best", "'best' (default; falls back to the newest), a step number of the "
                    "workdir's, a step directory (.../checkpoints/5000) or a checkpoint directory (its newest step).")
flags.DEFINE_string("data_dir", None, "Root with omniglot/ and mnist/ archives (default: the run's, else $SIAMESE_DATA_DIR).")
flags.DEFINE_enum("source", None, ["auto", "archives", "tfds"],
                  "Where the data come from (default: the run's config.source): a run trained from TFDS can be "
                  "evaluated from the original archives, and the other way round.")
flags.DEFINE_integer("episodes", None, "Episodes per N-way K-shot setting (default: the run's config, 1000).")
flags.DEFINE_enum("test_time_shifts", None, list(SHIFT_SETS),
                  "Test-time shift augmentation to evaluate with (default: the run's config.test_time_shifts).")
flags.DEFINE_bool("write", True, "Write results.json and plots/ into the workdir (process 0 writes them).")
cli.define_distributed_flags()


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_logging()
    import contextlib

    import ml_collections

    from siamese_jax import config_check, protocols
    from siamese_jax.workdir_lock import lock_workdir

    if (FLAGS.workdir is None) == (FLAGS.model is None):
        cli.fail("give --workdir (a training run) or --model (a model file or a shipped model), not both"
                 if FLAGS.workdir else "--workdir (a training run) or --model (a model file or a shipped model) is required")
    if FLAGS.model is not None:
        return _evaluate_model_file(FLAGS.model)
    workdir = FLAGS.workdir
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        from siamese_jax.inference import PRETRAINED_FILES

        hint = f"; for a model file or a shipped model: --model={workdir}" if (
            os.path.isfile(workdir) or workdir in PRETRAINED_FILES) else ""
        cli.fail(f"{workdir} is not a training workdir (no config.json){hint}")
    try:
        with open(path) as f:
            config = ml_collections.ConfigDict(json.load(f))
    except ValueError as e:
        cli.fail(f"{path}: not a valid config.json ({cli.console.one_line(e)})")
    trained_views = config.get("test_time_shifts", "none")
    overrides = _data_overrides()
    config.update(overrides)
    # A workdir copied from the machine it trained on: its data folders are not here.
    config_check.recorded_data_folders_here(config, path, given=overrides)
    config_check.validate_model_config(config)
    # Before anything touches a device: every process of a multi-host evaluation joins here.
    process, processes = cli.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    cli.setup_logging(process, processes)
    # Writing results.json and plots/ into the workdir: the workdir's lock, as a training run takes
    # it (process 0, the one that writes).
    lock = contextlib.nullcontext()
    if FLAGS.write:
        # Every process checks the workdir and every process learns every outcome (a check on process
        # 0 alone left process 1 waiting in a collective for a peer that had already failed).
        lock = lock_workdir(workdir, purpose="evaluation", check=lambda: _check_workdir_to_write(workdir))
    trained = {}
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            trained = json.load(f)
    except (OSError, ValueError):
        pass
    train_seconds, overhead, setup = protocols.training_record(trained)
    with lock:
        results = protocols.evaluate_workdir(config, workdir, checkpoint=FLAGS.checkpoint, write=FLAGS.write,
                                             train_seconds=train_seconds, loop_overhead=overhead,
                                             training_setup=setup)
    if process == 0:
        print(cli.console.display(protocols.format_results_table(results)))  # ('±' in any encoding)
        note = other_views_note(workdir, config.get("test_time_shifts", "none"), trained_views, FLAGS.write)
        if note:
            print(note, file=sys.stderr)


def _check_workdir_to_write(workdir: str) -> str:
    """`config_check.check_workdir`, its "not writable" saying what reads a workdir without writing
    into it (a shared model folder someone else owns, a read-only mount)."""
    from siamese_jax import config_check

    try:
        return config_check.check_workdir(workdir)
    except config_check.ConfigError as e:
        if ": not writable (" not in str(e):
            raise
        raise config_check.ConfigError(f"{e}; --nowrite evaluates it without writing results.json and plots/ "
                                       f"into it") from None


def other_views_note(workdir: str, evaluated: str, trained: str, written: bool):
    """A workdir's model embeds with its config.json's views (siamese-embed/search/compare/calibrate
    --model=<workdir>); results.json written with other views no longer describes that model, which
    siamese-export then refuses to package. Said once, after the table."""
    if not written or evaluated == trained:
        return None
    return (f"note: {os.path.join(workdir, 'results.json')} now holds the numbers with test_time_shifts={evaluated}; "
            f"the workdir's model embeds with its config's {trained} (siamese-embed/search/compare --model), and "
            f"siamese-export asks for --test_time_shifts={evaluated} until they agree")


def _data_overrides() -> dict:
    """The config keys the flags replace: where the data are, how many episodes, which views."""
    overrides = {}
    if FLAGS.data_dir:
        overrides["archive_dir"] = FLAGS.data_dir
    if FLAGS.source:  # (a data key: not part of what the run trained or how it is scored)
        overrides["source"] = FLAGS.source
    if FLAGS.episodes is not None:
        if FLAGS.episodes < 2:  # the ± of each row is a 95% interval over episodes
            cli.fail(f"--episodes={FLAGS.episodes}: must be at least 2")
        overrides["eval_episodes"] = FLAGS.episodes
    if FLAGS.test_time_shifts:
        overrides["test_time_shifts"] = FLAGS.test_time_shifts
    return overrides


def _evaluate_model_file(source: str):
    """--model: the final evaluation of a model file (or a shipped model) with the config it carries,
    printed. A file has one set of weights (no --checkpoint) and no workdir to write into."""
    if FLAGS["checkpoint"].present:
        cli.fail("--checkpoint is for a --workdir: a model file has one set of weights")
    if FLAGS.write and FLAGS["write"].present:
        cli.fail("--write is for a --workdir: a model file's evaluation is printed, not written (drop --write)")
    overrides = _data_overrides()
    process, processes = cli.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    cli.setup_logging(process, processes)
    from siamese_jax import config_check, inference, protocols

    try:
        loaded, step = inference.load_run(source, overrides)
    except inference.ModelError as e:
        cli.fail(str(e))
    config_check.validate_model_config(loaded.config)
    results = protocols.evaluate_loaded(loaded.config, loaded, step)
    if process == 0:
        print(cli.console.display(protocols.format_results_table(results)))  # ('±' in any encoding)


def run():
    """The `siamese-evaluate` console script."""
    cli.run_app(main)


if __name__ == "__main__":
    run()
