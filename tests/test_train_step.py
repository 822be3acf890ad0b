"""The data-parallel proof: the same global batch and key give the same loss and update on 1 and 4 devices.

SGD (not Adam) is used on purpose: Adam's update is nearly invariant to a gradient scaled N times,
so it would hide the classic "gradients summed over devices" bug this test is here to catch.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from siamese_jax import losses as L
from siamese_jax import models, parallel
from siamese_jax import train_step as ts

B, SIZE = 8, 16


def _model(loss, norm="batch"):
    config = ml_collections.ConfigDict(dict(model="small", widths=(8, 8), embedding_dim=16, norm=norm,
                                            l2_normalize=loss in ts.DIRECTION_LOSSES, loss=loss, compute_dtype="float32",
                                            num_classes=4))
    return models.build_model(config)


def _batch(loss, selection="online"):
    rng = np.random.default_rng(0)
    img = lambda: rng.uniform(size=(B, SIZE, SIZE, 1)).astype(np.float32)
    kind = ts.batch_kind(loss, selection)
    if kind == "pairs":
        return {"x1": img(), "x2": img(), "is_similar": np.array([1, 0] * (B // 2), bool)}
    if kind == "triplets":
        return {"anchor": img(), "positive": img(), "negative": img()}
    # 4 classes x 2 images, ordered so that each device's shard holds ONE class: local mining would
    # find no negatives at all, global mining finds plenty.
    labels = np.repeat(np.arange(4), 2).astype(np.int32)
    if loss in ts.CLASS_CENTRE_LOSSES:  # ArcFace's class centres are indexed 0..C-1
        return {"images": img(), "labels": labels + 100, "class_index": labels}
    return {"images": img(), "labels": labels}


def _run(loss, devices, steps=2, norm="batch", augment_fn=None, selection="online"):
    mesh = parallel.make_data_mesh(devices)
    model = _model(loss, norm)
    tx = optax.sgd(0.1)
    state = ts.create_train_state(model, tx, jax.random.PRNGKey(0), SIZE)
    state = parallel.put_replicated(state, mesh)
    step = ts.make_train_step(model, tx, mesh, loss=loss, margin=0.5, augment_fn=augment_fn,
                              triplet_selection=selection)
    batch = jax.device_put(_batch(loss, selection), parallel.batch_sharded(mesh))
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch, jax.random.PRNGKey(1))
        history.append({k: float(v) for k, v in metrics.items()})
    return jax.device_get(state), history


def _initial_params(loss):
    return ts.create_train_state(_model(loss), optax.sgd(0.1), jax.random.PRNGKey(0), SIZE).params


# Every loss the step knows (a new one is covered by adding it to train_step's groups), the triplet
# loss once per selection.
EVERY_LOSS_AND_SELECTION = [(loss, selection) for loss in ts.ALL_LOSSES
                            for selection in (ts.TRIPLET_SELECTIONS if loss in ts.TRIPLET_LOSSES else (None,))]


@pytest.mark.parametrize("loss, selection", EVERY_LOSS_AND_SELECTION)
def test_four_devices_equal_one_device(loss, selection):
    assert jax.device_count() >= 4
    selection = selection or "online"
    s1, h1 = _run(loss, jax.devices()[:1], selection=selection)
    s4, h4 = _run(loss, jax.devices()[:4], selection=selection)
    for m1, m4 in zip(h1, h4):
        assert m1.keys() == m4.keys()
        for k in m1:
            np.testing.assert_allclose(m4[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=f"{loss}: metric {k}")
    assert h1[0]["loss"] > 0
    # Float32 rounding grows with the step's size: the prototypical loss (squared distances in a
    # softmax) moves the parameters ~10x further than the margin losses in these two steps (0.58 vs
    # 0.06-0.09), and the 4-device sums round differently by up to ~3e-6. A gradient counted N times
    # would differ by the size of the step itself.
    moved = max(float(np.max(np.abs(np.asarray(p) - np.asarray(q))))
                for p, q in zip(jax.tree.leaves(s1.params), jax.tree.leaves(_initial_params(loss))))
    atol = max(1e-6, 1e-5 * moved)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-5, atol=atol), s1.params, s4.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6), s1.batch_stats, s4.batch_stats)
    assert int(s1.step) == int(s4.step) == 2


def test_update_is_the_global_batch_sgd_step():
    """One step's parameter change equals -lr x the single-device gradient of the global-batch loss."""
    loss = "batch_hard"
    mesh = parallel.make_data_mesh(jax.devices()[:4])
    model = _model(loss, norm="layer")
    state0 = ts.create_train_state(model, optax.sgd(0.1), jax.random.PRNGKey(0), SIZE)
    batch = _batch(loss)
    # Jitted: one compile, not one per operation (op by op the test took ~17 CPU-seconds, jitted ~8).
    grads = jax.jit(jax.grad(lambda p: ts.loss_fn(p, {}, model, batch, loss, 0.5, False)[0]))(state0.params)
    step = ts.make_train_step(model, optax.sgd(0.1), mesh, loss=loss, margin=0.5)
    state1, _ = step(parallel.put_replicated(state0, mesh), jax.device_put(batch, parallel.batch_sharded(mesh)),
                     jax.random.PRNGKey(1))
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, state0.params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), expected, jax.device_get(state1.params))


def test_augmentation_inside_the_step_is_device_count_invariant():
    from siamese_jax import augment

    cfg = augment.AffineConfig()
    fn = lambda key, x: augment.random_affine(key, x, cfg)
    _, h1 = _run("triplet", jax.devices()[:1], steps=1, augment_fn=fn)
    _, h4 = _run("triplet", jax.devices()[:4], steps=1, augment_fn=fn)
    _, h_plain = _run("triplet", jax.devices()[:1], steps=1)
    np.testing.assert_allclose(h4[0]["loss"], h1[0]["loss"], rtol=2e-5)
    assert h1[0]["loss"] != h_plain[0]["loss"]  # the augmentation did change the images


class _DropoutEncoder(nn.Module):
    """A contributor's encoder with dropout, as Flax models write it."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(16)(x.reshape(x.shape[0], -1))
        return nn.Dense(8)(nn.Dropout(0.5, deterministic=not train)(nn.relu(x)))


def test_an_encoder_with_dropout_trains_with_fresh_masks_that_do_not_depend_on_the_device_count():
    """The step hands the model a "dropout" key (it handed none: `nn.Dropout` failed at the first
    step), new each step and for each step key, the same masks on 1 and 4 devices; embedding
    (train=False) is deterministic."""
    model = models.SiameseNetwork(encoder=_DropoutEncoder())

    def losses(devices, key, steps=2, learning_rate=0.1):
        tx = optax.sgd(learning_rate)
        mesh = parallel.make_data_mesh(devices)
        state = parallel.put_replicated(ts.create_train_state(model, tx, jax.random.PRNGKey(0), SIZE), mesh)
        step = ts.make_train_step(model, tx, mesh, loss="batch_hard", margin=0.5)
        batch = jax.device_put(_batch("batch_hard"), parallel.batch_sharded(mesh))
        out = []
        for _ in range(steps):
            state, metrics = step(state, batch, key)
            out.append(float(metrics["loss"]))
        return out, jax.device_get(state)

    one, state = losses(jax.devices()[:1], jax.random.PRNGKey(1))
    four, _ = losses(jax.devices()[:4], jax.random.PRNGKey(1))
    other_key, _ = losses(jax.devices()[:1], jax.random.PRNGKey(2))
    np.testing.assert_allclose(four, one, rtol=2e-5)
    assert one[0] != other_key[0]  # another key, other masks
    # Deterministic per key; the masks do change the loss (train=False would give another value).
    assert losses(jax.devices()[:1], jax.random.PRNGKey(1))[0] == one
    # New masks every step: with the weights held still (rate 0), the same batch and key give
    # another loss at each step.
    still, _ = losses(jax.devices()[:1], jax.random.PRNGKey(1), steps=3, learning_rate=0.0)
    assert len(set(still)) == 3, still
    x = jnp.asarray(_batch("batch_hard")["images"])
    variables = {"params": state.params}
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


def test_metrics_are_device_arrays_and_state_is_donated():
    mesh = parallel.make_data_mesh(jax.devices()[:2])
    model = _model("contrastive")
    tx = optax.adam(1e-3)
    state = parallel.put_replicated(ts.create_train_state(model, tx, jax.random.PRNGKey(0), SIZE), mesh)
    step = ts.make_train_step(model, tx, mesh, loss="contrastive", margin=1.0)
    batch = jax.device_put(_batch("contrastive"), parallel.batch_sharded(mesh))
    old_leaf = jax.tree.leaves(state.params)[0]
    new_state, metrics = step(state, batch, jax.random.PRNGKey(0))
    assert set(metrics) >= {"loss", "active_fraction", "embedding_norm", "grad_norm"}
    assert all(isinstance(v, jax.Array) for v in metrics.values())
    assert old_leaf.is_deleted()  # donated: no second copy of the state per step
    assert jax.tree.leaves(new_state.params)[0].sharding.is_fully_replicated


def test_batch_not_divisible_by_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by the 4 devices"):
        parallel.check_batch_divisible(6, parallel.make_data_mesh(jax.devices()[:4]))


def test_unknown_loss_is_rejected():
    with pytest.raises(ValueError, match="unknown loss"):
        ts.batch_kind("cosface")
    with pytest.raises(ValueError, match="unknown triplet_selection"):
        ts.batch_kind("triplet", "hardest")


def test_online_triplets_pick_a_same_class_positive_and_the_nearest_negative():
    emb = jnp.array([[0.0], [1.0], [0.2], [5.0], [0.3], [9.5]])
    labels = jnp.array([0, 0, 1, 1, 2, 2])
    pos, neg, valid = ts.online_triplets(emb, labels, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(pos), [1, 0, 3, 2, 5, 4])  # the only other member of the class
    np.testing.assert_array_equal(np.asarray(neg), [2, 4, 4, 1, 2, 3])  # nearest image of another class
    assert bool(valid.all())
    _, _, valid = ts.online_triplets(emb[:3], jnp.array([0, 0, 1]), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(valid), [True, True, False])  # class 1 has no positive



def test_online_triplet_active_fraction_counts_a_hinge_of_exactly_zero_as_inactive():
    """The logged active_fraction of the online selection is the share of anchors with a hinge > 0,
    as in every miner of losses.py: an anchor exactly at the margin gives no gradient."""
    import flax.linen as nn

    class Flatten(nn.Module):  # the embedding is the input: distances chosen exactly
        @nn.compact
        def __call__(self, x, train=False):
            return x.reshape((x.shape[0], -1))

    # 1-D, margin 0.5, each class of two: anchor -> (d(a, p), nearest negative) -> hinge
    #   0.0 -> (1, 1.5) -> 0 exactly;  1.0 -> (1, 0.5) -> 1;  1.5 -> (1, 0.5) -> 1;  2.5 -> (1, 1.5) -> 0
    batch = {"images": np.array([0.0, 1.0, 1.5, 2.5], np.float32).reshape(4, 1, 1, 1),
             "labels": np.array([0, 0, 1, 1], np.int32)}
    value, (stats, _) = ts.loss_fn({}, {}, Flatten(), batch, "triplet", 0.5, False, False,
                                   jax.random.PRNGKey(0), "online")
    np.testing.assert_allclose(float(value), 0.5)
    assert float(stats["active_fraction"]) == 0.5  # 1.0 if the two zero hinges counted as active

def test_moving_average_of_the_weights_is_the_math_and_leaves_training_unchanged():
    """config.ema_decay: avg_t = d_t avg_{t-1} + (1 - d_t) p_t with d_t = min(decay, (1+t)/(10+t)),
    avg_0 = p_0; the live parameters are bit-identical to a run without the average."""
    loss, decay, steps = "batch_hard", 0.5, 3
    mesh = parallel.make_data_mesh(jax.devices()[:4])
    model = _model(loss)
    batch = jax.device_put(_batch(loss), parallel.batch_sharded(mesh))

    def run(tx):
        step = ts.make_train_step(model, tx, mesh, loss=loss, margin=0.5)
        state = parallel.put_replicated(ts.create_train_state(model, tx, jax.random.PRNGKey(0), SIZE), mesh)
        params = [jax.device_get(state.params)]
        for _ in range(steps):
            state, _ = step(state, batch, jax.random.PRNGKey(1))
            params.append(jax.device_get(state.params))
        return jax.device_get(state), params

    plain, trajectory = run(optax.sgd(0.1))
    averaged, live = run(optax.chain(optax.sgd(0.1), ts.params_moving_average(decay)))
    for a, b in zip(jax.tree.leaves(trajectory), jax.tree.leaves(live)):
        np.testing.assert_array_equal(a, b)  # the average is a read-out, not a change of the updates
    expected = trajectory[0]
    for t in range(1, steps + 1):
        d = min(decay, (1 + t) / (10 + t))
        expected = jax.tree.map(lambda a, p: d * a + (1 - d) * p, expected, trajectory[t])
    assert ts.averaged_state(plain) is plain  # no average kept: the state itself
    average = ts.averaged_state(averaged)
    assert int(averaged.opt_state[1].count) == steps
    jax.tree.map(lambda e, a: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), expected, average.params)
    assert not np.allclose(jax.tree.leaves(average.params)[0], jax.tree.leaves(averaged.params)[0])
    assert average.batch_stats is averaged.batch_stats and average.step is averaged.step


def test_make_optimizer_keeps_an_average_only_when_asked():
    c = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=1, num_steps=10, weight_decay=0.0))
    params = {"w": jnp.ones(3)}
    assert not isinstance(ts.make_optimizer(c).init(params)[-1], ts.ParamsAverageState)  # old configs: no key
    c.ema_decay = 0.0
    assert not isinstance(ts.make_optimizer(c).init(params)[-1], ts.ParamsAverageState)
    c.ema_decay = 0.999
    assert isinstance(ts.make_optimizer(c).init(params)[-1], ts.ParamsAverageState)


def test_a_schedule_shorter_than_the_training_ends_at_its_final_rate_and_the_run_says_so(caplog):
    """What the resume warning advises (`lr_schedule_steps=<old num_steps>` after raising num_steps):
    the old schedule, then its final rate, 1% of the peak, for the remaining steps."""
    from siamese_jax import train as train_lib

    c = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=3, weight_decay=0.0, num_steps=40,
                                       lr_schedule_steps=20))
    old = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=3, weight_decay=0.0, num_steps=20))
    schedule, old_schedule = ts.learning_rate_schedule(c), ts.learning_rate_schedule(old)
    for step in range(21):
        assert float(schedule(step)) == float(old_schedule(step)), step
    for step in (20, 25, 39):
        assert float(schedule(step)) == pytest.approx(1e-4), step
    with caplog.at_level("WARNING", logger=train_lib.log.name):
        train_lib._warn_if_the_schedule_ends_early(c)
        train_lib._warn_if_the_schedule_ends_early(old)  # (no schedule key: nothing to say)
    assert [r.getMessage() for r in caplog.records] == [
        "the learning-rate schedule ends at step 20 of 40: the last 20 steps train at its final rate (0.0001, 1% of the peak)"]


def test_a_run_stopped_early_on_a_longer_schedule_takes_that_schedules_first_steps():
    """config.lr_schedule_steps: training 20 steps of a 200-step schedule makes exactly the first 20
    updates of the 200-step run (same rates), and not those of a 20-step run."""
    base = dict(learning_rate=1e-2, warmup_steps=3, weight_decay=0.0)
    short_on_long = ml_collections.ConfigDict(dict(base, num_steps=20, lr_schedule_steps=200))
    long = ml_collections.ConfigDict(dict(base, num_steps=200))
    short = ml_collections.ConfigDict(dict(base, num_steps=20))  # configs before the key: no entry at all

    def updates(config):
        tx, params = ts.make_optimizer(config), {"w": jnp.zeros(2)}
        state, out = tx.init(params), []
        for t in range(20):
            u, state = tx.update({"w": jnp.array([1.0, -2.0]) * (t + 1)}, state, params)
            out.append(np.asarray(u["w"]))
        return np.stack(out)

    np.testing.assert_array_equal(updates(short_on_long), updates(long))
    assert not np.allclose(updates(short)[-5:], updates(long)[-5:])  # the 20-step cosine has decayed by then


@pytest.mark.parametrize("selection", ["online", "online_all", "random"])
def test_triplet_loss_with_squared_distances_for_every_selection(selection):
    """`squared=True` with online selection used to fail at the first step (it named a distance
    function losses.py does not have); the per-anchor loss must be the hinge on squared distances."""
    model = _model("triplet", norm="layer")  # no batch statistics: the loss alone, in eval mode
    params = ts.create_train_state(model, optax.sgd(0.1), jax.random.PRNGKey(0), SIZE).params
    batch = _batch("triplet", selection)
    key = jax.random.PRNGKey(3)
    value, _ = ts.loss_fn(params, {}, model, batch, "triplet", 0.5, True, False, key, selection)
    embed = lambda x: np.asarray(model.apply({"params": params}, jnp.asarray(x), train=False), np.float64)  # noqa: E731
    d = lambda a, b: np.sum((a - b) ** 2, axis=-1)  # squared Euclidean  # noqa: E731
    if selection == "online":  # one random positive per anchor, its hardest negative
        emb = embed(batch["images"])
        pos, neg, valid = (np.asarray(a) for a in ts.online_triplets(jnp.asarray(emb, jnp.float32), batch["labels"], key, True))
        per_anchor = np.maximum(d(emb, emb[pos]) - d(emb, emb[neg]) + 0.5, 0.0)
        expected = np.sum(per_anchor * valid) / max(valid.sum(), 1)
    elif selection == "online_all":  # every positive pair, the anchor's hardest negative
        emb, labels = embed(batch["images"]), np.asarray(batch["labels"])
        terms = []
        for a in range(len(emb)):
            negatives = labels != labels[a]
            hardest = min(d(emb[a], emb[n]) for n in np.flatnonzero(negatives))
            terms += [max(d(emb[a], emb[p]) - hardest + 0.5, 0.0)
                      for p in np.flatnonzero(~negatives) if p != a]
        expected = np.mean(terms)
    else:  # the sampled triplets as given
        anchor, positive, negative = (embed(batch[k]) for k in ("anchor", "positive", "negative"))
        expected = np.mean(np.maximum(d(anchor, positive) - d(anchor, negative) + 0.5, 0.0))
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    # (the hinge on plain distances differs: each selection's branch passes `squared` on)
    plain, _ = ts.loss_fn(params, {}, model, batch, "triplet", 0.5, False, False, key, selection)
    assert abs(float(plain) - expected) > 0.05, (float(plain), expected)


def test_multi_similarity_weights_reach_the_loss():
    """config.ms_alpha / ms_beta / ms_lambda travel config -> train.multi_similarity_of -> loss_fn: a key
    recorded in config.json but never passed on would train silently with the paper's defaults."""
    from siamese_jax import losses as L
    from siamese_jax import train
    from siamese_jax.configs import default

    c = default.get_config("omniglot")
    assert train.multi_similarity_of(c) == ts.MULTI_SIMILARITY == (2.0, 50.0, 0.5)
    c.ms_alpha, c.ms_beta, c.ms_lambda = 1.0, 10.0, 0.2
    assert train.multi_similarity_of(c) == (1.0, 10.0, 0.2)
    loss = "multi_similarity"
    model, batch = _model(loss, norm="layer"), _batch(loss)  # no batch statistics: the loss alone, in eval mode
    params = ts.create_train_state(model, optax.sgd(0.1), jax.random.PRNGKey(0), SIZE).params
    emb = model.apply({"params": params}, batch["images"], train=False)
    values = []
    for weights in (ts.MULTI_SIMILARITY, (1.0, 10.0, 0.2)):
        got = ts.loss_fn(params, {}, model, batch, loss, 0.3, False, train=False, multi_similarity=weights)[0]
        np.testing.assert_allclose(float(got), float(L.multi_similarity_loss(emb, batch["labels"], 0.3, *weights)),
                                   rtol=1e-5)
        values.append(float(got))
    assert values[0] != values[1]
    default_weights = ts.loss_fn(params, {}, model, batch, loss, 0.3, False, train=False)[0]
    assert float(default_weights) == values[0]


# ------------------------------------------------------------------ the mutation review of 2026-12-06
# Each test below failed on a mutant of the code that every earlier test passed (stop 47).

def test_arcface_scale_reaches_the_loss():
    # Guards loss_fn passing `arcface_scale` (config.arcface_scale, via make_train_step) on to the
    # ArcFace loss, as test_multi_similarity_weights_reach_the_loss does for its weights: every test
    # ran with the default 30, so a branch hard-coding scale=30.0 trained silently with it.
    config = ml_collections.ConfigDict(dict(model="small", widths=(8, 8), embedding_dim=16, norm="layer",
                                            l2_normalize=True, loss="arcface", compute_dtype="float32", num_classes=4))
    model = models.build_model(config)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 2).astype(np.int32)
    batch = {"images": rng.uniform(size=(8, 16, 16, 1)).astype(np.float32), "labels": labels + 100,
             "class_index": labels}
    params = ts.create_train_state(model, optax.sgd(0.1), jax.random.PRNGKey(0), 16).params
    # One jitted program (a traced scale) for both scales: eager, this test took 8 s on CPU.
    run = jax.jit(lambda p, scale: (model.apply({"params": p}, batch["images"], train=False),
                                    ts.loss_fn(p, {}, model, batch, "arcface", 0.5, False, train=False,
                                               arcface_scale=scale)[0]))
    values = []
    for scale in (30.0, 8.0):
        emb, got = run(params, scale)
        want = L.arcface_loss(np.asarray(emb), labels, np.asarray(params["class_centres"]), scale, 0.5)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
        values.append(float(got))
    assert values[0] != values[1]


def test_an_explicit_margin_of_0_is_the_margin_not_the_losss_default():
    """`--config.margin=0` is a valid margin (config_check takes >= 0); read as unset, the run
    trained with the loss's default margin while config.json recorded 0."""
    from siamese_jax import train
    from siamese_jax.configs import default

    c = default.get_config("mnist")
    c.loss, c.margin = "contrastive", 0.0
    assert train.margin_of(c) == 0.0
    c.margin = None
    assert train.margin_of(c) == c.margins["contrastive"] > 0


def test_a_schedule_as_long_as_the_training_is_not_called_one_that_ends_early(caplog):
    """lr_schedule_steps == num_steps (e.g. written out by hand) is the whole run's schedule: no
    warning that "the last 0 steps train at its final rate"."""
    from siamese_jax import train as train_lib

    c = ml_collections.ConfigDict(dict(learning_rate=1e-2, num_steps=40, lr_schedule_steps=40))
    with caplog.at_level("WARNING", logger=train_lib.log.name):
        train_lib._warn_if_the_schedule_ends_early(c)
    assert not caplog.records


def test_online_triplets_outside_jit_trip_no_debug_infs():
    """The nearest-negative argmin's fill is finite: eagerly under jax.debug_infs it raised a
    FloatingPointError (a false alarm for a user debugging a divergence)."""
    emb = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
    labels = jnp.array([0, 0, 1, 1, 2, 2])
    want = jax.jit(ts.online_triplets)(emb, labels, jax.random.PRNGKey(0))
    with jax.debug_infs(True):
        got = ts.online_triplets(emb, labels, jax.random.PRNGKey(0))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("loss, selection", [(loss, "online") for loss in ts.ALL_LOSSES] + [("triplet", "online_all")])
def test_loss_fn_and_moving_average_trace_under_strict_dtype_promotion(loss, selection):
    """A developer checking dtypes runs under jax_numpy_dtype_promotion="strict": the online triplet
    selection's int32 count divided a float32 weight, and the moving average mixed its int32 count
    with Python floats, both implicit promotions (to float32, the same values as the explicit casts
    now). Traced only (eval_shape): no compile. optax's own schedules do not pass it; not tested."""
    model = _model(loss)
    variables = models.init_variables(model, jax.random.PRNGKey(0), SIZE)
    batch = _batch(loss, selection)
    with jax.numpy_dtype_promotion("strict"):
        jax.eval_shape(lambda p, s: ts.loss_fn(p, s, model, batch, loss, 0.5, False, True, jax.random.PRNGKey(1),
                                               selection), variables["params"], variables.get("batch_stats", {}))
        average = ts.params_moving_average(0.99)
        jax.eval_shape(lambda p: average.update(p, average.init(p), p), variables["params"])


def test_retrieval_per_query_traces_under_strict_dtype_promotion():
    """MAP@R's per-query precision (float32) times the hits (bool) over R (int32): explicit casts."""
    from siamese_jax import evaluation
    neighbours, query, r = jnp.array([[0, 1, 0], [1, 1, 0]]), jnp.array([0, 1]), jnp.array([2, 1])
    want = evaluation._retrieval_per_query(neighbours, query, r)
    with jax.numpy_dtype_promotion("strict"):
        got = evaluation._retrieval_per_query(neighbours, query, r)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.slow
def test_training_loop_steady_state_makes_no_implicit_transfer(data_dir, tmp_path, monkeypatch):
    """After its first steps the loop's sampler, train step and metrics fetch run under
    jax.transfer_guard("disallow"): the sampler was given the step as a Python int, a host-to-device
    copy every step (found by the review of 2026-12-07; the device's own state.step is the same number)."""
    from siamese_jax import input_pipeline as ip
    from siamese_jax import train as train_lib
    from siamese_jax.configs import default

    calls = {"n": 0}

    def guarded(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] <= 9:  # the first 3 steps (3 calls each) compile and may copy
                return fn(*args, **kwargs)
            with jax.transfer_guard("disallow"):
                return fn(*args, **kwargs)
        return wrapper

    make_sampler, make_train_step = ip.make_sampler, ts.make_train_step
    monkeypatch.setattr(ip, "make_sampler", lambda *a, **k: (lambda s, b: (guarded(s), b))(*make_sampler(*a, **k)))
    monkeypatch.setattr(ts, "make_train_step", lambda *a, **k: guarded(make_train_step(*a, **k)))
    monkeypatch.setattr(train_lib, "_finish_step", guarded(train_lib._finish_step))
    config = default.get_config()
    config.update(dict(archive_dir=str(data_dir), widths=(8, 8), embedding_dim=16, val_episodes=10,
                       classes_per_batch=8, images_per_class=2, batch_size=16, log_every_seconds=0,
                       test_time_shifts="none", plots=False, num_steps=8, eval_every_steps=100,
                       checkpoint_every_steps=100))
    train_lib.train(config, str(tmp_path / "run"))
    assert calls["n"] == 3 * 8
