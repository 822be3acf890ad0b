"""Speed benchmarks, each against a peer measured in the same run (ratios, not absolute claims).

    python -m experiments.benchmark [--quick]

1. P×K batch sampling + affine augmentation: the jitted on-device sampler vs the same batch drawn
   with NumPy on the host and copied to the device (what a Python data loader does).
2. The train step: one jitted call per step (what experiments.train does) vs `lax.scan` over 10
   steps per call (stack-notes §8: slower on CPU; usually faster on GPU/TPU).
3. Compute dtype: float32 vs bfloat16 train steps (bf16 convolutions are emulated on CPU).
4. Max-pooling in the small encoder's train step: `models.max_pool_2x2` (reshape + max, whose
   gradient is elementwise) vs `flax.linen.max_pool` (gradient = XLA select-and-scatter).
5. Encoder shape: the default 16-32-64-128 channels at 35 px vs 4 x 32 channels at 28 px.
6. Exact k-NN search: `evaluation.knn` (jitted top-k over chunks) vs NumPy brute force.
"""
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
STEP_IMAGE_SIZE = 35  # the CPU default config's input size (experiments/configs/default.py)
flags.DEFINE_bool("quick", False, "Fewer repetitions (a smoke run).")
flags.DEFINE_string("data_dir", None, "Data root (default: $SIAMESE_DATA_DIR).")


def _rate(fn, n):
    """Calls per second of `fn()` (blocked on its result), after one warm-up call."""
    jax.block_until_ready(fn())
    t = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return n / (time.perf_counter() - t)


def _row(name, ours, peer, unit, ours_name, peer_name):
    print(f"{name:<34} {ours_name}: {ours:10.1f} {unit}   {peer_name}: {peer:10.1f} {unit}   ratio {ours / peer:6.2f}x")


def bench_sampling(ds, n):
    from siamese_jax import augment, sampling

    P, K, size = 32, 4, STEP_IMAGE_SIZE
    dds = sampling.to_device_dataset(ds, image_size=size)
    cfg = augment.AffineConfig()
    on_device = jax.jit(lambda key, step: sampling.sample_pk_batch(key, step, dds, P, K, augment_cfg=cfg)["images"])
    key = jax.random.PRNGKey(0)
    counter = iter(range(10 ** 9))
    ours = _rate(lambda: on_device(key, next(counter)), n)

    images = np.asarray(dds.images)
    labels = np.asarray(ds.labels)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    classes = np.array(sorted(by_class))
    rng = np.random.default_rng(0)
    aug = jax.jit(lambda k, x: augment.random_affine(k, x, cfg))

    def host():
        picked = rng.choice(classes, P, replace=False)
        idx = np.concatenate([rng.choice(by_class[c], K, replace=False) for c in picked])
        x = jnp.asarray(images[idx].astype(np.float32)[..., None] / 255.0)
        return aug(key, x)

    peer = _rate(host, n)
    _row("P×K sampling + augmentation", ours, peer, "batch/s", "on device", "host NumPy")


def _step_setup(ds, dtype, widths=(16, 32, 64, 128), image_size=STEP_IMAGE_SIZE):
    import ml_collections

    from siamese_jax import models, parallel, sampling
    from siamese_jax import train_step as ts

    config = ml_collections.ConfigDict(dict(model="small", widths=widths, embedding_dim=64, norm="batch",
                                            l2_normalize=False, loss="batch_hard", compute_dtype=dtype))
    model = models.build_model(config)
    tx = optax.adam(1e-3)
    mesh = parallel.make_data_mesh(jax.devices()[:1])
    dds = sampling.to_device_dataset(ds, image_size=image_size)
    state = ts.create_train_state(model, tx, jax.random.PRNGKey(0), image_size)
    batch = jax.jit(lambda k: {k2: v for k2, v in sampling.sample_pk_batch(k, 0, dds, 32, 4).items()
                               if k2 in ("images", "labels")})(jax.random.PRNGKey(1))
    return model, tx, mesh, state, batch


def bench_scan(ds, n):
    from siamese_jax import train_step as ts

    model, tx, mesh, state, batch = _step_setup(ds, "float32")
    step = ts.make_train_step(model, tx, mesh, loss="batch_hard", margin=0.5)
    holder = {"s": jax.tree.map(jnp.copy, state)}

    def per_step():
        holder["s"], m = step(holder["s"], batch, jax.random.PRNGKey(0))
        return m["loss"]

    ours = _rate(per_step, n)

    def scan_body(s, _):
        (value, (stats, bs)), grads = jax.value_and_grad(ts.loss_fn, has_aux=True)(
            s.params, s.batch_stats, model, batch, "batch_hard", 0.5, False)
        updates, opt = tx.update(grads, s.opt_state, s.params)
        return s.replace(params=optax.apply_updates(s.params, updates), batch_stats=bs, opt_state=opt,
                         step=s.step + 1), value

    scan10 = jax.jit(lambda s: jax.lax.scan(scan_body, s, None, length=10))
    holder2 = {"s": jax.tree.map(jnp.copy, state)}

    def scanned():
        holder2["s"], losses = scan10(holder2["s"])
        return losses

    peer = 10 * _rate(scanned, max(1, n // 10))
    _row("train step (batch-hard, 128 img)", ours, peer, "step/s", "1 step/call", "lax.scan x10")


def _train_step_rate(ds, n, dtype="float32", widths=(16, 32, 64, 128), image_size=STEP_IMAGE_SIZE) -> float:
    """Steps/s of the jitted batch-hard train step (one call per step) on one fixed P×K batch."""
    from siamese_jax import train_step as ts

    model, tx, mesh, state, batch = _step_setup(ds, dtype, widths, image_size)
    step = ts.make_train_step(model, tx, mesh, loss="batch_hard", margin=0.5)
    holder = {"s": state}

    def one():
        holder["s"], m = step(holder["s"], batch, jax.random.PRNGKey(0))
        return m["loss"]

    return _rate(one, n)


def bench_dtype(ds, n):
    rates = {dtype: _train_step_rate(ds, n, dtype) for dtype in ("float32", "bfloat16")}
    _row(f"compute dtype on {jax.devices()[0].platform}", rates["float32"], rates["bfloat16"], "step/s",
         "float32", "bfloat16")


def bench_pooling(ds, n):
    import flax.linen as nn

    from siamese_jax import models

    rates = {}
    for name, pool in (("reshape", models.max_pool_2x2),
                       ("nn.max_pool", lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)))):
        original = models.max_pool_2x2
        models.max_pool_2x2 = pool  # the encoder looks the function up at trace time
        try:
            rates[name] = _train_step_rate(ds, n)
        finally:
            models.max_pool_2x2 = original
    _row("max-pool in the train step", rates["reshape"], rates["nn.max_pool"], "step/s", "reshape+max", "nn.max_pool")


def bench_encoders(ds, n):
    """The default encoder against the first sessions' one (4 x 32 channels at 28 px)."""
    ours = _train_step_rate(ds, n, widths=(16, 32, 64, 128), image_size=STEP_IMAGE_SIZE)
    peer = _train_step_rate(ds, n, widths=(32, 32, 32, 32), image_size=28)
    _row("encoder in the train step", ours, peer, "step/s", "16-128@35px", "4x32@28px")


def bench_knn(n):
    from siamese_jax import evaluation

    rng = np.random.default_rng(0)
    index = rng.normal(size=(20000, 64)).astype(np.float32)
    query = rng.normal(size=(1000, 64)).astype(np.float32)
    ours = _rate(lambda: evaluation.knn(query, index, 10)[1], n)

    def numpy_knn():
        d = (query ** 2).sum(1)[:, None] - 2 * query @ index.T + (index ** 2).sum(1)[None]
        part = np.argpartition(d, 10, axis=1)[:, :10]
        order = np.take_along_axis(d, part, 1).argsort(1)
        return np.take_along_axis(part, order, 1)

    peer = _rate(numpy_knn, n)
    np.testing.assert_array_equal(evaluation.knn(query, index, 10)[1], numpy_knn())  # same answer
    _row("k-NN 1k queries x 20k (k=10)", ours, peer, "call/s", "jitted top-k", "NumPy")


def main(argv):
    del argv
    from siamese_jax.data import load

    n = 5 if FLAGS.quick else 30
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
    ds = load("omniglot", "background", archive_dir=FLAGS.data_dir)
    bench_sampling(ds, 4 * n)
    bench_scan(ds, n)
    bench_dtype(ds, max(3, n // 3))
    bench_pooling(ds, n)
    bench_encoders(ds, n)
    bench_knn(max(3, n // 3))


if __name__ == "__main__":
    app.run(main)
