"""MNIST pairs (the Keras protocol of `siamese_jax.protocols.evaluate_mnist`) with each test-time
shift set of `siamese_jax.test_time` (each digit's embedding the mean of its embeddings shifted by up
to 1 px, then L2-normalised again), side by side: how the `mnist_pairs` config's set was chosen
(the highest validation pair accuracy; BUILD_NOTES, "MNIST pairs at 99.7%").

    python -m experiments.mnist_tta --model=runs/mnist-pairs-s0 [--data_dir=../shared/data]
    python -m experiments.mnist_tta --model=runs/mnist-pairs-s0 --model=runs/mnist-pairs-s1 ...

Prints the validation and test pair accuracy with each shift set (a model's own set is ignored
here); the threshold is chosen on the validation pairs for each, as in training. Several --model:
an ensemble, each digit's embedding the concatenation of every model's (unit-length) embedding.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

FLAGS = flags.FLAGS


def tta_pair_accuracies(model, data_dir=None, shift_sets=None) -> dict:
    """{shift set: {"validation": v, "test": t}} pair accuracies on the Keras-protocol pairs: `v` at the
    threshold that maximises it (what chooses a shift set), `t` at that same threshold.
    `model`: one loaded model, or a list of them (an ensemble: their embeddings concatenated);
    `shift_sets`: names in `test_time.SHIFT_SETS` (default: all)."""
    import numpy as np

    from siamese_jax.test_time import SHIFT_SETS

    from siamese_jax import evaluation, protocols
    from siamese_jax import input_pipeline as ip
    from siamese_jax.embedding import prepare_dataset_images

    models = list(model) if isinstance(model, (list, tuple)) else [model]
    config = models[0].config
    if config.dataset != "mnist":
        raise ValueError(f"{config.dataset} model: this measures MNIST pairs only")
    if data_dir:
        config.archive_dir = data_dir
    _, val = ip.split_train_val(config, ip.load_split(config, "train"))
    test = ip.load_split(config, "test")
    data = {}
    for name, ds, seed in (("validation", val, config.eval_seed), ("test", test, config.eval_seed + 1)):
        data[name] = (prepare_dataset_images(ds, config.image_size), *protocols.keras_pairs(ds.labels, seed))
    out = {}
    for set_name in shift_sets or SHIFT_SETS:
        dist = {}
        for name, (x, a, b, same) in data.items():
            emb = np.concatenate([m.embed_prepared(x, test_time_shifts=set_name) for m in models], axis=-1)
            dist[name] = (np.linalg.norm(emb[a] - emb[b], axis=-1), same)
        threshold = evaluation.best_threshold(*dist["validation"])
        out[set_name] = {name: float(evaluation.verification_accuracy(*dist[name], threshold)) for name in dist}
    return out


def main(argv):
    del argv
    from siamese_jax import cli, parallel

    cli.setup_logging()
    parallel.use_cpu_cores_as_devices(128, None)
    from siamese_jax.inference import load_model
    from siamese_jax.test_time import SHIFT_SETS

    models = [load_model(m) for m in FLAGS.model]
    for name, acc in tta_pair_accuracies(models, FLAGS.data_dir).items():
        print(f"{name:<8} ({len(SHIFT_SETS[name])} views)  validation pair accuracy {100 * acc['validation']:.3f}%"
              f"  test pair accuracy {100 * acc['test']:.3f}%")


if __name__ == "__main__":
    flags.DEFINE_multi_string("model", ["pretrained-mnist"], "A training workdir, a .msgpack file or "
                              "pretrained-mnist; repeat it for an ensemble.")
    flags.DEFINE_string("data_dir", None, "Data root (default: $SIAMESE_DATA_DIR).")
    from siamese_jax import cli

    cli.run_app(main)  # --help exits 0; a bad flag or input is one error line, exit 2
