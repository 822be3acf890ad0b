"""Losses against plain NumPy loops (float64), plus the edge cases that break naive versions:
no positive pair, one class only, identical embeddings, B = 2, bfloat16 input, jit vs eager."""
import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siamese_jax import losses as L

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
TOL = dict(rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ NumPy references

def np_dist(x, y, squared):
    d2 = float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
    return d2 if squared else np.sqrt(d2)


def np_contrastive(x1, x2, s, margin):
    out = []
    for a, b, si in zip(x1, x2, s):
        d = np_dist(a, b, squared=False)
        out.append(si * d**2 + (1 - si) * max(margin - d, 0.0) ** 2)
    return np.mean(out)


def np_triplet(a, p, n, margin, squared):
    return np.mean([max(np_dist(ai, pi, squared) - np_dist(ai, ni, squared) + margin, 0.0)
                    for ai, pi, ni in zip(a, p, n)])


def np_batch_all(e, y, margin, squared):
    losses = []
    for a, p, n in itertools.product(range(len(y)), repeat=3):
        if a != p and y[a] == y[p] and y[a] != y[n]:
            t = np_dist(e[a], e[p], squared) - np_dist(e[a], e[n], squared) + margin
            if t > 0:
                losses.append(t)
    return np.mean(losses) if losses else 0.0


def np_batch_hard(e, y, margin, squared):
    losses = []
    for a in range(len(y)):
        pos = [np_dist(e[a], e[p], squared) for p in range(len(y)) if p != a and y[p] == y[a]]
        neg = [np_dist(e[a], e[n], squared) for n in range(len(y)) if y[n] != y[a]]
        if pos and neg:
            losses.append(max(max(pos) - min(neg) + margin, 0.0))
    return np.mean(losses) if losses else 0.0


def np_semihard(e, y, margin, squared):
    """Returns (loss, number of pairs that used the fallback)."""
    losses, fallbacks = [], 0
    for a in range(len(y)):
        neg = [np_dist(e[a], e[n], squared) for n in range(len(y)) if y[n] != y[a]]
        if not neg:
            continue
        for p in range(len(y)):
            if p == a or y[p] != y[a]:
                continue
            d_ap = np_dist(e[a], e[p], squared)
            farther = [d for d in neg if d > d_ap]
            if farther:
                d_an = min(farther)
            else:
                d_an, fallbacks = max(neg), fallbacks + 1
            losses.append(max(d_ap - d_an + margin, 0.0))
    return (np.mean(losses) if losses else 0.0), fallbacks


def np_hardest_negative(e, y, margin, squared):
    losses = []
    for a in range(len(y)):
        neg = [np_dist(e[a], e[n], squared) for n in range(len(y)) if y[n] != y[a]]
        if not neg:
            continue
        for p in range(len(y)):
            if p != a and y[p] == y[a]:
                losses.append(max(np_dist(e[a], e[p], squared) - min(neg) + margin, 0.0))
    return np.mean(losses) if losses else 0.0


def np_mining_stats(name, e, y, margin, squared):
    """The miners' logged statistics by loops: (stats, how much active_fraction may differ because a
    hinge within 1e-4 of 0 can fall either side in float32)."""
    n = len(y)
    d = [[np_dist(e[i], e[j], squared) for j in range(n)] for i in range(n)]
    pos = lambda a: [p for p in range(n) if p != a and y[p] == y[a]]  # noqa: E731
    neg = lambda a: [m for m in range(n) if y[m] != y[a]]  # noqa: E731
    mean = lambda v: float(np.mean(v)) if len(v) else 0.0  # noqa: E731
    hinges, stats = [], {}
    if name == "batch_all":
        hinges = [d[a][p] - d[a][m] + margin for a in range(n) for p in pos(a) for m in neg(a)]
        stats["mean_positive_distance"] = mean([d[a][p] for a in range(n) for p in pos(a)])
        stats["mean_negative_distance"] = mean([d[a][m] for a in range(n) for m in neg(a)])
    elif name == "batch_hard":
        valid = [a for a in range(n) if pos(a) and neg(a)]
        hardest_p = [max(d[a][p] for p in pos(a)) for a in valid]
        hardest_n = [min(d[a][m] for m in neg(a)) for a in valid]
        hinges = [hp - hn + margin for hp, hn in zip(hardest_p, hardest_n)]
        stats["mean_positive_distance"], stats["mean_negative_distance"] = mean(hardest_p), mean(hardest_n)
    elif name == "semihard":
        chosen, d_ap, fallback = [], [], []
        for a in range(n):
            if not neg(a):
                continue
            for p in pos(a):
                farther = [d[a][m] for m in neg(a) if d[a][m] > d[a][p]]
                chosen.append(min(farther) if farther else max(d[a][m] for m in neg(a)))
                d_ap.append(d[a][p])
                fallback.append(not farther)
        hinges = [ap - an + margin for ap, an in zip(d_ap, chosen)]
        stats.update(mean_positive_distance=mean(d_ap), mean_negative_distance=mean(chosen),
                     fallback_fraction=mean(fallback))
    else:  # hardest_negative: every positive pair with its anchor's hardest negative
        pairs = [(a, p) for a in range(n) if neg(a) for p in pos(a)]
        hinges = [d[a][p] - min(d[a][m] for m in neg(a)) + margin for a, p in pairs]
        stats["mean_positive_distance"] = mean([d[a][p] for a, p in pairs])
        # per positive pair, as the other two (an anchor with more positives counts more often)
        stats["mean_negative_distance"] = mean([min(d[a][m] for m in neg(a)) for a, p in pairs])
    stats["active_fraction"] = mean([h > 0 for h in hinges])
    slack = sum(abs(h) < 1e-4 for h in hinges) / max(len(hinges), 1)
    return stats, slack


# --------------------------------------------------------------------------------- input drawing

def _embeddings(seed, b, e, scale=1.0):
    return (np.random.default_rng(seed).normal(size=(b, e)) * scale).astype(np.float32)


labelled_batches = st.tuples(
    st.integers(0, 2**31 - 1),        # seed
    st.sampled_from([3, 12]),         # batch size (few shapes: each one is a ~0.1 s compile; B=2 is an edge case)
    st.sampled_from([1, 8]),          # embedding dim
    st.integers(1, 4),                # number of classes drawn from
    st.sampled_from([0.1, 0.5, 1.0]),  # embedding scale (small: many margin violations)
)


def _labelled(params):
    seed, b, e, classes, scale = params
    emb = _embeddings(seed, b, e, scale)
    labels = np.random.default_rng(seed + 1).integers(0, classes, size=b).astype(np.int32)
    return emb, labels


MINERS = {
    "batch_all": (L.batch_all_triplet_loss, L.batch_all_triplet_loss_with_stats, np_batch_all),
    "batch_hard": (L.batch_hard_triplet_loss, L.batch_hard_triplet_loss_with_stats, np_batch_hard),
    "semihard": (L.batch_semihard_triplet_loss, L.batch_semihard_triplet_loss_with_stats,
                 lambda *a: np_semihard(*a)[0]),
    "hardest_negative": (L.hardest_negative_triplet_loss, L.hardest_negative_triplet_loss_with_stats,
                         np_hardest_negative),
}


def _jit(fn):
    # One compile per shape instead of one per primitive per shape: keeps the property tests fast.
    # Eager use is covered by the edge-case tests and test_jit_equals_eager.
    takes_squared = "squared" in inspect.signature(fn).parameters
    return jax.jit(fn, static_argnames="squared" if takes_squared else ())


def _assert_finite_grad(fn, *args):
    g = jax.jit(jax.grad(fn))(*args)  # jitted: much faster than eager here; eager == jit is tested below
    assert np.all(np.isfinite(np.asarray(g))), g


# ------------------------------------------------------------------------------------- distances

@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 7]), st.sampled_from([1, 16]))
def test_pairwise_distances_match_loop(seed, b, e):
    x = _embeddings(seed, b, e)
    for squared in (False, True):
        got = np.asarray(_jit(L.pairwise_distances)(x, squared=squared))
        want = np.array([[np_dist(x[i], x[j], squared) for j in range(b)] for i in range(b)])
        np.testing.assert_allclose(got, want, **TOL)
        assert np.all(np.diag(got) == 0.0)
        np.testing.assert_allclose(np.asarray(_jit(L.euclidean_distance)(x, x[::-1], squared=squared)),
                                   np.diag(want[:, ::-1]), **TOL)


def test_pairwise_gradient_rule_matches_plain_autodiff():
    # pairwise_distances has a hand-written (matmul) derivative; it must agree with autodiff of the
    # plain formula, in reverse and forward mode.
    x = jnp.asarray(_embeddings(12, 6, 5))
    weights = jnp.asarray(_embeddings(13, 6, 6))

    def plain(e):
        return jnp.sum(weights * jnp.sum(jnp.square(e[:, None] - e[None]), -1))

    def ours(e):
        return jnp.sum(weights * L.pairwise_distances(e, squared=True))

    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-5, atol=1e-5)
    tangent = jnp.asarray(_embeddings(14, 6, 5))
    np.testing.assert_allclose(jax.jvp(ours, (x,), (tangent,))[1], jax.jvp(plain, (x,), (tangent,))[1], rtol=1e-5)


def test_distance_gradients_at_zero_are_finite_and_zero():
    x = jnp.ones((4, 3))
    for squared in (False, True):
        g = jax.grad(lambda z: jnp.sum(L.pairwise_distances(z, squared=squared)))(x)
        np.testing.assert_array_equal(np.asarray(g), 0.0)
        g = jax.grad(lambda z: jnp.sum(L.euclidean_distance(z, x, squared=squared)))(x)
        np.testing.assert_array_equal(np.asarray(g), 0.0)


# ---------------------------------------------------------------------------------- contrastive

@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 16]), st.sampled_from([2, 8]), st.sampled_from([0.5, 1.0, 2.0]))
def test_contrastive_matches_loop(seed, b, e, margin):
    rng = np.random.default_rng(seed)
    x1, x2 = _embeddings(seed, b, e, 0.5), _embeddings(seed + 1, b, e, 0.5)
    s = rng.integers(0, 2, size=b)
    want = np_contrastive(x1, x2, s, margin)
    loss = _jit(L.contrastive_loss)
    np.testing.assert_allclose(float(loss(x1, x2, is_similar=s, margin=margin)), want, **TOL)
    # bool and 0/1 labels are the same thing
    np.testing.assert_allclose(float(loss(x1, x2, is_similar=s.astype(bool), margin=margin)), want, **TOL)


def test_contrastive_all_similar_is_mean_squared_distance():
    x1, x2 = _embeddings(0, 10, 5), _embeddings(1, 10, 5)
    want = np.mean(np.sum((x1.astype(np.float64) - x2) ** 2, axis=1))
    for ones in (np.ones(10, np.int32), np.ones(10, bool), np.ones(10, np.float32)):
        np.testing.assert_allclose(float(L.contrastive_loss(x1, x2, is_similar=ones)), want, rtol=1e-5)


def test_contrastive_polarity_and_stats():
    x = np.zeros((2, 3), np.float32)
    far = np.array([[3.0, 0, 0], [0, 0, 0]], np.float32)
    # identical pair labelled "same": no loss; labelled "different": margin² loss
    assert float(L.contrastive_loss(x, x, is_similar=[1, 1])) == 0.0
    np.testing.assert_allclose(float(L.contrastive_loss(x, x, is_similar=[0, 0], margin=2.0)), 4.0)
    # a far pair labelled "different" costs nothing, a far pair labelled "same" costs d² = 9
    loss, stats = L.contrastive_loss_with_stats(far, x, is_similar=[True, False], margin=1.0)
    np.testing.assert_allclose(float(loss), (9.0 + 1.0) / 2)
    np.testing.assert_allclose(float(stats["active_fraction"]), 1.0)
    np.testing.assert_allclose(float(stats["mean_positive_distance"]), 3.0)
    np.testing.assert_allclose(float(stats["mean_negative_distance"]), 0.0)


# -------------------------------------------------------------------------------------- triplet

@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 16]), st.sampled_from([2, 8]), st.booleans(),
       st.sampled_from([0.2, 1.0]))
def test_triplet_matches_loop(seed, b, e, squared, margin):
    a, p, n = (_embeddings(seed + i, b, e, 0.5) for i in range(3))
    want = np_triplet(a, p, n, margin, squared)
    loss, stats = _jit(L.triplet_loss_with_stats)(a, p, n, margin=margin, squared=squared)
    np.testing.assert_allclose(float(loss), want, **TOL)
    np.testing.assert_allclose(float(_jit(L.triplet_loss)(a, p, n, margin=margin, squared=squared)), want, **TOL)
    active = np.mean([np_dist(ai, pi, squared) - np_dist(ai, ni, squared) + margin > 0 for ai, pi, ni in zip(a, p, n)])
    np.testing.assert_allclose(float(stats["active_fraction"]), active, atol=1e-6)


def test_triplet_default_is_squared():
    a, p, n = (_embeddings(i, 6, 4) for i in range(3))
    np.testing.assert_allclose(float(L.triplet_loss(a, p, n)), np_triplet(a, p, n, 0.2, True), **TOL)


# ----------------------------------------------------------------------------------- mining

@pytest.mark.parametrize("name", list(MINERS))
@SETTINGS
@given(params=labelled_batches, squared=st.booleans(), margin=st.sampled_from([0.2, 1.0]))
def test_mining_matches_loop(name, params, squared, margin):
    emb, labels = _labelled(params)
    _, fn_stats, ref = MINERS[name]
    want = ref(emb, labels, margin, squared)
    # (the plain `fn` is `fn_stats(...)[0]`; it is checked in the default-distance and edge-case tests)
    loss, stats = _jit(fn_stats)(emb, labels, margin=margin, squared=squared)
    np.testing.assert_allclose(float(loss), want, **TOL)
    # The statistics the training log and metrics.jsonl show, against the loops (only their range
    # was checked: a batch_hard active fraction over every anchor, or swapped mean distances, passed).
    want_stats, slack = np_mining_stats(name, emb, labels, margin, squared)
    assert set(want_stats) <= set(stats), name
    for key, value in want_stats.items():
        tol = dict(rtol=0, atol=slack + 1e-6) if key == "active_fraction" else TOL
        np.testing.assert_allclose(float(stats[key]), value, err_msg=key, **tol)


def test_mining_default_distance_is_not_squared():
    emb, labels = _embeddings(3, 8, 4), np.array([0, 0, 1, 1, 2, 2, 3, 3])
    for name, (fn, _, ref) in MINERS.items():
        np.testing.assert_allclose(float(jax.jit(fn)(emb, labels)), ref(emb, labels, 0.2, False), err_msg=name, **TOL)


def test_batch_all_active_fraction():
    emb, labels = _embeddings(5, 9, 3, 0.3), np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    _, stats = L.batch_all_triplet_loss_with_stats(emb, labels, margin=0.5)
    valid = active = 0
    for a, p, n in itertools.product(range(9), repeat=3):
        if a != p and labels[a] == labels[p] and labels[a] != labels[n]:
            valid += 1
            active += np_dist(emb[a], emb[p], False) - np_dist(emb[a], emb[n], False) + 0.5 > 0
    assert 0 < active < valid  # the check means something
    np.testing.assert_allclose(float(stats["active_fraction"]), active / valid, atol=1e-6)


def test_semihard_fallback_path_is_hit():
    # 1-D: anchor 0 at 0, its positive at 10, negatives at 1 and 2 are both nearer than the positive,
    # so pair (0, 1) must fall back to the FARTHEST negative (2): loss = 10 − 2 + m.
    emb = np.array([[0.0], [10.0], [1.0], [2.0]], np.float32)
    labels = np.array([0, 0, 1, 1])
    want, fallbacks = np_semihard(emb, labels, 0.5, False)
    assert fallbacks > 0
    loss, stats = L.batch_semihard_triplet_loss_with_stats(emb, labels, margin=0.5)
    np.testing.assert_allclose(float(loss), want, **TOL)
    # pairs: (0,1) fallback n=2 -> 8.5; (1,0) d_ap=10, negatives at 9, 8 -> fallback 9 -> 1.5;
    # (2,3) d_ap=1, negatives at 2, 8 -> 2 -> 0; (3,2) d_ap=1, negatives at 2, 8 -> 2 -> 0.
    np.testing.assert_allclose(want, (8.5 + 1.5 + 0 + 0) / 4)
    np.testing.assert_allclose(float(stats["fallback_fraction"]), fallbacks / 4)
    np.testing.assert_allclose(float(stats["active_fraction"]), 0.5)


def test_semihard_prefers_nearest_farther_negative():
    # 1-D points, margin 0.5; per positive pair (a, p): D(a,p), chosen negative distance -> loss
    #   (0,1): 1.0, nearest farther of {0.5, 1.2, 3} is 1.2 -> 0.3    (1,0): 1.0, of {0.5, 0.2, 2} -> 2 -> 0
    #   (2,3): 0.7, none of {0.5, 0.5} farther: max 0.5 -> 0.7       (2,4): 2.5, fallback 0.5 -> 2.5
    #   (3,2): 0.7, of {1.2, 0.2} -> 1.2 -> 0                          (3,4): 1.8, fallback 1.2 -> 1.1
    #   (4,2): 2.5, of {3, 2} -> 3 -> 0                                (4,3): 1.8, of {3, 2} -> 2 -> 0.3
    emb = np.array([[0.0], [1.0], [0.5], [1.2], [3.0]], np.float32)
    labels = np.array([0, 0, 1, 1, 1])
    want = (0.3 + 0 + 0.7 + 2.5 + 0 + 1.1 + 0 + 0.3) / 8
    np.testing.assert_allclose(np_semihard(emb, labels, 0.5, False)[0], want)
    loss, stats = L.batch_semihard_triplet_loss_with_stats(emb, labels, margin=0.5)
    np.testing.assert_allclose(float(loss), want, **TOL)
    np.testing.assert_allclose(float(stats["fallback_fraction"]), 3 / 8)
    np.testing.assert_allclose(float(stats["active_fraction"]), 5 / 8)


# ----------------------------------------------------------------------------------- edge cases

EDGE_BATCHES = {
    "no_positive_pair": (_embeddings(0, 5, 4), np.arange(5)),
    "one_class": (_embeddings(1, 5, 4), np.zeros(5, np.int64)),
    "identical_embeddings": (np.ones((6, 4), np.float32), np.array([0, 0, 1, 1, 2, 2])),
    "all_zero_embeddings": (np.zeros((4, 3), np.float32), np.array([0, 0, 1, 1])),
    "b2_same": (_embeddings(2, 2, 4), np.array([7, 7])),
    "b2_different": (_embeddings(3, 2, 4), np.array([0, 1])),
    "duplicated_rows": (np.repeat(_embeddings(4, 3, 4), 2, axis=0), np.array([0, 0, 1, 1, 2, 2])),
}


@pytest.mark.parametrize("batch", list(EDGE_BATCHES))
@pytest.mark.parametrize("name", list(MINERS))
def test_mining_edge_cases_are_finite(name, batch):
    emb, labels = EDGE_BATCHES[batch]
    fn, fn_stats, ref = MINERS[name]
    for squared in (False, True):
        loss, stats = _jit(fn_stats)(emb, labels, margin=0.2, squared=squared)
        np.testing.assert_allclose(float(loss), ref(emb, labels, 0.2, squared), **TOL)
        assert all(np.isfinite(float(v)) for v in stats.values()), stats
    # the gradient hazard is the sqrt at 0, i.e. squared=False
    _assert_finite_grad(lambda e: fn(e, labels, margin=0.2), jnp.asarray(emb))
    if batch in ("no_positive_pair", "one_class", "b2_same", "b2_different"):
        assert float(loss) == 0.0  # nothing to mine


def test_pair_and_triplet_losses_finite_on_identical_inputs():
    x = jnp.ones((3, 4))
    grads = jax.jit(jax.grad(lambda a, b: L.contrastive_loss(a, b, is_similar=jnp.array([1, 0, 1])), argnums=(0, 1)))
    assert all(np.all(np.isfinite(g)) for g in grads(x, x))
    for squared in (False, True):
        f = jax.jit(lambda a, p, n, squared=squared: L.triplet_loss(a, p, n, squared=squared))
        np.testing.assert_allclose(float(f(x, x, x)), 0.2)
        assert all(np.all(np.isfinite(g)) for g in jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, x, x))
    # zero gradient where the distance is exactly 0 (the similar term has no sqrt; the margin term's
    # gradient at d = 0 is the safe-sqrt's 0)
    g = jax.grad(lambda a: L.contrastive_loss(a, x, is_similar=jnp.array([0, 0, 0])))(x)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# ----------------------------------------------------------------------------------- jit, dtypes

def test_jit_equals_eager():
    emb, labels = _embeddings(7, 12, 6, 0.5), np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    for name, (_, fn_stats, _) in MINERS.items():
        for squared in (False, True):
            eager = fn_stats(emb, labels, margin=0.3, squared=squared)
            jitted = jax.jit(fn_stats, static_argnames="squared")(emb, labels, margin=0.3, squared=squared)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), eager, jitted)
    x1, x2, x3 = (_embeddings(i, 8, 5) for i in range(3))
    s = np.array([1, 0] * 4)
    for fn, args in ((L.contrastive_loss_with_stats, (x1, x2, s)),
                     (L.triplet_loss_with_stats, (x1, x2, x3)),
                     (L.verification_loss_with_stats, (x1[:, 0], s))):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fn(*args), jax.jit(fn)(*args))


def test_bfloat16_inputs_compute_in_float32():
    emb32, labels = _embeddings(8, 8, 4), np.array([0, 0, 1, 1, 2, 2, 3, 3])
    emb16 = jnp.asarray(emb32, jnp.bfloat16)
    emb_rounded = np.asarray(emb16.astype(jnp.float32))  # same values the bf16 path sees
    for name, (fn, _, ref) in MINERS.items():
        out = jax.jit(fn)(emb16, labels)
        assert out.dtype == jnp.float32, name
        np.testing.assert_allclose(float(out), ref(emb_rounded, labels, 0.2, False), err_msg=name, **TOL)
        g = jax.jit(jax.grad(lambda e, fn=fn: fn(e, labels)))(emb16)
        assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
    a, p, n = (jnp.asarray(_embeddings(i, 4, 4), jnp.bfloat16) for i in range(3))
    assert L.triplet_loss(a, p, n).dtype == jnp.float32
    assert L.contrastive_loss(a, p, is_similar=[1, 0, 1, 0]).dtype == jnp.float32
    assert L.verification_logits(a, p, jnp.ones(4, jnp.bfloat16), 0.0).dtype == jnp.float32


# ----------------------------------------------------------------------------------- verification

def test_verification_logits_and_loss():
    rng = np.random.default_rng(0)
    h1, h2 = _embeddings(0, 6, 5), _embeddings(1, 6, 5)
    w, b = rng.normal(size=(5, 1)).astype(np.float32), np.array([0.3], np.float32)
    want_logits = np.array([sum(w[k, 0] * abs(h1[i, k] - h2[i, k]) for k in range(5)) + 0.3 for i in range(6)])
    logits = L.verification_logits(h1, h2, w, b)
    np.testing.assert_allclose(np.asarray(logits), want_logits, **TOL)
    np.testing.assert_allclose(np.asarray(L.verification_logits(h1, h2, w[:, 0], 0.3)), want_logits, **TOL)

    s = np.array([1, 0, 1, 1, 0, 0])
    p = 1 / (1 + np.exp(-want_logits))
    want = np.mean([-(si * np.log(pi) + (1 - si) * np.log(1 - pi)) for si, pi in zip(s, p)])
    np.testing.assert_allclose(np.asarray(L.same_probability(logits)), p, **TOL)
    for labels in (s, s.astype(bool)):
        loss, stats = L.verification_loss_with_stats(logits, is_similar=labels)
        np.testing.assert_allclose(float(loss), want, **TOL)
        np.testing.assert_allclose(float(L.verification_loss(logits, is_similar=labels)), want, **TOL)
        acc = np.mean((want_logits > 0) == (s == 1))
        np.testing.assert_allclose(float(stats["accuracy"]), acc)
        np.testing.assert_allclose(float(stats["active_fraction"]), 1 - acc, atol=1e-6)


def test_verification_extreme_logits_and_shape_check():
    logits = jnp.array([100.0, -100.0, 0.0])
    loss = L.verification_loss(logits, is_similar=jnp.array([0, 1, 1]))
    np.testing.assert_allclose(float(loss), (100 + 100 + np.log(2)) / 3, rtol=1e-5)
    _assert_finite_grad(lambda z: L.verification_loss(z, is_similar=jnp.array([0, 1, 1])), logits)
    # identical twins: |h1 − h2| = 0, gradient of the head must stay finite
    h = jnp.ones((2, 3))
    _assert_finite_grad(lambda a: L.verification_loss(L.verification_logits(a, h, jnp.ones(3), 0.0),
                                                      is_similar=jnp.array([1, 0])), h)
    with pytest.raises(ValueError):
        L.verification_loss(jnp.zeros((3, 1)), is_similar=jnp.zeros(3))


# ----------------------------------------------------------------------------------- gradients

def _assert_grad_matches_finite_differences(f, emb, grad, eps=1e-3):
    """`grad` (of scalar `f` at `emb` [N, E]) against central differences, entry by entry."""
    numeric = np.zeros_like(grad)
    for i, j in itertools.product(*map(range, emb.shape)):
        step = jnp.zeros_like(emb).at[i, j].set(eps)
        numeric[i, j] = (float(f(emb + step)) - float(f(emb - step))) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("name", ["contrastive", "triplet", "batch_all", "batch_hard", "semihard", "hardest_negative"])
def test_gradients_match_finite_differences(name):
    # Well-spread points, so no hinge or mining choice flips within the finite-difference step.
    emb = jnp.asarray(_embeddings(11, 8, 3, 2.0))
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    s = jnp.array([1, 0, 1, 0])
    fns = {
        "contrastive": lambda e: L.contrastive_loss(e[:4], e[4:], is_similar=s, margin=3.0),
        "triplet": lambda e: L.triplet_loss(e[:2], e[2:4], e[4:6], margin=3.0, squared=False),
    }
    for miner, (fn, _, _) in MINERS.items():
        fns[miner] = lambda e, fn=fn: fn(e, labels, margin=1.0)
    f = jax.jit(fns[name])
    grad = np.asarray(jax.grad(f)(emb), np.float64)
    assert np.any(grad != 0)
    _assert_grad_matches_finite_differences(f, emb, grad)


# ----------------------------------------------------------------------------------- ArcFace

def np_arcface(emb, index, centres, scale, margin):
    """Deng et al. 2019, written out per image in float64: softmax cross-entropy of s·cos θ_j, with
    s·cos(θ_y + m) at the own class while θ_y + m ≤ π (else s·(cos θ_y − m·sin m))."""
    e = np.asarray(emb, np.float64)
    w = np.asarray(centres, np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    out, active = [], []
    for x, y in zip(e, index):
        cos = np.clip(w @ x, -1, 1)
        theta = np.arccos(cos[y])
        z = scale * cos.copy()
        z[y] = scale * (np.cos(theta + margin) if theta + margin < np.pi else cos[y] - margin * np.sin(margin))
        out.append(np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[y])
        active.append(z[y] <= np.max(np.delete(z, y)))
    return float(np.mean(out)), float(np.mean(active))


@pytest.mark.parametrize("scale, margin", [(30.0, 0.5), (16.0, 0.2), (10.0, 0.0)])
def test_arcface_matches_the_math(scale, margin):
    rng = np.random.default_rng(3)
    emb, centres = rng.normal(size=(12, 6)).astype(np.float32), rng.normal(size=(5, 6)).astype(np.float32)
    index = rng.integers(0, 5, size=12)
    emb[0] = -centres[index[0]]  # θ = π: the continuation branch
    want, want_active = np_arcface(emb, index, centres, scale, margin)
    loss, stats = jax.jit(L.arcface_loss_with_stats)(emb, index, centres, scale, margin)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    np.testing.assert_allclose(float(stats["active_fraction"]), want_active)
    nearest = np.argmax((emb / np.linalg.norm(emb, axis=1, keepdims=True)) @
                        (centres / np.linalg.norm(centres, axis=1, keepdims=True)).T, axis=1)
    np.testing.assert_allclose(float(stats["accuracy"]), np.mean(nearest == index))
    # Only directions count: rescaling the embeddings or the centres changes nothing.
    np.testing.assert_allclose(float(L.arcface_loss(3.0 * emb, index, 0.1 * centres, scale, margin)), want, rtol=1e-4)
    if margin == 0.0:  # m = 0 is plain softmax cross-entropy over s·cos (the normalised softmax)
        logits = np.asarray(L.arcface_logits(emb, index, centres, scale, 0.0))
        e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        np.testing.assert_allclose(logits, scale * e @ (centres / np.linalg.norm(centres, axis=1, keepdims=True)).T,
                                   rtol=1e-5, atol=1e-5)


def test_arcface_margin_makes_separated_classes_cost_and_gradients_stay_finite():
    centres = np.eye(4, dtype=np.float32)
    index = np.array([0, 1, 2, 3])
    # Every embedding exactly on its own centre (θ = 0, where sqrt(1 − cos²) has an infinite slope).
    loss0, stats0 = L.arcface_loss_with_stats(centres, index, centres, 4.0, 0.0)
    loss5, stats5 = L.arcface_loss_with_stats(centres, index, centres, 4.0, 0.5)
    np.testing.assert_allclose(float(loss0), np.log(1 + 3 * np.exp(-4.0)), rtol=1e-4)
    # (sin θ is floored at sqrt(1e-7) for a finite gradient at θ = 0: 3e-4 rad, hence rtol 1e-3)
    np.testing.assert_allclose(float(loss5), np.log(1 + 3 * np.exp(-4.0 * np.cos(0.5))), rtol=1e-3)
    assert float(stats0["active_fraction"]) == float(stats5["active_fraction"]) == 0.0
    assert float(stats5["accuracy"]) == 1.0
    g = jax.grad(lambda e, w: L.arcface_loss(e, index, w, 30.0, 0.5), argnums=(0, 1))(jnp.asarray(centres),
                                                                                     jnp.asarray(centres))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in g)
    # Between two centres at 90°, an embedding at 40° from its own class meets a 0.5 rad margin
    # (40° + 28.6° < 50°) and one at 44° does not: only the second is "active".
    def at(deg):
        r = np.deg2rad(deg)
        return np.array([[np.cos(r), np.sin(r)]], np.float32)
    two = np.eye(2, dtype=np.float32)
    assert float(L.arcface_loss_with_stats(at(20), [0], two, 30.0, 0.5)[1]["active_fraction"]) == 0.0
    assert float(L.arcface_loss_with_stats(at(44), [0], two, 30.0, 0.5)[1]["active_fraction"]) == 1.0
    # The margin is a penalty: for the same embeddings the loss grows with m.
    rng = np.random.default_rng(0)
    emb, idx = rng.normal(size=(16, 4)).astype(np.float32), rng.integers(0, 4, 16)
    values = [float(L.arcface_loss(emb, idx, centres, 30.0, m)) for m in (0.0, 0.2, 0.5)]
    assert values[0] < values[1] < values[2]


def test_arcface_gradients_match_finite_differences():
    rng = np.random.default_rng(5)
    emb = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    centres = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)
    index = np.array([0, 1, 2, 0, 1, 2])
    f = jax.jit(lambda e: L.arcface_loss(e, index, centres, 4.0, 0.3))
    grad = np.asarray(jax.grad(f)(emb), np.float64)
    _assert_grad_matches_finite_differences(f, emb, grad)


# ----- prototypical (Snell et al. 2017) ---------------------------------------------------------------

def np_prototypical(emb, labels):
    """Snell et al.'s loss written out image by image: every image a query against the class means of
    the batch, its own class's mean over its other images. (loss, misclassified share)."""
    emb, labels = np.asarray(emb, np.float64), np.asarray(labels)
    classes = list(dict.fromkeys(labels.tolist()))  # in order of first appearance
    losses, wrong = [], []
    for i, (e, y) in enumerate(zip(emb, labels)):
        others_of_y = [j for j in range(len(labels)) if labels[j] == y and j != i]
        if not others_of_y or len(classes) < 2:
            continue
        d = {}
        for c in classes:
            members = others_of_y if c == y else [j for j in range(len(labels)) if labels[j] == c]
            d[c] = float(np.sum((e - emb[members].mean(axis=0)) ** 2))
        logits = np.array([-d[c] for c in classes])
        own = logits[classes.index(y)]
        losses.append(np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - own)
        wrong.append(own <= max(v for c, v in zip(classes, logits) if c != y))
    return (float(np.mean(losses)) if losses else 0.0), (float(np.mean(wrong)) if wrong else 0.0)


@pytest.mark.parametrize("seed, p, k", [(0, 4, 2), (1, 3, 4), (2, 8, 3)])
def test_prototypical_matches_the_math(seed, p, k):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(rng.choice(100, p, replace=False), k))  # classes interleaved
    emb = rng.normal(size=(p * k, 5)).astype(np.float32)
    want, want_wrong = np_prototypical(emb, labels)
    loss, stats = jax.jit(L.prototypical_loss_with_stats)(emb, labels)
    np.testing.assert_allclose(float(loss), want, **TOL)
    np.testing.assert_allclose(float(stats["active_fraction"]), want_wrong, **TOL)
    assert float(L.prototypical_loss(emb, labels)) == pytest.approx(float(loss))


def test_prototypical_uses_the_leave_one_out_mean_and_ignores_unusable_images():
    # Class 0 at 0 and 2 (the image at 0 sees its class's prototype at 2, not at their mean 1), class 1
    # at 4 and 5, and a lone image of class 2 at 3: not a query (no other image of its class), but a
    # prototype for the others.
    emb = np.array([[0.0], [2.0], [4.0], [5.0], [3.0]], np.float32)
    labels = np.array([0, 0, 1, 1, 2])
    lse = lambda *d2: np.log(np.sum(np.exp(-np.array(d2))))  # noqa: E731
    by_hand = [lse(4, 20.25, 9) + 4, lse(4, 6.25, 1) + 4,   # class 0: own d² 4; class 1 at 4.5; class 2 at 3
               lse(1, 9, 1) + 1, lse(1, 16, 4) + 1]         # class 1: own d² 1; class 0 at 1; class 2 at 3
    assert np_prototypical(emb, labels)[0] == pytest.approx(np.mean(by_hand), rel=1e-9)
    np.testing.assert_allclose(float(L.prototypical_loss(emb, labels)), np.mean(by_hand), **TOL)
    # Misclassified: the image at 2 (class 2's prototype d² 1 < own 4) and the one at 4 (a tie, 1 = 1).
    assert float(L.prototypical_loss_with_stats(emb, labels)[1]["active_fraction"]) == pytest.approx(2 / 4)


@pytest.mark.parametrize("batch", list(EDGE_BATCHES))
def test_prototypical_edge_cases_are_finite(batch):
    emb, labels = EDGE_BATCHES[batch]
    loss, stats = jax.jit(L.prototypical_loss_with_stats)(emb, labels)
    np.testing.assert_allclose(float(loss), np_prototypical(emb, labels)[0], **TOL)
    assert all(np.isfinite(float(v)) for v in stats.values()), stats
    _assert_finite_grad(lambda e: L.prototypical_loss(e, labels), jnp.asarray(emb))
    if batch in ("no_positive_pair", "one_class", "b2_same", "b2_different"):
        assert float(loss) == 0.0  # no image has both another of its class and another class


def test_prototypical_gradients_match_finite_differences():
    rng = np.random.default_rng(7)
    emb = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    f = jax.jit(lambda e: L.prototypical_loss(e, labels))
    grad = np.asarray(jax.grad(f)(emb), np.float64)
    _assert_grad_matches_finite_differences(f, emb, grad)


# ----- multi-similarity (Wang et al. 2019) -------------------------------------------------------------

def np_multi_similarity_terms(emb, labels, epsilon=0.1, alpha=2.0, beta=50.0, lam=0.5):
    """Wang et al.'s loss written out anchor by anchor in float64, as the authors' code does it (mine
    against the unmined sets; an anchor with nothing kept costs 0). {anchor: its term} over the
    anchors with a positive and a negative, and the unit-vector distances of all positive and all
    negative pairs."""
    e = np.asarray(emb, np.float64)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    u = np.where(norms > 0, e / np.maximum(norms, 1e-300), 0.0)
    sim = u @ u.T
    labels = np.asarray(labels)
    n = len(labels)
    terms, d_pos, d_neg = {}, [], []
    for i in range(n):
        pos = [sim[i, j] for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [sim[i, j] for j in range(n) if labels[j] != labels[i]]
        d_pos += [np.sqrt(max(2 - 2 * s, 0.0)) for s in pos]
        d_neg += [np.sqrt(max(2 - 2 * s, 0.0)) for s in neg]
        if not pos or not neg:
            continue
        kept_neg = [s for s in neg if s > min(pos) - epsilon]
        kept_pos = [s for s in pos if s < max(neg) + epsilon]
        terms[i] = 0.0 if not kept_neg or not kept_pos else (
            np.log1p(sum(np.exp(-alpha * (s - lam)) for s in kept_pos)) / alpha
            + np.log1p(sum(np.exp(beta * (s - lam)) for s in kept_neg)) / beta)
    return terms, d_pos, d_neg


def np_multi_similarity(emb, labels, **hyper):
    """(loss: the mean term over the anchors with a positive and a negative — the authors' code
    divides by the batch size, the same on P x K batches, where every image is such an anchor; the
    share of them with a mined pair; mean positive / negative unit-vector distance)."""
    terms, d_pos, d_neg = np_multi_similarity_terms(emb, labels, **hyper)
    mean = lambda v: float(np.mean(v)) if len(v) else 0.0  # noqa: E731
    return mean(list(terms.values())), mean([t > 0 for t in terms.values()]), mean(d_pos), mean(d_neg)


@pytest.mark.parametrize("seed, p, k, hyper", [
    (0, 4, 2, {}), (1, 3, 4, {}), (2, 8, 3, {}),
    (3, 5, 4, dict(epsilon=0.0, alpha=1.0, beta=10.0, lam=0.0)),
    (4, 6, 2, dict(epsilon=0.5, alpha=4.0, beta=40.0, lam=0.7)),
])
def test_multi_similarity_matches_the_math(seed, p, k, hyper):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(rng.choice(100, p, replace=False), k))  # classes interleaved
    emb = rng.normal(size=(p * k, 5)).astype(np.float32)
    want, want_active, want_pos, want_neg = np_multi_similarity(emb, labels, **hyper)
    loss, stats = jax.jit(L.multi_similarity_loss_with_stats)(emb, labels, **hyper)
    np.testing.assert_allclose(float(loss), want, **TOL)
    np.testing.assert_allclose(float(stats["active_fraction"]), want_active, atol=1e-6)
    np.testing.assert_allclose(float(stats["mean_positive_distance"]), want_pos, **TOL)
    np.testing.assert_allclose(float(stats["mean_negative_distance"]), want_neg, **TOL)
    assert float(L.multi_similarity_loss(emb, labels, **hyper)) == pytest.approx(float(loss), rel=1e-5)
    # Only directions count: rescaling each embedding changes nothing.
    scales = rng.uniform(0.1, 10.0, size=(p * k, 1)).astype(np.float32)
    np.testing.assert_allclose(float(L.multi_similarity_loss(emb * scales, labels, **hyper)), want, **TOL)


def test_multi_similarity_mining_by_hand():
    # Unit vectors in 2-D at angles (degrees). Anchor 0 (class 0, at 0°) has positives at 10° and 80°
    # and negatives at 30° and 100°; S is the cosine of the angle between two of them.
    deg = np.array([0.0, 10.0, 80.0, 30.0, 100.0])
    emb = np.stack([np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))], axis=1).astype(np.float32)
    labels = np.array([0, 0, 0, 1, 1])
    c = lambda a: np.cos(np.deg2rad(a))  # noqa: E731
    # Anchor 0: its least similar positive has S = cos 80° = 0.174, so the negative at 30° (0.866) is kept
    # and the one at 100° (−0.174, below 0.174 − 0.1) is not; its most similar negative has S = 0.866, so
    # the positive at 80° (0.174 < 0.966) is kept and the one at 10° (0.985) is not.
    anchor0 = np.log1p(np.exp(-2 * (c(80) - 0.5))) / 2 + np.log1p(np.exp(50 * (c(30) - 0.5))) / 50
    terms = np_multi_similarity_terms(emb, labels)[0]
    assert terms[0] == pytest.approx(anchor0, rel=1e-6)  # (the points are float32)
    np.testing.assert_allclose(float(L.multi_similarity_loss(emb, labels)), np.mean(list(terms.values())), **TOL)
    # Keeping every pair (epsilon 10) is another, larger number: the mining matters.
    everything = np_multi_similarity(emb, labels, epsilon=10.0)[0]
    np.testing.assert_allclose(float(L.multi_similarity_loss(emb, labels, epsilon=10.0)), everything, **TOL)
    assert everything > np.mean(list(terms.values()))
    # Classes further apart than epsilon: nothing is mined, the loss and the active share are 0.
    apart = np.array([[1.0, 0.0], [0.99, 0.14], [-1.0, 0.0], [-0.99, -0.14]], np.float32)
    loss, stats = L.multi_similarity_loss_with_stats(apart, np.array([0, 0, 1, 1]))
    assert float(loss) == 0.0 and float(stats["active_fraction"]) == 0.0


@pytest.mark.parametrize("batch", list(EDGE_BATCHES))
def test_multi_similarity_edge_cases_are_finite(batch):
    emb, labels = EDGE_BATCHES[batch]
    loss, stats = jax.jit(L.multi_similarity_loss_with_stats)(emb, labels)
    np.testing.assert_allclose(float(loss), np_multi_similarity(emb, labels)[0], **TOL)
    assert all(np.isfinite(float(v)) for v in stats.values()), stats
    _assert_finite_grad(lambda e: L.multi_similarity_loss(e, labels), jnp.asarray(emb))
    if batch in ("no_positive_pair", "one_class", "b2_same", "b2_different"):
        assert float(loss) == 0.0  # no anchor has both a positive and a negative


def test_multi_similarity_gradients_match_finite_differences():
    rng = np.random.default_rng(8)
    emb = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    # epsilon 10: every pair is kept, so no mining choice flips within the finite-difference step;
    # beta 10 keeps the negative term's curvature within the central difference's reach.
    f = jax.jit(lambda e: L.multi_similarity_loss(e, labels, epsilon=10.0, beta=10.0))
    grad = np.asarray(jax.grad(f)(emb), np.float64)
    assert np.any(grad != 0)
    _assert_grad_matches_finite_differences(f, emb, grad)
    # and with the paper's mining on, away from any mining boundary
    g = jax.jit(lambda e: L.multi_similarity_loss(e, labels))
    _assert_grad_matches_finite_differences(g, emb, np.asarray(jax.grad(g)(emb), np.float64))


def test_multi_similarity_bfloat16_and_jit_equals_eager():
    emb, labels = _embeddings(9, 8, 4), np.array([0, 0, 1, 1, 2, 2, 3, 3])
    out = jax.jit(L.multi_similarity_loss)(jnp.asarray(emb, jnp.bfloat16), labels)
    assert out.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(emb, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(float(out), np_multi_similarity(rounded, labels)[0], **TOL)
    eager = L.multi_similarity_loss_with_stats(emb, labels)
    jitted = jax.jit(L.multi_similarity_loss_with_stats)(emb, labels)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), eager, jitted)


# ----- relational distillation (RKD-D) ---------------------------------------------------------------

def _rkd_loop(student, teacher, delta=1.0):
    """Park et al.'s RKD-D written out pair by pair."""
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    n = len(student)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    ds = {p: np.linalg.norm(student[p[0]] - student[p[1]]) for p in pairs}
    dt = {p: np.linalg.norm(teacher[p[0]] - teacher[p[1]]) for p in pairs}
    mu_s, mu_t = np.mean(list(ds.values())), np.mean(list(dt.values()))
    total = 0.0
    for p in pairs:
        e = abs(ds[p] / mu_s - dt[p] / mu_t)
        total += 0.5 * e * e if e <= delta else delta * (e - 0.5 * delta)
    return total / len(pairs)


@pytest.mark.parametrize("seed, delta", [(0, 1.0), (1, 0.1), (2, 1.0)])
def test_relational_distance_loss_matches_loop(seed, delta):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(7, 3)).astype(np.float32)
    teacher = rng.normal(size=(7, 10)).astype(np.float32) * 5.0  # another dimension and scale
    got = float(L.relational_distance_loss(student, teacher, delta))
    np.testing.assert_allclose(got, _rkd_loop(student, teacher, delta), rtol=1e-5)
    assert got > 0


def test_relational_distance_loss_is_zero_for_any_scaled_or_stacked_copy_of_the_teacher():
    """Only relative distances count: a student at another scale, or a teacher made of several
    copies of the student (an ensemble of identical models), costs nothing."""
    rng = np.random.default_rng(3)
    student = rng.normal(size=(8, 4)).astype(np.float32)
    for teacher in (3.0 * student, np.concatenate([student, student, student], axis=1)):
        assert float(L.relational_distance_loss(student, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_relational_distance_loss_gradients_are_finite_and_never_reach_the_teacher():
    rng = np.random.default_rng(4)
    student = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32).at[1].set(0.0).at[2].set(0.0)  # a d = 0 pair
    teacher = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    g_student, g_teacher = jax.grad(L.relational_distance_loss, argnums=(0, 1))(student, teacher)
    assert np.all(np.isfinite(g_student)) and np.any(np.asarray(g_student) != 0)
    assert np.all(np.asarray(g_teacher) == 0)
    f = jax.jit(lambda s: L.relational_distance_loss(s, teacher))
    x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    _assert_grad_matches_finite_differences(f, x, np.asarray(jax.grad(f)(x), np.float64))


# ----- shapes a student passes by mistake (the Python-API review of 2026-12-05) --------------------

def test_a_label_column_or_an_empty_batch_is_a_value_error_not_a_broadcast_loss():
    # labels[:, None] (Keras and PyTorch pipelines hand labels as [B, 1]) broadcast against [B] into a
    # [B, B] loss: contrastive gave 3.454 for 2.131, batch-hard 2.113 for 0.499, with no error.
    rng = np.random.default_rng(0)
    x1, x2 = (jnp.asarray(rng.normal(size=(8, 4)), jnp.float32) for _ in range(2))
    s = jnp.asarray(rng.integers(0, 2, 8))
    labels = jnp.asarray([0, 0, 1, 1, 2, 2, 3, 3])
    with pytest.raises(ValueError, match=r"is_similar \(8, 1\) must have shape \(8,\)"):
        L.contrastive_loss(x1, x2, s[:, None])
    with pytest.raises(ValueError, match="is_similar"):
        L.contrastive_loss(x1, x2, s[:1])  # one label for the whole batch broadcast too
    for loss in (L.batch_all_triplet_loss, L.batch_hard_triplet_loss, L.batch_semihard_triplet_loss,
                 L.hardest_negative_triplet_loss, L.prototypical_loss, L.multi_similarity_loss):
        with pytest.raises(ValueError, match=r"labels \(8, 1\) must have shape \(8,\)"):
            loss(x1, labels[:, None])
        with pytest.raises(ValueError, match="empty"):
            loss(x1[:0], labels[:0])
        assert np.isfinite(float(jax.jit(loss)(x1, labels)))  # the checks are on shapes: jit is fine
    with pytest.raises(ValueError, match="anchor"):
        L.triplet_loss(x1, x2, x2[:, :3])
    for empty in (lambda: L.contrastive_loss(x1[:0], x2[:0], s[:0]), lambda: L.triplet_loss(x1[:0], x1[:0], x1[:0]),
                  lambda: L.verification_loss(jnp.zeros(0), jnp.zeros(0))):
        with pytest.raises(ValueError, match="empty"):
            empty()  # they returned NaN though the module promises "never NaN"
    with pytest.raises(ValueError, match="same B"):
        L.relational_distance_loss(x1, x2[:5])


def test_arcface_class_index_outside_the_centres_is_a_value_error_eagerly():
    # Passing dataset label ids instead of class_index: index C gave a NaN loss, −1 a finite but wrong
    # one (the gather wrapped round; the margin's mask never matched).
    rng = np.random.default_rng(1)
    emb = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    centres = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)
    for bad in ([0, 1, 2, 3], [0, 1, 2, -1]):
        with pytest.raises(ValueError, match=r"class_index must be integers in \[0, 3\)"):
            L.arcface_loss(emb, np.array(bad), centres)
    with pytest.raises(ValueError, match="centres"):
        L.arcface_loss(emb, np.array([0, 1, 2, 0]), centres[:, :2])
    good = np.array([0, 1, 2, 0])
    assert float(L.arcface_loss(emb, good, centres)) == pytest.approx(float(jax.jit(L.arcface_loss)(emb, good, centres)), rel=1e-5)


def test_is_similar_must_be_zero_or_one():
    """The API audit of stop 45: `is_similar` = 2 or -1 weighted the terms (a contrastive loss of
    -12.4, a verification loss of 0.616 for 1.116); traced values (under jit) cannot be checked."""
    x1 = jnp.array([[0.0, 0.0], [3.0, 4.0]])
    x2 = jnp.zeros((2, 2))
    assert float(L.contrastive_loss(x1, x2, jnp.array([1, 0]))) == pytest.approx(0.0)
    for bad in ([2, 0], [-1, 0]):
        with pytest.raises(ValueError, match="contrastive_loss: is_similar must be bool or 0/1"):
            L.contrastive_loss(x1, x2, np.array(bad))
    with pytest.raises(ValueError, match="verification_loss: is_similar must be bool or 0/1"):
        L.verification_loss(jnp.zeros(4), np.array([2, 0, 0, 1]))
    assert np.isfinite(float(jax.jit(L.contrastive_loss)(x1, x2, jnp.array([True, False]))))


# ------------------------------------------------------------------ the mutation review of 2026-12-06
# Each test below failed on a mutant of the code that every earlier test passed (stop 47).

def test_contrastive_default_margin_is_one():
    # Guards the documented default margin=1.0 of `contrastive_loss` (users call it without a margin):
    # every contrastive test passed a margin or used only "same" pairs, so margin=2.0 went unnoticed.
    x = np.zeros((1, 2), np.float32)
    y = np.array([[0.5, 0.0]], np.float32)  # d = 0.5, labelled "different"
    assert float(L.contrastive_loss(x, y, is_similar=[0])) == pytest.approx((1.0 - 0.5) ** 2)
    assert float(L.contrastive_loss_with_stats(x, y, is_similar=[0])[0]) == pytest.approx(0.25)


def test_contrastive_stats_count_only_costly_pairs_and_report_distances_not_squares():
    # Guards contrastive stats: active_fraction counts pairs with loss > 0 (a different pair beyond
    # the margin costs 0 and is not active), and mean_negative_distance is in d, not d².
    # (The existing polarity test had every pair active and its negative pair at d = 0, where d = d².)
    x = np.zeros((2, 1), np.float32)
    y = np.array([[3.0], [0.5]], np.float32)        # d = 3 (different), d = 0.5 (same)
    loss, stats = L.contrastive_loss_with_stats(x, y, is_similar=[0, 1], margin=1.0)
    assert float(loss) == pytest.approx((0.0 + 0.25) / 2)
    assert float(stats["active_fraction"]) == pytest.approx(0.5)
    assert float(stats["mean_negative_distance"]) == pytest.approx(3.0)
    assert float(stats["mean_positive_distance"]) == pytest.approx(0.5)


@pytest.mark.parametrize("squared", [False, True])
def test_triplet_stats_mean_distances_are_the_anchor_positive_and_anchor_negative_means(squared):
    # Guards triplet_loss_with_stats' mean_positive_distance / mean_negative_distance (the training
    # log's numbers): only the loss and active_fraction were checked, so swapped or wrong means passed.
    a = np.zeros((2, 1), np.float32)
    p = np.array([[1.0], [2.0]], np.float32)   # d(a, p) = 1, 2
    n = np.array([[3.0], [5.0]], np.float32)   # d(a, n) = 3, 5
    _, stats = L.triplet_loss_with_stats(a, p, n, margin=0.2, squared=squared)
    want_pos = np.mean([1.0, 4.0]) if squared else 1.5
    want_neg = np.mean([9.0, 25.0]) if squared else 4.0
    assert float(stats["mean_positive_distance"]) == pytest.approx(want_pos)
    assert float(stats["mean_negative_distance"]) == pytest.approx(want_neg)


def test_mining_a_hinge_of_exactly_zero_is_neither_active_nor_averaged():
    # Guards the strict "> 0" of the miners (batch all: "mean of the strictly positive triplet
    # losses"; active_fraction: "loss > 0"). The random property tests never hit an exact tie, so
    # ">= 0" passed. 1-D points, all distances exact in float32, margin 0.5:
    #   anchor 0: D(0, 1) = 1, its only negative at 1.5 -> hinge 1 - 1.5 + 0.5 = 0 exactly
    #   anchor 1: D(1, 0) = 1, its only negative at 0.5 -> hinge 1.0;  anchor 2 has no positive.
    emb = np.array([[0.0], [1.0], [1.5]], np.float32)
    labels = np.array([0, 0, 1])
    loss, stats = L.batch_all_triplet_loss_with_stats(emb, labels, margin=0.5)
    assert float(loss) == pytest.approx(1.0)  # the zero hinge is not in the mean
    assert float(stats["active_fraction"]) == pytest.approx(0.5)
    for fn in (L.batch_hard_triplet_loss_with_stats, L.hardest_negative_triplet_loss_with_stats,
               L.batch_semihard_triplet_loss_with_stats):
        loss, stats = fn(emb, labels, margin=0.5)
        assert float(loss) == pytest.approx(0.5), fn.__name__
        assert float(stats["active_fraction"]) == pytest.approx(0.5), fn.__name__


def test_mining_stats_are_finite_eagerly_for_anchors_without_a_negative():
    # Guards the `where` that keeps the +inf "no negative" fill out of batch hard's stats. The edge
    # test calls the losses under jit only, where XLA happened to give 0; eagerly the unmasked fill
    # made mean_negative_distance NaN (inf * 0).
    emb = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    labels = np.zeros(5, np.int64)  # one class: no anchor has a negative
    for fn in (L.batch_all_triplet_loss_with_stats, L.batch_hard_triplet_loss_with_stats,
               L.batch_semihard_triplet_loss_with_stats, L.hardest_negative_triplet_loss_with_stats):
        loss, stats = fn(emb, labels)  # eager, not jitted
        assert np.isfinite(float(loss)), fn.__name__
        assert all(np.isfinite(float(v)) for v in stats.values()), (fn.__name__, stats)


def test_prototypical_stats_mean_distances_by_hand():
    # Guards prototypical_loss_with_stats' mean_positive_distance (squared distance to the own,
    # leave-one-out prototype) and mean_negative_distance (to the nearest other prototype): only the
    # loss and active_fraction were checked, so a swapped stat passed. The leave-one-out example of
    # test_prototypical_uses_the_leave_one_out_mean...: own d² 4, 4, 1, 1; nearest other 9, 1, 1, 4.
    emb = np.array([[0.0], [2.0], [4.0], [5.0], [3.0]], np.float32)
    labels = np.array([0, 0, 1, 1, 2])
    _, stats = L.prototypical_loss_with_stats(emb, labels)
    assert float(stats["mean_positive_distance"]) == pytest.approx((4 + 4 + 1 + 1) / 4, abs=1e-5)
    assert float(stats["mean_negative_distance"]) == pytest.approx((9 + 1 + 1 + 4) / 4, abs=1e-5)


def test_verification_accuracy_counts_a_logit_of_exactly_zero_as_different():
    # Guards the documented "misclassified at logit 0" rule, (z > 0) = "same": a zero-initialised
    # head gives logits of exactly 0, and `z >= 0` flipped every such pair's verdict.
    _, stats = L.verification_loss_with_stats(jnp.zeros(3), is_similar=jnp.array([1, 1, 0]))
    assert float(stats["accuracy"]) == pytest.approx(1 / 3)
    assert float(stats["active_fraction"]) == pytest.approx(2 / 3)


def test_arcface_defaults_are_scale_30_and_margin_half_a_radian():
    # Guards arcface_loss's documented defaults (s = 30, m = 0.5, as in Deng et al. and the
    # training config): every ArcFace test passed both explicitly, so other defaults passed.
    rng = np.random.default_rng(2)
    emb, centres = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    index = np.array([0, 1, 2, 0, 1, 2])
    want = float(L.arcface_loss_with_stats(emb, index, centres, 30.0, 0.5)[0])
    assert float(L.arcface_loss(emb, index, centres)) == pytest.approx(want, rel=1e-6)
    assert float(L.arcface_loss_with_stats(emb, index, centres)[0]) == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(np.asarray(L.arcface_logits(emb, index, centres)),
                               np.asarray(L.arcface_logits(emb, index, centres, 30.0, 0.5)), rtol=1e-6)
    assert want != pytest.approx(float(L.arcface_loss_with_stats(emb, index, centres, 30.0, 0.3)[0]), rel=1e-3)


def test_arcface_an_own_logit_tied_with_another_class_is_active():
    # Guards arcface's active_fraction rule "own-class logit not yet the largest" (own <= max other):
    # an embedding exactly halfway between two centres, no margin, ties and still has to be pushed.
    centres = np.eye(2, dtype=np.float32)
    halfway = np.array([[1.0, 1.0]], np.float32)
    _, stats = L.arcface_loss_with_stats(halfway, np.array([0]), centres, 10.0, 0.0)
    assert float(stats["active_fraction"]) == 1.0


def _np_multi_similarity_anchor_terms(emb, labels, epsilon=0.1, alpha=2.0, beta=50.0, lam=0.5):
    """{anchor: its term} over the anchors with a positive and a negative (Wang et al., float64)."""
    e = np.asarray(emb, np.float64)
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim, n = u @ u.T, len(labels)
    terms = {}
    for i in range(n):
        pos = [sim[i, j] for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [sim[i, j] for j in range(n) if labels[j] != labels[i]]
        if pos and neg:
            kp = [s for s in pos if s < max(neg) + epsilon]
            kn = [s for s in neg if s > min(pos) - epsilon]
            terms[i] = (np.log1p(sum(np.exp(-alpha * (s - lam)) for s in kp)) / alpha
                        + np.log1p(sum(np.exp(beta * (s - lam)) for s in kn)) / beta)
    return terms


def test_multi_similarity_averages_over_the_anchors_with_a_positive_and_a_negative_only():
    # Guards the documented mean "over those anchors" (the anchors with a positive and a negative):
    # every test batch was P x K (all anchors valid) or had none, so a mean over the whole batch
    # passed. Here the lone images 6 and 7 are negatives for the others but not anchors.
    emb = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 4])
    terms = _np_multi_similarity_anchor_terms(emb, labels)
    assert sorted(terms) == [0, 1, 2, 3, 4, 5] and sum(terms.values()) > 0
    want = np.mean(list(terms.values()))  # / 6, not / 8
    assert float(jax.jit(L.multi_similarity_loss)(emb, labels)) == pytest.approx(want, rel=1e-4)


def test_relational_distance_loss_default_delta_is_one():
    # Guards relational_distance_loss's default Huber delta = 1 (every value test passed delta):
    # with the default, errors above 1 are linear (|e| - 0.5), below 1 quadratic.
    student = np.array([[0.0], [1.0], [10.0]], np.float32)
    teacher = np.array([[0.0], [9.0], [10.0]], np.float32)
    got = float(L.relational_distance_loss(student, teacher))
    assert got == pytest.approx(float(L.relational_distance_loss(student, teacher, 1.0)), rel=1e-6)
    assert got != pytest.approx(float(L.relational_distance_loss(student, teacher, 2.0)), rel=1e-3)


def test_prototypical_loss_is_the_same_for_embeddings_with_a_large_common_offset():
    # The |e|^2 - 2 e.c + |c|^2 expansion lost the distances to float32 rounding at an offset of
    # 1,000 (8.30 against 7.74); the loss is translation invariant, and now the code is too.
    labels = np.repeat(np.arange(4), 3)
    base = np.random.default_rng(0).normal(size=(12, 16)).astype(np.float32)
    want = float(L.prototypical_loss(base, labels))
    for offset in (100.0, 1000.0):
        assert float(L.prototypical_loss(base + np.float32(offset), labels)) == pytest.approx(want, rel=1e-4), offset


# ------------------------------------------------------------------------- JAX's debug modes

_DEBUGGED_LOSSES = {
    **{name: fns[1] for name, fns in MINERS.items()},
    "prototypical": L.prototypical_loss_with_stats,
    "multi_similarity": L.multi_similarity_loss_with_stats,
    "arcface": lambda e, labels: L.arcface_loss_with_stats(e, labels, jnp.asarray(_embeddings(11, 4, 5))),
}


@pytest.mark.parametrize("name", list(_DEBUGGED_LOSSES))
def test_losses_outside_jit_trip_no_debug_infs_or_nans(name):
    """A user debugging a divergence runs the losses eagerly under JAX_DEBUG_INFS / JAX_DEBUG_NANS:
    the masked mins and maxes filled with ±inf raised a FloatingPointError at the fill (a false
    alarm) on every call. Their fills are the largest finite floats now, with the same results (bit
    for bit on the loss tests' batches, losses, stats and gradients; the review of 2026-12-07)."""
    fn = _DEBUGGED_LOSSES[name]
    # Anchors without a positive (class 2) or without anything farther: every fill is used.
    emb, labels = jnp.asarray(_embeddings(3, 7, 5)), jnp.array([0, 0, 0, 1, 1, 2, 3], jnp.int32)
    want_loss, want_stats = jax.jit(fn)(emb, labels)
    want_grad = jax.jit(jax.grad(lambda e: fn(e, labels)[0]))(emb)
    with jax.debug_infs(True), jax.debug_nans(True):
        loss, stats = fn(emb, labels)
        grad = jax.grad(lambda e: fn(e, labels)[0])(emb)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    assert {k: float(v) for k, v in stats.items()} == pytest.approx({k: float(v) for k, v in want_stats.items()}, rel=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-5, atol=1e-7)
