import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from siamese_jax import losses as L
from siamese_jax import models
from siamese_jax.configs import default


def _config(**kw):
    c = ml_collections.ConfigDict(dict(model="small", widths=(16, 16, 16, 16), embedding_dim=32, norm="batch",
                                       l2_normalize=False, loss="triplet", compute_dtype="float32"))
    c.update(kw)
    return c


def test_koch_twin_network_has_the_papers_parameter_count():
    model = models.build_model(_config(model="koch", loss="verification", embedding_dim=4096))
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0), 105))
    assert models.count_params(shapes["params"]) == 38_951_745
    assert models.count_params(shapes["params"]["encoder"]) == 38_947_648


def test_koch_gradient_under_bfloat16_follows_float32_where_its_sigmoid_features_saturate():
    """Review 52 (Koch in bfloat16): the Dense layer and sigmoid computed in bfloat16 rounded every
    feature above sigmoid(~6) to exactly 1.0 (bfloat16's step is 2^-8 just below 1), where the sigmoid's
    gradient s(1 - s) is 0 and the head's |h1 - h2| of two such features is 0: no gradient reached the
    encoder from saturated features, which a trained network has many of (here all of them, by a
    Dense bias of 7). omniglot_koch trains in bfloat16. The sigmoid now computes in float32."""
    density = jnp.linspace(0.05, 0.5, 8)[:, None, None, None]  # unlike images: little cancellation between the towers
    x = (jax.random.uniform(jax.random.PRNGKey(1), (8, 65, 65, 1)) < density).astype(jnp.float32)
    same = jnp.arange(4) % 2 == 0
    grads = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        net = models.SiameseNetwork(models.KochEncoder(features=16, dtype=dtype), verification_head=True)
        params = net.init(jax.random.PRNGKey(0), x)["params"]
        params["encoder"]["Dense_0"]["bias"] = jnp.full((16,), 7.0)

        def loss(params, net=net):
            h = net.apply({"params": params}, x).astype(jnp.float32)  # as train_step.loss_fn
            return L.verification_loss(net.apply({"params": params}, h[:4], h[4:], method=net.logits), same)
        grads[dtype] = jax.jit(jax.grad(loss))(params)
    for (path, g32), g16 in zip(jax.tree_util.tree_flatten_with_path(grads[jnp.float32])[0],
                                jax.tree.leaves(grads[jnp.bfloat16])):
        g32, g16 = np.asarray(g32), np.asarray(g16, np.float32)
        # bfloat16 convolutions' rounding: 0.14-0.20 here (Dense and head 0.002-0.02); the bfloat16
        # sigmoid gave 1.0 (all zero) but for the head's bias.
        assert np.linalg.norm(g16 - g32) <= 0.3 * np.linalg.norm(g32), (jax.tree_util.keystr(path), np.abs(g16).max())


def test_koch_encoder_output_is_a_4096_sigmoid_code():
    enc = models.KochEncoder(features=4096)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 105, 105, 1))
    variables = enc.init(jax.random.PRNGKey(0), x)
    # flatten size 9216 = 256 * 6 * 6, as the paper's feature-map sizes say
    assert variables["params"]["Dense_0"]["kernel"].shape == (9216, 4096)
    h = enc.apply(variables, x)
    assert h.shape == (2, 4096) and bool(jnp.all((h > 0) & (h < 1)))


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
@pytest.mark.parametrize("size", [28, 32])
def test_small_encoder_shapes_and_l2_normalisation(norm, size):
    model = models.build_model(_config(norm=norm, l2_normalize=True))
    variables = models.init_variables(model, jax.random.PRNGKey(0), size)
    assert ("batch_stats" in variables) == (norm == "batch")
    x = jax.random.uniform(jax.random.PRNGKey(1), (5, size, size, 1))
    h = model.apply(variables, x, train=False)
    assert h.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(h), axis=-1), 1.0, rtol=1e-5)


def test_l2_normalisation_is_the_networks_for_any_encoder():
    """`l2_normalize` is applied by SiameseNetwork to whatever the encoder emits (Koch's sigmoid code,
    a contributor's module), and for the small encoder it is the same as the encoder's own option."""

    class Flat(nn.Module):  # a contributor's encoder: no normalisation of its own
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(6)(x.reshape(x.shape[0], -1))

    x = jax.random.uniform(jax.random.PRNGKey(1), (5, 8, 8, 1))
    for network in (models.SiameseNetwork(encoder=Flat(), l2_normalize=True),
                    models.SiameseNetwork(encoder=Flat(), l2_normalize=True, verification_head=True)):
        h = network.apply(network.init(jax.random.PRNGKey(0), x), x)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(h), axis=-1), 1.0, rtol=1e-5)
    koch = models.build_model(ml_collections.ConfigDict(dict(model="koch", embedding_dim=32, l2_normalize=True,
                                                             l2_normalize_koch=True, loss="arcface", num_classes=3,
                                                             compute_dtype="float32")))
    xk = jax.random.uniform(jax.random.PRNGKey(1), (2, 65, 65, 1))
    variables = koch.init(jax.random.PRNGKey(0), xk)
    h = np.asarray(koch.apply(variables, xk))
    assert h.shape == (2, 32) and variables["params"]["class_centres"].shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(h, axis=-1), 1.0, rtol=1e-5)
    # The small encoder: the network's normalisation gives the encoder option's values, and the
    # variables are the same tree (model files and checkpoints written before load unchanged).
    xs = jax.random.uniform(jax.random.PRNGKey(2), (5, 28, 28, 1))
    network = models.build_model(_config(l2_normalize=True))
    variables = models.init_variables(network, jax.random.PRNGKey(0), 28)
    own = models.SmallConvEncoder(widths=(16, 16, 16, 16), embedding_dim=32, l2_normalize=True)
    assert jax.tree.structure(own.init(jax.random.PRNGKey(0), xs)) == jax.tree.structure(
        {k: v["encoder"] for k, v in variables.items()})
    np.testing.assert_array_equal(np.asarray(network.apply(variables, xs)),
                                  np.asarray(own.apply({k: v["encoder"] for k, v in variables.items()}, xs)))


def test_a_koch_config_from_before_l2_normalize_koch_embeds_unnormalised_as_it_trained():
    """Koch's net once recorded `l2_normalize=True` and ignored it (a workdir or model file from before
    2026-12-05, when training it was refused): such a config, which lacks `l2_normalize_koch`, builds
    the network it trained, with its embeddings (and the distances its calibration was fitted to);
    the default config's Koch net normalises. The small encoder's configs of every age normalise."""
    legacy = _config(model="koch", embedding_dim=8, l2_normalize=True, loss="contrastive")
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 65, 65, 1))
    network = models.build_model(legacy)
    variables = models.init_variables(network, jax.random.PRNGKey(0), 65)
    h = np.asarray(network.apply(variables, x))
    unnormalised = models.build_model(_config(model="koch", embedding_dim=8, l2_normalize=False, loss="contrastive"))
    np.testing.assert_array_equal(h, np.asarray(unnormalised.apply(variables, x)))
    assert not np.allclose(np.linalg.norm(h, axis=-1), 1.0)
    now = models.build_model(_config(model="koch", embedding_dim=8, l2_normalize=True, loss="contrastive",
                                     l2_normalize_koch=default.get_config().l2_normalize_koch))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(now.apply(variables, x)), axis=-1), 1.0, rtol=1e-5)
    assert models.l2_normalizes(_config(l2_normalize=True)) and not models.l2_normalizes(legacy)


def test_small_encoder_per_block_widths():
    """`widths` sets each block's channels (and so the number of blocks); the 1x1 map feeds the Dense.
    Configs from before `widths` (`width` x `num_blocks`) still build the same network."""
    model = models.build_model(_config(widths=(4, 8, 16, 24, 8)))  # 28 -> 14 -> 7 -> 3 -> 1 -> 1
    variables = models.init_variables(model, jax.random.PRNGKey(0), 28)
    enc = variables["params"]["encoder"]
    assert [enc[f"Conv_{i}"]["kernel"].shape[-1] for i in range(5)] == [4, 8, 16, 24, 8]
    assert enc["Dense_0"]["kernel"].shape == (8, 32)
    h = model.apply(variables, jnp.zeros((3, 28, 28, 1)), train=False)
    assert h.shape == (3, 32)
    legacy = _config(width=16, num_blocks=3)
    del legacy["widths"]
    assert models.build_model(legacy).encoder.widths == (16, 16, 16)
    for bad in ((), (8, 0), (8, "x"), (8, True)):
        with pytest.raises(ValueError, match="config.widths must be"):
            models.build_model(_config(widths=bad))


def test_bfloat16_compute_keeps_float32_parameters():
    # Jitted, as training and embedding run them: one compile each, not one per operation (op by op
    # the test took ~13 CPU-seconds, jitted ~4; the dtypes are the same either way).
    model = models.build_model(_config(compute_dtype="bfloat16", norm="layer"))
    variables = jax.jit(lambda key: models.init_variables(model, key, 28))(jax.random.PRNGKey(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 28, 28, 1))
    h32 = jax.jit(models.build_model(_config(norm="layer")).apply)(variables, x)
    h16 = jax.jit(model.apply)(variables, x)
    assert h16.dtype == jnp.float32  # embeddings are returned in float32 for the losses
    np.testing.assert_allclose(np.asarray(h16), np.asarray(h32), atol=0.1)


def test_verification_head_is_l1_weighted_sum():
    model = models.build_model(_config(loss="verification", norm="none"))
    variables = models.init_variables(model, jax.random.PRNGKey(0), 28)
    w = variables["params"]["head"]["kernel"][:, 0]
    b = variables["params"]["head"]["bias"][0]
    h1, h2 = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 32))
    got = model.apply(variables, h1, h2, method=model.logits)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.abs(h1 - h2) @ w + b), rtol=1e-5, atol=1e-5)
    # The head the model trains with is the loss module's formula (which the losses' tests check).
    np.testing.assert_allclose(np.asarray(got), np.asarray(L.verification_logits(h1, h2, w, b)), rtol=1e-6, atol=1e-6)


def test_unknown_model_or_norm_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model(_config(model="resnet"))
    with pytest.raises(ValueError, match="unknown norm"):
        models.init_variables(models.build_model(_config(norm="group")), jax.random.PRNGKey(0), 28)


@pytest.mark.parametrize("shape", [(2, 28, 28, 3), (1, 7, 7, 2), (3, 3, 5, 1), (2, 96, 96, 4)])
def test_reshape_max_pool_equals_flax_max_pool(shape):
    import flax.linen as nn

    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    expected = nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(models.max_pool_2x2(x), expected)
    # Gradients agree too where the window maximum is unique (random normals: always).
    g = jax.grad(lambda x: jnp.sum(models.max_pool_2x2(x) ** 2))(x)
    g_ref = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)) ** 2))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6)


def _flax_bn_relu_pool(x, scale, bias, pool, train=True, stats=None):
    """The three layers the fused block replaces, as Flax writes them."""
    import flax.linen as nn

    c = x.shape[-1]
    stats = stats or {"mean": jnp.zeros(c), "var": jnp.ones(c)}
    y, updates = nn.BatchNorm(use_running_average=not train, momentum=0.9).apply(
        {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x, mutable=["batch_stats"])
    y = nn.relu(y)
    return (models.max_pool_2x2(y) if pool else y), updates["batch_stats"]


@pytest.mark.parametrize("shape,pool", [((8, 35, 35, 4), True), ((8, 17, 17, 3), True), ((6, 4, 4, 5), True),
                                        ((6, 1, 1, 5), False)])
def test_fused_batch_norm_relu_pool_equals_the_flax_layers(shape, pool):
    """Same values, same gradients (x, scale, bias) and same running statistics as nn.BatchNorm +
    ReLU + max_pool_2x2, including odd sizes (the floored row/column) and a window with tied maxima."""
    kx, ks, kb, kg = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(kx, shape)
    if pool:
        x = x.at[0, 0, 1, 0].set(x[0, 0, 0, 0])  # a tie inside one 2x2 window
    scale = 1.0 + 0.5 * jax.random.normal(ks, shape[-1:])
    bias = 0.3 * jax.random.normal(kb, shape[-1:])
    out_shape = (shape[0], shape[1] // 2, shape[2] // 2, shape[3]) if pool else shape
    cot = jax.random.normal(kg, out_shape)

    # Each side jitted (its forward and its backward pass one compile each, not one per operation:
    # op by op the 4 cases took ~20 CPU-seconds, jitted ~10); the two sides stay separate programs.
    ref, vjp_ref = jax.vjp(jax.jit(lambda *a: _flax_bn_relu_pool(*a, pool)[0]), x, scale, bias)
    ours, vjp_ours = jax.vjp(jax.jit(lambda *a: models.batch_norm_relu_pool(*a, 1e-5, pool)[0]), x, scale, bias)
    np.testing.assert_allclose(ours, ref, atol=2e-6)
    for g_ours, g_ref in zip(vjp_ours(cot), vjp_ref(cot)):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-4)

    module = models.BatchNormReLUPool(pool=pool)
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": jnp.full(shape[-1:], 0.1), "var": jnp.full(shape[-1:], 2.0)}}
    out, upd = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    _, ref_upd = jax.jit(lambda x, s, b, stats: _flax_bn_relu_pool(x, s, b, pool, stats=stats))(
        x, scale, bias, variables["batch_stats"])
    for k in ("mean", "var"):
        np.testing.assert_allclose(upd["batch_stats"][k], ref_upd[k], rtol=1e-5, atol=1e-6)
    eval_ref, _ = jax.jit(lambda x, s, b, stats: _flax_bn_relu_pool(x, s, b, pool, train=False, stats=stats))(
        x, scale, bias, variables["batch_stats"])
    np.testing.assert_allclose(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x), eval_ref, atol=2e-6)


def test_fused_block_keeps_nn_batchnorm_variable_names_and_bfloat16():
    # Jitted, as training runs them: one compile each, not one per operation (op by op the test took
    # ~10 CPU-seconds, jitted ~5).
    enc = models.SmallConvEncoder(widths=(4, 8), embedding_dim=3, dtype=jnp.bfloat16)
    v = jax.jit(enc.init)(jax.random.PRNGKey(0), jnp.zeros((2, 9, 9, 1)))
    assert set(v["params"]) == {"Conv_0", "BatchNorm_0", "Conv_1", "BatchNorm_1", "Dense_0"}
    assert set(v["params"]["BatchNorm_0"]) == {"scale", "bias"} and set(v["batch_stats"]["BatchNorm_1"]) == {"mean", "var"}
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 9, 9, 1))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(enc.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                                                         mutable=["batch_stats"])[0])))(v["params"])
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


def test_encoders_refuse_nchw_integer_and_too_small_input_with_one_clear_error():
    # The Python-API review (2026-12-05): an NCHW batch [8, 1, 35, 35] initialised and trained (the
    # 35 rows read as channels, H = 1 switched every pool off); uint8 0..255 input gave embeddings of
    # norm ~600; Koch's encoder below 65 px failed in JAX's initializer with a bare ZeroDivisionError.
    key = jax.random.PRNGKey(0)
    small = models.SmallConvEncoder(widths=(8, 8), embedding_dim=4)
    with pytest.raises(ValueError, match=r"NHWC.*\(NCHW\? move the channels last\)"):
        small.init(key, jnp.zeros((8, 1, 35, 35)))
    with pytest.raises(ValueError, match="float images in \\[0, 1\\]; got uint8"):
        small.init(key, jnp.zeros((8, 35, 35, 1), jnp.uint8))
    for size in (28, 64):
        with pytest.raises(ValueError, match="KochEncoder needs images of at least 65x65 pixels"):
            models.KochEncoder(features=8).init(key, jnp.zeros((1, size, size, 1)))
    models.KochEncoder(features=8).init(key, jnp.zeros((1, 65, 65, 1)))  # the least that works
    with pytest.raises(ValueError, match="num_class_centres needs embedding_dim"):
        models.SiameseNetwork(encoder=small, num_class_centres=10).init(key, jnp.zeros((2, 35, 35, 1)))


# ------------------------------------------------------ the mutation review of 2026-12-06, round 3
# Each test below failed on a mutant of the code that every earlier test passed.

def test_small_encoder_pools_every_map_above_1x1_and_biases_only_unnormalised_convolutions():
    """8 -> 4 -> 2 -> 1: a 2x2 map is pooled too (the Dense reads widths[-1] features, as the shipped
    models' checkpoints have it); a convolution followed by a norm has no bias (the norm's shift is it)."""
    for norm in ("batch", "layer", "none"):
        model = models.build_model(_config(norm=norm, widths=(4, 4, 6)))
        shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0), 8))
        enc = shapes["params"]["encoder"]
        assert enc["Dense_0"]["kernel"].shape == (6, 32), norm
        assert all(("bias" in enc[f"Conv_{i}"]) == (norm == "none") for i in range(3)), norm


def test_build_model_takes_the_embedding_size_dtype_and_class_centres_from_the_config():
    key = jax.random.PRNGKey(0)
    koch = models.build_model(_config(model="koch", embedding_dim=64))
    shapes = jax.eval_shape(lambda: models.init_variables(koch, key, 105))
    assert shapes["params"]["encoder"]["Dense_0"]["kernel"].shape == (9216, 64)
    arcface = models.build_model(_config(loss="arcface", l2_normalize=True, num_classes=5))
    assert jax.eval_shape(lambda: models.init_variables(arcface, key, 28))["params"]["class_centres"].shape == (5, 32)
    other = models.build_model(_config(loss="batch_hard", num_classes=5))  # only ArcFace learns centres
    assert "class_centres" not in jax.eval_shape(lambda: models.init_variables(other, key, 28))["params"]
    # A config.json written before compute_dtype existed computes in float32, as it was trained.
    old = _config()
    del old["compute_dtype"]
    assert models.build_model(old).encoder.dtype == jnp.float32


def test_unfused_batch_norm_layers_train_and_embed_like_the_fused_block():
    """fused_batch_norm=False (nn.BatchNorm + ReLU + pool, the benchmark's reference) has the same
    variables and computes the same: batch statistics in training, running averages at inference."""
    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 12, 12, 1))
    fused = models.SmallConvEncoder(widths=(4, 6), embedding_dim=3)
    unfused = fused.clone(fused_batch_norm=False)
    v = fused.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(unfused.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(v)
    (h_f, s_f), (h_u, s_u) = (m.apply(v, x, train=True, mutable=["batch_stats"]) for m in (fused, unfused))
    np.testing.assert_allclose(h_u, h_f, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s_u), jax.tree.leaves(s_f)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    trained = {"params": v["params"], **s_f}
    np.testing.assert_allclose(unfused.apply(trained, x), fused.apply(trained, x), rtol=1e-4, atol=1e-5)


def test_fused_block_gradient_under_bfloat16_follows_the_float32_one():
    """Under bfloat16 the pooling window is recomputed in the output's dtype, so its maxima compare
    equal to the output: compared in float32 instead, almost no element matched and the gradient
    through every pool was ~0 (finite, so the bfloat16 test above did not see it)."""
    kx, ks, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (4, 6, 6, 3))
    scale, bias = 1.0 + 0.3 * jax.random.normal(ks, (3,)), jnp.full((3,), 0.1)
    cot = jax.random.normal(kg, (4, 3, 3, 3))
    grads = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        _, vjp = jax.vjp(lambda x, s, b: models.batch_norm_relu_pool(x, s, b, 1e-5, True)[0],
                         x.astype(dtype), scale, bias)
        grads[dtype] = [np.asarray(g, np.float32) for g in vjp(cot.astype(dtype))]
    for g16, g32 in zip(grads[jnp.bfloat16], grads[jnp.float32]):
        assert np.abs(g16 - g32).max() <= 0.05 * np.abs(g32).max(), (np.abs(g16).max(), np.abs(g32).max())


def test_fused_block_gradient_under_bfloat16_inside_jit_follows_the_float32_one():
    """Review 52 (reduced precision): inside jit, from ~16k elements on, XLA:CPU's excess precision
    dropped the bfloat16 rounding of the recomputed window while the stored output kept it, so no
    maximum matched: the gradient of x, scale and bias was exactly 0 through every block, and a
    bfloat16 training (omniglot_gpu's dtype) trained only its last Dense layer. Eagerly (the test
    above) and below that size, it matched."""
    kx, ks, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (32, 4, 4, 32))
    scale, bias = 1.0 + 0.3 * jax.random.normal(ks, (32,)), jnp.full((32,), 0.1)
    cot = jax.random.normal(kg, (32, 2, 2, 32))
    grads = {}
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        def f(x, s, b, dtype=dtype):
            out = models.batch_norm_relu_pool(x.astype(dtype), s, b, 1e-5, True)[0]
            return jnp.sum(out.astype(jnp.float32) * cot)
        grads[dtype] = [np.asarray(g, np.float32) for g in jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, scale, bias)]
    for dtype in (jnp.bfloat16, jnp.float16):
        for name, g16, g32 in zip(("x", "scale", "bias"), grads[dtype], grads[jnp.float32]):
            # bfloat16 rounding moves a few maxima (and makes ties): ~0.03 here; the bug gave 1.0.
            assert np.linalg.norm(g16 - g32) <= 0.1 * np.linalg.norm(g32), (dtype, name, np.abs(g16).max())


def test_encoders_work_under_rank_promotion_raise():
    """JAX_NUMPY_RANK_PROMOTION=raise, a JAX debug setting, refused the fused BatchNorm block's implicit
    [N, H, W, C] * [C]: every model of the package failed to build, blamed on its config or image size."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 9, 9, 1))
    # Jitted: the setting is checked as the functions are traced, here as in training; one compile
    # each, not one per operation (op by op the test took ~11 CPU-seconds, jitted ~6).
    with jax.numpy_rank_promotion("raise"):
        for encoder in (models.SmallConvEncoder(widths=(4, 6), embedding_dim=3),
                        models.SmallConvEncoder(widths=(4, 6), embedding_dim=3, l2_normalize=True, fused_batch_norm=False)):
            v = jax.jit(encoder.init)(jax.random.PRNGKey(1), x)
            assert jax.jit(encoder.apply)(v, x).shape == (4, 3)

            def loss(params):
                h, _ = encoder.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
                return jnp.sum(jnp.sin(h))

            assert all(np.isfinite(g).all() for g in jax.tree.leaves(jax.jit(jax.grad(loss))(v["params"])))
