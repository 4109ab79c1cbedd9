"""Differentiable augmentation of D's inputs (DiffAugment), against a D that memorises a small dataset.

Zhao, Liu, Lin, Zhu, Han, "Differentiable Augmentation for Data-Efficient GAN Training", NeurIPS 2020,
https://arxiv.org/abs/2006.10738. The same random transform family is applied to every image D sees, real
and generated, in the D step and in the G step; it is differentiable, so G's gradient flows through it and
G learns the un-augmented distribution. The three policies follow the authors' DiffAugment_pytorch.py
(github.com/mit-han-lab/data-efficient-gans, BSD-2): its exact formulas, written here with fewer index
tensors; it is one file in a research repository, not a package to depend on.

    x = diff_augment(x, "translation,cutout")   # x: B x C x H x W float, any memory format

Randomness comes from torch's default generator on x's device (the training RNG stream: it is in the
checkpoint, so a resumed run draws the same transforms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def parse_policy(policy: str) -> tuple[str, ...]:
    """``"translation,cutout"`` -> ``("translation", "cutout")``; ``""`` -> ``()``. Raises ValueError naming
    an unknown policy."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    bad = [p for p in names if p not in POLICIES]
    if bad:
        raise ValueError(f"unknown augmentation {bad[0]!r}; use a comma-separated subset of {', '.join(POLICIES)}")
    return names


def diff_augment(x: torch.Tensor, policy: str) -> torch.Tensor:
    """``x`` (B x C x H x W, float) with each policy applied per image: ``color`` (brightness +-0.5, saturation
    x[0, 2], contrast x[0.5, 1.5]), ``translation`` (up to 1/8 of the side, zero padded), ``cutout`` (a square
    of half the side set to 0, its centre anywhere in the image). Same shape and dtype."""
    for p in parse_policy(policy):
        x = _FNS[p](x)
    return x


def _rand(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)


def _color(x: torch.Tensor) -> torch.Tensor:
    x = x + (_rand(x) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x) * 2) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_rand(x) + 0.5) + mean


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    B, _, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    ty = torch.randint(-sh, sh + 1, (B, 1, 1), device=x.device)
    tx = torch.randint(-sw, sw + 1, (B, 1, 1), device=x.device)
    rows = (torch.arange(H, device=x.device).view(1, H, 1) + ty + 1).clamp(0, H + 1)
    cols = (torch.arange(W, device=x.device).view(1, 1, W) + tx + 1).clamp(0, W + 1)
    padded = F.pad(x, [1, 1, 1, 1])                               # a zero border: shifted-in pixels read it
    b = torch.arange(B, device=x.device).view(B, 1, 1)
    return padded.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    B, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    oy = torch.randint(0, H + (1 - ch % 2), (B, 1, 1), device=x.device)
    ox = torch.randint(0, W + (1 - cw % 2), (B, 1, 1), device=x.device)
    rows = torch.arange(H, device=x.device).view(1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    inside = ((rows >= oy - ch // 2) & (rows < oy - ch // 2 + ch) & (cols >= ox - cw // 2)
              & (cols < ox - cw // 2 + cw))
    return x * (~inside).unsqueeze(1).to(x.dtype)


_FNS = {"color": _color, "translation": _translation, "cutout": _cutout}
