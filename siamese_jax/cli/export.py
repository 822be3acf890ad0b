"""Export a trained workdir as one model file, calibrated on validation pairs from the training split.

    siamese-export --workdir=runs/omniglot-triplet --out=omniglot-triplet.msgpack

(or `python -m siamese_jax.cli.export`, or `python -m experiments.export` in a checkout).

The threshold is chosen on pairs of the held-out *background* alphabets (the run's validation set),
never on the evaluation alphabets that results.json reports on.
"""
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

from siamese_jax import cli  # noqa: E402
from siamese_jax.test_time import SHIFT_SETS  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir written by siamese-train.", required=True)
flags.DEFINE_string("out", None, "Model file to write (.msgpack).", required=True)
flags.DEFINE_integer("pairs", 4000, "Validation pairs for the threshold (half same, half different).")
flags.DEFINE_enum("test_time_shifts", None, list(SHIFT_SETS),
                  "Test-time shift augmentation the exported model embeds with (default: the run's config's).")
flags.DEFINE_float("far", None, "Target false-accept rate (default: the max-accuracy threshold).")
flags.DEFINE_enum("source", None, ["auto", "archives", "tfds"],
                  "Where the data come from (default: the run's config.source): a run trained from TFDS can be "
                  "evaluated from the original archives, and the other way round.")
flags.DEFINE_string("data_dir", None, "Root with omniglot/ and mnist/ archives (default: the run's, else $SIAMESE_DATA_DIR).")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.pairs < 2:
        cli.fail(f"--pairs={FLAGS.pairs}: must be at least 2 (half same-class, half different-class pairs)")
    if FLAGS.far is not None and not 0 < FLAGS.far < 1:
        cli.fail(f"--far={FLAGS.far}: must be between 0 and 1")
    from siamese_jax.files import check_output_file

    # Before any work, as siamese-embed and siamese-calibrate check theirs: a folder failed only at
    # the final write, after the data and the embeddings, naming "output=" instead of the flag.
    check_output_file(FLAGS.out)
    cli.setup_logging()
    import numpy as np

    from siamese_jax import config_check, evaluation
    from siamese_jax import input_pipeline as ip
    from siamese_jax.embedding import prepare_dataset_images
    from siamese_jax.inference import load_model

    model = load_model(FLAGS.workdir)
    config = model.config
    if FLAGS.data_dir:  # the validation pairs are read from here (as siamese-evaluate --data_dir)
        config.archive_dir = FLAGS.data_dir
    if FLAGS.source:
        config.source = FLAGS.source
    # A workdir copied from the machine it trained on: its data folders are not here (and the file
    # written below carries none to the next machine: `SiameseModel.save`).
    config_check.recorded_data_folders_here(config, os.path.join(FLAGS.workdir, "config.json"),
                                            given=("archive_dir",) if FLAGS.data_dir else ())
    if FLAGS.test_time_shifts:
        config.test_time_shifts = model.test_time_shifts = FLAGS.test_time_shifts
    results_path = os.path.join(FLAGS.workdir, "results.json")
    results = {}
    if os.path.exists(results_path):
        try:
            with open(results_path) as f:
                results = json.load(f)
        except OSError as e:  # a folder of that name, no permission
            cli.fail(f"{results_path}: cannot read it ({e.strerror or e})")
        except ValueError as e:  # hand-edited or damaged: it printed a JSON error naming no file
            cli.fail(f"{results_path}: not readable JSON ({e}); run siamese-evaluate --workdir={FLAGS.workdir} "
                     f"to write it again")
        if not isinstance(results, dict):
            cli.fail(f"{results_path}: not a results file (a JSON {type(results).__name__}); run "
                     f"siamese-evaluate --workdir={FLAGS.workdir} to write it again")
    evaluated_with = results.get("test_time_shifts", "none")
    if results and evaluated_with != model.test_time_shifts:
        # The file's provenance numbers must be the exported model's own.
        cli.fail(f"{results_path} was evaluated with test_time_shifts={evaluated_with}, the model would embed with "
                 f"{model.test_time_shifts}: export with --test_time_shifts={evaluated_with}, or first run "
                 f"siamese-evaluate --workdir={FLAGS.workdir} --test_time_shifts={model.test_time_shifts}")
    evaluated_step, step = results.get("checkpoint_step"), model.provenance.get("step")
    if results and evaluated_step is not None and evaluated_step != step:
        # Training went on after the evaluation (a resume with --noevaluate, or an export while it
        # runs): the file would carry another checkpoint's test numbers (the concurrency review of
        # 2026-12-05: step 360 exported with step 10's Lake score).
        cli.fail(f"{results_path} describes checkpoint step {evaluated_step}, the workdir's best checkpoint is "
                 f"now step {step}: run siamese-evaluate --workdir={FLAGS.workdir} first")
    _, val = ip.split_train_val(config, ip.load_split(config, ip.train_split_name(config)))
    a, b, same = evaluation.balanced_pairs(val.labels, FLAGS.pairs, seed=config.eval_seed)
    x = prepare_dataset_images(val, config.image_size)
    emb = model.embed_prepared(x)
    cal = model.calibrate(np.linalg.norm(emb[a] - emb[b], axis=-1), same, FLAGS.far)
    held_out = ("held-out background alphabets" if config.dataset == "omniglot"
                else "held-out tail of the train split")
    model.provenance.update(
        calibrated_on=f"{cal.num_pairs} pairs of the run's validation data ({held_out})",
        train_seconds=results.get("train_seconds"))
    if config.dataset == "omniglot":
        model.provenance.update(lake_20_runs_accuracy=results.get("lake_20_runs", {}).get("accuracy"),
                                episodes=results.get("episodes"))
    else:
        model.provenance.update(test_pair_accuracy=results.get("verification", {}).get("test_accuracy"),
                                test_precision_at_1=results.get("retrieval", {}).get("precision_at_1"))
    model.provenance.pop("workdir", None)
    model.save(FLAGS.out)
    size = os.path.getsize(FLAGS.out)
    print(f"wrote {FLAGS.out} ({size / 1e6:.2f} MB): threshold {cal.threshold:.4f} ({cal.method}), "
          f"validation accuracy {cal.accuracy:.3f}, FAR {cal.false_accept_rate:.3f}")


def run():
    cli.run_app(main)


if __name__ == "__main__":
    run()
