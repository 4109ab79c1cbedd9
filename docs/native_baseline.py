"""The best a generator can read on the 8x8 pixel measure (docs/quality.md): two random halves of the real
shards against each other. Usage: python docs/native_baseline.py data/digits [resolution 8] [seed 0]"""

import sys

import numpy as np
import scipy.linalg
import torch

from dcgan_dist.data.shards import read_shards
from dcgan_dist.eval.native import NativePixels, precision_recall, std_ratio


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) (Heusel et al., 2017), float64."""
    sa, sb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * root))


if __name__ == "__main__":
    shards, res, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8, int(sys.argv[3]) if len(sys.argv) > 3 else 0
    x = torch.from_numpy(np.stack([im for im, _ in read_shards(shards)])).permute(0, 3, 1, 2)
    f = NativePixels(res, x.shape[1])(x).double()
    perm = torch.randperm(len(f), generator=torch.Generator().manual_seed(seed))
    a, b = f[perm[: len(f) // 2]], f[perm[len(f) // 2:]]
    p, r = precision_recall(a, b)
    print(f"real half vs real half at {res}x{res}: Frechet distance {frechet(a, b):.4f}, precision {p:.3f}, "
          f"recall {r:.3f}, pixel std ratio {std_ratio(a, b):.3f}")
