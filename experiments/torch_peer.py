"""The PyTorch peer for `experiments/benchmark.py`: the same networks, losses and optimizer as the
JAX train steps it is compared with, so that ours/peer is a like-for-like ratio.

Optional: needs `torch` (`pip install -e ".[bench]"`); nothing in `siamese_jax` imports it.

- `small_encoder(widths, embedding_dim, image_size)`: `models.SmallConvEncoder` (conv 3x3 without
  bias, BatchNorm with Flax's momentum 0.9 = torch's 0.1 and eps 1e-5, ReLU, 2x2 max-pool per block,
  then a linear embedding). `koch_encoder()`: `models.KochEncoder` (105x105, 4096-d sigmoid).
- `hardest_negative_triplet_loss`, `batch_hard_triplet_loss`, `verification_loss`: the formulas of
  `siamese_jax.losses` (unsquared Euclidean distances with the same gradient-safe sqrt).
- `shift_elastic(...)` / `random_shift_elastic(...)`: the CPU default's on-device augmentation
  (`siamese_jax.augment` with the default config: a random shift plus Simard et al.'s elastic field,
  bilinear, zero outside) written with `F.grid_sample`; the same pixels as ours for the same draws.
- `make_step(...)`: one Adam train step, eager or `torch.compile`d; on CUDA bf16 autocast and
  channels_last, as a PyTorch user would write it. `augment=` puts the augmentation inside the step,
  as `experiments.train` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def small_encoder(widths=(16, 32, 64, 128), embedding_dim=64, image_size=35) -> nn.Module:
    layers, c_in, size = [], 1, image_size
    for width in widths:
        layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False),
                   nn.BatchNorm2d(width, eps=1e-5, momentum=0.1), nn.ReLU()]
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        c_in = width
    layers += [nn.Flatten(), nn.Linear(c_in * size * size, embedding_dim)]
    return nn.Sequential(*layers)


def koch_encoder(features=4096) -> nn.Module:
    layers, c_in = [], 1
    for filters, k, pool in ((64, 10, True), (128, 7, True), (128, 4, True), (256, 4, False)):
        layers += [nn.Conv2d(c_in, filters, k), nn.ReLU()] + ([nn.MaxPool2d(2)] if pool else [])
        c_in = filters
    layers += [nn.Flatten(), nn.Linear(256 * 6 * 6, features), nn.Sigmoid()]
    return nn.Sequential(*layers)


def pairwise_distances(emb):
    """Unsquared Euclidean distances; sqrt(max(d², 1e-16)) off the diagonal, exactly 0 on it (as losses.py)."""
    sq = (emb * emb).sum(1)
    d2 = (sq[:, None] - 2.0 * emb @ emb.T + sq[None, :]).clamp_min(0.0)
    eye = torch.eye(emb.shape[0], dtype=torch.bool, device=emb.device)
    d2 = d2.masked_fill(eye, 0.0)
    return torch.where(d2 > 1e-16, torch.sqrt(d2.clamp_min(1e-16)), torch.zeros_like(d2))


def _masks(labels):
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def hardest_negative_triplet_loss(emb, labels, margin=0.5):
    dist = pairwise_distances(emb.float())
    positive, negative = _masks(labels)
    hardest = dist.masked_fill(~negative, float("inf")).min(1).values
    per_pair = (dist - hardest[:, None] + margin).clamp_min(0.0)
    w = positive.float()
    return (per_pair * w).sum() / w.sum().clamp_min(1.0)


def batch_hard_triplet_loss(emb, labels, margin=0.5):
    dist = pairwise_distances(emb.float())
    positive, negative = _masks(labels)
    hardest_pos = dist.masked_fill(~positive, 0.0).max(1).values
    hardest_neg = dist.masked_fill(~negative, float("inf")).min(1).values
    return (hardest_pos - hardest_neg + margin).clamp_min(0.0).mean()


class _VerificationHead(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.head = nn.Linear(features, 1)

    def forward(self, h1, h2):
        return self.head((h1.float() - h2.float()).abs())[:, 0]


def gaussian_smoothing_matrix(size: int, sigma: float, device="cpu") -> torch.Tensor:
    """[size, size] Gaussian filter of one axis, zero outside the image, truncated at 4 sigma, the
    full kernel normalised to 1 (scipy.ndimage.gaussian_filter's mode="constant")."""
    offsets = torch.arange(size)[:, None] - torch.arange(size)[None, :]
    radius = int(4.0 * sigma + 0.5)
    kernel = lambda d: torch.exp(-0.5 * (d.double() / sigma) ** 2)  # noqa: E731
    norm = kernel(torch.arange(-radius, radius + 1)).sum()
    return torch.where(offsets.abs() <= radius, kernel(offsets) / norm, 0.0).float().to(device)


def shift_elastic(images, shifts, noise, alpha: float, g_rows, g_cols):
    """images [B, 1, H, W] moved by `shifts` [B, 2] px (rows down, cols right) and bent by the
    displacement field alpha * G_rows @ noise @ G_cols^T (noise [B, 2, H, W] in [-1, 1]): the output
    pixel o reads the input at o - shift + field(o), bilinear, zero outside, clipped to [0, 1]."""
    b, _, h, w = images.shape
    field = alpha * (g_rows @ noise @ g_cols.T)  # [B, 2, H, W]; half einsum's time on CPU
    rows = torch.arange(h, dtype=images.dtype, device=images.device)[None, :, None] - shifts[:, 0, None, None] + field[:, 0]
    cols = torch.arange(w, dtype=images.dtype, device=images.device)[None, None, :] - shifts[:, 1, None, None] + field[:, 1]
    grid = torch.stack([2.0 * cols / (w - 1) - 1.0, 2.0 * rows / (h - 1) - 1.0], dim=-1)  # (x, y) in [-1, 1]
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.clamp(0.0, 1.0)


def random_shift_elastic(images, translate_limit: float, alpha: float, g_rows, g_cols):
    """`shift_elastic` with shifts ~ U(-translate_limit, translate_limit) and noise ~ U(-1, 1)."""
    b, _, h, w = images.shape
    shifts = (2.0 * torch.rand(b, 2, device=images.device) - 1.0) * translate_limit
    noise = 2.0 * torch.rand(b, 2, h, w, device=images.device) - 1.0
    return shift_elastic(images, shifts, noise, alpha, g_rows, g_cols)


def make_step(kind: str, *, compile: bool, device: str = "cpu", image_size: int, widths=(16, 32, 64, 128),
              lr: float = 1e-3, augment: dict | None = None):
    """`step(images, labels_or_is_similar) -> loss` for kind in
    {"small_hardest" (the CPU default), "small_batch_hard", "koch_verification", "koch_triplet"}.

    Pair kinds take images [2B, 1, H, W] (x1 and x2 interleaved) and is_similar [B]; triplet kinds
    [3B, 1, H, W] (anchor, positive, negative interleaved); P×K kinds images [B, 1, H, W] and labels [B].
    `augment`: dict(translate_limit, alpha, sigma) (px of the image drawn) to shift and bend every
    image inside the step (`random_shift_elastic`), as experiments.train does with the default config.
    """
    if kind.startswith("small"):
        encoder = small_encoder(widths, 64, image_size)
        head = None
    else:
        encoder = koch_encoder()
        head = _VerificationHead(4096) if kind == "koch_verification" else None
    modules = nn.ModuleList([m for m in (encoder, head) if m is not None]).to(device)
    cuda = device.startswith("cuda")
    if cuda:
        modules = modules.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(modules.parameters(), lr=lr)

    if augment is not None:
        g = gaussian_smoothing_matrix(image_size, float(augment["sigma"]), device)

    def loss_of(images, target):
        if augment is not None:
            images = random_shift_elastic(images, float(augment["translate_limit"]), float(augment["alpha"]), g, g)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            emb = encoder(images)
            if kind == "small_hardest":
                return hardest_negative_triplet_loss(emb, target)
            if kind == "small_batch_hard":
                return batch_hard_triplet_loss(emb, target)
            if kind == "koch_verification":
                e = emb.float().reshape(-1, 2, emb.shape[-1])
                logits = head(e[:, 0], e[:, 1])
                return F.binary_cross_entropy_with_logits(logits, target.float())
            e = emb.float().reshape(-1, 3, emb.shape[-1])
            d_ap = (e[:, 0] - e[:, 1]).pow(2).sum(1).clamp_min(1e-16).sqrt()
            d_an = (e[:, 0] - e[:, 2]).pow(2).sum(1).clamp_min(1e-16).sqrt()
            return (d_ap - d_an + 0.5).clamp_min(0.0).mean()

    def step(images, target):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(images, target)
        loss.backward()
        opt.step()
        return loss.detach()

    if compile:
        step = torch.compile(step)
    modules.train()
    return step


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
