"""G_ema: an exponential moving average of the generator's weights, the generator to sample and evaluate.

The decay is given as a half-life in images seen (across all ranks), as StyleGAN2-ADA does: after every G
step, ``G_ema = beta * G_ema + (1 - beta) * G`` with ``beta = 0.5 ** (images_per_step / (ema_kimg * 1000))``.
With ``ema_rampup`` the half-life is at most ``ema_rampup`` times the images seen so far, so the average
forgets the random initialisation quickly early in training. BatchNorm running statistics are not averaged
over time but copied from G (they belong to G's current weights); the trainer keeps G's identical on every
rank (step.mean_bn_stats), so G_ema is identical on every rank too. It never goes through DDP.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, g: nn.Module, kimg: float, rampup: float) -> None:
        """``g``: the unwrapped generator (not the DDP wrapper)."""
        self.model = copy.deepcopy(g).eval().requires_grad_(False)
        self.kimg, self.rampup = kimg, rampup

    def beta(self, images_seen: int, images_per_step: int) -> float:
        half_life = self.kimg * 1000.0
        if self.rampup > 0:
            half_life = min(half_life, images_seen * self.rampup)
        return 0.5 ** (images_per_step / max(half_life, 1e-8))

    @torch.no_grad()
    def update(self, g: nn.Module, images_seen: int, images_per_step: int) -> None:
        """After a G step; ``images_seen`` includes this step's."""
        weight = 1.0 - self.beta(images_seen, images_per_step)
        for p_ema, p in zip(self.model.parameters(), g.parameters()):
            p_ema.lerp_(p.detach(), weight)
        for b_ema, b in zip(self.model.buffers(), g.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)
