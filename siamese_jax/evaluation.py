"""Evaluation metrics as pure functions on embeddings and distances.

Everything here takes arrays in and returns NumPy values / plain Python numbers; nothing touches a
model. All functions are deterministic: nearest-neighbour ties go to the lower index.

- One-shot episodes: `one_shot_accuracy` (1-NN or prototype rule), `summarize_accuracies`.
- Lake et al.'s 20 official Omniglot runs: `lake_run_errors`.
- Pair verification (predict "same" iff distance <= threshold): `best_threshold`,
  `threshold_for_far`, `verification_accuracy`, `roc_auc`, `roc_curve`.
- Retrieval as pytorch-metric-learning's AccuracyCalculator defines it: `retrieval_metrics`
  (precision@1, MAP@R, leave-one-out), built on the exact chunked `knn`.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# Upper bound on the floats one jitted chunk materialises (queries x index, or the per-episode
# difference tensor): 2**25 float32 = 128 MiB, small enough for a laptop CPU and any accelerator.
_CHUNK_FLOATS = 1 << 25
# Values per block when an index goes to the device (centred and squared block by block) or is
# checked for NaN: 2**18 float32 = 1 MiB, so the device copy is the only full-size array made
# (blocks of 16 MiB left ~200 MB more in the process at 1M rows: the allocator kept their copies).
_INDEX_BLOCK_FLOATS = 1 << 18
# float64 values per block of `knn`'s direct recomputation of the k returned distances (~64 MiB).
_EXACT_FLOATS = 1 << 23


# ------------------------------------------------------------------------------------------------
# One-shot episodes
# ------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("rule",))
def _episode_predictions(support, query, rule: str):
    """support [T, n_way, k_shot, E], query [T, n_way, n_query, E] -> predicted class [T, n_way, n_query]."""
    t, n_way, k_shot, e = support.shape
    if rule == "prototype":
        refs = support.mean(axis=2)  # [T, n_way, E]
        owner = jnp.arange(n_way)
    else:  # nearest: every support example is a candidate; it votes for its own class
        refs = support.reshape(t, n_way * k_shot, e)
        owner = jnp.repeat(jnp.arange(n_way), k_shot)
    q = query.reshape(t, -1, e)
    # Direct differences (not the |a|^2+|b|^2-2ab expansion): episodes are small, so this is
    # affordable and exact to the last bit, which keeps near-ties honest.
    d2 = jnp.sum(jnp.square(q[:, :, None, :] - refs[:, None, :, :]), axis=-1)  # [T, Q, S]
    nearest = jnp.argmin(d2, axis=-1)  # argmin returns the first minimum: lower index wins ties
    return owner[nearest].reshape(query.shape[:3])


def _require_finite(x: np.ndarray, what: str) -> None:
    """NaN compares false with everything: a diverged model's NaN embeddings were scored as chance
    (every query "nearest" to the first class) and NaN distances ranked as the largest."""
    x = np.asarray(x)
    blocks = [x]
    if x.ndim and len(x):  # in blocks of rows: the mask of a million 128-d index rows was 128 MB
        rows = max(1, _INDEX_BLOCK_FLOATS // max(1, x[0].size))
        blocks = (x[start:start + rows] for start in range(0, len(x), rows))
    if not all(np.isfinite(block).all() for block in blocks):
        raise ValueError(f"{what} hold NaN or Inf (a diverged model?); nothing was scored")


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def one_shot_predictions(support_emb, query_emb, rule: str = "nearest", embeddings=None) -> np.ndarray:
    """Predicted class (index into n_way) for every query; shapes as in `one_shot_accuracy`.

    With `embeddings` [N, E], `support_emb` and `query_emb` are integer indices into it
    ([T,] n_way, k_shot / n_query), gathered one chunk of episodes at a time: the same predictions as
    passing `embeddings[support_emb]`, `embeddings[query_emb]`, without holding every episode's
    embeddings at once (20,000 20-way 5-shot episodes of 128-d: 1.2 GB)."""
    if rule not in ("nearest", "prototype"):
        raise ValueError(f"rule must be 'nearest' or 'prototype', got {rule!r}")
    if embeddings is None:
        support = np.asarray(support_emb, np.float32)
        query = np.asarray(query_emb, np.float32)
        s_shape, q_shape = support.shape, query.shape
    else:
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be [N, E], got {embeddings.shape}")
        support, query = np.asarray(support_emb), np.asarray(query_emb)
        if not (np.issubdtype(support.dtype, np.integer) and np.issubdtype(query.dtype, np.integer)):
            raise ValueError(f"with embeddings, support and query are integer indices, got {support.dtype} and {query.dtype}")
        for name, ix in (("support_emb", support), ("query_emb", query)):
            # (-1, a common "missing" marker, picked the last embedding: a wrong accuracy, silently)
            if ix.size and (ix.min() < 0 or ix.max() >= len(embeddings)):
                raise ValueError(f"{name} holds indices from {ix.min()} to {ix.max()}; with embeddings "
                                 f"[{len(embeddings)}, E] they must be in [0, {len(embeddings)})")
        s_shape, q_shape = support.shape + embeddings.shape[1:], query.shape + embeddings.shape[1:]
    single = len(s_shape) == 3
    if single:
        support, query = support[None], query[None]
        s_shape, q_shape = (1,) + s_shape, (1,) + q_shape
    if len(s_shape) != 4 or len(q_shape) != 4:
        raise ValueError(f"expected [T,] n_way, k_shot, E arrays, got {s_shape} and {q_shape}")
    if s_shape[0] != q_shape[0] or s_shape[1] != q_shape[1] or s_shape[3] != q_shape[3]:
        raise ValueError(f"support {s_shape} and query {q_shape} disagree on episodes/n_way/E")
    t, n_way, k_shot, e = s_shape
    if t == 0:
        raise ValueError("no episodes to score")
    if n_way == 0 or k_shot == 0 or q_shape[2] == 0:
        # (no queries made every episode's accuracy the mean of nothing: NaN)
        raise ValueError(f"an episode needs at least one class, one support image and one query, got "
                         f"n_way={n_way}, k_shot={k_shot}, n_query={q_shape[2]}")
    if embeddings is None:
        _require_finite(support, "the support embeddings")
        _require_finite(query, "the query embeddings")
    n_query = q_shape[2]
    per_episode = n_way * n_query * (n_way * k_shot) * e
    # A fixed chunk size (padded; a power of two for short lists, else what fits the memory bound):
    # one compilation per size class, not per episode count.
    chunk = max(1, min(_power_of_two_at_least(t), _CHUNK_FLOATS // max(per_episode, 1)))
    out = []
    for start in range(0, t, chunk):
        s, q = support[start:start + chunk], query[start:start + chunk]
        if embeddings is not None:
            s, q = embeddings[s], embeddings[q]
            _require_finite(s, "the support embeddings")
            _require_finite(q, "the query embeddings")
        pad = chunk - len(s)
        if pad:  # fixed chunk shape: the same compilation for any episode count up to the chunk
            s = np.concatenate([s, np.zeros((pad,) + s.shape[1:], s.dtype)])
            q = np.concatenate([q, np.zeros((pad,) + q.shape[1:], q.dtype)])
        out.append(np.asarray(_episode_predictions(s, q, rule))[:chunk - pad])
    pred = np.concatenate(out)
    return pred[0] if single else pred


def one_shot_accuracy(support_emb, query_emb, rule: str = "nearest", embeddings=None):
    """Per-episode N-way K-shot accuracy with Euclidean distances.

    support_emb [n_way, k_shot, E] and query_emb [n_way, n_query, E] (one episode, returns a float),
    or with a leading episode axis [T, ...] (returns float64 [T]). Query row i belongs to class i.
    rule="nearest": the class of the nearest single support example (1-NN, Koch et al.);
    rule="prototype": the nearest class mean of the k shots (Snell et al.). Same for k_shot=1.
    With `embeddings` [N, E], support_emb and query_emb are indices into it (`one_shot_predictions`).
    """
    pred = one_shot_predictions(support_emb, query_emb, rule, embeddings)
    true = np.arange(pred.shape[-2])[:, None]
    correct = pred == true
    if correct.ndim == 2:
        return float(correct.mean())
    return correct.reshape(len(correct), -1).mean(axis=1).astype(np.float64)


def summarize_accuracies(per_episode_acc) -> dict:
    """{"mean", "ci95", "num_episodes"}; ci95 = 1.96 * std / sqrt(n) with the sample std (ddof=1).

    One episode has no spread to estimate: its ci95 is NaN (printed "± nan"), not 0, which would read
    as an exact result. The configs and `siamese-evaluate --episodes` ask for at least 2.
    """
    acc = np.asarray(per_episode_acc, np.float64).reshape(-1)
    n = int(acc.size)
    if n == 0:
        raise ValueError("no episodes to summarize")
    std = float(acc.std(ddof=1)) if n > 1 else math.nan
    return {"mean": float(acc.mean()), "ci95": 1.96 * std / math.sqrt(n), "num_episodes": n}


# ------------------------------------------------------------------------------------------------
# Lake et al.'s 20 official runs
# ------------------------------------------------------------------------------------------------
def lake_run_errors(train_emb, test_emb, answers) -> dict:
    """Lake's protocol: each run's 20 test images are classified by 1-NN among its 20 training images.

    train_emb, test_emb: [R, 20, E]; answers: [R, 20] int, the 0-based index of the correct training
    image for each test image (class_labels.txt). Returns {"accuracy", "error_rate" (in %, as Lake's
    demo prints it), "errors_per_run" (list of R ints), "num_trials" (R * 20)}.
    """
    train = np.asarray(train_emb, np.float32)
    test = np.asarray(test_emb, np.float32)
    answers = np.asarray(answers)
    if train.ndim != 3 or test.ndim != 3 or test.shape[:2] != answers.shape or train.shape[0] != test.shape[0] \
            or train.shape[2] != test.shape[2]:
        raise ValueError(f"shapes disagree: train {train.shape}, test {test.shape}, answers {answers.shape}")
    if answers.size and (not np.issubdtype(answers.dtype, np.integer) or answers.min() < 0
                         or answers.max() >= train.shape[1]):  # 1-based answers scored 0% without a word
        raise ValueError(f"answers must be 0-based indices into the {train.shape[1]} training images, got values "
                         f"from {answers.min()} to {answers.max()}")
    # One "episode" per run: the 20 training images are the support set, one shot each.
    # Test image j sits in "query row" j; only the predicted training index matters here.
    pred = one_shot_predictions(train[:, :, None, :], test[:, :, None, :])[:, :, 0]  # [R, 20]
    errors = (pred != answers).sum(axis=1)
    num_trials = int(answers.size)
    total_errors = int(errors.sum())
    return {
        "accuracy": 1.0 - total_errors / num_trials,
        "error_rate": 100.0 * total_errors / num_trials,
        "errors_per_run": [int(e) for e in errors],
        "num_trials": num_trials,
    }


# ------------------------------------------------------------------------------------------------
# Pair verification. Convention: smaller distance = more similar; predict "same" iff d <= threshold.
# ------------------------------------------------------------------------------------------------
def same_labels(is_similar) -> np.ndarray:
    """`is_similar` as a flat bool array; anything but bools or 0/1 is a ValueError (strings such as
    "same" were all True, and any nonzero number counted as "same")."""
    y = np.asarray(is_similar)
    if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
        raise ValueError(f"is_similar must be bool or 0/1 per pair (1 = same class), got {y.dtype} values"
                         + (f" from {y.min()} to {y.max()}" if y.size and y.dtype.kind in "biuf" else ""))
    return y.astype(bool).reshape(-1)


def _pairs(distances, is_similar):
    d = np.asarray(distances).reshape(-1)
    if not np.issubdtype(d.dtype, np.floating):
        d = d.astype(np.float64)
    same = same_labels(is_similar)
    if d.shape != same.shape:
        raise ValueError(f"distances {d.shape} and is_similar {same.shape} differ in length")
    if d.size == 0:
        raise ValueError("no pairs")
    _require_finite(d, "the distances")
    return d, same


def verification_accuracy(distances, is_similar, threshold) -> float:
    """Fraction of pairs classified correctly by "same iff distance <= threshold"."""
    d, same = _pairs(distances, is_similar)
    t = np.asarray(threshold)
    # (jnp.issubdtype: a bfloat16 scalar, from bf16 distances, is a number too; np.number has no bfloat16)
    if t.ndim or not jnp.issubdtype(t.dtype, jnp.number) or np.isnan(t):
        # (NaN compared False with every distance: "no pair is the same", scored as an accuracy)
        raise ValueError(f"threshold must be one number (inf accepts every pair), got {threshold!r}")
    return float(np.mean((d <= t) == same))


def best_threshold(distances, is_similar) -> float:
    """The threshold maximising verification accuracy on these pairs (exact, O(n log n)).

    Every distinct way of splitting the sorted distances is scored with cumulative counts; the
    returned value is the midpoint between the last accepted and first rejected distance (the
    smallest such split on ties in accuracy). Accept-nothing returns a value just below the minimum.
    """
    d, same = _pairs(distances, is_similar)
    order = np.argsort(d, kind="stable")
    ds, ss = d[order], same[order]
    # A split may only fall between distinct values: equal distances get the same prediction.
    last_of_run = np.flatnonzero(np.append(ds[1:] != ds[:-1], True))
    same_accepted = np.cumsum(ss)[last_of_run]  # positives at or below each distinct value
    diff_rejected = (~ss).sum() - np.cumsum(~ss)[last_of_run]  # negatives above it
    correct = same_accepted + diff_rejected
    none_correct = int((~ss).sum())  # accept nothing
    best = int(np.argmax(correct))
    if none_correct >= correct[best]:
        return float(np.nextafter(ds[0], -np.inf))
    lo = ds[last_of_run[best]]
    if last_of_run[best] == len(ds) - 1:
        return float(lo)
    hi = ds[last_of_run[best] + 1]
    mid = lo + (hi - lo) / 2
    return float(mid if lo <= mid < hi else lo)  # guard adjacent floats where the midpoint rounds up


def threshold_for_far(distances, is_similar, target_far: float) -> float:
    """The largest threshold whose false-accept rate on the different pairs is <= target_far.

    FAR = #{different pairs with d <= t} / #different pairs. Any t between the returned value and
    the first distance that would break the bound gives the same predictions; the returned value is
    the largest observed distance in that range (so it survives float32 comparisons), or a value
    just below every distance when even the smallest different pair may not be accepted.
    """
    if not 0.0 <= target_far <= 1.0:
        raise ValueError(f"target_far must be in [0, 1], got {target_far}")
    d, same = _pairs(distances, is_similar)
    neg = np.sort(d[~same])
    if neg.size == 0:
        raise ValueError("threshold_for_far needs at least one different pair")
    allowed = int(math.floor(target_far * neg.size + 1e-9))  # false accepts we may make
    if allowed >= neg.size:
        return float(d.max())
    first_forbidden = neg[allowed]  # accepting it (and everything tied with it) breaks the bound
    below = d[d < first_forbidden]
    if below.size:
        return float(below.max())
    return float(np.nextafter(first_forbidden, np.array(-np.inf, first_forbidden.dtype)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x ascending, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last member of each tie group
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def roc_auc(distances, is_similar) -> float:
    """ROC-AUC of "-distance predicts same": P(d_different > d_same) + 0.5 * P(tie).

    Computed with the Mann-Whitney rank statistic (ties get average ranks), O(n log n).
    1.0 = every same pair is closer than every different pair; 0.5 = chance.
    """
    d, same = _pairs(distances, is_similar)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both same and different pairs")
    ranks = _average_ranks(d)
    # U statistic of the different pairs ranking above (farther than) the same pairs.
    u = ranks[~same].sum() - n_neg * (n_neg + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(distances, is_similar) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false_accept_rate, true_accept_rate, thresholds), thresholds ascending over distinct distances.

    Point i is the rule "same iff d <= thresholds[i]"; a first point (0, 0) is prepended with a
    threshold just below the smallest distance. The trapezoid area under it equals `roc_auc`.
    """
    d, same = _pairs(distances, is_similar)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_curve needs both same and different pairs")
    order = np.argsort(d, kind="stable")
    ds, ss = d[order], same[order]
    last_of_run = np.flatnonzero(np.append(ds[1:] != ds[:-1], True))
    tar = np.concatenate([[0.0], np.cumsum(ss)[last_of_run] / n_pos])
    far = np.concatenate([[0.0], np.cumsum(~ss)[last_of_run] / n_neg])
    thresholds = np.concatenate([[np.nextafter(ds[0], np.array(-np.inf, ds.dtype))], ds[last_of_run]])
    return far, tar, thresholds


# ------------------------------------------------------------------------------------------------
# Exact k-nearest neighbours, chunked over queries
# ------------------------------------------------------------------------------------------------
def _sq_dists_topk(q, q_ids, index, index_sqnorm, k: int, exclude_self: bool):
    """Squared distances of a query chunk to the whole index, and the k smallest (ascending)."""
    cross = jnp.dot(q, index.T, precision=jax.lax.Precision.HIGHEST)
    d2 = jnp.sum(q * q, axis=1, keepdims=True) + index_sqnorm[None, :] - 2.0 * cross
    d2 = jnp.maximum(d2, 0.0)  # the expansion can dip below zero by rounding
    if exclude_self:
        cols = jnp.arange(index.shape[0])
        d2 = jnp.where(cols[None, :] == q_ids[:, None], jnp.inf, d2)
    # lax.top_k puts the lower index first among equal values: ties go to the lower index.
    neg, idx = jax.lax.top_k(-d2, k)
    return -neg, idx


@functools.partial(jax.jit, static_argnames=("k", "exclude_self"))
def _knn_chunk(q, q_ids, index, index_sqnorm, k: int, exclude_self: bool):
    d2, idx = _sq_dists_topk(q, q_ids, index, index_sqnorm, k, exclude_self)
    return jnp.sqrt(d2), idx


def _query_chunks(query: np.ndarray, n_index: int, chunk_size: Optional[int]):
    """Yields (start, stop, padded query chunk, padded ids); one static chunk shape for jit."""
    n = len(query)
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_FLOATS // max(n_index, 1))
    # A power-of-two chunk (padded) for a short query list: `search` of 1, 3, 7 ... queries compiled
    # once per size class instead of once per count (~0.2 s each).
    chunk = max(1, min(int(chunk_size), _power_of_two_at_least(n)))
    for start in range(0, n, chunk):
        q = query[start:start + chunk]
        ids = np.arange(start, start + len(q), dtype=np.int32)
        pad = chunk - len(q)
        if pad:
            q = np.concatenate([q, np.zeros((pad, q.shape[1]), q.dtype)])
            ids = np.concatenate([ids, np.full(pad, -1, np.int32)])  # -1 matches no index column
        yield start, start + chunk - pad, q, ids


def _prepare(query_emb, index_emb):
    index = np.asarray(index_emb, np.float32)
    query = np.asarray(query_emb, np.float32)
    if index.ndim != 2 or query.ndim != 2 or index.shape[1] != query.shape[1]:
        raise ValueError(f"expected [Q, E] and [N, E] embeddings, got {query.shape} and {index.shape}")
    _require_finite(index, "the index embeddings")
    _require_finite(query, "the query embeddings")
    # Centre on the index mean: distances are unchanged, but the |a|^2+|b|^2-2ab expansion loses
    # far less precision when embeddings share a large common offset.
    centre = index.mean(axis=0, keepdims=True) if len(index) else 0.0
    index_dev, index_sqnorm = _centred_on_device(index, centre)
    return query - centre, index_dev, index_sqnorm


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _put_rows(index, sqnorm, block, block_sqnorm, start):
    """Rows [start, start + len(block)) of the (donated, so updated in place) device index and of its
    squared norms."""
    index = jax.lax.dynamic_update_slice(index, block, (start, jnp.zeros_like(start)))
    return index, jax.lax.dynamic_update_slice(sqnorm, block_sqnorm, (start,))


def _centred_on_device(index: np.ndarray, centre):
    """(index - centre on the device, its rows' squared norms), made block by block of rows.

    Made whole, a million 128-d rows held the host's centred copy, the device copy and the device's
    squares at once (+1.5 GB over the 0.5 GB index for one `siamese-search` query). Each block is
    the same float32 subtraction, and its squared norms the same eager ops on blocks of ~2**18
    values, where XLA's row sums do not depend on the row count (checked: identical to the whole
    array's for 1M x 128 and other shapes); an index of one block is made whole, as before."""
    n, e = index.shape
    rows = max(1, _INDEX_BLOCK_FLOATS // max(e, 1))
    if n <= rows:
        index_dev = jnp.asarray(index - centre)
        return index_dev, jnp.sum(index_dev * index_dev, axis=1)
    index_dev, sqnorm = jnp.zeros((n, e), jnp.float32), jnp.zeros((n,), jnp.float32)
    starts = list(range(0, n - rows + 1, rows)) + ([n - rows] if n % rows else [])  # (the last overlaps)
    for start in starts:
        block = jnp.asarray(index[start:start + rows] - centre)
        index_dev, sqnorm = _put_rows(index_dev, sqnorm, block, jnp.sum(block * block, axis=1), np.int32(start))
    return index_dev, sqnorm


def whole_k(k) -> int:
    """`k` as an int: any integer scalar (int, a NumPy integer, a 0-d NumPy or JAX integer array, as
    `operator.index` takes them); ValueError for a bool, a float (int(2.7) would have returned 2
    neighbours for a k of 2.7 without a word) or anything else."""
    try:
        if isinstance(k, (bool, np.bool_)):
            raise TypeError
        return operator.index(k)
    except TypeError:
        raise ValueError(f"k must be a whole number of neighbours, got {k!r}") from None


def knn(query_emb, index_emb, k: int, chunk_size: Optional[int] = None, exclude_self: bool = False):
    """Exact k nearest neighbours by Euclidean distance, over chunks of queries.

    query_emb [Q, E], index_emb [N, E]. Returns (distances float32 [Q, k], indices int32 [Q, k]),
    each row sorted by ascending distance, ties among them broken by the lower index (which of
    several different rows at exactly the k-th distance is kept follows the float32 rounding
    of the search below, not the index). exclude_self=True means
    the queries ARE the index (same order) and leaves each query out of its own neighbours.
    Each chunk holds chunk_size x N distances (chunk_size=None sizes it to about 128 MiB).
    The neighbours are found with the float32 expansion |q|^2 - 2 q.e + |e|^2; the k distances
    returned are then computed directly (float64 differences), and the k re-sorted by them.
    """
    k = whole_k(k)
    query, index, index_sqnorm = _prepare(query_emb, index_emb)
    n_index = index.shape[0]
    available = n_index - 1 if exclude_self else n_index
    if k < 1 or k > available:
        raise ValueError(f"k={k} must be in [1, {available}] for an index of {n_index} items"
                         + (" (self excluded)" if exclude_self else ""))
    if exclude_self and len(query) != n_index:
        raise ValueError("exclude_self=True needs the queries to be the index itself")
    dists = np.empty((len(query), k), np.float32)
    idx = np.empty((len(query), k), np.int32)
    for start, stop, q, ids in _query_chunks(query, n_index, chunk_size):
        d_c, i_c = _knn_chunk(jnp.asarray(q), jnp.asarray(ids), index, index_sqnorm, k, exclude_self)
        dists[start:stop] = np.asarray(d_c)[:stop - start]
        idx[start:stop] = np.asarray(i_c)[:stop - start]
    # The expansion cancels: an item's distance to itself read up to 0.02 (128-d embeddings of norm
    # ~34), and a near-duplicate's was off by its own size. So the k distances again, directly, and
    # the row re-sorted by them (ties: lower index), over blocks of queries (bounded memory).
    # Rows are gathered from the arrays as given (no dtype conversion: a float64 or on-device index
    # is not copied whole again), each gathered block in float32, as the neighbours were found.
    query_emb, index_emb = np.asarray(query_emb), np.asarray(index_emb)
    rows = max(1, _EXACT_FLOATS // max(1, k * query.shape[1]))
    for start in range(0, len(query), rows):
        block = slice(start, start + rows)
        diff = (index_emb[idx[block]].astype(np.float32).astype(np.float64)
                - query_emb[block, None, :].astype(np.float32).astype(np.float64))
        exact = np.sqrt(np.sum(diff * diff, axis=-1))
        order = np.lexsort((idx[block], exact), axis=-1)
        dists[block] = np.take_along_axis(exact, order, 1)
        idx[block] = np.take_along_axis(idx[block], order, 1)
    return dists, idx


# ------------------------------------------------------------------------------------------------
# Retrieval: precision@1 and MAP@R (Musgrave et al. 2020; pytorch-metric-learning AccuracyCalculator)
# ------------------------------------------------------------------------------------------------
def _retrieval_per_query(neighbour_labels, query_labels, r):
    """Per-query precision@1 and AP@R from ranked neighbour labels.

    neighbour_labels [Q, K] (nearest first), query_labels [Q], r [Q] = number of relevant items
    (K >= max r). AP@R = (1/R) * sum_{i<=R} P(i) * rel(i), with P(i) the precision over the first i.
    Queries with r = 0 get 0 for both (callers drop them, as AccuracyCalculator does).
    """
    xp = jnp if isinstance(neighbour_labels, jax.Array) else np
    rel = neighbour_labels == query_labels[:, None]
    ranks = xp.arange(1, neighbour_labels.shape[1] + 1)
    in_r = ranks[None, :] <= r[:, None]
    hit = rel & in_r
    precision_at_i = xp.cumsum(hit, axis=1) / ranks[None, :]
    ap = xp.sum(precision_at_i * hit.astype(precision_at_i.dtype), axis=1) / xp.maximum(r, 1).astype(precision_at_i.dtype)
    return rel[:, 0] & (r > 0), ap


@functools.partial(jax.jit, static_argnames=("k",))
def _retrieval_chunk(q, q_ids, q_labels, q_r, index, index_sqnorm, labels, k: int):
    _, idx = _sq_dists_topk(q, q_ids, index, index_sqnorm, k, exclude_self=True)
    return _retrieval_per_query(labels[idx], q_labels, q_r)


def retrieval_metrics(embeddings, labels, chunk_size: Optional[int] = None, max_k: Optional[int] = None) -> dict:
    """Leave-one-out retrieval over one labelled set: precision@1 and MAP@R, exact.

    Each item queries all the others. R = the number of other items sharing its label; queries with
    R = 0 ("lone" queries) are left out of both averages, as in pytorch-metric-learning's
    AccuracyCalculator (avg_of_avgs=False). k = max R neighbours are retrieved per query, chunked.
    max_k caps R (pass 1023 to match AccuracyCalculator on classes of more than 1024 items, where
    faiss limits k); by default nothing is capped.
    Returns {"precision_at_1", "mean_average_precision_at_r", "num_queries", "num_lone_queries"}.
    """
    if max_k is not None and (isinstance(max_k, bool) or not isinstance(max_k, (int, np.integer)) or max_k < 1):
        # (0 or -1, read as "no cap", made every query "lone": precision@1 and MAP@R 0.0 over 0 queries)
        raise ValueError(f"max_k must be a positive integer or None (no cap), got {max_k!r}")
    labels = np.asarray(labels).reshape(-1)
    emb = np.asarray(embeddings, np.float32)
    if emb.ndim != 2 or len(emb) != len(labels):
        raise ValueError(f"embeddings {emb.shape} and labels {labels.shape} disagree")
    if len(emb) == 0:
        raise ValueError("no embeddings to score")
    _require_finite(emb, "the embeddings")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    label_ids = inverse.reshape(-1).astype(np.int32)
    r = (counts[label_ids] - 1).astype(np.int32)
    if max_k is not None:
        r = np.minimum(r, int(max_k))
    valid = r > 0
    result = {"num_queries": int(valid.sum()), "num_lone_queries": int((~valid).sum())}
    if not valid.any():
        return {"precision_at_1": 0.0, "mean_average_precision_at_r": 0.0, **result}
    k = int(r.max())
    query, index, index_sqnorm = _prepare(emb, emb)
    labels_dev = jnp.asarray(label_ids)
    p1 = np.empty(len(emb), bool)
    ap = np.empty(len(emb), np.float64)
    for start, stop, q, ids in _query_chunks(query, len(emb), chunk_size):
        n = stop - start
        q_labels = np.pad(label_ids[start:stop], (0, len(q) - n))
        q_r = np.pad(r[start:stop], (0, len(q) - n))
        p1_c, ap_c = _retrieval_chunk(jnp.asarray(q), jnp.asarray(ids), jnp.asarray(q_labels), jnp.asarray(q_r),
                                      index, index_sqnorm, labels_dev, k)
        p1[start:stop] = np.asarray(p1_c)[:n]
        ap[start:stop] = np.asarray(ap_c)[:n]
    return {"precision_at_1": float(p1[valid].mean()), "mean_average_precision_at_r": float(ap[valid].mean()),
            **result}


def balanced_pairs(labels: np.ndarray, num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`num_pairs` pairs, half same-class and half different-class, drawn with a fixed seed (for calibration)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    multi = classes[counts >= 2]
    if num_pairs >= 1 and len(multi) == 0:
        raise ValueError("balanced_pairs needs a class with at least 2 images (for the same-class pairs)")
    if num_pairs >= 2 and len(classes) < 2:
        raise ValueError("balanced_pairs needs at least 2 classes (for the different-class pairs)")
    by_class = {c: np.flatnonzero(labels == c) for c in classes}
    first, second, same = [], [], []
    for i in range(num_pairs):
        if i % 2 == 0:
            c = multi[rng.integers(len(multi))]
            a, b = rng.choice(by_class[c], 2, replace=False)
        else:
            c1, c2 = rng.choice(classes, 2, replace=False)
            a, b = by_class[c1][rng.integers(counts[classes == c1][0])], by_class[c2][rng.integers(counts[classes == c2][0])]
        first.append(a), second.append(b), same.append(i % 2 == 0)
    return np.array(first), np.array(second), np.array(same)
