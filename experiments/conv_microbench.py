"""One 3x3 convolution, XLA:CPU against PyTorch's CPU kernels: forward, and forward + both gradients.

    python -m experiments.conv_microbench        # needs the optional `bench` extra (torch)
    python -m experiments.conv_microbench threads  # XLA only: how many cores each convolution uses

Where a train-step row of `experiments.benchmark` loses, this says whether the convolutions are why
(BUILD_NOTES, "Performance"). Shapes: 128 images, NHWC for XLA, NCHW for PyTorch, float32; mean of 5
calls after one warm-up call. The second table splits XLA's backward into the input gradient and the
kernel gradient, and times the kernel gradient written as nine matmuls over shifted views of the
padded input (a lever tried: BUILD_NOTES, "Levers tried").
"""
import resource
import sys
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


def kernel_grad_as_matmuls(x, dy):
    """d(sum(conv(x, w) * dy)) / dw for the 3x3 SAME convolution, as [3, 3, C_in, C_out]."""
    n, h, w, c_in = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dy2 = dy.reshape(-1, dy.shape[-1])
    return jnp.stack([jnp.stack([padded[:, i:i + h, j:j + w, :].reshape(-1, c_in).T @ dy2 for j in range(3)])
                      for i in range(3)])


def backward_split():
    print(f"{'convolution':<28}{'input grad ms':>14}{'kernel grad ms':>16}{'as 9 matmuls ms':>17}")
    shapes = SHAPES[1:] + [(128, 35, 16, 32), (128, 17, 32, 64), (128, 8, 64, 128)]
    for b, h, ci, co in shapes:
        x = jax.random.normal(jax.random.PRNGKey(0), (b, h, h, ci))
        w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, ci, co)) * 0.1
        dy = jax.random.normal(jax.random.PRNGKey(2), (b, h, h, co))
        dx = jax.jit(lambda x, w, dy: jax.vjp(_conv, x, w)[1](dy)[0])
        dw = jax.jit(lambda x, w, dy: jax.vjp(_conv, x, w)[1](dy)[1])
        dw9 = jax.jit(kernel_grad_as_matmuls)
        ref = dw(x, w, dy)
        assert float(jnp.max(jnp.abs(ref - dw9(x, dy))) / jnp.max(jnp.abs(ref))) < 1e-4
        times = [_ms(lambda: f(x, w, dy), jax.block_until_ready) for f in (dx, dw)]
        times.append(_ms(lambda: dw9(x, dy), jax.block_until_ready))
        print(f"{b} x {h}px {ci}->{co:<14}{times[0]:>10.0f}{times[1]:>16.0f}{times[2]:>17.0f}")


def _ms_and_cores(fn, n=50):
    """Wall ms per call and the process's CPU time / wall time over n calls (1.0: one core busy)."""
    jax.block_until_ready(fn())
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(fn())
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return wall / n * 1e3, (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / wall


def threads_per_convolution():
    """On one XLA CPU device, which convolutions YNNPACK spreads over the cores, and whether two
    independent convolutions in one program run side by side (they would let one device use every
    core without the cross-device collectives of the data mesh)."""
    print(f"{jax.device_count()} XLA device(s), {len(__import__('os').sched_getaffinity(0))} cores")
    print(f"{'convolution (forward)':<28}{'ms':>8}{'cores busy':>12}")
    # The CPU default encoder's four convolutions at its 35 px input, then wider ones.
    shapes = [(128, 35, 1, 16), (128, 17, 16, 32), (128, 8, 32, 64), (128, 4, 64, 128),
              (128, 17, 64, 64), (128, 17, 128, 128), (128, 8, 128, 128)]
    fwd = jax.jit(_conv)
    for b, h, ci, co in shapes:
        x, w = jnp.ones((b, h, h, ci)), jnp.full((3, 3, ci, co), 0.01)
        ms, cores = _ms_and_cores(lambda: fwd(x, w))
        print(f"{b} x {h}px {ci}->{co:<14}{ms:>8.2f}{cores:>12.2f}")
    x1, x2, w = jnp.ones((128, 17, 17, 16)), jnp.full((128, 17, 17, 16), 2.0), jnp.full((3, 3, 16, 32), 0.01)
    two = jax.jit(lambda a, b, w: (_conv(a, w), _conv(b, w)))
    ms, cores = _ms_and_cores(lambda: two(x1, x2, w))
    print(f"{'two independent 16->32':<28}{ms:>8.2f}{cores:>12.2f}")


if __name__ == "__main__":
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in sys.argv[1:]):
        print(__doc__)
    elif sys.argv[1:] == ["threads"]:
        threads_per_convolution()
    elif sys.argv[1:]:
        print(f"error: unknown argument {' '.join(sys.argv[1:])!r} (usage: python -m experiments.conv_microbench [threads])",
              file=sys.stderr)
        sys.exit(2)
    else:
        main()
        backward_split()
