"""GAN losses on D's logits (never sigmoid + BCELoss: it saturates in fp16 and autocast refuses it).

All losses are computed in float32 whatever the autocast dtype of the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_targets(n: int, real_label: float, flip_prob: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for D's real and fake halves: one-sided smoothing on the real side, random flips."""
    t_real = torch.full((n,), real_label, device=device)
    t_fake = torch.zeros(n, device=device)
    if flip_prob > 0:
        flip = torch.rand(n, device=device) < flip_prob
        t_real, t_fake = torch.where(flip, t_fake, t_real), torch.where(flip, t_real, t_fake)
    return t_real, t_fake


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor, t_real: torch.Tensor, t_fake: torch.Tensor):
    real, fake = real.float(), fake.float()
    if kind == "bce":
        # -t log s(x) - (1-t) log(1 - s(x)), summed over the real and fake halves
        return F.binary_cross_entropy_with_logits(real, t_real) + F.binary_cross_entropy_with_logits(fake, t_fake)
    if kind == "hinge":
        # E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]; labels do not apply
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "lsgan":
        # 1/2 E[(D(x) - t_real)^2] + 1/2 E[(D(G(z)) - t_fake)^2]
        return 0.5 * ((real - t_real) ** 2).mean() + 0.5 * ((fake - t_fake) ** 2).mean()
    raise ValueError(kind)


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    fake = fake.float()
    if kind == "bce":
        return F.softplus(-fake).mean()              # non-saturating: -log s(D(G(z)))
    if kind == "hinge":
        return -fake.mean()
    if kind == "lsgan":
        return 0.5 * ((fake - 1) ** 2).mean()
    raise ValueError(kind)
