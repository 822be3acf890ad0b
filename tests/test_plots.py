"""Each plot writes a PNG that PIL opens, of a sensible size, without a display."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from siamese_jax import plots


def _strokes(rng, n, size=28):
    """Ink-bright float images in [0, 1]: a few random bright bars on a 0 background."""
    x = np.zeros((n, size, size), np.float32)
    for img in x:
        for _ in range(3):
            r, c = rng.integers(3, size - 8, 2)
            if rng.random() < 0.5:
                img[r:r + 2, c:c + 8] = 1.0
            else:
                img[r:r + 8, c:c + 2] = 1.0
    return x


def _check_png(path, min_w=300, min_h=200):
    assert os.path.getsize(path) > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert min_w <= w <= 4000 and min_h <= h <= 3000
        grey = np.asarray(im.convert("L"), np.float32)
    assert grey.std() > 5  # something was drawn
    return grey


def test_plot_pairs(tmp_path):
    rng = np.random.default_rng(0)
    x1, x2 = _strokes(rng, 6), _strokes(rng, 6)[..., None]  # [B,H,W] and [B,H,W,1] both accepted
    same = np.array([1, 0, 1, 0, 1, 0], bool)
    d = rng.random(6)
    path = plots.plot_pairs(str(tmp_path / "sub" / "pairs.png"), x1, x2, same, d, threshold=0.5)
    grey = _check_png(path)
    assert grey.mean() > 200  # ink dark on a white page, not white strokes on black
    _check_png(plots.plot_pairs(str(tmp_path / "pairs_plain.png"), x1, x2, same, d, max_pairs=3))
    _check_png(plots.plot_pairs(str(tmp_path / "pairs_rows.png"), x1, x2, same, d, threshold=0.5,
                                row_labels=["drawn at random", "hardest"], title="Test pairs"))


def test_the_pairs_shown_are_a_random_row_then_the_hardest():
    rng = np.random.default_rng(0)
    same = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    d = np.r_[rng.uniform(0, 2, 50), rng.uniform(1, 3, 50)]
    show, rows = plots.pick_pairs_to_show(d, same, np.random.default_rng(1))
    assert rows == ["drawn at random", "hardest"] and len(show) == 8
    assert same[show[:4]].tolist() == [True, True, False, False]  # half same, half different
    # The hardest: the two same pairs farthest apart, the two different pairs closest together.
    assert set(show[4:6]) == set(np.argsort(-np.where(same, d, -np.inf))[:2])
    assert set(show[6:]) == set(np.argsort(np.where(same, np.inf, d))[:2])
    # No pair twice, even where few pairs leave little to draw from: with 4 of each kind the random
    # row is the other 4; with 3 of each it would repeat the hardest, so it is left out.
    few = np.r_[0:4, 50:54]
    show, rows = plots.pick_pairs_to_show(d[few], same[few], np.random.default_rng(1))
    assert len(rows) == 2 and sorted(show.tolist()) == list(range(8))
    few = np.r_[0:3, 50:53]
    show, rows = plots.pick_pairs_to_show(d[few], same[few], np.random.default_rng(1))
    assert rows == ["hardest"] and len(set(show.tolist())) == len(show) == 4
    show, rows = plots.pick_pairs_to_show(d[:60], same[:60], np.random.default_rng(1))
    assert len(set(show.tolist())) == len(show) == 8
    # Only same pairs (or fewer than 2 of a kind): no row can be balanced; what there is is shown.
    show, rows = plots.pick_pairs_to_show(d[:3], same[:3], rng)
    assert rows == [] and show.tolist() == [0, 1, 2]


def test_plot_training_curves(tmp_path):
    history = [{"step": s, "loss": 1.0 / s} for s in range(1, 120)]
    history += [{"step": s, "val_one_shot_accuracy": 0.5 + s / 400, "val_one_shot_accuracy_live": 0.5 + s / 500}
                for s in range(20, 120, 20)]
    history += [{"step": 5, "steps_per_second": 12.0}, {"step": 7, "loss": float("nan")}, {"note": "text"}]
    _check_png(plots.plot_training_curves(str(tmp_path / "curves.png"), history), min_w=800)
    _check_png(plots.plot_training_curves(str(tmp_path / "noted.png"), history,
                                          validation_note="one-shot episodes (200) of the held-out alphabets"), min_w=800)
    _check_png(plots.plot_training_curves(str(tmp_path / "empty.png"), []), min_w=800)


def test_curves_star_the_kept_checkpoint_not_the_highest_point(tmp_path, monkeypatch):
    # After a resume that changed how validation scores, best/ holds a later step than the highest
    # point of metrics.jsonl: the star follows the step the evaluation read (`kept_step`).
    labels = []
    saved = plots._save

    def keep_legend(fig, path):
        labels.append([t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()])
        return saved(fig, path)

    monkeypatch.setattr(plots, "_save", keep_legend)
    history = [{"step": 10, "val_one_shot_accuracy": 0.9}, {"step": 20, "val_one_shot_accuracy": 0.7},
               {"step": 30, "val_one_shot_accuracy": 0.8}]
    plots.plot_training_curves(str(tmp_path / "a.png"), history, kept_step=30)
    plots.plot_training_curves(str(tmp_path / "b.png"), history)
    plots.plot_training_curves(str(tmp_path / "c.png"), history, kept_step=25)  # no point there
    assert "kept: 0.800 at step 30" in labels[0]
    assert "best: 0.900 at step 10" in labels[1] and "best: 0.900 at step 10" in labels[2]


def test_plot_distance_histograms(tmp_path):
    rng = np.random.default_rng(1)
    path = plots.plot_distance_histograms(str(tmp_path / "d.png"), rng.normal(1, 0.3, 300).clip(0),
                                          rng.normal(2, 0.4, 500).clip(0), threshold=1.5)
    _check_png(path)
    _check_png(plots.plot_distance_histograms(str(tmp_path / "d1.png"), [0.2, 0.2], []))


def test_plot_embedding_map(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(25), 8)  # more classes than max_classes: only the first 20 drawn
    emb = rng.normal(size=(25, 16))[labels] + 0.3 * rng.normal(size=(200, 16))
    _check_png(plots.plot_embedding_map(str(tmp_path / "map.png"), emb, labels))
    _check_png(plots.plot_embedding_map(str(tmp_path / "map1d.png"), emb[:, :1], labels, max_classes=3))
    # With the images, each class is named by a drawing on the map (not a number in a legend).
    images = _strokes(rng, len(labels))
    pictured = _check_png(plots.plot_embedding_map(str(tmp_path / "pictured.png"), emb, labels, images=images))
    plain = _check_png(plots.plot_embedding_map(str(tmp_path / "plain.png"), emb, labels))
    assert pictured.shape != plain.shape or np.abs(pictured - plain).mean() > 1
    with pytest.raises(ValueError, match="199 images for 200 embeddings"):
        plots.plot_embedding_map(str(tmp_path / "short.png"), emb, labels, images=images[1:])
    bad = emb.copy()
    bad[3, 0] = np.nan
    for broken in (bad, np.full_like(emb, np.nan)):  # was a LinAlgError traceback (all NaN)
        with pytest.raises(ValueError, match=r"embeddings are NaN or infinite"):
            plots.plot_embedding_map(str(tmp_path / "nan.png"), broken, labels)
    assert not (tmp_path / "nan.png").exists()


def test_plot_episodes(tmp_path):
    rng = np.random.default_rng(3)
    support = (_strokes(rng, 20) * 255).astype(np.uint8)  # uint8 accepted too
    queries = _strokes(rng, 20)
    true = rng.permutation(20)
    predicted = true.copy()
    predicted[[2, 9]] = (predicted[[2, 9]] + 1) % 20
    path = plots.plot_episodes(str(tmp_path / "ep.png"), support, queries, predicted, true, max_queries=4,
                               title="Lake's run 3 of 20")
    grey = _check_png(path, min_w=1000)
    assert grey.mean() > 200
    with pytest.raises(ValueError, match=r"predicted \(3\) and true \(\d+\) must match"):  # (NumPy's broadcast error is a ValueError too)
        plots.plot_episodes(str(tmp_path / "bad.png"), support, queries, predicted[:3], true)


def test_plots_need_no_pyplot_and_import_lazily(tmp_path):
    # `import siamese_jax.plots` must not import matplotlib, and plotting must not touch pyplot
    # (which would pick or switch a global backend under a notebook).
    code = (
        "import sys, numpy as np\n"
        "import siamese_jax.plots as p, siamese_jax.evaluation\n"
        "assert 'matplotlib' not in sys.modules\n"
        f"p.plot_distance_histograms({str(tmp_path / 'x.png')!r}, np.ones(3), np.zeros(3))\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "DISPLAY")}
    env["JAX_PLATFORMS"] = "cpu"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert (tmp_path / "x.png").stat().st_size > 1000


def test_the_evaluation_distance_plot_uses_the_threshold_chosen_on_background_pairs(monkeypatch, tmp_path):
    # The histogram of the evaluation pairs' distances drew (and printed the accuracy at) a threshold
    # chosen on those same pairs: an optimistic number on a plot of held-out data. Both plots now
    # draw the one chosen on the background pairs.
    import types

    from siamese_jax import protocols
    from siamese_jax.configs import default
    from siamese_jax.data.dataset import ImageDataset

    rng = np.random.default_rng(0)

    def dataset(split, n_classes, per_class):
        labels = np.repeat(np.arange(n_classes), per_class).astype(np.int32)
        return ImageDataset(images=rng.integers(0, 256, (len(labels), 12, 12), dtype=np.uint8), labels=labels,
                            name="omniglot", split=split)

    background, evaluation = dataset("background", 30, 4), dataset("evaluation", 25, 4)
    monkeypatch.setattr(protocols.ip, "load_split", lambda config, split: background)
    drawn = {}
    monkeypatch.setattr(protocols.plots, "plot_pairs",
                        lambda path, a, b, same, d, threshold, **k: drawn.setdefault("pairs", (threshold, a)))
    monkeypatch.setattr(protocols.plots, "plot_distance_histograms",
                        lambda path, pos, neg, threshold, **k: drawn.setdefault("distances", threshold))
    monkeypatch.setattr(protocols.plots, "plot_embedding_map", lambda *a, **k: None)
    monkeypatch.setattr(protocols.plots, "plot_episodes", lambda *a, title, **k: drawn.setdefault("episode", (a[3], title)))
    # An "embedding" whose distances separate the classes imperfectly, differently on the two sets.
    embed = lambda u8: (u8.reshape(len(u8), -1)[:, :4].astype(np.float32) / 64.0)
    loaded = types.SimpleNamespace(embed_u8=embed)
    config = default.get_config("omniglot")
    config.image_size = 12
    runs = [types.SimpleNamespace(train_images=np.zeros((20, 12, 12), np.uint8), test_images=np.zeros((20, 12, 12), np.uint8),
                                  answers=np.arange(20)) for _ in range(3)]
    # Lake's runs: the supports are one-hot codes; run 1's queries are all right, run 2 gets 3 wrong,
    # run 3 gets 1 wrong.
    train_emb = np.tile(np.eye(20, dtype=np.float32), (3, 1, 1))
    test_emb = train_emb.copy()
    test_emb[1, :3] = np.roll(np.eye(20, dtype=np.float32), 1, axis=1)[:3]
    test_emb[2, 5] = np.eye(20, dtype=np.float32)[6]
    ev_emb = embed(evaluation.images) + evaluation.labels[:, None].astype(np.float32)
    protocols._omniglot_plots(str(tmp_path), runs, train_emb, test_emb, evaluation, evaluation.images, ev_emb, config, loaded)
    assert drawn["distances"] == drawn["pairs"][0]
    shown = drawn["pairs"][1]  # evaluation images: the pairs the histogram is of
    assert len(shown) == 8 and all(any((img == e).all() for e in evaluation.images) for img in shown)
    predicted, title = drawn["episode"]
    assert title.startswith("Lake's run 2 of 3") and predicted[:4].tolist() == [1, 2, 3, 3]
