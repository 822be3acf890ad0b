"""Test-time shift augmentation: an image's embedding as the mean of its embeddings shifted by a
pixel or so, L2-normalised again when the model's embeddings are unit length.

`config.test_time_shifts` names the set of shifts (`SHIFT_SETS`); "square9" is the Omniglot default,
"none" (one view) the MNIST preset's and the value for configs without the key.
It applies wherever a trained model embeds images for use — `inference.SiameseModel` (compare,
embed, search, calibrate, export's threshold) and the final evaluation protocols — but not to the
validation that chooses checkpoints during training, which stays one view (cheaper, and a shift
set is chosen after training, on the same validation data: BUILD_NOTES, "MNIST pairs at 99.7%").
"""
from __future__ import annotations

from typing import Callable

# (rows, cols) in pixels of the model's input. The rows and columns that come in at an edge are
# background (0: the model's input has ink = 1). Until 2026-12-04 they wrapped round from the other
# edge (`jnp.roll`), which brought ink in wherever a character touches the border (5% of the
# evaluation images at 35 px, 3.7% at 48).
SHIFT_SETS = {
    "none": ((0, 0),),
    "cross5": ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)),
    "square9": tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)),
}


def shifts_of(config) -> tuple:
    """The config's shift set (configs written before the key existed: "none")."""
    return shift_set(config.get("test_time_shifts", "none"))


def shift_set(name: str, what: str = "config.test_time_shifts") -> tuple:
    """The shifts of the set named `name`; an unknown name is a ValueError naming `what`."""
    if name not in SHIFT_SETS:
        raise ValueError(f"{what}={name!r}: must be one of {', '.join(SHIFT_SETS)}")
    return SHIFT_SETS[name]


def shifted(images, dy: int, dx: int):
    """images [N, H, W, C] moved dy rows down and dx columns right, background (0) coming in."""
    import jax.numpy as jnp

    h, w = images.shape[1:3]
    m = max(abs(dy), abs(dx))
    padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
    return padded[:, m - dy:m - dy + h, m - dx:m - dx + w, :]


def shift_averaged(embed: Callable, shifts: tuple, l2_normalize: bool) -> Callable:
    """Wraps `embed(params, batch_stats, images [N, H, W, C]) -> [N, E]` (traceable) so that it
    returns the mean over `shifts` of the embeddings of the shifted images. One view: `embed` itself."""
    if tuple(shifts) == ((0, 0),):
        return embed
    import jax  # here, so the CLIs can read SHIFT_SETS' names without importing jax
    import jax.numpy as jnp

    margin = max(max(abs(dy), abs(dx)) for dy, dx in shifts)
    # Where each view (`shifted(images, dy, dx)`) starts in the images padded by `margin`.
    starts = [(margin - dy, margin - dx) for dy, dx in shifts]

    def averaged(params, batch_stats, images):
        # A running sum, one view at a time, in a loop (`lax.scan`): the peak memory of one batch, not
        # of len(shifts). Written as a Python sum of the views, XLA ran them side by side: square9 on
        # 1,024 images at 35 px held 1,005 MB of temporary buffers, one view 148 MB (the loop: 154 MB),
        # and `siamese-evaluate --model=pretrained-mnist` peaked at 1.4 GB (the loop: 0.7 GB; the
        # memory review of 2026-12-07). The same embeddings to the bit for the default's net; those
        # of the L2-normalised digit model move by at most 1 ulp (4.5e-8).
        padded = jnp.pad(images, ((0, 0), (margin, margin), (margin, margin), (0, 0)))

        def view(start):
            return jax.lax.dynamic_slice(padded, (0, start[0], start[1], 0), images.shape)

        def add_view(total, start):
            return total + embed(params, batch_stats, view(start)), None

        rest = jnp.asarray(starts[1:], jnp.int32)
        total, _ = jax.lax.scan(add_view, embed(params, batch_stats, view(starts[0])), rest)
        mean = total / len(shifts)
        if l2_normalize:
            mean = mean / jnp.linalg.norm(mean, axis=-1, keepdims=True)
        return mean

    return averaged
