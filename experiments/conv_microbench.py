"""One 3x3 convolution, XLA:CPU against PyTorch's CPU kernels: forward, and forward + both gradients.

    python -m experiments.conv_microbench        # needs the optional `bench` extra (torch)

Where a train-step row of `experiments.benchmark` loses, this says whether the convolutions are why
(BUILD_NOTES, "Performance"). Shapes: 128 images, NHWC for XLA, NCHW for PyTorch, float32; mean of 5
calls after one warm-up call.
"""
import time

import jax
import jax.numpy as jnp
from jax import lax

SHAPES = [(128, 56, 1, 128), (128, 28, 128, 128), (128, 56, 128, 128)]  # (images, side, in, out)


def _conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _ms(fn, sync, n=5):
    sync(fn())
    t = time.perf_counter()
    for _ in range(n):
        out = fn()
    sync(out)
    return (time.perf_counter() - t) / n * 1e3


def main():
    import torch

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    fwd = jax.jit(_conv)
    both = jax.jit(jax.grad(lambda x, w: jnp.sum(_conv(x, w) ** 2), argnums=(0, 1)))
    print(f"{'convolution':<28}{'fwd ms ours/torch':>22}{'fwd+bwd ms ours/torch':>26}")
    for b, h, ci, co in SHAPES:
        x, w = jnp.ones((b, h, h, ci)), jnp.full((3, 3, ci, co), 0.01)
        tx = torch.ones(b, ci, h, h, requires_grad=True)
        tw = torch.full((co, ci, 3, 3), 0.01, requires_grad=True)

        def torch_both():
            (torch.nn.functional.conv2d(tx, tw, padding=1) ** 2).sum().backward()

        ours = (_ms(lambda: fwd(x, w), jax.block_until_ready), _ms(lambda: both(x, w), jax.block_until_ready))
        peer = (_ms(lambda: torch.nn.functional.conv2d(tx, tw, padding=1), lambda _: None),
                _ms(torch_both, lambda _: None))
        print(f"{b} x {h}px {ci}->{co:<14}{ours[0]:>10.0f} / {peer[0]:<10.0f}{ours[1]:>12.0f} / {peer[1]:<10.0f}")


if __name__ == "__main__":
    main()
