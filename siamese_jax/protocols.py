"""The evaluation protocols the field reports, run on a trained workdir.

Omniglot: Lake et al.'s official 20 runs (20-way 1-shot within an alphabet, 1-NN on embeddings, 400
trials); N-way K-shot episodes on the 20 evaluation alphabets (5/20-way x 1/5-shot, 1,000 episodes,
fixed seed), "unstructured" (classes from all alphabets) and "within alphabet"; retrieval
(precision@1, MAP@R) over the evaluation set.
MNIST: verification accuracy on the Keras example's 20,000 test pairs (one positive and one negative
pair per test image, fixed seed) with the distance threshold chosen on validation pairs from the
held-out tail of the train split; ROC-AUC; retrieval over the test set.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import jax
import numpy as np

from siamese_jax import evaluation, metrics_writer, parallel, plots, sampling
from siamese_jax import input_pipeline as ip
from siamese_jax.data import ImageDataset, load_lake_runs
from siamese_jax.embedding import LoadedModel, load_workdir_model, resized_images
from siamese_jax.files import atomic_write_json, read_jsonl

log = logging.getLogger(__name__)

EPISODE_SETTINGS = [(5, 1), (5, 5), (20, 1), (20, 5)]


def keras_pairs(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Keras contrastive example's pairs: for each image, one same-class and one other-class partner.

    Returns (first, second, is_similar) index arrays of length 2N, pairs interleaved (same, different).
    The same-class partner is another image of the class, drawn until it is not the image itself
    (the Keras example does not redraw: ~0.05% of its 20,000 MNIST test pairs are an image with
    itself); only a class with one image gives a pair of the image with itself.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    if len(by_class) < 2:  # no other-class partner to draw (it failed in NumPy: "high <= 0")
        raise ValueError(f"keras_pairs needs images of at least 2 classes, got {len(by_class)} class(es)")
    classes = np.array(sorted(by_class))
    first, second, same = [], [], []
    for i, c in enumerate(labels):
        members = by_class[c]
        j = members[rng.integers(len(members))]
        while j == i and len(members) > 1:
            j = members[rng.integers(len(members))]
        other = classes[classes != c][rng.integers(len(classes) - 1)]
        k = by_class[other][rng.integers(len(by_class[other]))]
        first += [i, i]
        second += [j, k]
        same += [True, False]
    return np.array(first), np.array(second), np.array(same)


def _finite(emb: np.ndarray, what: str) -> np.ndarray:
    """Embeddings a protocol may score. NaN distances compare false, so a diverged checkpoint's NaN
    embeddings would be scored as chance (every query "nearest" to class 0), not refused."""
    bad = ~np.isfinite(emb).all(axis=-1)
    if bad.any():
        raise ValueError(f"the model embeds {int(bad.sum())} of {len(emb)} images of {what} as NaN or Inf "
                         f"(a diverged checkpoint?); nothing was scored")
    return emb


def lake_run_embeddings(runs, embed_u8, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(training images [R, 20, E], test images [R, 20, E]): the embeddings of Lake's runs' images,
    resized to the model's `size` as training resized its images, embedded in one call of
    `embed_u8` ([N, size, size] uint8 -> [N, E])."""
    train_u8 = np.stack([r.train_images for r in runs])  # [R, 20, 105, 105]
    test_u8 = np.stack([r.test_images for r in runs])
    R = len(runs)
    flat = np.concatenate([train_u8.reshape(-1, 105, 105), test_u8.reshape(-1, 105, 105)])
    flat_ds = ImageDataset(images=flat, labels=np.arange(len(flat), dtype=np.int32), name="omniglot", split="lake_runs")
    emb = _finite(embed_u8(resized_images(flat_ds, size)), "Lake's runs")
    return emb[:R * 20].reshape(R, 20, -1), emb[R * 20:].reshape(R, 20, -1)


def evaluate_omniglot(config, loaded: LoadedModel, plots_dir: Optional[str]) -> dict:
    size = config.image_size
    results = {}
    # Lake et al.'s 20 runs.
    runs = load_lake_runs(config.archive_dir)
    train_emb, test_emb = lake_run_embeddings(runs, loaded.embed_u8, size)
    answers = np.stack([r.answers for r in runs])
    lake = evaluation.lake_run_errors(train_emb, test_emb, answers)
    results["lake_20_runs"] = lake

    # N-way K-shot episodes on the evaluation alphabets.
    ev = ip.load_split(config, "evaluation")
    dds = sampling.to_device_dataset(ev, image_size=size)
    ev_u8 = np.asarray(dds.images)
    ev_emb = _finite(loaded.embed_u8(ev_u8), "the evaluation alphabets")
    episodes = {}
    key = jax.random.PRNGKey(config.eval_seed)
    for structure, within in (("unstructured", False), ("within_alphabet", True)):
        for n_way, k_shot in EPISODE_SETTINGS:
            support, query = sampling.sample_episode_indices(
                jax.random.fold_in(key, 100 * n_way + k_shot + (7 if within else 0)), dds,
                config.eval_episodes, n_way, k_shot, 1, within_alphabet=within)
            acc = evaluation.one_shot_accuracy(support, query, embeddings=ev_emb)  # gathered chunk by chunk
            episodes[f"{structure}/{n_way}-way-{k_shot}-shot"] = evaluation.summarize_accuracies(acc)
    results["episodes"] = episodes
    results["retrieval"] = evaluation.retrieval_metrics(ev_emb, ev.labels)

    if plots_dir:
        _omniglot_plots(plots_dir, runs, train_emb, test_emb, ev, ev_u8, ev_emb, config, loaded)
    return results


def evaluate_mnist(config, loaded: LoadedModel, plots_dir: Optional[str]) -> dict:
    _, val = ip.split_train_val(config, ip.load_split(config, "train"))
    test = ip.load_split(config, "test")
    out = {}
    dist = {}
    for name, ds, seed in (("validation", val, config.eval_seed), ("test", test, config.eval_seed + 1)):
        emb = _finite(loaded.embed_u8(resized_images(ds, config.image_size)), f"the {name} images")
        a, b, same = keras_pairs(ds.labels, seed)
        d = np.linalg.norm(emb[a] - emb[b], axis=-1)
        dist[name] = (d, same, a, b, emb, ds)
    threshold = evaluation.best_threshold(dist["validation"][0], dist["validation"][1])
    d, same = dist["test"][0], dist["test"][1]
    out["verification"] = {
        "num_test_pairs": int(len(d)),
        "threshold": float(threshold),
        "threshold_chosen_on": f"{len(dist['validation'][0])} validation pairs from the train split's held-out tail",
        "test_accuracy": float(evaluation.verification_accuracy(d, same, threshold)),
        "validation_accuracy": float(evaluation.verification_accuracy(dist["validation"][0], dist["validation"][1], threshold)),
        "roc_auc": float(evaluation.roc_auc(d, same)),
    }
    emb, ds = dist["test"][4], dist["test"][5]
    out["retrieval"] = evaluation.retrieval_metrics(emb, ds.labels)
    if plots_dir and parallel.is_main_process():
        a, b = dist["test"][2], dist["test"][3]
        imgs = resized_images(ds, config.image_size)
        show, rows = plots.pick_pairs_to_show(d, same, np.random.default_rng(config.eval_seed))
        plots.plot_pairs(os.path.join(plots_dir, "pairs.png"), imgs[a[show]], imgs[b[show]], same[show], d[show],
                         threshold, row_labels=rows, title="MNIST test pairs and their embedding distances")
        plots.plot_distance_histograms(os.path.join(plots_dir, "distances.png"), d[same], d[~same], threshold,
                                       title=f"MNIST test pairs: embedding distances of {len(d):,} pairs",
                                       threshold_source="validation pairs")
        plots.plot_embedding_map(os.path.join(plots_dir, "embedding_map.png"), emb[:3000], ds.labels[:3000],
                                 images=imgs[:3000], title="MNIST test digits' embeddings, first two principal components")
    return out


def _omniglot_plots(plots_dir, runs, train_emb, test_emb, ev, ev_u8, ev_emb, config, loaded):
    # The threshold is chosen on pairs of *background* images (the training alphabets) and drawn on
    # the evaluation pairs: their plots then show the accuracy a threshold fitted elsewhere gets on new
    # alphabets (a threshold fitted on the plotted pairs themselves would flatter them).
    train = ip.load_split(config, "background")
    rng = np.random.default_rng(config.eval_seed)
    sub = train.subset(np.sort(rng.choice(len(train), min(2000, len(train)), replace=False)))
    tr_emb = loaded.embed_u8(resized_images(sub, config.image_size))  # a collective: every process takes part ...
    if not parallel.is_main_process():  # ... and process 0 draws the files
        return
    a, b, same = keras_pairs(sub.labels, config.eval_seed)
    threshold = evaluation.best_threshold(np.linalg.norm(tr_emb[a] - tr_emb[b], axis=-1), same)
    a, b, same = keras_pairs(ev.labels, config.eval_seed)
    d = np.linalg.norm(ev_emb[a] - ev_emb[b], axis=-1)
    show, rows = plots.pick_pairs_to_show(d, same, rng)
    plots.plot_pairs(os.path.join(plots_dir, "pairs.png"), ev_u8[a[show]], ev_u8[b[show]], same[show], d[show],
                     threshold, row_labels=rows, title="Pairs from the evaluation alphabets and their embedding distances")
    plots.plot_distance_histograms(os.path.join(plots_dir, "distances.png"), d[same], d[~same], threshold,
                                   title=f"Evaluation alphabets: embedding distances of {len(d):,} pairs",
                                   threshold_source="background pairs")
    first_classes = np.unique(ev.labels)[:20]
    mask = np.isin(ev.labels, first_classes)
    plots.plot_embedding_map(os.path.join(plots_dir, "embedding_map.png"), ev_emb[mask], ev.labels[mask],
                             images=ev_u8[mask], title="20 characters of the evaluation alphabets, first two principal components")
    # The run a person learns most from: the one with the most mistakes (the first such run on a tie),
    # predicted by the rule that scored them (`lake_run_errors`), so the plot agrees with results.json.
    predicted = evaluation.one_shot_predictions(train_emb[:, :, None], test_emb[:, :, None])[:, :, 0]
    worst = int(np.argmax([np.sum(p != run.answers) for p, run in zip(predicted, runs)]))
    run = runs[worst]
    plots.plot_episodes(os.path.join(plots_dir, "episodes.png"), run.train_images / 255.0, run.test_images / 255.0,
                        predicted[worst], run.answers, title=f"Lake's run {worst + 1} of {len(runs)} (the run with the most mistakes)")


def evaluate_loaded(config, loaded: LoadedModel, step: int, plots_dir: Optional[str] = None) -> dict:
    """The final evaluation of a loaded model (a workdir's checkpoint, a model file, a shipped model):
    the dataset's protocols and what was evaluated, on which devices. Writes only the plots."""
    t0 = time.time()
    if config.dataset == "omniglot":
        results = evaluate_omniglot(config, loaded, plots_dir)
    else:
        results = evaluate_mnist(config, loaded, plots_dir)
    results.update(dataset=config.dataset, loss=config.loss, model=config.model, image_size=config.image_size,
                   test_time_shifts=config.get("test_time_shifts", "none"),
                   checkpoint_step=step, num_steps=config.num_steps, devices=jax.device_count(),
                   processes=jax.process_count(), platform=jax.devices()[0].platform,
                   eval_seconds=round(time.time() - t0, 1))
    return results


def evaluate_workdir(config, workdir: str, *, checkpoint: str = "best", train_seconds: Optional[float] = None,
                     loop_overhead: Optional[dict] = None, training_setup: Optional[dict] = None,
                     write: bool = True) -> dict:
    """Evaluates the workdir's checkpoint that `checkpoint` names (`embedding.checkpoint_location`:
    "best" by default, a step number, a step or checkpoint directory); writes results.json and plots/
    (atomically) unless `write=False`.

    With several processes, every process runs this (the embeddings are collectives) and gets the
    same results; only process 0 writes results.json and the plots."""
    t0 = time.time()
    main = parallel.is_main_process()
    loaded, step = load_workdir_model(config, workdir, checkpoint)
    plots_dir = os.path.join(workdir, "plots") if (write and config.plots) else None
    if plots_dir and main:
        os.makedirs(plots_dir, exist_ok=True)
    results = evaluate_loaded(config, loaded, step, plots_dir)
    history = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if plots_dir and history and main:
        held_out = "held-out alphabets" if config.dataset == "omniglot" else "held-out training digits"
        plots.plot_training_curves(os.path.join(plots_dir, "curves.png"), history,
                                   validation_note=f"one-shot, {config.val_episodes} episodes of {held_out}",
                                   kept_step=step)
    results["eval_seconds"] = round(time.time() - t0, 1)
    # The evaluated checkpoint's validation score: what chose it, and where it sits on curves.png.
    chosen_by = [r["val_one_shot_accuracy"] for r in history if r.get("step") == step and "val_one_shot_accuracy" in r]
    if chosen_by:
        results["val_one_shot_accuracy"] = chosen_by[-1]
    if train_seconds is not None:
        results["train_seconds"] = round(train_seconds, 1)
    if loop_overhead:  # {"validation_seconds": s, "checkpoints_seconds": s} of this run's training
        results.update(loop_overhead)
    if training_setup:  # re-evaluating: train_seconds were spent on the training's devices, not these
        results.update({k: training_setup[k] for k in ("devices", "processes", "platform") if k in training_setup})
    if write and main:
        atomic_write_json(os.path.join(workdir, "results.json"), results)
        metrics_writer.write_evaluation(workdir, step, results)
    return results


def training_record(trained) -> tuple:
    """(train_seconds, {"validation_seconds", "checkpoints_seconds"}, {"devices", "processes",
    "platform"}) to keep from the results.json a re-evaluation replaces (`trained`: its contents,
    {} if none or unreadable). The training's own timings are not the evaluation's to measure
    (re-evaluating dropped them, and export then recorded them as None), and neither is what they
    were measured on (this process may split the CPU otherwise). Without a training time there is
    nothing the devices describe: the re-evaluation records its own."""
    if not isinstance(trained, dict):
        return None, {}, {}
    train_seconds = trained.get("train_seconds")
    overhead = {k: trained[k] for k in ("validation_seconds", "checkpoints_seconds") if trained.get(k) is not None}
    setup = {k: trained[k] for k in ("devices", "processes", "platform")
             if trained.get(k) is not None} if train_seconds is not None else {}
    return train_seconds, overhead, setup


def format_results_table(results: dict) -> str:
    """A short plain-text table of the headline numbers."""
    rows = [("dataset / loss", f"{results['dataset']} / {results['loss']} (step {results['checkpoint_step']})")]
    if "lake_20_runs" in results:
        lake = results["lake_20_runs"]
        # Two decimals: 400 trials move in steps of 0.25 points (97.25% printed as 97.2% hid one).
        rows.append(("Lake 20 runs, 20-way 1-shot", f"{100 * lake['accuracy']:.2f}%  ({lake['num_trials']} trials)"))
        for name, s in results["episodes"].items():
            rows.append((name, f"{100 * s['mean']:.1f}% ± {100 * s['ci95']:.1f}"))
    if "verification" in results:
        v = results["verification"]
        rows.append(("pair accuracy (test)", f"{100 * v['test_accuracy']:.2f}%  ({v['num_test_pairs']} pairs, "
                                              f"threshold {v['threshold']:.3f})"))
        rows.append(("ROC-AUC (test)", f"{v['roc_auc']:.4f}"))
    r = results.get("retrieval", {})
    if r:
        rows.append(("precision@1 / MAP@R", f"{r['precision_at_1']:.3f} / {r['mean_average_precision_at_r']:.3f}"))
    if "train_seconds" in results:
        processes = results.get("processes", 1)
        rows.append(("train time", f"{results['train_seconds']:.0f} s on {results['devices']} {results['platform']} device(s)"
                                   + (f" in {processes} processes" if processes > 1 else "")))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 40)
    return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])

