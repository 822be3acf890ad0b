"""The PyTorch peer for `experiments/benchmark.py`: the same networks, losses and optimizer as the
JAX train steps it is compared with, so that ours/peer is a like-for-like ratio.

Optional: needs `torch` (`pip install -e ".[bench]"`); nothing in `siamese_jax` imports it.

- `small_encoder(widths, embedding_dim, image_size)`: `models.SmallConvEncoder` (conv 3x3 without
  bias, BatchNorm with Flax's momentum 0.9 = torch's 0.1 and eps 1e-5, ReLU, 2x2 max-pool per block,
  then a linear embedding). `koch_encoder()`: `models.KochEncoder` (105x105, 4096-d sigmoid).
- `hardest_negative_triplet_loss`, `batch_hard_triplet_loss`, `verification_loss`: the formulas of
  `siamese_jax.losses` (unsquared Euclidean distances with the same gradient-safe sqrt).
- `make_step(...)`: one Adam train step, eager or `torch.compile`d; on CUDA bf16 autocast and
  channels_last, as a PyTorch user would write it.
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


def make_step(kind: str, *, compile: bool, device: str = "cpu", image_size: int, widths=(16, 32, 64, 128),
              lr: float = 1e-3):
    """`step(images, labels_or_is_similar) -> loss` for kind in
    {"small_hardest" (the CPU default), "small_batch_hard", "koch_verification", "koch_triplet"}.

    Pair kinds take images [2B, 1, H, W] (x1 and x2 interleaved) and is_similar [B]; triplet kinds
    [3B, 1, H, W] (anchor, positive, negative interleaved); P×K kinds images [B, 1, H, W] and labels [B].
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

    def loss_of(images, target):
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
