"""The 8x8 pixel measure of docs/quality.md at equal set sizes. Real half B against real half A is the best a
generator can read; each checkpoint's G_ema (G with --raw) is read the same way: as many generated images as
half B holds against half A, averaged over 3 latent seeds. The eval.native_resolution metrics of a run compare
2,000 generated images with all real ones, a different (larger) set, so their values are not these.

Usage: python docs/native_baseline.py data/digits [--resolution 8] [--seed 0] [--checkpoint CKPT ...] [--raw]"""

import argparse

import numpy as np
import scipy.linalg
import torch

from dcgan_dist.data.shards import read_shards
from dcgan_dist.eval.native import NativePixels, precision_recall, std_ratio
from dcgan_dist.models import load_generator


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) (Heusel et al., 2017), float64."""
    sa, sb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * root))


def measures(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, float]:
    """Frechet distance, precision, recall and pixel-std ratio of ``b`` against the reference ``a``."""
    return (frechet(a, b), *precision_recall(a, b), std_ratio(a, b))


def line(name: str, fd: float, precision: float, recall: float, std: float) -> str:
    return f"{name}: Frechet distance {fd:.4f}, precision {precision:.3f}, recall {recall:.3f}, pixel std ratio {std:.3f}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards")
    ap.add_argument("--resolution", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="the random split into halves")
    ap.add_argument("--checkpoint", nargs="*", default=[])
    ap.add_argument("--raw", action="store_true", help="G instead of G_ema")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.from_numpy(np.stack([im for im, _ in read_shards(args.shards)])).permute(0, 3, 1, 2)
    native = NativePixels(args.resolution, x.shape[1])
    f = native(x).double()
    perm = torch.randperm(len(f), generator=torch.Generator().manual_seed(args.seed))
    a, b = f[perm[: len(f) // 2]], f[perm[len(f) // 2:]]
    print(line(f"real half B ({len(b)}) vs real half A ({len(a)}) at {args.resolution}x{args.resolution}",
               *measures(a, b)))
    for ckpt in args.checkpoint:
        G, which, _ = load_generator(ckpt, raw=args.raw)
        rows = []
        for seed in range(3):
            z = torch.randn(len(b), G.latent, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                images = ((G(z) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            rows.append(measures(a, native(images).double()))
        print(line(f"{ckpt} ({which}, {len(b)} images x 3 seeds) vs real half A", *np.mean(rows, 0)))
