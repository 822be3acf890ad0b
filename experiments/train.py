"""Train a Siamese network, then evaluate it: `python -m experiments.train --loss=triplet`.

    python -m experiments.train --loss=batch_hard --dataset=omniglot --workdir=runs/x \
        --config.num_steps=5000 --config.learning_rate=1e-3

Re-running with the same --workdir resumes from its newest checkpoint.

Several processes (hosts): every process runs the same command with its own --process_id,

    python -m experiments.train ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0

or --coordinator_address=auto where JAX can detect the cluster (Cloud TPU VM, SLURM). README,
"Training on several hosts".
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402

LOSSES = ("contrastive", "triplet", "batch_hard", "batch_all", "semihard", "verification")
FLAGS = flags.FLAGS
flags.DEFINE_enum("loss", None, LOSSES, "Loss (overrides config.loss).")
flags.DEFINE_enum("dataset", None, ("omniglot", "mnist"), "Dataset; picks that dataset's default preset.")
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<dataset>-<loss>).")
flags.DEFINE_string("data_dir", None, "Root with omniglot/ and mnist/ archives (default: $SIAMESE_DATA_DIR).")
flags.DEFINE_enum("source", None, ("auto", "archives", "tfds"), "Data source (overrides config.source).")
cli.define_distributed_flags()
try:  # ml_collections loads the config file and applies --config.x= overrides right here, at definition
    config_flags.DEFINE_config_file("config", cli.DEFAULT_CONFIG, "Config file (a get_config() module).",
                                    lock_config=False)
except Exception as e:  # noqa: BLE001 - an unknown key or a bad value is the user's input
    message = str(e).strip().splitlines()[-1].strip("\"'") if str(e).strip() else type(e).__name__
    message = message.replace("\\n", " ").replace("\\'", "'")  # ml_collections' KeyError text is a repr
    cli.fail(f"bad --config override or file: {type(e).__name__}: {message}")


def resolve_config():
    """The config after presets and flags: --dataset picks a preset, --config.x= overrides win over it."""
    from experiments.configs import default

    config = FLAGS.config
    if FLAGS.dataset and FLAGS.dataset != config.dataset:
        if config_flags.get_config_filename(FLAGS["config"]) != cli.DEFAULT_CONFIG:
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


def use_cpu_cores(config):
    """One XLA CPU device per core (or `config.cpu_devices`) before JAX starts: the data-parallel step
    then runs on every core of a CPU-only machine (no effect on GPU/TPU devices)."""
    from siamese_jax import parallel
    from siamese_jax import train_step as ts

    kind = ts.batch_kind(config.loss, config.triplet_selection)
    batch = config.classes_per_batch * config.images_per_class if kind == "classes" else config.batch_size
    parallel.use_cpu_cores_as_devices(batch, config.get("cpu_devices"))


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_logging()
    # Before anything touches a device (importing siamese_jax does not).
    process, processes = cli.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    cli.setup_logging(process, processes)
    from siamese_jax import protocols
    from siamese_jax.train import train_and_evaluate

    try:
        config = resolve_config()
        use_cpu_cores(config)
        workdir = FLAGS.workdir or os.path.join("runs", f"{config.dataset}-{config.loss}")
        results = train_and_evaluate(config, workdir)
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(130)
    except cli.user_errors() as e:
        cli.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if process == 0:
        print(protocols.format_results_table(results))


if __name__ == "__main__":
    cli.run_app(main)
