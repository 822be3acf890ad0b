"""Does a model's verdict, and its P(same), hold on pairs it never saw? The pairs come from the
model's test data: Omniglot's evaluation alphabets, or MNIST's test digits. Half of them are two
drawings of one class. The other half are two classes: any two, and for Omniglot also two of one
alphabet (the harder kind). Each pair is scored with the model's own calibration, the threshold
and P(same) that `siamese-compare` prints. Nothing is fitted on these pairs.

    python -m experiments.pair_reliability [--model=pretrained] [--pairs=5000] [--seed=0]
        [--same_share=0.05] [--data_dir=../shared/data]

For each kind of pair it prints:
- the verdict's accuracy and its false-accept and false-reject rates, beside what the calibration
  claimed on its own pairs;
- the reliability of P(same): ten bins of P(same), each with its pairs, its mean P(same) and the
  share of those pairs that were one class;
- the expected calibration error (ECE: the bins' |mean P(same) - share|, weighted by their pairs)
  and the Brier score.

P(same) is fitted on a 50/50 mix of pairs. `--same_share=s` weights the pairs as a mix where a
share s is one class, and scores P(same) twice: as printed, and with its odds multiplied by
s / (1 - s), the README's correction for such a mix.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
BINS = 10


def draw_pairs(labels, groups, n: int, seed: int, within_group: bool):
    """n pairs of two distinct images of one class, then n pairs of two classes. The two classes
    are any two (`within_group=False`) or two of one group, such as an alphabet. Returns (a, b, same)
    as index arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = {c: np.flatnonzero(labels == c) for c in classes}
    group_of = {c: groups[by_class[c][0]] for c in classes}
    same_group = {g: [c for c in classes if group_of[c] == g] for g in set(group_of.values())}
    a, b = [], []
    for c in rng.choice([c for c in classes if len(by_class[c]) > 1], n):
        i, j = rng.choice(by_class[c], 2, replace=False)
        a.append(i)
        b.append(j)
    for c in rng.choice(classes, n):
        pool = [o for o in (same_group[group_of[c]] if within_group else classes) if o != c]
        a.append(rng.choice(by_class[c]))
        b.append(rng.choice(by_class[pool[rng.integers(len(pool))]]))
    return np.array(a), np.array(b), np.arange(2 * n) < n


def reliability(p, same, weights=None, bins: int = BINS):
    """Equal-width bins of P(same): (rows of (low, pairs, mean P, share that were one class), ECE,
    Brier). `weights` turn the pairs into another mix of same and different."""
    import numpy as np

    p, y = np.asarray(p, np.float64), np.asarray(same, np.float64)
    w = np.ones_like(p) if weights is None else np.asarray(weights, np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for k in range(bins):
        m = which == k
        if not m.any():
            rows.append((k / bins, 0, float("nan"), float("nan")))
            continue
        mean_p, share = np.average(p[m], weights=w[m]), np.average(y[m], weights=w[m])
        ece += w[m].sum() / w.sum() * abs(mean_p - share)
        rows.append((k / bins, int(m.sum()), float(mean_p), float(share)))
    return rows, float(ece), float(np.average((p - y) ** 2, weights=w))


def mix_weights(same, share: float):
    """Weights that make the pairs' share of one-class pairs `share`."""
    import numpy as np

    same = np.asarray(same)
    return np.where(same, share / same.mean(), (1 - share) / (1 - same.mean()))


def prior_corrected(p, share: float):
    """P(same) fitted on a 50/50 mix, for a mix where a share `share` is one class: odds x s/(1-s)."""
    import numpy as np

    odds = np.asarray(p, np.float64) / np.maximum(1 - np.asarray(p, np.float64), 1e-300) * share / (1 - share)
    return odds / (1 + odds)


def pairs_of_test_data(model, pairs: int, seed: int):
    """{kind: (distances, same)} on the model's test data, every image embedded once."""
    import numpy as np

    from siamese_jax import input_pipeline as ip
    from siamese_jax.embedding import prepare_dataset_images

    config = model.config
    ds = ip.load_split(config, "evaluation" if config.dataset == "omniglot" else "test")
    embeddings = model.embed_prepared(prepare_dataset_images(ds, config.image_size))
    if config.dataset == "omniglot":
        kinds = {"any two characters": False, "two characters of one alphabet": True}
        groups = ds.alphabets
    else:
        kinds, groups = {"any two digits": False}, np.zeros_like(ds.labels)
    out = {}
    for kind, within in kinds.items():
        a, b, same = draw_pairs(ds.labels, groups, pairs, seed, within)
        out[kind] = (np.linalg.norm(embeddings[a] - embeddings[b], axis=-1), same)
    return out


def report(calibration, distances, same, share: float = 0.5) -> list[str]:
    """The lines printed for one kind of pair."""
    import numpy as np

    w = None if share == 0.5 else mix_weights(same, share)
    ww = np.ones(len(same)) if w is None else w
    verdict = distances <= calibration.threshold
    accuracy = np.average(verdict == same, weights=ww)
    far, frr = np.mean(verdict[~same]), np.mean(~verdict[same])
    p = calibration.probability(distances)
    rows, ece, brier = reliability(p, same, w)
    lines = [f"verdict at threshold {calibration.threshold:.4f}: accuracy {accuracy:.4f}, false accepts "
             f"{far:.4f}, false rejects {frr:.4f} (its calibration: accuracy {calibration.accuracy:.4f}, "
             f"false accepts {calibration.false_accept_rate:.4f} on {calibration.num_pairs} pairs)",
             f"P(same): ECE {ece:.4f}, Brier {brier:.4f}"]
    if w is not None:
        _, ece_c, brier_c = reliability(prior_corrected(p, share), same, w)
        lines[-1] += f"; with its odds x {share:g}/{1 - share:g}: ECE {ece_c:.4f}, Brier {brier_c:.4f}"
    lines.append("  P(same)   pairs  mean P(same)  one class")
    for low, n, mean_p, fraction in rows:
        lines.append(f"  {low:.1f}-{low + 1 / BINS:.1f}  {n:6d}  " + (f"{mean_p:12.3f}  {fraction:9.3f}" if n else
                                                                    f"{'-':>12}  {'-':>9}"))
    return lines


def main(argv):
    from siamese_jax import cli, inference

    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_logging()  # orbax's INFO lines of loading a workdir's checkpoint (absl's default prefix) otherwise

    if FLAGS.pairs < 1:
        cli.fail(f"--pairs={FLAGS.pairs}: must be at least 1")
    if not 0 < FLAGS.same_share < 1:
        cli.fail(f"--same_share={FLAGS.same_share}: must lie strictly between 0 and 1")
    try:
        model = inference.load_model(FLAGS.model)
    except inference.ModelError as e:
        cli.fail(str(e))
    if model.calibration is None:
        cli.fail(f"{FLAGS.model} has no calibration (siamese-calibrate gives it one)")
    if FLAGS.data_dir:
        model.config.archive_dir = FLAGS.data_dir
    shares = [0.5] + ([FLAGS.same_share] if FLAGS.same_share != 0.5 else [])
    for kind, (distances, same) in pairs_of_test_data(model, FLAGS.pairs, FLAGS.seed).items():
        for share in shares:
            print(f"\n{FLAGS.model} on {model.config.dataset}'s test data, {FLAGS.pairs} pairs of one class and "
                  f"{FLAGS.pairs} of {kind}" + ("" if share == 0.5 else f", weighted to {share:g} of one class"))
            print("\n".join(report(model.calibration, distances, same, share)))


if __name__ == "__main__":
    from siamese_jax import cli

    flags.DEFINE_string("model", "pretrained", "A shipped model (pretrained, pretrained-mnist), a model file or a "
                        "calibrated training workdir.")
    flags.DEFINE_integer("pairs", 5000, "Pairs of one class, and as many of two classes, per kind of pair.")
    flags.DEFINE_integer("seed", 0, "Which pairs are drawn.")
    flags.DEFINE_float("same_share", 0.5, "Also score the pairs weighted as a mix with this share of one class.")
    flags.DEFINE_string("data_dir", None, "Root with omniglot/ and mnist/ archives (default: $SIAMESE_DATA_DIR).")
    cli.run_app(main)
