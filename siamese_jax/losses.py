"""Siamese losses as pure, jit-compatible functions of jnp arrays.

d(x, y) = ||x - y||_2 and D is d² ("squared=True") or d. Every loss returns a float32 scalar mean,
upcasting bfloat16/float16 inputs first, and has finite gradients everywhere (identical embeddings
included: the square root is taken through a double `where`, so its gradient at d² = 0 is 0).

- contrastive (Hadsell et al. 2006, without the ½):  s·d² + (1 − s)·max(m − d, 0)²,  s = 1 for the same class
- triplet (FaceNet):                                 max(D(a, p) − D(a, n) + m, 0)
- online mining on embeddings [B, E] with integer labels [B] (a ≠ p share a label, n has another):
    batch all:  mean of the strictly positive triplet losses over all valid triplets
    batch hard (Hermans et al. 2017):  max(max_p D(a, p) − min_n D(a, n) + m, 0) per anchor
    semihard (FaceNet, TF-Addons rules):  per positive pair, the nearest negative farther than p,
              else the farthest negative
    hardest negative:  per positive pair, max(D(a, p) − min_n D(a, n) + m, 0)  (the "triplet" loss's
              `online_all` selection in training)
- prototypical (Snell et al. 2017) on a labelled batch [B, E]: each image against the class means
  ("prototypes") of the batch, its own class's mean taken over the *other* images of its class
  (leave-one-out): softmax cross-entropy of the logits −‖e − c_k‖² over the batch's classes
- verification (Koch et al. 2015):  logit = Σ_k w_k |h1_k − h2_k| + b;  binary cross-entropy, 1 = same
- ArcFace (Deng et al. 2019; additive angular margin), on embeddings [B, E] with each image's class
  index [B] and a learned centre per training class, W [C, E]:  with cos θ_j = ê·ŵ_j (unit vectors),
  softmax cross-entropy of the logits s·cos(θ_y + m) for the image's own class y and s·cos θ_j for the
  others. The embedding is learned as a direction; pairs are compared by the distance of unit vectors.
- multi-similarity (Wang et al. 2019) on a labelled batch [B, E], with S_ij = ê_i·ê_j the cosine of
  the L2-normalised embeddings: per anchor i, pair mining keeps the negatives with
  S_in > min_p S_ip − ε and the positives with S_ip < max_n S_in + ε, then
  1/α·log(1 + Σ_kept p exp(−α(S_ip − λ))) + 1/β·log(1 + Σ_kept n exp(β(S_in − λ)))
  (α = 2, β = 50, λ = 0.5, ε = 0.1 by default; ε is `config.margin`)
- relational distillation (Park et al. 2019, RKD-D), student [B, E] against a fixed teacher [B, F]:
  the mean Huber loss between the two batches' pairwise distances, each divided by its own mean
  (added to a metric loss with `config.distill_weight` when `config.distill_teachers` is set).

Each loss `f` has a twin `f_with_stats` returning `(loss, stats)` (not the distillation loss, a bare
scalar added to one of them). `stats` is a dict of float32 scalars,
always with "active_fraction": the share of the triplets / anchors / pairs the loss considers that
have a loss > 0 (for verification: the share misclassified at logit 0). Mean distances in `stats`
are in the distance the loss uses (D). Empty averages are 0, never NaN (a batch with no valid
triplet, pair or anchor); an empty batch is a ValueError.

Shapes are checked when a loss is traced: labels and `is_similar` must have exactly the batch's
shape [B] (a [B, 1] column would broadcast against [B] into a [B, B] loss: a wrong number, silently).

Adding a loss (multi-similarity's commit is a worked example; `tests/test_notebook_and_configs.py`
fails where a registry below misses it, but the silent places are 3 and 4):
1. here: `f` and `f_with_stats`, `__all__`, a line above; tests in `tests/test_losses.py` against a
   NumPy loop, by-hand values, `EDGE_BATCHES`, finite differences;
2. `train_step`: the loss in one of the groups (`ALL_LOSSES` and `batch_kind` follow from them;
   `DIRECTION_LOSSES` if it compares cosines) and its branch in `loss_fn`;
3. its settings: `configs/default.py` (`MARGINS` entry, new keys), `config_check` (their ranges), and
   `train.py` passing them to `make_train_step` — a key recorded in config.json but never passed on
   trains silently with its default (test it end to end, as `test_end_to_end.py` does for multi-similarity);
   new keys only this loss reads go in `train._LOSS_ONLY_KEYS` (else resuming any older run names them);
4. the 1-vs-4-device test in `tests/test_train_step.py` (its losses come from `ALL_LOSSES`);
5. `siamese_jax/cli/train.py`'s `LOSSES`, a row in `experiments/loss_sweep.py`, README's `--loss` list.
"""
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "pairwise_distances", "euclidean_distance",
    "contrastive_loss", "contrastive_loss_with_stats",
    "triplet_loss", "triplet_loss_with_stats",
    "batch_all_triplet_loss", "batch_all_triplet_loss_with_stats",
    "batch_hard_triplet_loss", "batch_hard_triplet_loss_with_stats",
    "batch_semihard_triplet_loss", "batch_semihard_triplet_loss_with_stats",
    "hardest_negative_triplet_loss", "hardest_negative_triplet_loss_with_stats",
    "verification_logits", "verification_loss", "verification_loss_with_stats", "same_probability",
    "arcface_logits", "arcface_loss", "arcface_loss_with_stats",
    "prototypical_logits", "prototypical_loss", "prototypical_loss_with_stats",
    "multi_similarity_loss", "multi_similarity_loss_with_stats",
    "relational_distance_loss",
]


# ----------------------------------------------------------------------------------------- helpers

def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def _fill_max(x):
    """The largest finite value of x's dtype: the neutral fill of a masked min (`_fill_min`, its negative,
    of a masked max). Finite, as flax's attention masks, unlike ±inf: the results are the same (a fill
    only ever meets the where that discards it, a min/max it loses to, or an exp that gives 0), but an
    inf made outside jit trips JAX_DEBUG_INFS, and a user debugging a divergence got false alarms."""
    return jnp.finfo(x.dtype).max


def _fill_min(x):
    return jnp.finfo(x.dtype).min


def _safe_sqrt(d2):
    """sqrt with a finite gradient (0) at 0: the inner `where` keeps sqrt away from 0 in the backward pass."""
    positive = d2 > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, d2, 1.0)), 0.0)


def _safe_mean(values, mask):
    """Mean of `values` where `mask`; 0 when the mask is empty (no NaN, no 0/0 in the gradient)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _shape(x):
    # np.shape, not jnp.shape: it takes tracers (their .shape) and also the Python lists a notebook
    # passes, which jnp.shape warns about (an error in a future JAX).
    return tuple(np.shape(x))


def _check_pairs(what, x1, x2, is_similar=None, names=("x1", "x2")):
    """x1 and x2 [..., E] of one shape, not empty; `is_similar` of their shape without E."""
    s1, s2 = _shape(x1), _shape(x2)
    if len(s1) < 2 or s1 != s2:
        raise ValueError(f"{what}: {names[0]} {s1} and {names[1]} {s2} must be embeddings of one shape [B, E]")
    if 0 in s1[:-1]:
        raise ValueError(f"{what}: the batch is empty ({names[0]} {s1})")
    if is_similar is not None and _shape(is_similar) != s1[:-1]:
        raise ValueError(f"{what}: is_similar {_shape(is_similar)} must have shape {s1[:-1]}, one "
                         f"0/1 per pair (a [B, 1] column would broadcast into a wrong loss)")
    if is_similar is not None:
        _check_zero_one(what, is_similar)


def _check_zero_one(what, is_similar):
    """`is_similar` holds only 0/1 (or bools): 2 or −1 weighted the terms (a negative loss)."""
    if not isinstance(is_similar, jax.core.Tracer):  # under jit the values are unknown here
        values = np.asarray(is_similar)  # NumPy: jnp ops would be traced inside an outer jit
        if values.size and not np.all((values == 0) | (values == 1)):
            raise ValueError(f"{what}: is_similar must be bool or 0/1 (1 = same class), got values from "
                             f"{values.min()} to {values.max()}")


def _check_labelled(what, embeddings, labels, label_name="labels"):
    """embeddings [B, E] (B ≥ 1) and integer labels [B]."""
    e, l = _shape(embeddings), _shape(labels)
    if len(e) != 2 or e[0] == 0:
        raise ValueError(f"{what}: embeddings {e} must be a non-empty batch [B, E]")
    if l != e[:1]:
        raise ValueError(f"{what}: {label_name} {l} must have shape ({e[0]},), one per embedding "
                         f"(a [B, 1] column would broadcast into a wrong loss)")


def _as_weight(is_similar):
    # bool or 0/1 -> float32 weight of the "same class" term.
    return jnp.asarray(is_similar).astype(jnp.float32)


# --------------------------------------------------------------------------------------- distances

def euclidean_distance(x1, x2, squared=False):
    """d(x1[i], x2[i]) for paired rows [..., E] -> [...]; d² when `squared`. Gradient-safe at 0."""
    d2 = jnp.sum(jnp.square(_f32(x1) - _f32(x2)), axis=-1)
    return d2 if squared else _safe_sqrt(d2)


@jax.custom_jvp
def _pairwise_squared(e):
    # Explicit differences, not ||a||² − 2a·b + ||b||²: identical rows give exactly 0 (no cancellation
    # noise for the sqrt to amplify, no random tie-breaking in the miners) and small distances stay
    # accurate. XLA fuses the [B, B, E] difference into the reduction in the forward pass.
    return jnp.sum(jnp.square(e[:, None, :] - e[None, :, :]), axis=-1)


@_pairwise_squared.defjvp
def _pairwise_squared_jvp(primals, tangents):
    # d(d²_ij) = 2 (e_i − e_j)·(t_i − t_j), written with a matmul so that the backward pass is
    # matmuls too: autodiff of the explicit difference materialises [B, B, E] and was ~50x slower
    # at E = 4096 on CPU. "highest": the terms cancel for close points, so TF32/bf16 passes on GPU/TPU
    # would swamp the small true difference.
    (e,), (t,) = primals, tangents
    self_dots = jnp.sum(e * t, axis=-1)
    cross = jnp.matmul(e, t.T, precision=jax.lax.Precision.HIGHEST)
    return _pairwise_squared(e), 2.0 * (self_dots[:, None] + self_dots[None, :] - cross - cross.T)


def pairwise_distances(embeddings, squared=False):
    """[B, E] -> [B, B] matrix of d (or d²) between all rows; diagonal exactly 0, gradient-safe."""
    d2 = _pairwise_squared(_f32(embeddings))
    return d2 if squared else _safe_sqrt(d2)


# ------------------------------------------------------------------------------------ contrastive

def contrastive_loss_with_stats(x1, x2, is_similar, margin=1.0):
    """(loss, stats) of `contrastive_loss`; stats: active_fraction, mean_positive/negative_distance (d)."""
    _check_pairs("contrastive_loss", x1, x2, is_similar)
    s = _as_weight(is_similar)
    d2 = euclidean_distance(x1, x2, squared=True)
    d = _safe_sqrt(d2)
    # The similar term uses d² directly (exact gradient 2(x1 − x2), no sqrt involved).
    per_pair = s * d2 + (1.0 - s) * jnp.square(jnp.maximum(margin - d, 0.0))
    stats = {
        "active_fraction": jnp.mean((per_pair > 0).astype(jnp.float32)),
        "mean_positive_distance": _safe_mean(d, s > 0),
        "mean_negative_distance": _safe_mean(d, s == 0),
    }
    return jnp.mean(per_pair), stats


def contrastive_loss(x1, x2, is_similar, margin=1.0):
    """Mean over pairs of is_similar·d² + (1 − is_similar)·max(margin − d, 0)² (Hadsell et al. 2006, no ½).

    `is_similar` [B] is bool or 0/1 and **1 / True means the two rows are the same class**. Careful
    when porting: the current Keras siamese-contrastive example uses the opposite label (0 = similar).
    """
    return contrastive_loss_with_stats(x1, x2, is_similar, margin)[0]


# ---------------------------------------------------------------------------------------- triplet

def triplet_loss_with_stats(anchor, positive, negative, margin=0.2, squared=True):
    """(loss, stats) of `triplet_loss`; stats: active_fraction, mean_positive/negative_distance (D)."""
    _check_pairs("triplet_loss", anchor, positive, None, ("anchor", "positive"))
    _check_pairs("triplet_loss", anchor, negative, None, ("anchor", "negative"))
    d_ap = euclidean_distance(anchor, positive, squared=squared)
    d_an = euclidean_distance(anchor, negative, squared=squared)
    per_triplet = jnp.maximum(d_ap - d_an + margin, 0.0)
    stats = {
        "active_fraction": jnp.mean((per_triplet > 0).astype(jnp.float32)),
        "mean_positive_distance": jnp.mean(d_ap),
        "mean_negative_distance": jnp.mean(d_an),
    }
    return jnp.mean(per_triplet), stats


def triplet_loss(anchor, positive, negative, margin=0.2, squared=True):
    """Mean over rows of max(D(a, p) − D(a, n) + margin, 0), D = d² if `squared` else d (FaceNet)."""
    return triplet_loss_with_stats(anchor, positive, negative, margin, squared)[0]


# --------------------------------------------------------------------------------- online mining

def _label_masks(labels):
    """positive[a, p]: same label and a ≠ p; negative[a, n]: different label."""
    labels = jnp.asarray(labels)
    same = labels[:, None] == labels[None, :]
    positive = same & ~jnp.eye(labels.shape[0], dtype=bool)
    return positive, ~same


def batch_all_triplet_loss_with_stats(embeddings, labels, margin=0.2, squared=False):
    """(loss, stats) of `batch_all_triplet_loss`; active_fraction = positive-loss triplets / valid triplets."""
    _check_labelled("batch_all_triplet_loss", embeddings, labels)
    dist = pairwise_distances(embeddings, squared=squared)
    positive, negative = _label_masks(labels)
    # [a, p, n]: B³ entries, fine for mining batches (B ~ 100s).
    per_triplet = dist[:, :, None] - dist[:, None, :] + margin
    valid = positive[:, :, None] & negative[:, None, :]
    active = valid & (per_triplet > 0)
    num_active = jnp.sum(active.astype(jnp.float32))
    loss = jnp.sum(jnp.where(active, per_triplet, 0.0)) / jnp.maximum(num_active, 1.0)
    stats = {
        "active_fraction": num_active / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0),
        "mean_positive_distance": _safe_mean(dist, positive),
        "mean_negative_distance": _safe_mean(dist, negative),
    }
    return loss, stats


def batch_all_triplet_loss(embeddings, labels, margin=0.2, squared=False):
    """Mean of the strictly positive max(D(a,p) − D(a,n) + margin, 0) over all valid triplets; 0 if none."""
    return batch_all_triplet_loss_with_stats(embeddings, labels, margin, squared)[0]


def batch_hard_triplet_loss_with_stats(embeddings, labels, margin=0.2, squared=False):
    """(loss, stats) of `batch_hard_triplet_loss`; stats over the anchors with a positive and a negative."""
    _check_labelled("batch_hard_triplet_loss", embeddings, labels)
    dist = pairwise_distances(embeddings, squared=squared)
    positive, negative = _label_masks(labels)
    valid_anchor = jnp.any(positive, axis=1) & jnp.any(negative, axis=1)
    # D >= 0, so 0 is a neutral fill for the max; the min uses the largest float, then a where keeps
    # it out of the arithmetic (and of the gradient) for anchors without negatives.
    hardest_positive = jnp.max(jnp.where(positive, dist, 0.0), axis=1)
    hardest_negative = jnp.min(jnp.where(negative, dist, _fill_max(dist)), axis=1)
    hardest_negative = jnp.where(valid_anchor, hardest_negative, 0.0)
    per_anchor = jnp.maximum(hardest_positive - hardest_negative + margin, 0.0)
    stats = {
        "active_fraction": _safe_mean((per_anchor > 0).astype(jnp.float32), valid_anchor),
        "mean_positive_distance": _safe_mean(hardest_positive, valid_anchor),
        "mean_negative_distance": _safe_mean(hardest_negative, valid_anchor),
    }
    return _safe_mean(per_anchor, valid_anchor), stats


def batch_hard_triplet_loss(embeddings, labels, margin=0.2, squared=False):
    """Hermans et al. 2017: mean over anchors with ≥1 positive and ≥1 negative of
    max(max_p D(a, p) − min_n D(a, n) + margin, 0); 0 if there is no such anchor."""
    return batch_hard_triplet_loss_with_stats(embeddings, labels, margin, squared)[0]


def hardest_negative_triplet_loss_with_stats(embeddings, labels, margin=0.2, squared=False):
    """(loss, stats) of `hardest_negative_triplet_loss`; stats over the positive pairs considered."""
    _check_labelled("hardest_negative_triplet_loss", embeddings, labels)
    dist = pairwise_distances(embeddings, squared=squared)
    positive, negative = _label_masks(labels)
    has_negative = jnp.any(negative, axis=1)
    considered = positive & has_negative[:, None]
    hardest_negative = jnp.min(jnp.where(negative, dist, _fill_max(dist)), axis=1)
    hardest_negative = jnp.where(has_negative, hardest_negative, 0.0)  # no fill in arithmetic or gradient
    per_pair = jnp.maximum(dist - hardest_negative[:, None] + margin, 0.0)
    stats = {
        "active_fraction": _safe_mean((per_pair > 0).astype(jnp.float32), considered),
        "mean_positive_distance": _safe_mean(dist, considered),
        "mean_negative_distance": _safe_mean(jnp.broadcast_to(hardest_negative[:, None], dist.shape), considered),
    }
    return _safe_mean(per_pair, considered), stats


def hardest_negative_triplet_loss(embeddings, labels, margin=0.2, squared=False):
    """Every positive pair (a, p), a ≠ p, with the anchor's hardest negative:
    max(D(a, p) − min_n D(a, n) + margin, 0), mean over the positive pairs whose anchor has a
    negative; 0 if there are none. Batch-hard's negatives with batch-all's positives: no plateau at
    loss ≈ margin early on, and every positive pair of the P×K batch gets a gradient."""
    return hardest_negative_triplet_loss_with_stats(embeddings, labels, margin, squared)[0]


def batch_semihard_triplet_loss_with_stats(embeddings, labels, margin=0.2, squared=False):
    """(loss, stats) of `batch_semihard_triplet_loss`; stats over the positive pairs considered.

    Extra stat "fallback_fraction": share of those pairs with no negative farther than the positive.
    """
    _check_labelled("batch_semihard_triplet_loss", embeddings, labels)
    dist = pairwise_distances(embeddings, squared=squared)
    positive, negative = _label_masks(labels)
    d_ap = dist[:, :, None]                     # [a, p, 1]
    d_an = dist[:, None, :]                     # [a, 1, n]
    farther = negative[:, None, :] & (d_an > d_ap)  # [a, p, n]: negatives beyond the positive
    has_farther = jnp.any(farther, axis=2)
    nearest_farther = jnp.min(jnp.where(farther, d_an, _fill_max(dist)), axis=2)
    farthest = jnp.max(jnp.where(negative, dist, _fill_min(dist)), axis=1)  # [a]: fallback negative
    has_negative = jnp.any(negative, axis=1)
    considered = positive & has_negative[:, None]
    # Double where: the fills (the largest and smallest floats) never reach the arithmetic or the gradient.
    chosen = jnp.where(has_farther, jnp.where(has_farther, nearest_farther, 0.0),
                       jnp.where(has_negative, farthest, 0.0)[:, None])
    per_pair = jnp.maximum(dist - chosen + margin, 0.0)
    stats = {
        "active_fraction": _safe_mean((per_pair > 0).astype(jnp.float32), considered),
        "fallback_fraction": _safe_mean((~has_farther).astype(jnp.float32), considered),
        "mean_positive_distance": _safe_mean(dist, considered),
        "mean_negative_distance": _safe_mean(chosen, considered),
    }
    return _safe_mean(per_pair, considered), stats


def batch_semihard_triplet_loss(embeddings, labels, margin=0.2, squared=False):
    """FaceNet semihard mining with TF-Addons' rules. For every positive pair (a, p), a ≠ p: the
    negative with the smallest D(a, n) > D(a, p), or if there is none the negative with the largest
    D(a, n); loss max(D(a, p) − D(a, n) + margin, 0). Mean over the positive pairs whose anchor has a
    negative; 0 if there are none."""
    return batch_semihard_triplet_loss_with_stats(embeddings, labels, margin, squared)[0]


# ----------------------------------------------------------------------------------- prototypical

def prototypical_logits(embeddings, labels):
    """([B, B] logits, [B, B] own, [B] valid) of `prototypical_loss`.

    Column j stands for the class of image j, and only the first image of each class in the batch
    keeps its column (the others are the smallest float32, −3.4e38: a softmax weight of 0), so row i is a softmax over the batch's distinct classes:
    −‖e_i − c‖², with c the mean of that class's images — for image i's own class, the mean of its
    *other* images (Snell et al.'s support/query split, every image a query once). `own[i, j]` marks
    row i's own-class column; `valid[i]`: image i has another image of its class and another class.
    """
    _check_labelled("prototypical_loss", embeddings, labels)
    # Centred on the batch mean: the distances (and so the loss and its gradients) are the same, but
    # the |e|^2 - 2 e.c + |c|^2 expansion below lost the distances to rounding when the embeddings
    # shared a large offset (a loss of 8.30 for 7.74 at an offset of 1,000; the mutation review of
    # 2026-12-06). evaluation._prepare centres for the same reason.
    e = _f32(embeddings)
    e = e - jnp.mean(e, axis=0, keepdims=True)
    labels = jnp.asarray(labels)
    same = labels[:, None] == labels[None, :]
    index = jnp.arange(labels.shape[0])
    # The first image of each class represents it: no same-class image before it.
    first = ~jnp.any(same & (index[None, :] < index[:, None]), axis=1)
    count = jnp.sum(same, axis=1).astype(jnp.float32)           # images of the class of j
    class_sum = same.astype(jnp.float32) @ e                      # row j: sum over the class of j
    prototype = class_sum / count[:, None]                        # row j: the mean of the class of j
    own_prototype = (class_sum - e) / jnp.maximum(count - 1.0, 1.0)[:, None]  # row i: leave-one-out mean
    # ‖e_i − c_j‖² as |e_i|² − 2 e_i·c_j + |c_j|² (one matmul), clipped at 0 against rounding.
    d_other = jnp.maximum(jnp.sum(e * e, 1)[:, None] - 2.0 * e @ prototype.T + jnp.sum(prototype * prototype, 1)[None, :], 0.0)
    d_own = jnp.sum(jnp.square(e - own_prototype), axis=1)
    own = same & first[None, :]
    logits = jnp.where(own, -d_own[:, None], -d_other)
    logits = jnp.where(first[None, :], logits, _fill_min(logits))  # exp(fill - max) = 0 in the softmax
    valid = (count > 1.0) & jnp.any(~same, axis=1)
    return logits, own, valid


def prototypical_loss_with_stats(embeddings, labels):
    """(loss, stats) of `prototypical_loss`; stats over the valid images: active_fraction (the share
    whose own-class prototype is not the nearest: misclassified), mean_positive_distance (squared
    distance to the own prototype) and mean_negative_distance (to the nearest other prototype)."""
    logits, own, valid = prototypical_logits(embeddings, labels)
    own_logit = jnp.sum(jnp.where(own, logits, 0.0), axis=1)
    others = jnp.where(own, _fill_min(logits), logits)
    nearest_other = jnp.max(others, axis=1)
    # No fill reaches the arithmetic where a row has no other class (valid is False there).
    nearest_other = jnp.where(valid, nearest_other, 0.0)
    per_image = jax.nn.logsumexp(jnp.where(valid[:, None], logits, 0.0), axis=1) - own_logit
    stats = {
        "active_fraction": _safe_mean((own_logit <= nearest_other).astype(jnp.float32), valid),
        "mean_positive_distance": _safe_mean(-own_logit, valid),
        "mean_negative_distance": _safe_mean(-nearest_other, valid),
    }
    return _safe_mean(per_image, valid), stats


def prototypical_loss(embeddings, labels):
    """Prototypical networks' loss (Snell et al. 2017) on a labelled batch (P classes x K images):
    mean over the images i with a same-class and an other-class image of

        −log softmax_k(−‖e_i − c_k‖²)[y_i],

    k over the batch's classes, c_k the mean embedding of class k's images in the batch, and for the
    image's own class y_i the mean of its other images (leave-one-out). 0 if no image is valid.
    Squared Euclidean distances, no temperature, as in the paper."""
    return prototypical_loss_with_stats(embeddings, labels)[0]


# ----------------------------------------------------------------------------------- verification

def verification_logits(h1, h2, weight, bias):
    """Koch et al.'s head: Σ_k weight_k·|h1_k − h2_k| + bias, [B, E] -> [B].

    `weight` is [E] or a Dense kernel [E, 1]; `bias` is a scalar or [1].
    """
    l1 = jnp.abs(_f32(h1) - _f32(h2))
    return l1 @ jnp.reshape(_f32(weight), (-1,)) + jnp.reshape(_f32(bias), ())


def same_probability(logits):
    """P(same class) = sigmoid(logits)."""
    return jax.nn.sigmoid(_f32(logits))


def verification_loss_with_stats(logits, is_similar):
    """(loss, stats) of `verification_loss`; stats: active_fraction (= misclassified), accuracy."""
    z = _f32(logits)
    _check_zero_one("verification_loss", is_similar)
    s = _as_weight(is_similar)
    if z.shape != s.shape:  # a [B, 1] vs [B] mix-up would silently broadcast to [B, B]
        raise ValueError(f"logits {z.shape} and is_similar {s.shape} must have the same shape")
    if z.size == 0:
        raise ValueError(f"verification_loss: the batch is empty (logits {z.shape})")
    # −[s·log σ(z) + (1 − s)·log(1 − σ(z))], with log(1 − σ(z)) = log σ(−z): stable for any z.
    per_pair = -(s * jax.nn.log_sigmoid(z) + (1.0 - s) * jax.nn.log_sigmoid(-z))
    correct = (z > 0) == (s > 0.5)
    accuracy = jnp.mean(correct.astype(jnp.float32))
    return jnp.mean(per_pair), {"active_fraction": 1.0 - accuracy, "accuracy": accuracy}


def verification_loss(logits, is_similar):
    """Mean binary cross-entropy from logits; `is_similar` bool or 0/1, 1 = same class."""
    return verification_loss_with_stats(logits, is_similar)[0]


# ---------------------------------------------------------------------------------------- ArcFace

def _unit(x):
    x = _f32(x)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def arcface_logits(embeddings, class_index, centres, scale=30.0, margin=0.5):
    """[B, C] logits: s·cos(θ_y + m) at each image's own class y = class_index, s·cos θ_j elsewhere,
    where cos θ_j is the cosine between the embedding and the class centre j (both L2-normalised).

    cos(θ + m) = cos θ·cos m − sin θ·sin m is the target logit while θ + m < π. Past that point it
    would rise again as θ grows, so there, as in Deng et al.'s code (insightface), it is replaced by
    cos θ − m·sin m, which keeps falling as θ grows; the two differ at θ = π − m, a step of
    −(cos m + m·sin m − 1) (−0.117 at m = 0.5, before the scale s).
    """
    _check_labelled("arcface_loss", embeddings, class_index, "class_index")
    c = _shape(centres)
    if len(c) != 2 or c[1] != _shape(embeddings)[1]:
        raise ValueError(f"arcface_loss: centres {c} must be [C, E] with the embeddings' E = {_shape(embeddings)[1]}")
    if not isinstance(class_index, jax.core.Tracer):  # under jit the values are unknown here
        index = np.asarray(class_index)  # NumPy: jnp ops would be traced inside an outer jit
        if not np.issubdtype(index.dtype, np.integer) or bool(np.any((index < 0) | (index >= c[0]))):
            raise ValueError(f"arcface_loss: class_index must be integers in [0, {c[0]}) (rows of centres), "
                             f"got {index.dtype} values from {index.min()} to {index.max()}")
    cos = jnp.clip(_unit(embeddings) @ _unit(centres).T, -1.0, 1.0)
    target = jnp.asarray(class_index)[:, None] == jnp.arange(cos.shape[1])[None, :]
    # sin θ with a finite gradient at θ = 0 (sqrt'(0) is infinite): clip 1 − cos² away from 0.
    sin = jnp.sqrt(jnp.maximum(1.0 - cos * cos, 1e-7))
    cos_m, sin_m = jnp.cos(margin), jnp.sin(margin)
    with_margin = jnp.where(cos > jnp.cos(jnp.pi - margin), cos * cos_m - sin * sin_m, cos - margin * sin_m)
    return scale * jnp.where(target, with_margin, cos)


def arcface_loss_with_stats(embeddings, class_index, centres, scale=30.0, margin=0.5):
    """(loss, stats) of `arcface_loss`; stats: active_fraction (the images whose own-class logit, with
    the margin, is not yet the largest: the ones the margin still pushes) and accuracy (the nearest
    class centre, without the margin, is the image's own)."""
    logits = arcface_logits(embeddings, class_index, centres, scale, margin)
    index = jnp.asarray(class_index)
    own = jnp.take_along_axis(logits, index[:, None], axis=1)[:, 0]
    per_image = jax.nn.logsumexp(logits, axis=1) - own
    others = jnp.where(jnp.arange(logits.shape[1])[None, :] == index[:, None], _fill_min(logits), logits)
    active = own <= jnp.max(others, axis=1)
    plain = _unit(embeddings) @ _unit(centres).T
    accuracy = jnp.mean((jnp.argmax(plain, axis=1) == index).astype(jnp.float32))
    return jnp.mean(per_image), {"active_fraction": jnp.mean(active.astype(jnp.float32)), "accuracy": accuracy}


def arcface_loss(embeddings, class_index, centres, scale=30.0, margin=0.5):
    """ArcFace: mean softmax cross-entropy of `arcface_logits` over the batch. `class_index` [B]
    int in [0, C) indexes the rows of `centres` [C, E]; `margin` m is in radians. An index outside
    [0, C) is a ValueError when called eagerly; under `jax.jit` it cannot be checked and gives a NaN
    or wrong loss (map dataset labels to 0..C-1 first: `sampling` does, as `class_index`)."""
    return arcface_loss_with_stats(embeddings, class_index, centres, scale, margin)[0]


# ------------------------------------------------------------------------------- multi-similarity

def multi_similarity_loss_with_stats(embeddings, labels, epsilon=0.1, alpha=2.0, beta=50.0, lam=0.5):
    """(loss, stats) of `multi_similarity_loss`; stats over the anchors with a positive and a
    negative: active_fraction (the share with a mined pair: the others cost 0), and the mean
    Euclidean distance of the unit vectors (√(2 − 2S), what evaluation compares) over all positive
    and all negative pairs, as mean_positive_distance / mean_negative_distance."""
    _check_labelled("multi_similarity_loss", embeddings, labels)
    u = _unit(embeddings)
    sim = jnp.matmul(u, u.T, precision=jax.lax.Precision.HIGHEST)
    positive, negative = _label_masks(labels)
    valid_anchor = jnp.any(positive, axis=1) & jnp.any(negative, axis=1)
    # Mining (Eq. 5-6 of the paper, on the unmined sets; no gradient through the selection).
    s = jax.lax.stop_gradient(sim)
    hardest_positive = jnp.min(jnp.where(positive, s, _fill_max(s)), axis=1)  # least similar positive
    hardest_negative = jnp.max(jnp.where(negative, s, _fill_min(s)), axis=1)  # most similar negative
    kept_negative = negative & (s > hardest_positive[:, None] - epsilon) & valid_anchor[:, None]
    kept_positive = positive & (s < hardest_negative[:, None] + epsilon) & valid_anchor[:, None]

    def soft(z, kept):  # log(1 + Σ_kept exp(z)), stable for β·S up to any size; 0 when nothing is kept
        z = jnp.where(kept, z, _fill_min(z))  # exp(fill - max) = 0: the max is >= 0 (the 0 column)
        return jax.nn.logsumexp(jnp.concatenate([jnp.zeros_like(z[:, :1]), z], axis=1), axis=1)

    per_anchor = (soft(-alpha * (sim - lam), kept_positive) / alpha
                  + soft(beta * (sim - lam), kept_negative) / beta)
    mined = jnp.any(kept_positive, axis=1) | jnp.any(kept_negative, axis=1)
    distance = _safe_sqrt(jnp.maximum(2.0 - 2.0 * sim, 0.0))
    stats = {
        "active_fraction": _safe_mean(mined.astype(jnp.float32), valid_anchor),
        "mean_positive_distance": _safe_mean(distance, positive),
        "mean_negative_distance": _safe_mean(distance, negative),
    }
    return _safe_mean(per_anchor, valid_anchor), stats


def multi_similarity_loss(embeddings, labels, epsilon=0.1, alpha=2.0, beta=50.0, lam=0.5):
    """Multi-similarity loss (Wang et al., CVPR 2019) on a labelled batch (P classes x K images).

    S_ij is the cosine of embeddings i and j (both L2-normalised here, so the loss sees directions
    only). For each anchor i with a same-class and an other-class image, pair mining keeps

        negatives n with S_in > min_p S_ip − ε,   positives p with S_ip < max_n S_in + ε

    (min and max over all of i's positives / negatives), and the anchor costs

        1/α · log(1 + Σ_kept p exp(−α (S_ip − λ)))  +  1/β · log(1 + Σ_kept n exp(β (S_in − λ))).

    Mean over those anchors (one with nothing kept costs 0 and still counts, as in the authors'
    code, which divides by the batch size: the same mean on a P x K batch with K >= 2, where every
    image is such an anchor); 0 if there is no such anchor. Defaults are the paper's
    α = 2, β = 50, λ = 0.5, ε = 0.1. Train with `l2_normalize=True`, so that the distances evaluation
    and `compare` use are those of the unit vectors the loss shaped."""
    return multi_similarity_loss_with_stats(embeddings, labels, epsilon, alpha, beta, lam)[0]


# ------------------------------------------------------------------------------------ distillation

def relational_distance_loss(student, teacher, delta=1.0):
    """Park et al. 2019's distance-wise relational knowledge distillation (RKD-D) over a batch:

        ψ(x)_ij = ‖x_i − x_j‖ / μ(x),   μ(x) = mean of ‖x_i − x_j‖ over the pairs i ≠ j,
        loss = mean over i ≠ j of huber_δ(ψ(student)_ij − ψ(teacher)_ij).

    The student learns the teacher's *relative* distances, so the two may differ in dimension and
    scale (here: one small encoder against the concatenated embeddings of several trained ones).
    The teacher is a constant (no gradient flows into it)."""
    sb, tb = _shape(student), _shape(teacher)
    if len(sb) != 2 or len(tb) != 2 or sb[0] != tb[0] or sb[0] < 2:
        raise ValueError(f"relational_distance_loss: student {sb} and teacher {tb} must be batches [B, E] "
                         f"and [B, F] of the same B ≥ 2")
    s = pairwise_distances(student)
    t = pairwise_distances(jax.lax.stop_gradient(_f32(teacher)))
    off_diagonal = ~jnp.eye(s.shape[0], dtype=bool)
    psi_s = s / jnp.maximum(_safe_mean(s, off_diagonal), 1e-12)
    psi_t = t / jnp.maximum(_safe_mean(t, off_diagonal), 1e-12)
    err = jnp.abs(psi_s - psi_t)
    huber = jnp.where(err <= delta, 0.5 * jnp.square(err), delta * (err - 0.5 * delta))
    return _safe_mean(huber, off_diagonal)
