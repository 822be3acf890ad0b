"""Koch et al. 2015 at paper scale: 105x105 KochEncoder, L1 + sigmoid head, binary cross-entropy.

For accelerators: `siamese-train --config=omniglot_koch` (in a checkout also
`python -m experiments.train --config=experiments/configs/omniglot_koch.py`).
Koch used SGD with per-layer learning rates and momentum found by Bayesian search; we use Adam
(what the public reproductions that got closest used) with bfloat16 compute.
"""
from siamese_jax.configs import default


def get_config():
    c = default.get_config("omniglot")
    c.loss = "verification"
    c.model = "koch"
    c.embedding_dim = 4096
    c.image_size = 105
    c.compute_dtype = "bfloat16"
    c.batch_size = 128
    c.learning_rate = 6e-5
    c.warmup_steps = 500
    c.weight_decay = 1e-4
    c.num_steps = 30000
    # Koch et al.'s affine distortions (translate_px in pixels of the 105-px image), each component
    # drawn with probability 0.5; no elastic field.
    c.augment = True
    c.augment_rotation_deg = 10.0
    c.augment_shear = 0.3
    c.augment_scale_min = 0.8
    c.augment_scale_max = 1.2
    c.augment_translate_px = 2.0
    c.augment_prob = 0.5
    c.augment_elastic_alpha = 0.0
    c.test_time_shifts = "none"  # the paper's evaluation: one view
    c.rotation_classes = False
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    return c
