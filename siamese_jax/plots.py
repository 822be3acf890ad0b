"""Evaluation plots: each function draws arrays into a PNG at `path` and returns the path.

matplotlib is imported inside the functions (so `import siamese_jax` stays light) and used through
`matplotlib.figure.Figure` with the Agg canvas, never pyplot: no display is needed, no global
backend is switched under a notebook, and no figure is left open. Files are written atomically.

Images follow the project's convention (ink bright, background 0; float in [0, 1] or uint8) and are
shown ink-dark on white, as Omniglot is usually drawn.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from siamese_jax.files import atomic_open

_DPI = 120
_CORRECT, _WRONG, _NEUTRAL = "#1a9641", "#d7191c", "#333333"
_SAME_COLOUR, _DIFF_COLOUR = "#2c7bb6", "#fdae61"
_RC = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
       "figure.titlesize": 13, "axes.spines.top": False, "axes.spines.right": False}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(fig, path: str) -> str:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=_DPI, facecolor="white")
    return path


def _display_images(images) -> np.ndarray:
    """[B, H, W] or [B, H, W, 1], uint8 or float in [0, 1] -> float [B, H, W] in [0, 1]."""
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected [B, H, W] or [B, H, W, 1] images, got shape {np.shape(images)}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return np.clip(x.astype(np.float32), 0.0, 1.0)


def _show(ax, image, frame_colour: Optional[str] = None, frame_width: float = 3.0, dashed: bool = False):
    # gray_r: ink (1) is black, background (0) white.
    ax.imshow(image, cmap="gray_r", vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(frame_colour is not None)
        if frame_colour is not None:
            spine.set_edgecolor(frame_colour)
            spine.set_linewidth(frame_width)
            spine.set_linestyle("--" if dashed else "-")


# ------------------------------------------------------------------------------------------------
def plot_pairs(path: str, x1, x2, is_similar, distances, threshold: Optional[float] = None,
               max_pairs: int = 8, row_labels: Sequence[str] = (), title: Optional[str] = None) -> str:
    """Pairs side by side with their true label and learned distance, four to a row.

    With a threshold (same iff distance <= threshold) each pair's caption and frame are green when
    the prediction is right and red when it is wrong. `row_labels` name the rows (e.g. "drawn at
    random", "hardest"); `title` replaces the first line of the figure's title.
    """
    from matplotlib import rc_context

    a, b = _display_images(x1), _display_images(x2)
    same = np.asarray(is_similar).reshape(-1).astype(bool)
    d = np.asarray(distances, np.float64).reshape(-1)
    n = min(int(max_pairs), len(a), len(b), len(same), len(d))
    if n < 1:
        raise ValueError("no pairs to plot")
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    with rc_context(_RC):
        fig = _figure(3.0 * cols, 1.9 * rows + 0.6)
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
        for i, ax in enumerate(axes):
            if i >= n:
                ax.set_axis_off()
                continue
            gap = np.zeros((a.shape[1], max(2, a.shape[2] // 12)), np.float32)
            ax.imshow(np.hstack([a[i], gap, _match_height(b[i], a.shape[1])]), cmap="gray_r", vmin=0, vmax=1)
            ax.axvline(a.shape[2] + gap.shape[1] / 2 - 0.5, color="#999999", lw=1)
            ax.set_xticks([])
            ax.set_yticks([])
            truth = "same" if same[i] else "different"
            if threshold is None:
                colour, caption = _NEUTRAL, f"{truth}\nd = {d[i]:.3f}"
            else:
                predicted_same = d[i] <= threshold
                colour = _CORRECT if predicted_same == same[i] else _WRONG
                verdict = "same" if predicted_same else "different"
                caption = f"true: {truth}, pred: {verdict}\nd = {d[i]:.3f}"
            ax.set_title(caption, color=colour, fontsize=10)
            if i % cols == 0 and i // cols < len(row_labels):
                ax.set_ylabel(row_labels[i // cols], fontsize=10)
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5 if threshold is not None else 1.0)
        heading = title or "Pairs and their embedding distances"
        if threshold is not None:
            heading += f"\nsame if distance \u2264 {threshold:.3f}: green = right, red = wrong"
        fig.suptitle(heading)
        return _save(fig, path)


def pick_pairs_to_show(distances, is_similar, rng: np.random.Generator):
    """Indices of the 8 pairs worth a look (`plot_pairs` draws 4 a row), and a label for each row.

    The first row is drawn at random (2 same pairs, 2 different); the second holds the hardest: the 2
    same pairs with the largest distances and the 2 different pairs with the smallest, the pairs a
    threshold gets wrong first. No pair is shown twice. With fewer than 2 pairs of a kind (a row
    cannot be balanced) the pairs are shown as given, unlabelled. Distances must be finite.
    """
    d = np.asarray(distances, np.float64).reshape(-1)
    same = np.asarray(is_similar).reshape(-1).astype(bool)
    pos, neg = np.flatnonzero(same), np.flatnonzero(~same)
    if min(len(pos), len(neg)) < 2:
        return np.arange(min(len(d), 8)), []
    hardest = np.concatenate([pos[np.argsort(-d[pos], kind="stable")][:2], neg[np.argsort(d[neg], kind="stable")][:2]])
    rest_pos, rest_neg = np.setdiff1d(pos, hardest), np.setdiff1d(neg, hardest)
    if min(len(rest_pos), len(rest_neg)) < 2:  # too few for a second row: the hardest alone
        return hardest, ["hardest"]
    random_row = np.concatenate([rng.choice(rest_pos, 2, replace=False), rng.choice(rest_neg, 2, replace=False)])
    return np.concatenate([random_row, hardest]).astype(int), ["drawn at random", "hardest"]


def _match_height(image: np.ndarray, height: int) -> np.ndarray:
    """Pads or crops so two differently sized images can share a row (pairs are usually equal)."""
    if image.shape[0] == height:
        return image
    if image.shape[0] > height:
        return image[:height]
    return np.vstack([image, np.zeros((height - image.shape[0], image.shape[1]), image.dtype)])


# ------------------------------------------------------------------------------------------------
def _series(history: Sequence[dict], key: str):
    steps, values = [], []
    for record in history:
        v, s = record.get(key), record.get("step")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(s, (int, float)) and math.isfinite(v):
            steps.append(s)
            values.append(v)
    order = np.argsort(steps, kind="stable")
    return np.asarray(steps, np.float64)[order], np.asarray(values, np.float64)[order]


def _ema(values: np.ndarray, span: int) -> np.ndarray:
    alpha = 2.0 / (span + 1)
    out = np.empty_like(values)
    acc = values[0]
    for i, v in enumerate(values):
        acc = alpha * v + (1 - alpha) * acc
        out[i] = acc
    return out


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


_SERIES_NAMES = {"val_one_shot_accuracy": "validation one-shot accuracy",
                 "val_one_shot_accuracy_live": "the same, live weights (not the average)"}


def plot_training_curves(path: str, history: Sequence[dict],
                         loss_keys: Sequence[str] = ("loss", "val_loss"),
                         accuracy_keys: Sequence[str] = ("val_one_shot_accuracy", "val_one_shot_accuracy_live",
                                                         "val_accuracy", "val_verification_accuracy"),
                         validation_note: Optional[str] = None, kept_step: Optional[int] = None) -> str:
    """Two panels from metrics.jsonl records: losses vs step, validation accuracies vs step.

    Each key present with numeric values becomes a series (records without it are skipped, as
    metrics.jsonl mixes per-step and per-evaluation lines). A long noisy loss also gets a smoothed line.
    The first accuracy series' point at `kept_step` is starred (the checkpoint the run keeps, which is
    not its highest point after a resume changed how validation scores; without `kept_step`, or
    when no point is there, its highest point is starred). `validation_note`
    says under the panel's title what the score is (e.g. "20-way 1-shot, 200 episodes of ...").
    """
    from matplotlib import rc_context

    with rc_context(_RC):
        fig = _figure(11.0, 4.2)
        ax_loss, ax_acc = fig.subplots(1, 2)
        colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
        plotted_loss = 0
        all_losses = []
        for i, key in enumerate(loss_keys):
            steps, values = _series(history, key)
            if not len(steps):
                continue
            colour = colours[i % len(colours)]
            if len(values) >= 50:
                ax_loss.plot(steps, values, color=colour, alpha=0.25, lw=0.8)
                ax_loss.plot(steps, _ema(values, max(5, len(values) // 50)), color=colour, lw=2,
                             label=f"{key} (smoothed)")
            else:
                ax_loss.plot(steps, values, color=colour, lw=2, marker="o" if len(values) < 20 else None, label=key)
            all_losses.append(values)
            plotted_loss += 1
        if plotted_loss:
            v = np.concatenate(all_losses)
            if v.min() > 0 and v.max() / v.min() > 30:  # losses that fall by decades read better in log
                ax_loss.set_yscale("log")
            ax_loss.legend(loc="upper right")
        else:
            _no_data(ax_loss, "no loss recorded")
        ax_loss.set_title("Training loss")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        ax_loss.grid(alpha=0.3)

        plotted_acc = 0
        for i, key in enumerate(accuracy_keys):
            steps, values = _series(history, key)
            if not len(steps):
                continue
            colour = colours[(i + 2) % len(colours)]
            ax_acc.plot(steps, values, color=colour, lw=2, marker="o", ms=4, label=_SERIES_NAMES.get(key, key))
            if not plotted_acc:
                at = np.flatnonzero(np.asarray(steps) == kept_step) if kept_step is not None else []
                best = int(at[-1]) if len(at) else int(np.argmax(values))
                ax_acc.plot(steps[best], values[best], linestyle="none", marker="*", ms=15, color=colour,
                            markeredgecolor="black",
                            label=f"{'kept' if len(at) else 'best'}: {values[best]:.3f} at step {int(steps[best])}")
            plotted_acc += 1
        if plotted_acc:
            ax_acc.legend(loc="lower right")
        else:
            _no_data(ax_acc, "no validation accuracy recorded")
        ax_acc.set_title("Validation accuracy" + (f"\n{validation_note}" if validation_note else ""))
        ax_acc.set_xlabel("step")
        ax_acc.set_ylabel("accuracy")
        ax_acc.grid(alpha=0.3)
        return _save(fig, path)


# ------------------------------------------------------------------------------------------------
def plot_distance_histograms(path: str, pos_distances, neg_distances, threshold: Optional[float] = None,
                             title: str = "Embedding distances of same and different pairs",
                             threshold_source: Optional[str] = None) -> str:
    """Overlaid density histograms of same-pair and different-pair distances (shared bins).

    With a threshold, its accuracy on these pairs goes in the title; `threshold_source` says where it
    was chosen (e.g. "background pairs"), as a threshold fitted on the plotted pairs flatters them."""
    from matplotlib import rc_context

    pos = np.asarray(pos_distances, np.float64).reshape(-1)
    neg = np.asarray(neg_distances, np.float64).reshape(-1)
    both = np.concatenate([pos, neg])
    both = both[np.isfinite(both)]
    if both.size == 0:
        raise ValueError("no distances to plot")
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        hi = lo + 1.0
    bins = np.linspace(lo, hi, 51)
    with rc_context(_RC):
        fig = _figure(7.5, 4.5)
        ax = fig.subplots()
        for values, colour, name in ((pos, _SAME_COLOUR, "same"), (neg, _DIFF_COLOUR, "different")):
            if values.size:
                ax.hist(values, bins=bins, density=True, alpha=0.55, color=colour, edgecolor=colour,
                        label=f"{name} pairs (n={values.size})")
        if threshold is not None:
            where = f" (chosen on {threshold_source})" if threshold_source else ""
            ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.3f}{where}")
            if pos.size and neg.size:
                acc = (np.sum(pos <= threshold) + np.sum(neg > threshold)) / (pos.size + neg.size)
                title += f"\naccuracy {acc:.3f} at the threshold"
        if pos.size and neg.size:
            from siamese_jax.evaluation import roc_auc

            auc = roc_auc(np.concatenate([pos, neg]), np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)])
            title += (", " if threshold is not None else "\n") + f"ROC-AUC {auc:.3f}"
        ax.set_title(title)
        ax.set_xlabel("distance")
        ax.set_ylabel("density")
        ax.legend(loc="upper right")
        ax.grid(alpha=0.3)
        return _save(fig, path)


# ------------------------------------------------------------------------------------------------
def plot_embedding_map(path: str, embeddings, labels, max_classes: int = 20, images=None,
                       title: str = "Embeddings, first two principal components") -> str:
    """A 2-D PCA map (NumPy SVD) of the embeddings of the first `max_classes` classes, coloured by class.

    With `images` (one per embedding, as `_display_images` takes them) each class is named by a
    picture instead of a number: its most typical drawing (the one nearest the class's mean
    embedding), framed in the class's colour at the class's centre on the map.
    """
    from matplotlib import colormaps, rc_context

    emb = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels).reshape(-1)
    if emb.ndim != 2 or len(emb) != len(labels) or len(emb) == 0:
        raise ValueError(f"embeddings {emb.shape} and labels {labels.shape} disagree or are empty")
    if not np.isfinite(emb).all():  # the SVD would fail with LinAlgError (all NaN) or draw nothing
        raise ValueError(f"{int((~np.isfinite(emb).all(axis=1)).sum())} of {len(emb)} embeddings are NaN or "
                         f"infinite (a diverged model?); no embedding map drawn")
    if images is not None and len(images) != len(emb):
        raise ValueError(f"{len(images)} images for {len(emb)} embeddings")
    classes = np.unique(labels)[:max_classes]
    keep = np.isin(labels, classes)
    x, y = emb[keep], labels[keep]
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    if coords.shape[1] < 2:  # one-dimensional embeddings: a flat second axis
        coords = np.hstack([coords, np.zeros((len(coords), 1))])
    variance = s ** 2
    ratio = variance / variance.sum() if variance.sum() > 0 else np.zeros_like(variance)
    ratio = np.pad(ratio, (0, max(0, 2 - len(ratio))))
    cmap = colormaps["tab20" if len(classes) <= 20 else "turbo"]
    pictures = _display_images(np.asarray(images)[keep]) if images is not None else None
    with rc_context(_RC):
        fig = _figure(8.5 if len(classes) <= 20 and pictures is None else 7.5, 6.0)
        ax = fig.subplots()
        for i, c in enumerate(classes):
            colour = cmap(i % 20) if len(classes) <= 20 else cmap(i / max(1, len(classes) - 1))
            m = y == c
            ax.scatter(coords[m, 0], coords[m, 1], s=14, color=colour, alpha=0.8, linewidths=0, label=str(c))
            if pictures is not None:
                _class_picture(ax, pictures[m], x[m], coords[m], colour)
        ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% of variance)")
        pictured = ", each class named by its most typical drawing" if pictures is not None else ""
        ax.set_title(f"{title}\n{len(x)} points, {len(classes)} classes{pictured}")
        ax.grid(alpha=0.3)
        if len(classes) <= 20 and pictures is None:
            ax.legend(title="class", loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=1.5,
                      ncols=1 if len(classes) <= 12 else 2, fontsize=9, frameon=False)
        return _save(fig, path)


def _class_picture(ax, pictures, embeddings, coords, colour, inches: float = 0.36) -> None:
    """One class's most typical drawing (nearest its mean embedding) at its centre on the map."""
    from matplotlib.colors import Normalize
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    typical = int(np.argmin(np.linalg.norm(embeddings - embeddings.mean(axis=0), axis=1)))
    picture = pictures[typical]
    # OffsetImage draws zoom x 1 point per pixel; points are 1/72 inch.
    box = OffsetImage(picture, cmap="gray_r", norm=Normalize(0.0, 1.0), zoom=inches * 72 / max(picture.shape))
    ax.add_artist(AnnotationBbox(box, coords.mean(axis=0), frameon=True, pad=0.1, zorder=3,
                                 bboxprops=dict(edgecolor=colour, linewidth=2.0, facecolor="white", alpha=0.9)))


# ------------------------------------------------------------------------------------------------
def plot_episodes(path: str, support, queries, predicted, true, max_queries: int = 4,
                  title: Optional[str] = None) -> str:
    """One row per query: the query, then the n_way support images with the prediction framed.

    support [n_way, H, W] (one shot per class), queries [Q, H, W], predicted / true [Q] indices into
    support. The predicted image gets a solid green frame when right, red when wrong; on a mistake the
    true match gets a dashed green frame. Up to half the rows show mistakes when there are any.
    `title` names the episode (e.g. which of Lake's runs) before its score.
    """
    from matplotlib import rc_context

    sup = _display_images(support)
    qs = _display_images(queries)
    predicted = np.asarray(predicted).reshape(-1).astype(int)
    true = np.asarray(true).reshape(-1).astype(int)
    if not (len(qs) == len(predicted) == len(true)) or len(qs) == 0:
        raise ValueError(f"queries ({len(qs)}), predicted ({len(predicted)}) and true ({len(true)}) must match")
    n_way = len(sup)
    wrong = np.flatnonzero(predicted != true)
    right = np.flatnonzero(predicted == true)
    n_rows = min(int(max_queries), len(qs))
    n_wrong = min(len(wrong), max(n_rows // 2, 1 if len(wrong) else 0), n_rows)
    rows = np.sort(np.concatenate([wrong[:n_wrong], right[:n_rows - n_wrong]]))
    if len(rows) < n_rows:  # not enough correct ones to fill: take more mistakes
        rows = np.sort(np.concatenate([rows, wrong[n_wrong:n_wrong + n_rows - len(rows)]]))
    cell = 0.78
    with rc_context(_RC):
        fig = _figure(max(7.0, cell * (n_way + 1.4) + 0.4), cell * 1.28 * len(rows) + 1.1)
        grid = fig.add_gridspec(len(rows), n_way + 2, width_ratios=[1, 0.35] + [1] * n_way, wspace=0.05)
        for r, q in enumerate(rows):
            ax = fig.add_subplot(grid[r, 0])
            _show(ax, qs[q], frame_colour=_NEUTRAL, frame_width=1.5)
            ax.set_ylabel(f"query {q}", fontsize=9)
            if r == 0:
                ax.set_title("query", fontsize=10)
            for c in range(n_way):
                ax = fig.add_subplot(grid[r, c + 2])
                if c == predicted[q]:
                    _show(ax, sup[c], _CORRECT if predicted[q] == true[q] else _WRONG, frame_width=3.5)
                elif c == true[q]:
                    _show(ax, sup[c], _CORRECT, frame_width=2.5, dashed=True)
                else:
                    _show(ax, sup[c])
                if r == 0:
                    ax.set_title(str(c), fontsize=9)
        n_correct = int(np.sum(predicted == true))
        fig.suptitle(f"{title + ', ' if title else ''}{n_way}-way one-shot: {n_correct}/{len(qs)} queries correct\n"
                     "green = predicted and right, red = predicted and wrong, dashed = true match",
                     fontsize=11)
        return _save(fig, path)


def plot_neighbours(path: str, query_path: str, neighbour_paths: Sequence[str], distances,
                    threshold: Optional[float] = None) -> str:
    """Contact sheet for `search`: the query image, then its neighbours with their distances.

    Images are shown as the files look (not in the model's polarity), so a person recognises them.
    With the model's calibrated threshold each neighbour also says the model's verdict, "same" (in
    green, distance <= threshold) or "different" (grey).
    """
    import os

    from matplotlib import rc_context
    from PIL import Image

    from siamese_jax.images import upright

    def thumbnail(p):
        """The file as a viewer shows it (EXIF orientation applied, transparency on white); a file gone
        or unreadable since it was indexed is a grey tile, its name below it (the ranks are printed)."""
        try:
            with Image.open(p) as img:
                img = upright(img)  # a malformed EXIF block (struct.error, ...): as stored
                img = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
                white = Image.new("RGBA", img.size, (255, 255, 255, 255))
                return np.asarray(Image.alpha_composite(white, img).convert("RGB"))
        except (OSError, ValueError, SyntaxError):
            return np.full((8, 8, 3), 200, np.uint8)

    def caption(i):
        d = float(distances[i])
        if threshold is None:
            return f"#{i + 1}  d={d:.3f}", _SAME_COLOUR
        return (f"#{i + 1}  d={d:.3f}\nsame", _CORRECT) if d <= threshold else (f"#{i + 1}  d={d:.3f}\ndifferent", "#777777")

    with rc_context(_RC):
        n = len(neighbour_paths)
        fig = _figure(max(2.1 * (n + 1), 4.2), 2.6 if threshold is None else 3.1)
        axes = fig.subplots(1, n + 1)
        for ax, p, (title, colour) in [(axes[0], query_path, ("query", _NEUTRAL))] + [
                (axes[i + 1], q, caption(i)) for i, q in enumerate(neighbour_paths)]:
            _show(ax, thumbnail(p), colour, frame_width=1.0)  # RGB: no colour map applies
            ax.set_title(title, fontsize=10, color=colour)
            ax.set_xlabel(os.path.basename(p)[:22], fontsize=8)
        if threshold is not None:
            fig.suptitle(f"nearest neighbours\nsame if d \u2264 {threshold:.3f} (the model's threshold)", fontsize=10)
        return _save(fig, path)
