"""Evaluate a trained workdir: `python -m experiments.evaluate --workdir=runs/omniglot-triplet`.

Uses the run's own config.json and its best checkpoint (or --checkpoint=<step dir>); writes
results.json and plots/ into the workdir (or only prints, with --nowrite) and prints a table.
"""
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

from experiments import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir written by experiments.train.", required=True)
flags.DEFINE_string("checkpoint", "best", "'best' (default; falls back to the newest) or a checkpoint directory.")
flags.DEFINE_string("data_dir", None, "Root with omniglot/ and mnist/ archives (default: the run's, else $SIAMESE_DATA_DIR).")
flags.DEFINE_integer("episodes", None, "Episodes per N-way K-shot setting (default: the run's config, 1000).")
flags.DEFINE_bool("write", True, "Write results.json and plots/ into the workdir (process 0 writes them).")
cli.define_distributed_flags()


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_logging()
    process, processes = cli.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    cli.setup_logging(process, processes)
    import ml_collections

    from siamese_jax import protocols

    path = os.path.join(FLAGS.workdir, "config.json")
    if not os.path.isfile(path):
        cli.fail(f"{FLAGS.workdir} is not a training workdir (no config.json)")
    try:
        with open(path) as f:
            config = ml_collections.ConfigDict(json.load(f))
        if FLAGS.data_dir:
            config.archive_dir = FLAGS.data_dir
        if FLAGS.episodes:
            config.eval_episodes = FLAGS.episodes
        results = protocols.evaluate_workdir(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, write=FLAGS.write)
    except cli.user_errors() as e:
        cli.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if process == 0:
        print(protocols.format_results_table(results))


if __name__ == "__main__":
    cli.run_app(main)
