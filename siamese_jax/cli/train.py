r"""Train a Siamese network, then evaluate it: `siamese-train --loss=triplet` (or, in a checkout,
`python -m experiments.train --loss=triplet`).

    siamese-train --loss=batch_hard --dataset=omniglot --workdir=runs/x \
        --config.num_steps=5000 --config.learning_rate=1e-3
    siamese-train --config=omniglot_koch          # a shipped config by name, or a path to a config file

Re-running with the same --workdir resumes from its newest checkpoint. Every error is one `error:`
line and exit code 2 (SIAMESE_TRACEBACK=1 for the traceback of an unexpected one); SIGTERM/SIGINT
save a checkpoint and exit with code 130.

Several processes (hosts): every process runs the same command with its own --process_id,

    siamese-train ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0

or --coordinator_address=auto where JAX can detect the cluster (Cloud TPU VM, SLURM). README,
"Training on several hosts".
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from siamese_jax import cli  # noqa: E402

LOSSES = ("contrastive", "triplet", "batch_hard", "batch_all", "semihard", "prototypical", "verification", "arcface",
          "multi_similarity")
FLAGS = flags.FLAGS
flags.DEFINE_enum("loss", None, LOSSES, "Loss (overrides config.loss).")
flags.DEFINE_enum("dataset", None, ("omniglot", "mnist"), "Dataset; picks that dataset's default preset.")
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<dataset>-<loss>).")
flags.DEFINE_string("data_dir", None, "Root with omniglot/ and mnist/ archives (default: $SIAMESE_DATA_DIR).")
flags.DEFINE_enum("source", None, ("auto", "archives", "tfds"), "Data source (overrides config.source).")
flags.DEFINE_bool("evaluate", True, "After training, evaluate the best checkpoint on the evaluation split and write "
                  "results.json. --noevaluate trains only (same checks, resume, checkpoints); "
                  "`siamese-evaluate --workdir=...` evaluates later.")
cli.define_distributed_flags()
_DEFAULT_CONFIG_ERROR = None  # why the installed default cannot be read, said if it is used (resolve_config)
try:  # the installed default without a ':' (a Windows drive), which ml_collections would split at
    _DEFAULT_CONFIG = cli.config_flag_path(cli.DEFAULT_CONFIG)
except ValueError as e:
    _DEFAULT_CONFIG, _DEFAULT_CONFIG_ERROR = cli.DEFAULT_CONFIG, str(e)
try:  # ml_collections loads the config file and applies --config.x= overrides right here, at definition
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (a get_config() module).",
                                    lock_config=False)
except Exception as e:  # noqa: BLE001 - an unknown key or a bad value is the user's input
    # An override of a key the default lacks, in the words `--config=FILE`'s overrides get (it read
    # `bad --config override or file: AttributeError: no_such`).
    unknown = cli.unknown_override_key(e, sys.argv)
    if unknown:
        cli.fail(unknown)
    message = str(e).strip().splitlines()[-1].strip("\"'") if str(e).strip() else type(e).__name__
    message = message.replace("\\n", " ").replace("\\'", "'")  # ml_collections' KeyError text is a repr
    cli.fail(f"bad --config override or file: {type(e).__name__}: {message}")


def resolve_config():
    """The config after presets and flags: --dataset picks a preset, --config.x= overrides win over it."""
    from siamese_jax.configs import default

    try:
        config = FLAGS.config
        config.get("dataset")  # a config file that failed to load raises here (ml_collections defers it)
    except Exception as e:  # noqa: BLE001
        filename = config_flags.get_config_filename(FLAGS["config"])
        if filename == _DEFAULT_CONFIG and _DEFAULT_CONFIG_ERROR:
            cli.fail(f"the default config {_DEFAULT_CONFIG_ERROR}")
        cli.fail(f"--config={filename}: {cli.config_error_message(e)}")
    if FLAGS.dataset and FLAGS.dataset != config.dataset:
        filename, _, arg = config_flags.get_config_filename(FLAGS["config"]).partition(":")
        # The shipped default (or the checkout's shim) without its own dataset argument: --dataset
        # picks its preset. `default:mnist` with --dataset=omniglot is a contradiction like any other.
        if os.path.basename(filename) != "default.py" or arg:
            raise ValueError(f"--dataset={FLAGS.dataset} contradicts the config file's dataset {config.dataset!r}")
        config = default.get_config(FLAGS.dataset)
        config.update_from_flattened_dict(config_flags.get_override_values(FLAGS["config"]))
    if FLAGS.loss:
        config.loss = FLAGS.loss
    if FLAGS.data_dir:
        config.archive_dir = FLAGS.data_dir
    if FLAGS.source:
        config.source = FLAGS.source
    if config.loss not in LOSSES:
        raise ValueError(f"unknown loss {config.loss!r}; expected one of {', '.join(LOSSES)}")
    return config


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_logging()
    from siamese_jax import config_check, protocols
    from siamese_jax.train import train, train_and_evaluate

    config = resolve_config()
    workdir = FLAGS.workdir or os.path.join("runs", f"{config.get('dataset')}-{config.get('loss')}")
    # The config is checked before anything else happens (no device, no data, no other process),
    # so a bad value is one line at once; train_and_evaluate checks it again with the device count.
    config_check.validate_config(config, workdir=workdir)
    # Before anything touches a device (importing siamese_jax does not); `train` then splits the CPU
    # into one device per core (`train.use_cpu_cores`) before its first JAX operation.
    process, processes = cli.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    cli.setup_logging(process, processes)
    # An interrupt ends under `run_app`'s handler (console.guarded): the agreed stop of every process
    # (StoppedBySignal) exits 130 normally; a lone one (the data load, the final evaluation) leaves a
    # multi-process job at once (a SystemExit there waited ~300 s in JAX's shutdown barrier).
    results = (train_and_evaluate if FLAGS.evaluate else train)(config, workdir)
    if process == 0 and FLAGS.evaluate:
        # (display: '±' is not in every output encoding, e.g. PYTHONIOENCODING=ascii, and the run is done)
        print(cli.console.display(protocols.format_results_table(results)))
    elif process == 0:
        print(f"trained in {results['train_seconds']:.0f} s, not evaluated (--noevaluate); "
              f"evaluate with: siamese-evaluate --workdir={workdir}")
        stale = cli.stale_results_warning(workdir)
        if stale:
            print(stale, file=sys.stderr)


def run():
    """The `siamese-train` console script."""
    cli.run_app(main)


if __name__ == "__main__":
    run()
