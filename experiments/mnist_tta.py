"""MNIST pairs (the Keras protocol of `siamese_jax.protocols.evaluate_mnist`) with shift test-time
augmentation: each digit's embedding is the mean of its embeddings shifted by up to 1 px, then
L2-normalised again. A measurement of a lever for the 99.7% target (BUILD_NOTES, "MNIST pairs at
99.7%"), not part of the shipped evaluation.

    python -m experiments.mnist_tta --model=runs/mnist-pairs-s0 [--data_dir=../shared/data]
    python -m experiments.mnist_tta --model=runs/mnist-pairs-s0 --model=runs/mnist-pairs-s1 ...

Prints the test pair accuracy without and with each shift set; the threshold is chosen on the
validation pairs for each, as in training. Several --model: an ensemble, each digit's embedding the
concatenation of every model's (unit-length) embedding.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS

# Shift sets, (rows, cols) in pixels of the 28 px input.
SHIFT_SETS = {
    "none": [(0, 0)],
    "cross5": [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)],
    "square9": [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
}


def shift_tta_embeddings(model, images, shifts):
    """Mean over `shifts` of the embeddings of `images` ([N, H, W, 1] floats, as `embed_prepared`
    takes them) rolled by each shift; unit length again if the model's embeddings are."""
    import numpy as np

    embs = [np.asarray(model.embed_prepared(np.roll(images, s, axis=(1, 2)))) for s in shifts]
    mean = np.mean(embs, axis=0)
    if model.config.get("l2_normalize", False):
        mean = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    return mean


def tta_pair_accuracies(model, data_dir=None, shift_sets=SHIFT_SETS) -> dict:
    """{shift set: test pair accuracy} on the Keras-protocol pairs, threshold from the validation pairs.
    `model`: one loaded model, or a list of them (an ensemble: their embeddings concatenated)."""
    import numpy as np

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
    for set_name, shifts in shift_sets.items():
        dist = {}
        for name, (x, a, b, same) in data.items():
            emb = np.concatenate([shift_tta_embeddings(m, x, shifts) for m in models], axis=-1)
            dist[name] = (np.linalg.norm(emb[a] - emb[b], axis=-1), same)
        threshold = evaluation.best_threshold(*dist["validation"])
        out[set_name] = float(evaluation.verification_accuracy(*dist["test"], threshold))
    return out


def main(argv):
    del argv
    from siamese_jax import cli, parallel

    cli.setup_logging()
    parallel.use_cpu_cores_as_devices(128, None)
    from siamese_jax.inference import load_model

    models = [load_model(m) for m in FLAGS.model]
    for name, acc in tta_pair_accuracies(models, FLAGS.data_dir).items():
        print(f"{name:<8} ({len(SHIFT_SETS[name])} views)  test pair accuracy {100 * acc:.3f}%")


if __name__ == "__main__":
    flags.DEFINE_multi_string("model", ["pretrained-mnist"], "A training workdir, a .msgpack file or "
                              "pretrained-mnist; repeat it for an ensemble.")
    flags.DEFINE_string("data_dir", None, "Data root (default: $SIAMESE_DATA_DIR).")
    app.run(main)
