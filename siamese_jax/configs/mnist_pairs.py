"""MNIST pairs on the Keras protocol: a 2x wider encoder, batch-all triplets on L2-normalised
embeddings, shifted, rotated and scaled digits, 19 epochs, test-time shift averaging (the
`pretrained-mnist` model: 99.74 +- 0.01% over 3 seeds).

    siamese-train --config=mnist_pairs --workdir=runs/mnist-pairs
    (in a checkout: python -m experiments.train --config=experiments/configs/mnist_pairs.py ...)

What changes from the `mnist` preset of `default.py` (contrastive loss, 98.77%) and why
(BUILD_NOTES, "MNIST pairs at 99.7%"):
- L2-normalised embeddings: with unnormalised ones a fixed margin can be met by growing the
  embedding (99.45% -> 99.61% with the same everything else);
- batch-all triplets over P x K = 10 x 16 batches (every class in every batch): the best MNIST row of
  the loss comparison (99.14% after 1,000 steps, against contrastive's 93.3% at the same budget);
- +-2 px shifts, +-10 degree rotations and 0.9-1.1 scaling of every training digit (on device):
  what every MNIST result above 99.5% uses;
- model selection on 10,000 validation episodes (10-way 1-shot on the held-out 10,000 train images):
  the default 200 resolve 0.5 points, too coarse at 99.x%; with 2,000, seed 1 tied steps 3,000 and
  5,000 at 99.24%, kept the earlier one and scored 99.31% on the test pairs (seed 0: 99.61%);
- every block twice as wide, 32-64-128-256 (run W): validation up on all 3 seeds, test pairs
  99.54 +- 0.06% -> 99.67 +- 0.04%, at 1.9x the training time (~15 min alone on the 2-core box);
- each digit embedded as the mean over the 3 x 3 square of 1-px shifts (`test_time_shifts`), the set
  with the best validation pair accuracy over the 3 seeds: 99.67 -> 99.74%, 9x the embedding cost.
"""
from siamese_jax.configs import default


def get_config():
    c = default.get_config("mnist")
    c.loss = "batch_all"
    c.classes_per_batch = 10
    c.images_per_class = 16
    c.widths = (32, 64, 128, 256)  # 2x the default's channels: 421k parameters (run W)
    c.embedding_dim = 128
    c.l2_normalize = True
    c.augment = True
    c.augment_rotation_deg = 10.0
    c.augment_shear = 0.0
    c.augment_scale_min = 0.9
    c.augment_scale_max = 1.1
    c.augment_translate_px = 7.5  # pixels of a 105-px image (augment.AffineConfig): +-2 px at 28 px
    c.augment_prob = 1.0
    c.num_steps = 6000  # 19 epochs of the 50,000 training digits at 160 per step
    c.val_episodes = 10000
    # Embeddings averaged over the 3 x 3 square of 1-px shifts in use and in the final evaluation
    # (chosen on the validation pairs after training; selection during training is one view).
    c.test_time_shifts = "square9"
    return c
