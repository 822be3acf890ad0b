"""3x3 convolutions, XLA:CPU against PyTorch's CPU kernels; Koch's large kernels as matmuls.

    python -m experiments.conv_microbench        # needs the optional `bench` extra (torch)
    python -m experiments.conv_microbench threads  # XLA only: how many cores each convolution uses
    python -m experiments.conv_microbench koch     # XLA only: Koch's large kernels as lax vs matmuls

Where a train-step row of `experiments.benchmark` loses, this says whether the convolutions are why
(BUILD_NOTES, "Performance"). Shapes: 128 images, NHWC for XLA, NCHW for PyTorch, float32; mean of 5
calls after one warm-up call. The second table splits XLA's backward into the input gradient and the
kernel gradient, and times the kernel gradient written as nine matmuls over shifted views of the
padded input (a lever tried: BUILD_NOTES, "Levers tried"). `koch` times Koch et al.'s four
convolutions (32 images, VALID) as XLA's convolution and written as matmuls (an im2col along the
kernel's width with one matmul per kernel row, or the full im2col), another lever tried there.
"""
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

from siamese_jax import parallel

SHAPES = [(128, 56, 1, 128), (128, 28, 128, 128), (128, 56, 128, 128)]  # (images, side, in, out)


def _conv(x, w, padding="SAME"):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _ms(fn, sync, n=5):
    sync(fn())
    t = time.perf_counter()
    for _ in range(n):
        out = fn()
    sync(out)
    return (time.perf_counter() - t) / n * 1e3


def main():
    import torch

    torch.set_num_threads(parallel.available_cores())
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
    # process_time: user + system CPU of every thread, as getrusage(RUSAGE_SELF), on every platform
    # (`resource` is POSIX only).
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(fn())
    wall, cpu1 = time.perf_counter() - t0, time.process_time()
    return wall / n * 1e3, (cpu1 - cpu0) / wall


def threads_per_convolution():
    """On one XLA CPU device, which convolutions YNNPACK spreads over the cores, and whether two
    independent convolutions in one program run side by side (they would let one device use every
    core without the cross-device collectives of the data mesh)."""
    print(f"{jax.device_count()} XLA device(s), {parallel.available_cores()} cores")
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


def _conv_valid(x, w):
    return _conv(x, w, "VALID")


def _conv_im2col_rows(x, w):
    """VALID convolution: the input's kw column-shifted copies stacked on the channels, then one
    [kw·C, O] matmul per kernel row, summed."""
    kh, kw, ci, co = w.shape
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = jnp.concatenate([x[:, :, j:j + ow] for j in range(kw)], axis=-1)
    return sum(jnp.einsum("nhwk,ko->nhwo", cols[:, i:i + oh], w[i].reshape(kw * ci, co)) for i in range(kh))


def _conv_im2col_full(x, w):
    """VALID convolution as one matmul over the full im2col ([N, H', W', kh·kw·C])."""
    kh, kw, ci, co = w.shape
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    p = jnp.concatenate([x[:, i:i + oh, j:j + ow] for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.einsum("nhwk,ko->nhwo", p, w.reshape(kh * kw * ci, co))


def koch_as_matmuls():
    """Koch et al.'s convolutions (the benchmark's CPU batch: 32 images) three ways, forward and
    forward + both gradients (of the sum of squares), best of 3 blocks of 3 calls."""
    import numpy as np

    print(f"{jax.device_count()} XLA device(s), {parallel.available_cores()} cores; ms per call")
    print(f"{'convolution (32 images, VALID)':<34}{'form':<8}{'forward':>9}{'fwd+bwd':>9}{'max |diff|':>12}")
    for side, ci, co, k in ((105, 1, 64, 10), (48, 64, 128, 7), (21, 128, 128, 4), (9, 128, 256, 4)):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.random((32, side, side, ci)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, k, ci, co)) * 0.05, jnp.float32)
        want = jax.jit(_conv_valid)(x, w)
        for name, f in (("lax", _conv_valid), ("rows", _conv_im2col_rows), ("full", _conv_im2col_full)):
            fwd = jax.jit(f)
            both = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
            ms = [min(_ms(lambda: g(x, w), jax.block_until_ready, n=3) for _ in range(3)) for g in (fwd, both)]
            diff = float(jnp.max(jnp.abs(fwd(x, w) - want)))
            print(f"{f'{side}px {ci}->{co} {k}x{k}':<34}{name:<8}{ms[0]:>9.1f}{ms[1]:>9.1f}{diff:>12.1e}")


if __name__ == "__main__":
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in sys.argv[1:]):
        print(__doc__)
    elif sys.argv[1:] == ["threads"]:
        threads_per_convolution()
    elif sys.argv[1:] == ["koch"]:
        koch_as_matmuls()
    elif sys.argv[1:]:
        print(f"error: unknown argument {' '.join(sys.argv[1:])!r} "
              "(usage: python -m experiments.conv_microbench [threads|koch])",
              file=sys.stderr)
        sys.exit(2)
    else:
        main()
        backward_split()
