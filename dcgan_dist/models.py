"""The DCGAN paper's generator and discriminator for 32, 64 and 128 px, 1 or 3 channels."""

from __future__ import annotations

import math

import torch
from torch import nn


def _n_layers(resolution: int) -> int:
    if resolution not in (32, 64, 128):
        raise ValueError(f"resolution must be 32, 64 or 128, not {resolution}")
    return int(math.log2(resolution)) - 2          # upsamplings from 4x4 to the resolution


class Generator(nn.Module):
    """z (B x latent) -> image (B x C x R x R) in [-1, 1]: transposed convs, BatchNorm, ReLU, Tanh."""

    def __init__(self, latent: int = 100, ngf: int = 64, channels: int = 3, resolution: int = 64) -> None:
        super().__init__()
        n = _n_layers(resolution)
        width = [ngf * 2 ** (n - 1 - i) for i in range(n)]         # 64 px: 8, 4, 2, 1 x ngf
        layers = [nn.ConvTranspose2d(latent, width[0], 4, 1, 0, bias=False), nn.BatchNorm2d(width[0]), nn.ReLU(True)]
        for a, b in zip(width, width[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(width[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.latent = latent
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    """image -> logits (B,): strided convs, BatchNorm except on the first layer, LeakyReLU 0.2."""

    def __init__(self, ndf: int = 64, channels: int = 3, resolution: int = 64) -> None:
        super().__init__()
        n = _n_layers(resolution)
        width = [ndf * 2 ** i for i in range(n)]                     # 64 px: 1, 2, 4, 8 x ndf
        layers = [nn.Conv2d(channels, width[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for a, b in zip(width, width[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(width[-1], 1, 4, 1, 0, bias=False)]    # 4x4 -> 1x1 logit; no sigmoid
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


@torch.no_grad()
def dcgan_init(module: nn.Module) -> None:
    """The paper's init: conv weights N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build_models(cfg) -> tuple[Generator, Discriminator]:
    """G and D from a Config, initialised as configured."""
    g = Generator(cfg.model.latent, cfg.model.ngf, cfg.data.channels, cfg.data.resolution)
    d = Discriminator(cfg.model.ndf, cfg.data.channels, cfg.data.resolution)
    if cfg.model.init_g:
        dcgan_init(g)
    if cfg.model.init_d:
        dcgan_init(d)
    return g, d


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
