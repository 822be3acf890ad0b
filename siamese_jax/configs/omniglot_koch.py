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
    c.augment = True
    c.rotation_classes = False
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    return c
