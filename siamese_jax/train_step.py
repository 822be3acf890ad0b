"""The train state and the data-parallel train step.

`make_train_step(...)` returns one pure function `train_step(state, batch, key) -> (state, metrics)`
jitted once, with the state donated, the batch sharded on its leading axis over the `data` mesh and
the state replicated. The loss is computed on the GLOBAL batch (one forward pass over every image of
the batch, so BatchNorm statistics and online triplet mining see all of it); the same global batch
and key therefore give the same loss and update on 1 device or on many.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from siamese_jax import losses as L
from siamese_jax import models, parallel

PAIR_LOSSES = ("contrastive", "verification")
TRIPLET_LOSSES = ("triplet",)
MINING_LOSSES = ("batch_all", "batch_hard", "semihard")
# Softmax over the class means of the P x K batch (Snell et al.'s prototypes; no margin).
PROTOTYPE_LOSSES = ("prototypical",)
# Losses against a learned centre per training class (P x K batches carry each image's class index).
CLASS_CENTRE_LOSSES = ("arcface",)
# Soft-weighted pair losses on the cosine similarities of a P x K batch (Wang et al.'s multi-similarity;
# `margin` is its mining margin epsilon).
SIMILARITY_LOSSES = ("multi_similarity",)
ALL_LOSSES = PAIR_LOSSES + TRIPLET_LOSSES + MINING_LOSSES + PROTOTYPE_LOSSES + CLASS_CENTRE_LOSSES + SIMILARITY_LOSSES
# Losses on a P x K batch of class-labelled images (besides triplet's online selections).
CLASS_BATCH_LOSSES = MINING_LOSSES + PROTOTYPE_LOSSES + CLASS_CENTRE_LOSSES + SIMILARITY_LOSSES
# Losses that compare directions: they need unit-length embeddings (config.l2_normalize=True), so
# that the distances evaluation and `compare` use are those of the vectors the loss trained.
DIRECTION_LOSSES = CLASS_CENTRE_LOSSES + SIMILARITY_LOSSES


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any
    batch_stats: Any  # {} when the model has no BatchNorm
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key (checkpointable as a plain array)


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then cosine decay to 1% of it at `lr_schedule_steps` (unset:
    `num_steps`), constant after."""
    schedule_steps = int(config.get("lr_schedule_steps") or config.num_steps)  # configs before it lack it
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=min(config.warmup_steps, schedule_steps),
        decay_steps=max(schedule_steps, config.warmup_steps + 1), end_value=config.learning_rate * 0.01)


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam (AdamW with `weight_decay`) on a warm-up + cosine schedule over `lr_schedule_steps` (unset:
    `num_steps`). The optimizer fixes the shape of `opt_state`, so restoring a checkpoint builds its
    target with this same function."""
    schedule = learning_rate_schedule(config)
    tx = optax.adamw(schedule, weight_decay=config.weight_decay) if config.weight_decay else optax.adam(schedule)
    decay = float(config.get("ema_decay") or 0.0)  # configs written before the average lack it
    return optax.chain(tx, params_moving_average(decay)) if decay else tx


class ParamsAverageState(NamedTuple):
    count: jax.Array  # int32 scalar: updates averaged so far
    average: Any  # the exponential moving average of the parameters, same tree as params


def params_moving_average(decay: float) -> optax.GradientTransformation:
    """Keeps an exponential moving average of the parameters in the optimizer state; the updates
    pass through unchanged, so training follows exactly the trajectory it would without it.

    Chained last (after Adam), it sees the final update u_t and the parameters p_{t-1}:
        p_t = p_{t-1} + u_t,   avg_t = d_t avg_{t-1} + (1 - d_t) p_t,   avg_0 = p_0,
    with d_t = min(decay, (1 + t) / (10 + t)) (TensorFlow's ExponentialMovingAverage with
    num_updates), so the early average is not dominated by the random initialisation. Living in
    `opt_state`, the average is checkpointed, restored and replicated with it, and every restore
    target built by `make_optimizer(config)` has its shape."""
    def init(params):
        return ParamsAverageState(count=jnp.zeros((), jnp.int32),
                                  average=jax.tree.map(lambda p: jnp.array(p, copy=True), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("params_moving_average needs the parameters: tx.update(grads, opt_state, params)")
        count = state.count + 1
        c = count.astype(jnp.float32)  # explicit: the promotion of int32 with a Python float
        d = jnp.minimum(decay, (1.0 + c) / (10.0 + c))
        average = jax.tree.map(lambda a, p, u: a + (1.0 - d) * (p + u - a), state.average, params, updates)
        return updates, ParamsAverageState(count=count, average=average)

    return optax.GradientTransformation(init, update)


def averaged_state(state: TrainState) -> TrainState:
    """The state with its parameters replaced by their moving average when the optimizer keeps one
    (`config.ema_decay` > 0), else the state itself: what validation scores and the best checkpoint,
    evaluation and export hold. BatchNorm's running statistics stay the live network's (momentum 0.9:
    the last ~10 steps), a mismatch that shrinks with the learning rate (BUILD_NOTES, "Run EMA")."""
    parts = state.opt_state if isinstance(state.opt_state, tuple) else (state.opt_state,)
    for part in parts:
        if isinstance(part, ParamsAverageState):
            return state.replace(params=part.average)
    return state


def create_train_state(model, tx: optax.GradientTransformation, key, image_size: int) -> TrainState:
    init_key, state_key = jax.random.split(key)
    variables = models.init_variables(model, init_key, image_size)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=state_key)


TRIPLET_SELECTIONS = ("online", "online_all", "random")
# Wang et al.'s (alpha, beta, lambda): config.ms_alpha, ms_beta, ms_lambda.
MULTI_SIMILARITY = (2.0, 50.0, 0.5)


def batch_kind(loss: str, triplet_selection: str = "online") -> str:
    """Which sampler feeds a loss: "pairs", "triplets" or "classes" (P classes x K images).

    The triplet loss takes explicit (anchor, positive, negative) triplets, selected from each
    P x K batch, "online" (every image an anchor with one random same-class positive and the
    batch's hardest other-class negative) or "online_all" (the default: every same-class pair,
    each with its anchor's hardest negative, `losses.hardest_negative_triplet_loss`), or
    "random" (independent triplets drawn from the dataset, as the Keras triplet example does).
    """
    if loss in PAIR_LOSSES:
        return "pairs"
    if loss in TRIPLET_LOSSES:
        if triplet_selection not in TRIPLET_SELECTIONS:
            raise ValueError(f"unknown triplet_selection {triplet_selection!r}; expected one of {', '.join(TRIPLET_SELECTIONS)}")
        return "triplets" if triplet_selection == "random" else "classes"
    if loss in CLASS_BATCH_LOSSES:
        return "classes"
    raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(ALL_LOSSES)}")


def _tower_inputs(batch, kind):
    """All images of a batch as one [M, H, W, 1] array, interleaved per row so each device's rows stay local."""
    if kind == "classes":
        return batch["images"], None
    names = ("x1", "x2") if kind == "pairs" else ("anchor", "positive", "negative")
    stacked = jnp.stack([batch[n] for n in names], axis=1)  # [B, T, H, W, 1]
    return stacked.reshape((-1,) + stacked.shape[2:]), len(names)


def online_triplets(embeddings, labels, key, squared: bool = False):
    """Indices (positive, negative) per anchor of a labelled batch: a random other member of the
    anchor's class, and the other-class image nearest to the anchor. Anchors without a positive
    or a negative are masked out by the returned `valid`."""
    D = L.pairwise_distances(jax.lax.stop_gradient(embeddings), squared)
    same = labels[:, None] == labels[None, :]
    not_self = ~jnp.eye(labels.shape[0], dtype=bool)
    pos_mask, neg_mask = same & not_self, ~same
    noise = jax.random.uniform(key, D.shape)
    positive = jnp.argmax(jnp.where(pos_mask, noise, -1.0), axis=1)
    negative = jnp.argmin(jnp.where(neg_mask, D, L._fill_max(D)), axis=1)  # finite: JAX_DEBUG_INFS
    valid = jnp.any(pos_mask, axis=1) & jnp.any(neg_mask, axis=1)
    return positive, negative, valid


def loss_fn(params, batch_stats, model, batch, loss: str, margin: float, squared: bool, train: bool = True,
            key=None, triplet_selection: str = "online", arcface_scale: float = 30.0, distill_weight: float = 0.0,
            multi_similarity: tuple = MULTI_SIMILARITY):
    """(loss, (stats, new_batch_stats)) for one global batch. `key` picks online triplets' positives;
    `multi_similarity` is (alpha, beta, lambda) of that loss (its epsilon is `margin`).
    A P x K batch with "teacher" embeddings (one row per image) adds `distill_weight` x the relational
    distillation loss to the metric loss (stats: "distill_loss", unweighted)."""
    kind = batch_kind(loss, triplet_selection)
    images, towers = _tower_inputs(batch, kind)
    variables = {"params": params}
    # A "dropout" stream for an encoder with `nn.Dropout(deterministic=not train)` (none of the shipped
    # ones has one: then the key is unused and compiled away). Folded from the step's key, so every
    # step draws new masks, and generated for the global batch (JAX's partitionable threefry), so they
    # do not depend on the device count.
    rngs = {"dropout": jax.random.fold_in(key, 1)} if train and key is not None else {}
    if batch_stats:
        variables["batch_stats"] = batch_stats
        emb, updates = model.apply(variables, images, train=train, mutable=["batch_stats"], rngs=rngs)
        new_batch_stats = updates["batch_stats"]
    else:
        emb, new_batch_stats = model.apply(variables, images, train=train, rngs=rngs), batch_stats
    emb = emb.astype(jnp.float32)
    if towers is not None:
        emb_t = emb.reshape((-1, towers, emb.shape[-1]))
    if loss == "contrastive":
        value, stats = L.contrastive_loss_with_stats(emb_t[:, 0], emb_t[:, 1], is_similar=batch["is_similar"], margin=margin)
    elif loss == "verification":
        logits = model.apply(variables, emb_t[:, 0], emb_t[:, 1], method=model.logits)
        value, stats = L.verification_loss_with_stats(logits, is_similar=batch["is_similar"])
    elif loss == "triplet" and triplet_selection == "online_all":
        value, stats = L.hardest_negative_triplet_loss_with_stats(emb, batch["labels"], margin=margin, squared=squared)
    elif loss == "triplet" and kind == "classes":
        key = jax.random.PRNGKey(0) if key is None else key
        positive, negative, valid = online_triplets(emb, batch["labels"], key, squared)
        d_pos = L.euclidean_distance(emb, emb[positive], squared=squared)
        d_neg = L.euclidean_distance(emb, emb[negative], squared=squared)
        per_anchor = jnp.maximum(d_pos - d_neg + margin, 0.0)
        # The count cast explicitly (the int32 -> float32 that implicit promotion did), so the step also
        # traces under jax_numpy_dtype_promotion="strict".
        w = valid.astype(jnp.float32) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
        value = jnp.sum(per_anchor * w)  # = triplet_loss(emb, emb[positive], emb[negative]) over valid anchors
        stats = {"active_fraction": jnp.sum((per_anchor > 0).astype(jnp.float32) * w)}
    elif loss == "arcface":
        if "class_centres" not in params:
            raise ValueError("loss='arcface' needs a network with class centres: set config.num_classes "
                             "(train.py sets it to the training classes)")
        value, stats = L.arcface_loss_with_stats(emb, batch["class_index"], params["class_centres"],
                                                 scale=arcface_scale, margin=margin)
    elif loss == "prototypical":
        value, stats = L.prototypical_loss_with_stats(emb, batch["labels"])
    elif loss == "multi_similarity":
        alpha, beta, lam = multi_similarity
        value, stats = L.multi_similarity_loss_with_stats(emb, batch["labels"], epsilon=margin,
                                                          alpha=alpha, beta=beta, lam=lam)
    elif loss == "triplet":
        value, stats = L.triplet_loss_with_stats(emb_t[:, 0], emb_t[:, 1], emb_t[:, 2], margin=margin, squared=squared)
    elif loss in MINING_LOSSES:
        mining = {"batch_all": L.batch_all_triplet_loss_with_stats,
                  "batch_hard": L.batch_hard_triplet_loss_with_stats,
                  "semihard": L.batch_semihard_triplet_loss_with_stats}[loss]
        value, stats = mining(emb, batch["labels"], margin=margin, squared=squared)
    else:  # a loss in ALL_LOSSES without a branch here (a contributor's checklist: losses.py's docstring)
        raise NotImplementedError(f"loss {loss!r} has no branch in train_step.loss_fn")
    if "teacher" in batch:
        distill = L.relational_distance_loss(emb, batch["teacher"])
        value = value + distill_weight * distill
        stats = dict(stats, distill_loss=distill)
    stats = dict(stats, embedding_norm=jnp.mean(jnp.linalg.norm(emb, axis=-1)))
    return value, (stats, new_batch_stats)


def make_train_step(model, tx: optax.GradientTransformation, mesh, *, loss: str, margin: float,
                    squared: bool = False, augment_fn: Optional[Callable] = None,
                    triplet_selection: str = "online", arcface_scale: float = 30.0, distill_weight: float = 0.0,
                    multi_similarity: tuple = MULTI_SIMILARITY):
    """The jitted data-parallel step. `augment_fn(key, images) -> images` runs on device, per image.

    Returns `train_step(state, batch, key) -> (state, metrics)`; metrics are device scalars (loss,
    active_fraction, embedding_norm, grad_norm, param_norm of the updated parameters), read by the
    caller when it wants, not synced here.
    """
    batch_kind(loss, triplet_selection)  # validates the names early
    repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    def step(state: TrainState, batch, key):
        key = jax.random.fold_in(key, state.step)
        if augment_fn is not None:
            batch = dict(batch)
            for i, name in enumerate(n for n in ("x1", "x2", "anchor", "positive", "negative", "images") if n in batch):
                batch[name] = augment_fn(jax.random.fold_in(key, i), batch[name])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (value, (stats, batch_stats)), grads = grad_fn(
            state.params, state.batch_stats, model, batch, loss, margin, squared, True,
            jax.random.fold_in(key, 1000), triplet_selection, arcface_scale, distill_weight,
            tuple(float(v) for v in multi_similarity))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(stats, loss=value, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new_state, metrics

    return jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=(0,))
