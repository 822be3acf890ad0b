"""Evaluation metrics against brute-force NumPy references on small random data."""
import math
import jax.numpy as jnp
import numpy as np
import pytest

from siamese_jax import evaluation, protocols
from siamese_jax.index import EmbeddingIndex


# ------------------------------------------------------------------------------------------------
# One-shot episodes
# ------------------------------------------------------------------------------------------------
def _brute_one_shot(support, query, rule):
    """Loop reference: [T, n_way, k, E], [T, n_way, nq, E] -> per-episode accuracy."""
    accs = []
    for s, q in zip(support.astype(np.float64), query.astype(np.float64)):
        n_way, k_shot, _ = s.shape
        correct = 0
        for true_class in range(n_way):
            for x in q[true_class]:
                if rule == "prototype":
                    d = [np.sum((x - s[c].mean(0)) ** 2) for c in range(n_way)]
                    pred = int(np.argmin(d))
                else:
                    best, pred = np.inf, -1
                    for c in range(n_way):
                        for j in range(k_shot):
                            dist = np.sum((x - s[c, j]) ** 2)
                            if dist < best:
                                best, pred = dist, c
                correct += pred == true_class
        accs.append(correct / (n_way * q.shape[1]))
    return np.array(accs)


@pytest.mark.parametrize("rule", ["nearest", "prototype"])
@pytest.mark.parametrize("chunk_floats", [None, 1300])
def test_one_shot_accuracy_matches_brute_force(rule, chunk_floats, monkeypatch):
    # chunk_floats=1300: 2 episodes per chunk, the last chunk padded (7 episodes) — the path every
    # real evaluation takes (20-way, E=128: 655 episodes per chunk) and the default sizes here skip.
    if chunk_floats is not None:
        monkeypatch.setattr(evaluation, "_CHUNK_FLOATS", chunk_floats)
    rng = np.random.default_rng(0)
    T, n_way, k_shot, n_query, E = 7, 5, 3, 2, 4
    centres = rng.normal(size=(T, n_way, 1, E))
    # Noisy enough that some queries are misclassified, so accuracy is not trivially 1.
    support = (centres + 0.9 * rng.normal(size=(T, n_way, k_shot, E))).astype(np.float32)
    query = (centres + 0.9 * rng.normal(size=(T, n_way, n_query, E))).astype(np.float32)
    got = evaluation.one_shot_accuracy(support, query, rule=rule)
    want = _brute_one_shot(support, query, rule)
    assert got.shape == (T,)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert 0.0 < got.mean() < 1.0
    # A single episode gives a float equal to that episode's entry.
    single = evaluation.one_shot_accuracy(support[3], query[3], rule=rule)
    assert isinstance(single, float) and single == pytest.approx(want[3])


def test_nearest_and_prototype_differ_where_they_should():
    # Class 0 has shots at 0 and 2, class 1 two shots at 3. The class-0 query at 2.2 is nearest to
    # the shot at 2 (1-NN says 0) but nearer class 1's mean 3 than class 0's mean 1 (prototype says 1).
    support = np.array([[[0.0], [2.0]], [[3.0], [3.0]]], np.float32)  # [2 way, 2 shot, E=1]
    query = np.array([[[2.2]], [[3.0]]], np.float32)
    assert evaluation.one_shot_predictions(support, query, "nearest").tolist() == [[0], [1]]
    assert evaluation.one_shot_predictions(support, query, "prototype").tolist() == [[1], [1]]
    assert evaluation.one_shot_accuracy(support, query) == 1.0
    assert evaluation.one_shot_accuracy(support, query, rule="prototype") == 0.5
    with pytest.raises(ValueError):
        evaluation.one_shot_accuracy(support, query, rule="cosine")


@pytest.mark.parametrize("rule", ["nearest", "prototype"])
def test_one_shot_accuracy_of_indices_gathers_chunk_by_chunk_with_the_same_numbers(rule, monkeypatch):
    """`siamese-evaluate --episodes=20000` gathered every episode's support embeddings at once
    before scoring them (20-way 5-shot, 128-d: 1.2 GB; the command's peak 1.0 -> 2.4 GB). With
    `embeddings=`, the indices are gathered one chunk at a time: the same predictions, to the bit."""
    monkeypatch.setattr(evaluation, "_CHUNK_FLOATS", 1300)  # 2 episodes per chunk, the last padded
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(40, 4)).astype(np.float32)
    support, query = rng.integers(0, 40, size=(7, 5, 3)), rng.integers(0, 40, size=(7, 5, 2)).astype(np.int32)
    want = evaluation.one_shot_accuracy(emb[support], emb[query], rule=rule)
    assert 0.0 < want.mean() < 1.0
    np.testing.assert_array_equal(evaluation.one_shot_accuracy(support, query, rule=rule, embeddings=emb), want)
    np.testing.assert_array_equal(evaluation.one_shot_predictions(support, query, rule, embeddings=emb),
                                  evaluation.one_shot_predictions(emb[support], emb[query], rule))
    assert evaluation.one_shot_accuracy(support[3], query[3], rule=rule, embeddings=emb) == want[3]
    bad = emb.copy()
    bad[support[6, 1, 2]] = np.nan  # used by the last chunk only
    with pytest.raises(ValueError, match="the support embeddings hold NaN or Inf"):
        evaluation.one_shot_accuracy(support, query, rule=rule, embeddings=bad)
    with pytest.raises(ValueError, match="integer indices"):
        evaluation.one_shot_accuracy(emb[support], emb[query], embeddings=emb)


def test_one_shot_accuracy_of_indices_holds_one_chunk_of_episodes_not_all():
    import tracemalloc

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(500, 128)).astype(np.float32)
    t = 2000  # 20-way 5-shot: 2000 x 20 x 6 x 128 floats = 123 MB gathered at once
    support, query = rng.integers(0, 500, size=(t, 20, 5)), rng.integers(0, 500, size=(t, 20, 1))
    want = evaluation.one_shot_accuracy(support, query, embeddings=emb)  # (compiles outside the trace)
    tracemalloc.start()
    try:
        got = evaluation.one_shot_accuracy(support, query, embeddings=emb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, want)
    assert peak < 60e6, f"{peak / 1e6:.0f} MB (one chunk at a time: 26 MB; gathered at once: 148 MB)"


def test_the_omniglot_protocol_scores_episodes_from_indices_not_gathered_embeddings(data_dir, monkeypatch):
    """The call site: evaluate_omniglot hands the episode indices and the embeddings over, so the
    scoring gathers chunk by chunk (it gathered every episode first)."""
    from siamese_jax.configs import default

    class Seen(Exception):
        pass

    def spy(support, query, rule="nearest", embeddings=None):
        assert embeddings is not None and embeddings.ndim == 2, "episodes gathered before scoring"
        assert np.issubdtype(np.asarray(support).dtype, np.integer) and np.asarray(support).shape == (50, 5, 1)
        raise Seen

    monkeypatch.setattr(protocols.evaluation, "one_shot_accuracy", spy)
    config = default.get_config()
    config.archive_dir, config.eval_episodes, config.image_size = str(data_dir), 50, 12

    class Loaded:
        @staticmethod
        def embed_u8(u8):
            return u8.reshape(len(u8), -1).astype(np.float32)

    with pytest.raises(Seen):
        protocols.evaluate_omniglot(config, Loaded(), None)


def test_one_shot_ties_go_to_lower_class():
    support = np.zeros((3, 1, 2), np.float32)  # every class at the origin
    query = np.ones((3, 1, 2), np.float32)
    assert evaluation.one_shot_predictions(support, query).ravel().tolist() == [0, 0, 0]
    assert evaluation.one_shot_accuracy(support, query) == pytest.approx(1 / 3)


def test_summarize_accuracies():
    acc = np.array([1.0, 0.5, 0.75, 0.25])
    s = evaluation.summarize_accuracies(acc)
    assert s["num_episodes"] == 4
    assert s["mean"] == pytest.approx(0.625)
    assert s["ci95"] == pytest.approx(1.96 * np.std(acc, ddof=1) / 2)
    assert math.isnan(evaluation.summarize_accuracies([0.8])["ci95"])  # unknown, not exact


# ------------------------------------------------------------------------------------------------
# Lake's 20 runs
# ------------------------------------------------------------------------------------------------
def test_lake_run_errors_with_known_answers():
    rng = np.random.default_rng(1)
    R, E = 20, 8
    train = rng.normal(size=(R, 20, E)).astype(np.float32) * 10
    answers = np.stack([rng.permutation(20) for _ in range(R)])
    test = train[np.arange(R)[:, None], answers] + 0.01 * rng.normal(size=(R, 20, E)).astype(np.float32)
    planted = np.zeros(R, int)
    for run, n_wrong in [(0, 3), (5, 1), (19, 20)]:
        for j in range(n_wrong):  # move test image j onto a training image that is not its answer
            test[run, j] = train[run, (answers[run, j] + 1) % 20]
        planted[run] = n_wrong
    out = evaluation.lake_run_errors(train, test, answers)
    assert out["errors_per_run"] == planted.tolist()
    assert out["num_trials"] == 400
    assert out["accuracy"] == pytest.approx(1 - 24 / 400)
    assert out["error_rate"] == pytest.approx(100 * 24 / 400)


# ------------------------------------------------------------------------------------------------
# Pair verification
# ------------------------------------------------------------------------------------------------
def _random_pairs(rng, n, ties):
    same = rng.random(n) < 0.4
    d = np.where(same, rng.normal(1.0, 0.5, n), rng.normal(1.8, 0.5, n)).clip(0)
    if ties:
        d = np.round(d, 1)  # many exact ties, straddling classes
    return d.astype(np.float32), same


@pytest.mark.parametrize("seed", range(6))
def test_best_threshold_reaches_brute_force_maximum(seed):
    rng = np.random.default_rng(seed)
    d, same = _random_pairs(rng, int(rng.integers(5, 120)), ties=seed % 2 == 0)
    candidates = np.concatenate([[-1.0], np.unique(d)])  # every distinct prediction set
    brute_best = max(np.mean((d <= t) == same) for t in candidates)
    t = evaluation.best_threshold(d, same)
    assert evaluation.verification_accuracy(d, same, t) == pytest.approx(brute_best, abs=1e-12)


def test_best_threshold_edge_cases():
    d = np.array([0.1, 0.2, 0.3, 0.4])
    assert evaluation.best_threshold(d, [True, True, False, False]) == pytest.approx(0.25)
    t_none = evaluation.best_threshold(d, [False] * 4)  # accept nothing
    assert t_none < 0.1 and evaluation.verification_accuracy(d, [False] * 4, t_none) == 1.0
    t_all = evaluation.best_threshold(d, [True] * 4)
    assert evaluation.verification_accuracy(d, [True] * 4, t_all) == 1.0
    # Adjacent float32 values: the midpoint must not round onto the rejected one.
    a = np.float32(1.0)
    b = np.nextafter(a, np.float32(2.0))
    t = evaluation.best_threshold(np.array([a, b], np.float32), [True, False])
    assert np.float32(t) >= a and np.float32(t) < b


@pytest.mark.parametrize("seed", range(4))
def test_threshold_for_far_respects_bound_and_is_largest(seed):
    rng = np.random.default_rng(seed)
    d, same = _random_pairs(rng, 150, ties=seed % 2 == 0)
    neg = d[~same]
    for target in [0.0, 0.01, 0.05, 0.1, 0.3, 0.999, 1.0]:
        t = evaluation.threshold_for_far(d, same, target)
        far = np.mean(neg <= np.float32(t))
        assert far <= target + 1e-12
        # Maximal: the next observed distance above t would break the bound.
        above = np.unique(d[d > t])
        if above.size:
            assert np.mean(neg <= above[0]) > target
        else:  # t accepts everything, which only target 1.0 allows
            assert target == 1.0


def test_threshold_for_far_nothing_acceptable():
    d = np.array([0.1, 0.5, 0.9], np.float32)
    same = np.array([False, True, True])
    t = evaluation.threshold_for_far(d, same, 0.0)
    assert t < 0.1 and np.all(~(d <= np.float32(t)))


def _brute_auc(d, same):
    pos, neg = d[same].astype(np.float64), d[~same].astype(np.float64)
    wins = (neg[:, None] > pos[None, :]).sum() + 0.5 * (neg[:, None] == pos[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_matches_pairwise_count_and_curve_area(seed):
    rng = np.random.default_rng(seed)
    d, same = _random_pairs(rng, 90, ties=seed % 2 == 0)
    auc = evaluation.roc_auc(d, same)
    assert auc == pytest.approx(_brute_auc(d, same), abs=1e-12)
    far, tar, thresholds = evaluation.roc_curve(d, same)
    assert far[0] == 0 and tar[0] == 0 and far[-1] == 1 and tar[-1] == 1
    assert np.all(np.diff(thresholds) > 0) and np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)
    # Each point is exactly the rule "same iff d <= threshold".
    for i in [1, len(thresholds) // 2, len(thresholds) - 1]:
        assert tar[i] == pytest.approx(np.mean(d[same] <= thresholds[i]))
        assert far[i] == pytest.approx(np.mean(d[~same] <= thresholds[i]))
    area = np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2)
    assert area == pytest.approx(auc, abs=1e-9)


def test_roc_auc_direction_and_errors():
    assert evaluation.roc_auc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 1.0
    assert evaluation.roc_auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 0.0
    assert evaluation.roc_auc([0.5, 0.5], [True, False]) == 0.5
    with pytest.raises(ValueError):
        evaluation.roc_auc([0.1, 0.2], [True, True])


# ------------------------------------------------------------------------------------------------
# kNN and retrieval
# ------------------------------------------------------------------------------------------------
def _brute_knn(query, index, k, exclude_self=False):
    d = np.sqrt(((query[:, None, :].astype(np.float64) - index[None].astype(np.float64)) ** 2).sum(-1))
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]  # stable: lower index first on ties
    return np.take_along_axis(d, idx, 1), idx


def test_knn_matches_brute_force_and_chunking_is_invisible():
    rng = np.random.default_rng(0)
    index = rng.normal(size=(97, 6)).astype(np.float32) + 50.0  # a large common offset on purpose
    query = rng.normal(size=(41, 6)).astype(np.float32) + 50.0
    want_d, want_i = _brute_knn(query, index, 10)
    d_full, i_full = evaluation.knn(query, index, 10, chunk_size=None)
    for chunk in [1, 7, 41, 1000]:
        d, i = evaluation.knn(query, index, 10, chunk_size=chunk)
        assert d.shape == (41, 10) and i.dtype == np.int32
        np.testing.assert_array_equal(i, want_i)
        np.testing.assert_array_equal(i, i_full)
        np.testing.assert_allclose(d, want_d, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(d, d_full, rtol=1e-6, atol=1e-6)
    assert np.all(np.diff(d_full, axis=1) >= 0)


def test_knn_puts_a_large_index_on_the_device_block_by_block_with_the_same_numbers():
    """`siamese-search` of one query against a million 128-d rows peaked at 2.41 GB: the host's
    centred copy of the index, its device copy and the device's squares (+1.5 GB over the 0.5 GB
    index). Now the index goes over in blocks of ~1 MiB: the same centred values and squared norms,
    to the bit, and no full-size host copy or NaN mask."""
    import tracemalloc

    rng = np.random.default_rng(0)
    for n, e in ((5000, 128), (70001, 64), (9000, 1000)):  # several blocks, the last one overlapping
        x = (rng.normal(size=(n, e)) * 3 + 1).astype(np.float32)
        c = x.mean(axis=0, keepdims=True)
        assert n > evaluation._INDEX_BLOCK_FLOATS // e
        whole = jnp.asarray(x - c)
        dev, sqnorm = evaluation._centred_on_device(x, c)
        np.testing.assert_array_equal(np.asarray(dev), np.asarray(whole))
        # (Bit-equal on this project's CPUs; XLA promises no summation order, so within rounding.)
        np.testing.assert_allclose(np.asarray(sqnorm), np.asarray(jnp.sum(whole * whole, axis=1)), rtol=1e-6)
    index = rng.normal(size=(100_000, 128)).astype(np.float32)  # 51 MB
    query = index[[5, 99_999]] + 0.01
    want = evaluation.knn(query, index, 3)  # (compiles outside the trace)
    assert want[1][:, 0].tolist() == [5, 99_999]
    tracemalloc.start()
    try:
        got = evaluation.knn(query, index, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_array_equal(got[1], want[1])
    assert peak < 20e6, f"{peak / 1e6:.0f} MB on the host (block by block: 6 MB; the centred copy: 51 MB)"
    index[99_000, 3] = np.nan  # in the last block
    with pytest.raises(ValueError, match="the index embeddings hold NaN or Inf"):
        evaluation.knn(query, index, 3)


def test_one_shot_indices_outside_the_embeddings_are_refused():
    """The review of stop 54: with `embeddings`, an index of -1 (a "missing" marker) was NumPy's
    last row, and the episode was scored with it: 0.667 where every real query is right."""
    emb = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)  # images 4c..4c+3 are class c
    support = np.array([[0, 1], [4, 5], [8, 9]])
    query = np.array([[2], [6], [10]])
    assert evaluation.one_shot_accuracy(support, query, embeddings=emb) == 1.0
    for s, q, name in ((np.array([[0, 1], [4, -1], [8, 9]]), query, "support_emb"),
                       (support, np.array([[2], [6], [12]]), "query_emb"),
                       (support, np.array([[2], [-12], [10]]), "query_emb")):
        with pytest.raises(ValueError, match=rf"{name} holds indices from .* must be in \[0, 12\)"):
            evaluation.one_shot_predictions(s, q, embeddings=emb)


def test_knn_distances_are_computed_directly_not_from_the_cancelling_expansion():
    """The review of stop 54 (a notebook user's own embeddings): `knn(emb, emb, 2)` gave each item's
    distance to itself as up to 0.02 (128-d, norm ~34: float32 |q|^2 - 2q.e + |e|^2 cancels), and a
    near-duplicate 0.01 away was read with a relative error above 1. `EmbeddingIndex.search`
    recomputed its distances; `knn` itself returned the expansion's."""
    rng = np.random.default_rng(0)
    emb = (rng.normal(size=(500, 128)) * 3).astype(np.float32)
    d, i = evaluation.knn(emb, emb, 2)
    assert (i[:, 0] == np.arange(500)).all()
    assert (d[:, 0] == 0).all(), f"self-distances up to {d[:, 0].max():.2e}"
    query = emb[:40] + (1e-3 * rng.normal(size=(40, 128))).astype(np.float32)
    want_d, want_i = _brute_knn(query, emb, 3)
    d, i = evaluation.knn(query, emb, 3, chunk_size=7)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(d, want_d, rtol=1e-6)
    assert np.all(np.diff(d, axis=1) >= 0)


def test_knn_ties_exclude_self_and_bad_k():
    index = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    d, i = evaluation.knn(np.array([[1.0, 0.0]], np.float32), index, 5, chunk_size=1)
    assert i[0].tolist() == [0, 2, 4, 1, 3]  # three exact ties at distance 0: ascending index
    np.testing.assert_allclose(d[0], [0, 0, 0, 1, np.sqrt(2)], atol=1e-6)
    d, i = evaluation.knn(index, index, 4, chunk_size=2, exclude_self=True)
    assert all(row not in i[row] for row in range(5))
    assert i[0].tolist()[:2] == [2, 4] and i[2].tolist()[:2] == [0, 4]
    # (matched: lax.top_k raises a ValueError of its own for k = 6, so a bare raises would pass without the check)
    with pytest.raises(ValueError, match=r"k=6 must be in \[1, 5\]"):
        evaluation.knn(index, index, 6)
    with pytest.raises(ValueError, match=r"k=5 must be in \[1, 4\]"):
        evaluation.knn(index, index, 5, exclude_self=True)
    with pytest.raises(ValueError):
        evaluation.knn(index, index, 0)


def test_retrieval_per_query_on_pml_worked_example():
    # pytorch-metric-learning tests/utils/test_calculate_accuracies.py, "embeddings come from the same
    # source" case: label counts {1: 3, 2: 5, 3: 4, 4: 5}, so R = count - 1 per query; its expected
    # precision@1 = 1/5 and MAP@R = mean(1, (1/2)/2, (1/4)/4, (1/2)/3, (1/2)/4).
    query_labels = np.array([1, 1, 2, 3, 4])
    knn_labels = np.array([[0, 1, 1, 2, 2], [1, 0, 1, 1, 3], [4, 4, 4, 4, 2], [3, 1, 3, 1, 3], [0, 0, 4, 2, 2]])
    knn_labels = knn_labels[:, 1:]  # the query itself was the first neighbour
    r = np.array([2, 2, 4, 3, 4])
    p1, ap = evaluation._retrieval_per_query(knn_labels, query_labels, r)
    assert p1.mean() == pytest.approx(1 / 5)
    np.testing.assert_allclose(ap, [1, 1 / 4, 1 / 16, 1 / 6, 1 / 8])
    assert ap.mean() == pytest.approx(np.mean([1, 0.25, 1 / 16, 1 / 6, 1 / 8]))


def _brute_retrieval(emb, labels, max_k=None):
    n = len(emb)
    d = np.sqrt(((emb[:, None].astype(np.float64) - emb[None].astype(np.float64)) ** 2).sum(-1))
    p1, aps = [], []
    for i in range(n):
        r = int((labels == labels[i]).sum()) - 1
        if r == 0:
            continue
        if max_k is not None:
            r = min(r, max_k)
        others = [j for j in np.argsort(d[i], kind="stable") if j != i]
        rel = [labels[j] == labels[i] for j in others[:r]]
        p1.append(rel[0])
        hits, total = 0, 0.0
        for rank, is_rel in enumerate(rel, start=1):
            if is_rel:
                hits += 1
                total += hits / rank
        aps.append(total / r)
    return float(np.mean(p1)), float(np.mean(aps)), len(p1)


def test_retrieval_metrics_match_brute_force():
    rng = np.random.default_rng(3)
    labels = np.concatenate([np.repeat(np.arange(12), rng.integers(2, 9, 12)), [100, 101]])  # two lone items
    centres = rng.normal(size=(102, 5))
    emb = (centres[labels] * 1.2 + rng.normal(size=(len(labels), 5))).astype(np.float32)
    p1, mapr, n_q = _brute_retrieval(emb, labels)
    for chunk in [None, 5, 16]:
        out = evaluation.retrieval_metrics(emb, labels, chunk_size=chunk)
        assert out["precision_at_1"] == pytest.approx(p1, abs=1e-6)
        assert out["mean_average_precision_at_r"] == pytest.approx(mapr, abs=1e-6)
        assert out["num_queries"] == n_q == len(labels) - 2
        assert out["num_lone_queries"] == 2
    assert 0.2 < mapr < 0.95  # a non-trivial case
    # max_k caps R (AccuracyCalculator's faiss limit): on noisy clusters the capped MAP differs.
    p1_capped, mapr_capped, _ = _brute_retrieval(emb, labels, max_k=2)
    capped = evaluation.retrieval_metrics(emb, labels, max_k=2)
    assert capped["mean_average_precision_at_r"] == pytest.approx(mapr_capped, abs=1e-6)
    assert capped["precision_at_1"] == pytest.approx(p1_capped, abs=1e-6)
    assert abs(mapr_capped - mapr) > 0.01


def test_retrieval_metrics_perfect_and_degenerate():
    labels = np.repeat(np.arange(4), 5)
    emb = (np.eye(4)[labels] * 100 + np.random.default_rng(0).normal(size=(20, 4))).astype(np.float32)
    out = evaluation.retrieval_metrics(emb, labels)
    assert out["precision_at_1"] == 1.0 and out["mean_average_precision_at_r"] == pytest.approx(1.0)
    lone = evaluation.retrieval_metrics(np.zeros((3, 2), np.float32), [0, 1, 2])
    assert lone["num_queries"] == 0 and lone["precision_at_1"] == 0.0
    # max_k caps R (AccuracyCalculator's faiss limit); with perfect clusters MAP@R stays 1.
    capped = evaluation.retrieval_metrics(emb, labels, max_k=2)
    assert capped["mean_average_precision_at_r"] == pytest.approx(1.0)


def test_retrieval_max_k_below_one_is_refused_not_scored_as_zero():
    """The review of stop 54: max_k=0 or -1 (read as "no cap") capped every R at 0, so every query
    was "lone": precision@1 0.0 and MAP@R 0.0 over 0 queries, for perfectly clustered embeddings."""
    labels = np.repeat(np.arange(3), 4)
    emb = (np.eye(3)[labels] * 10).astype(np.float32)
    assert evaluation.retrieval_metrics(emb, labels, max_k=1)["precision_at_1"] == 1.0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_k must be a positive integer or None"):
            evaluation.retrieval_metrics(emb, labels, max_k=bad)


def test_nothing_to_score_and_non_finite_embeddings_are_errors_not_numbers():
    """A diverged checkpoint's NaN embeddings used to be scored as chance level (NaN distances
    compare false, so every query went to class 0); empty inputs crashed or returned 0."""
    with pytest.raises(ValueError, match="no episodes to score"):
        evaluation.one_shot_predictions(np.zeros((0, 5, 1, 4)), np.zeros((0, 5, 1, 4)))
    with pytest.raises(ValueError, match="no embeddings to score"):
        evaluation.retrieval_metrics(np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
    emb = np.ones((6, 4), np.float32)
    assert protocols._finite(emb, "x") is emb
    emb[2, 1] = np.nan
    emb[4, 0] = np.inf
    with pytest.raises(ValueError, match=r"embeds 2 of 6 images of Lake's runs as NaN or Inf \(a diverged checkpoint\?\)"):
        protocols._finite(emb, "Lake's runs")


def test_knn_and_episode_scoring_compile_once_per_power_of_two_size_class():
    # `search` with 9, 10, 11, 12 queries (or 5, 6, 7 episodes) compiled once per count (~0.2 s each).
    rng = np.random.default_rng(0)
    index = rng.normal(size=(300, 8)).astype(np.float32)
    before = evaluation._knn_chunk._cache_size()
    for q in (9, 10, 11, 12, 16):
        d, i = evaluation.knn(index[:q], index, 3)
        assert d.shape == (q, 3) and (i[:, 0] == np.arange(q)).all()  # padding rows are dropped
    assert evaluation._knn_chunk._cache_size() - before == 1
    before = evaluation._episode_predictions._cache_size()
    for t in (5, 6, 7, 8):
        s = rng.normal(size=(t, 5, 1, 4)).astype(np.float32)
        np.testing.assert_array_equal(evaluation.one_shot_accuracy(s, s), np.ones(t))
    assert evaluation._episode_predictions._cache_size() - before == 1


def test_the_scoring_functions_refuse_nan_instead_of_scoring_it():
    # A diverged model's NaN embeddings scored exactly chance (one_shot_accuracy 0.2 at 5-way, Lake's
    # runs 0.05), and roc_auc / best_threshold ranked a NaN distance as the largest.
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 5, 1, 4)).astype(np.float32)
    s[1, 2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        evaluation.one_shot_accuracy(s, s)
    with pytest.raises(ValueError, match="NaN or Inf"):
        evaluation.lake_run_errors(s[:, :, 0], s[:, :, 0], np.zeros((3, 5), int))
    d, same = np.array([0.1, np.nan, 2.0, 3.0]), np.array([1, 1, 0, 0])
    for f in (evaluation.roc_auc, evaluation.best_threshold, lambda d, s: evaluation.verification_accuracy(d, s, 1.0)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            f(d, same)
    emb = rng.normal(size=(10, 4)).astype(np.float32)
    emb[3, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        evaluation.knn(emb[:2], emb, 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        evaluation.retrieval_metrics(emb, np.arange(10) % 2)


def test_scoring_refuses_labels_that_would_be_scored_wrong():
    """The API audit of stop 45: 1-based Lake answers scored 0% without a word, any nonzero
    `is_similar` counted as "same" in the pair metrics, and two refusals were library tracebacks."""
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(2, 20, 4)), rng.normal(size=(2, 20, 4))
    answers = np.tile(np.arange(20), (2, 1))
    assert evaluation.lake_run_errors(train, train, answers)["accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"answers must be 0-based indices into the 20 training images, got values from 1 to 20"):
        evaluation.lake_run_errors(train, test, answers + 1)
    with pytest.raises(ValueError, match="shapes disagree"):
        evaluation.lake_run_errors(train, test[:, :, 0], answers)
    d = np.array([0.1, 0.2, 0.9, 0.3, 1.0, 1.2])
    with pytest.raises(ValueError, match="is_similar must be bool or 0/1"):
        evaluation.roc_auc(d, [3, 5, 0, 7, 0, 0])
    assert evaluation.roc_auc(d, [1, 1, 0, 1, 0, 0]) == 1.0
    with pytest.raises(ValueError, match=r"expected \[T,\] n_way, k_shot, E arrays, got \(1, 2\)"):
        evaluation.one_shot_accuracy([[1.0, 2.0]], [[1.0, 2.0]])  # (it raised AttributeError: 'list' ... 'shape')
    with pytest.raises(ValueError, match="a class with at least 2 images"):
        evaluation.balanced_pairs(np.arange(5), 4, seed=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        evaluation.balanced_pairs(np.zeros(5, int), 4, seed=0)


# ------------------------------------------------------------------ the mutation review of 2026-12-06
# Each test below failed on a mutant of the code that every earlier test passed (stop 47).

def test_best_threshold_ties_in_accuracy_go_to_the_smallest_split():
    # Guards best_threshold's documented tie rule ("the smallest such split on ties in accuracy;
    # accept-nothing ... just below the minimum"): the existing tests only compared accuracies,
    # so picking the largest tied split, or a split over accept-nothing, passed.
    d = np.array([0.1, 0.2, 0.3, 0.4])
    # Splits after 0.1 and after 0.3 both give 3/4 correct: the smaller one, midpoint 0.15.
    assert evaluation.best_threshold(d, [True, False, True, False]) == pytest.approx(0.15)
    # Accept-nothing (1/2) ties with accepting both (1/2): accept nothing.
    t = evaluation.best_threshold(np.array([0.1, 0.2]), [False, True])
    assert t < 0.1


def test_threshold_for_far_is_not_one_false_accept_short_by_float_rounding():
    # Guards the 1e-9 slack in threshold_for_far's floor(target_far * n): 0.29 * 100 is
    # 28.999999999999996 in floats, and without the slack the threshold allowed 28 false accepts
    # where the bound allows 29 (not "the largest threshold", as documented).
    neg = np.arange(1.0, 101.0)                 # 100 different pairs at 1, 2, ..., 100
    d = np.concatenate([neg, [0.5]])
    same = np.concatenate([np.zeros(100, bool), [True]])
    t = evaluation.threshold_for_far(d, same, 0.29)
    assert t == 29.0
    assert np.mean(neg <= t) == pytest.approx(0.29)


def test_balanced_pairs_are_what_they_say_and_use_classes_of_two_images():
    # Guards balanced_pairs (calibration's pairs), tested so far only for its refusals: half the
    # pairs same-class (two different images of a class with >= 2 images, a class of exactly 2
    # included), half different-class, each flagged correctly, reproducible from the seed.
    labels = np.repeat(np.arange(4), 2)          # every class has exactly 2 images
    first, second, same = evaluation.balanced_pairs(labels, 10, seed=0)
    assert len(first) == len(second) == len(same) == 10 and same.sum() == 5
    np.testing.assert_array_equal(labels[first] == labels[second], same)
    assert np.all(first != second)
    again = evaluation.balanced_pairs(labels, 10, seed=0)
    for a, b in zip((first, second, same), again):
        np.testing.assert_array_equal(a, b)


def test_best_threshold_midpoint_that_rounds_onto_the_rejected_distance_falls_back():
    # Guards best_threshold's guard "mid if lo <= mid < hi else lo". The existing adjacent-float
    # case (1.0, next float) has a midpoint that rounds DOWN (ties to even), so it never reached the
    # guard; from an odd-mantissa value the midpoint rounds UP onto the rejected distance.
    a = np.nextafter(np.float32(1.0), np.float32(2.0))   # odd last bit
    b = np.nextafter(a, np.float32(2.0))
    d = np.array([a, b], np.float32)
    t = evaluation.best_threshold(d, [True, False])
    assert np.float32(t) >= a and np.float32(t) < b
    assert evaluation.verification_accuracy(d, [True, False], t) == 1.0


def test_keras_pairs_same_partner_is_another_image_and_other_partner_another_class():
    # Guards protocols.keras_pairs (the MNIST verification protocol's pairs), which no fast test
    # ran: interleaved (same, different) per image, the same-class partner redrawn until it is not
    # the image itself (classes of 2 images make a self-pair likely), the other from another class.
    labels = np.repeat(np.arange(5), 2)
    first, second, same = protocols.keras_pairs(labels, seed=0)
    assert len(first) == 2 * len(labels)
    np.testing.assert_array_equal(first, np.repeat(np.arange(len(labels)), 2))
    np.testing.assert_array_equal(same, np.tile([True, False], len(labels)))
    np.testing.assert_array_equal(labels[first] == labels[second], same)
    assert np.all(first[same] != second[same])
    # a class with a single image is paired with itself (documented)
    f, s, _ = protocols.keras_pairs(np.array([0, 1, 1]), seed=0)
    assert s[0] == 0


def test_keras_pairs_of_one_class_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        protocols.keras_pairs(np.array([3, 3, 3]), seed=0)


def test_lake_run_embeddings_are_each_runs_training_and_test_images_in_order(data_dir):
    # The scoring of Lake's runs was tested on made-up embeddings only; the wiring from the runs'
    # images to them was not (their test embeddings taken from the training images passed every
    # test). An embedding that is the image itself, read back per run and position.
    from siamese_jax.augment import resize_uint8
    from siamese_jax.data import load_lake_runs

    runs = load_lake_runs(str(data_dir))
    train, test = protocols.lake_run_embeddings(runs, lambda u8: u8.reshape(len(u8), -1).astype(np.float32), 28)
    assert train.shape == test.shape == (20, 20, 28 * 28)
    for r in (0, 7, 19):
        np.testing.assert_array_equal(train[r], resize_uint8(runs[r].train_images, 28).reshape(20, -1))
        np.testing.assert_array_equal(test[r], resize_uint8(runs[r].test_images, 28).reshape(20, -1))


def test_a_re_evaluation_keeps_the_trainings_seconds_and_devices_and_only_with_its_time():
    """What `siamese-evaluate` keeps from the results.json it replaces (stop 48's one uncovered
    mutant: the devices kept whether or not a training time named them)."""
    trained = {"train_seconds": 412.3, "validation_seconds": 9.1, "checkpoints_seconds": None,
               "devices": 8, "processes": 2, "platform": "tpu", "lake_20_runs": {"accuracy": 0.97}}
    assert protocols.training_record(trained) == (
        412.3, {"validation_seconds": 9.1}, {"devices": 8, "processes": 2, "platform": "tpu"})
    # An evaluation's results.json with no training time (a workdir re-evaluated after export, say):
    # its devices describe no time, so this evaluation records its own.
    untimed = dict(trained, train_seconds=None)
    assert protocols.training_record(untimed) == (None, {"validation_seconds": 9.1}, {})
    assert protocols.training_record({k: v for k, v in trained.items() if k != "train_seconds"})[2] == {}
    for unreadable in ({}, [], "results", None):  # none, or not an object: nothing kept
        assert protocols.training_record(unreadable) == (None, {}, {})
    # The table names a training time only where there is one, with the devices it ran on.
    results = {"dataset": "mnist", "loss": "contrastive", "checkpoint_step": 6, "devices": 8, "platform": "tpu",
               "processes": 2}
    assert "train time" not in protocols.format_results_table(results)
    assert "412 s on 8 tpu device(s) in 2 processes" in protocols.format_results_table(
        dict(results, train_seconds=412.3))


def test_a_re_evaluation_with_other_views_says_results_json_no_longer_describes_the_model():
    """`siamese-evaluate --test_time_shifts=none` on a run trained with square9 rewrote results.json
    silently, while the workdir's model (embed/search/compare --model=<workdir>) still embeds with
    square9; only export noticed, later. Now a note after the table says so."""
    from siamese_jax.cli.evaluate import other_views_note

    note = other_views_note("runs/a", "none", "square9", written=True)
    assert note.startswith("note: runs/a/results.json now holds the numbers with test_time_shifts=none")
    assert "config's square9" in note and "--test_time_shifts=none" in note
    assert other_views_note("runs/a", "square9", "square9", written=True) is None
    assert other_views_note("runs/a", "none", "square9", written=False) is None  # --nowrite: nothing rewritten


def test_fractional_k_nan_threshold_and_queryless_episodes_are_refused_not_scored():
    """Stop 54's leftovers: knn(k=2.7) and EmbeddingIndex.search(k=2.7) returned 2 neighbours;
    verification_accuracy(threshold=NaN) scored "no pair is the same" as an accuracy (0.5 here);
    an episode with no queries scored NaN."""
    index = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    assert evaluation.knn(index, index, np.int64(2))[1].shape == (3, 2)  # NumPy integers are whole numbers
    for bad in (2.7, 2.0, True, "2"):
        with pytest.raises(ValueError, match="k must be a whole number of neighbours"):
            evaluation.knn(index, index, bad)
        with pytest.raises(ValueError, match="k must be a whole number of neighbours"):
            EmbeddingIndex(index, ["a", "b", "c"], "fingerprint").search(index, bad)
    d, same = np.array([0.1, 0.2, 0.9, 1.0]), [True, True, False, False]
    assert evaluation.verification_accuracy(d, same, np.inf) == 0.5  # inf: every pair "same"
    assert evaluation.verification_accuracy(d, same, np.float32(0.5)) == 1.0
    for bad in (np.nan, float("nan"), [0.5, 0.6], None):
        with pytest.raises(ValueError, match="threshold must be one number"):
            evaluation.verification_accuracy(d, same, bad)
    support = np.zeros((3, 1, 2), np.float32)
    with pytest.raises(ValueError, match="n_query=0"):
        evaluation.one_shot_accuracy(support, np.zeros((3, 0, 2), np.float32))
    with pytest.raises(ValueError, match="k_shot=0"):
        evaluation.one_shot_accuracy(np.zeros((3, 0, 2), np.float32), np.zeros((3, 1, 2), np.float32))


def test_k_may_be_an_integer_scalar_of_numpy_or_jax():
    """The fractional-k check of stop 55 refused a JAX integer scalar (`jnp.int32(2)`, what a k
    computed in JAX is) and a 0-d NumPy integer array, which `int(k)` had taken: an integer scalar of
    any kind is a whole number of neighbours; a float one (`jnp.float32(2.0)`) still is not."""
    import jax.numpy as jnp

    index = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    for k in (jnp.int32(2), jnp.array(2), np.array(2)):
        assert evaluation.knn(index, index, k)[1].shape == (3, 2)
        assert EmbeddingIndex(index, ["a", "b", "c"], "fingerprint").search(index, k)[1].shape == (3, 2)
    for bad in (jnp.float32(2.0), np.bool_(True), jnp.array([2])):
        with pytest.raises(ValueError, match="k must be a whole number of neighbours"):
            evaluation.knn(index, index, bad)


def test_a_bfloat16_threshold_is_a_number():
    """The NaN-threshold check of stop 55 asked np.issubdtype(dtype, np.number), which bfloat16 (a
    threshold computed from bf16 distances: compute_dtype=bfloat16 on a GPU/TPU) is not: "threshold
    must be one number" for 0.5, where it had scored. NaN, a bool and a string still refused."""
    import jax.numpy as jnp

    d, same = np.array([0.1, 0.2, 0.9, 1.0]), [True, True, False, False]
    assert evaluation.verification_accuracy(d, same, jnp.bfloat16(0.5)) == 1.0
    assert evaluation.verification_accuracy(jnp.asarray(d, jnp.bfloat16), same,
                                            jnp.median(jnp.asarray(d, jnp.bfloat16))) == 1.0
    for bad in (jnp.bfloat16(float("nan")), True, "0.5"):
        with pytest.raises(ValueError, match="threshold must be one number"):
            evaluation.verification_accuracy(d, same, bad)
