"""A second quality measure that no learned feature extractor stands between: the data's own pixel space at its
native resolution (the bundled digits are 8x8 images upsampled to 32 px: judge them at 8x8).

``NativePixels`` is an extractor like the others (uint8 N x C x H x W -> float N x C*r*r, area-averaged to r x r,
in [0, 1]), so the Frechet distance in that space comes from the same torchmetrics code and cached reference
statistics as FID. On top of it: improved precision and recall (Kynkaanniemi et al., 2019, "Improved Precision
and Recall Metric for Assessing Generative Models", k-nearest-neighbour balls, k = 3) and the ratio of the
generated images' per-pixel standard deviation to the real ones' (greyer, less saturated strokes read < 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NativePixels(nn.Module):
    def __init__(self, resolution: int, channels: int) -> None:
        super().__init__()
        self.resolution, self.num_features = resolution, channels * resolution * resolution
        self.key = f"pixels{resolution}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images.float() / 255.0, self.resolution)
        return x.flatten(1)


@torch.no_grad()
def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision (the fraction of generated samples inside the k-NN ball of some real sample) and recall
    (the fraction of real samples inside the k-NN ball of some generated one), Kynkaanniemi et al. 2019.
    ``real``: N x D, ``fake``: M x D features (N, M > k); Euclidean distances in float64, computed in blocks of
    rows (memory ~ 1,024 x max(N, M) x 8 bytes)."""
    real, fake = real.double(), fake.double()
    radius_real, radius_fake = _knn_radius(real, k), _knn_radius(fake, k)
    return _covered(fake, real, radius_real), _covered(real, fake, radius_fake)


def _knn_radius(x: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (k + 1: each row is its own 0th)."""
    return torch.cat([torch.cdist(x[i:i + block], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), block)])


def _covered(x: torch.Tensor, centres: torch.Tensor, radius: torch.Tensor, block: int = 1024) -> float:
    """The fraction of rows of ``x`` within ``radius[j]`` of some ``centres[j]``."""
    hits = sum(int((torch.cdist(x[i:i + block], centres) <= radius[None, :]).any(dim=1).sum())
               for i in range(0, len(x), block))
    return hits / len(x)


def std_ratio(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Mean per-pixel standard deviation of the generated images over that of the real ones."""
    return float(fake.double().std(0).mean() / real.double().std(0).mean().clamp(min=1e-12))
