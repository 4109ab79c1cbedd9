"""FID and KID of a generator against the shards, on one process or many.

The statistics are torchmetrics' (FrechetInceptionDistance and KernelInceptionDistance, the same code papers
use through torchmetrics): this module only feeds them features and caches the real side. Features are
extracted once and given to both metrics through a pass-through "feature extractor".

Distributed: generated image i comes from the latent drawn for block ``i // batch`` (a generator seeded with
(seed, block)), and blocks are dealt to the ranks round-robin, so the generated set does not depend on the
number of ranks. Each rank adds its features; torchmetrics reduces the float64 sums (FID) and gathers the
features (KID) across ranks at compute(). The reference statistics of the shards are computed once per
(shard set, extractor, count) and cached: float64 sums for FID, the features of the first ``kid_real``
images (in stored order) for KID.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.shards import fingerprint, read_chunk
from ..data.store import Store
from . import cache as cached

log = logging.getLogger("dcgan_dist")


class _Given(nn.Module):
    """Pass-through: the metrics receive features, already extracted."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass
class Dist:
    """What the evaluation needs of the process group (Accelerate's, or a single process)."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    barrier: object = None
    gather_object: object = None
    reduce_sum: object = None

    @classmethod
    def from_accelerator(cls, acc) -> "Dist":
        from accelerate.utils import gather_object
        return cls(acc.process_index, acc.num_processes, acc.device, acc.wait_for_everyone,
                   gather_object, lambda t: acc.reduce(t, reduction="sum"))


def reference(extractor: nn.Module, shards: Path, manifest: dict, kid_real: int, cache: Path, dist: Dist,
              batch: int = 250) -> dict:
    """The real side, from the cache or computed across the ranks (chunks dealt round-robin) and cached.
    A damaged cached entry is computed again (with a warning); an unwritable cache is a UserError."""
    kid_real = min(kid_real, manifest["num_images"])
    key = hashlib.sha256(f"{fingerprint(manifest)}|{extractor.key}|{kid_real}".encode()).hexdigest()[:16]
    path = cache / f"reference-{key}.safetensors"
    entry = cached.load(path)            # every rank reads the same file: all agree whether to compute it
    if entry is not None:
        return entry[0]
    t0 = time.perf_counter()
    stats = _reference_stats(extractor, shards, manifest, kid_real, dist, batch)
    if dist.rank == 0:
        cached.save(path, stats, {"shards": str(shards), "extractor": extractor.key})
        log.info("reference statistics of %d images of %s in %.1f s, cached as %s", int(stats["n"]), shards,
                 time.perf_counter() - t0, path)
    if dist.barrier:
        dist.barrier()
    return stats


def _reference_stats(extractor, shards: Path, manifest: dict, kid_real: int, dist: Dist, batch: int) -> dict:
    shape = (manifest["resolution"], manifest["resolution"], manifest["channels"])
    chunks = [(s["name"], c) for s in manifest["shards"] for c in s["chunks"]]
    starts = np.cumsum([0] + [c["n"] for _, c in chunks])
    d = extractor.num_features
    total = torch.zeros(d, dtype=torch.float64, device=dist.device)
    outer = torch.zeros(d, d, dtype=torch.float64, device=dist.device)
    kept = []                                    # (first global index, features) of the first kid_real images
    store = Store(shards)
    for i in range(dist.rank, len(chunks), dist.world):
        name, chunk = chunks[i]
        images, _ = read_chunk(store, name, chunk, shape)
        x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2)      # read_chunk's arrays are read-only views
        feats = torch.cat([_features(extractor, x[j:j + batch], dist.device) for j in range(0, len(x), batch)])
        f64 = feats.double()
        total += f64.sum(0)
        outer += f64.T @ f64
        if starts[i] < kid_real:
            kept.append((int(starts[i]), feats[: kid_real - starts[i]].float().cpu()))
    if dist.world > 1:
        total, outer = dist.reduce_sum(total), dist.reduce_sum(outer)
        kept = dist.gather_object(kept)
    kid = torch.cat([f for _, f in sorted(kept, key=lambda p: p[0])])
    return {"sum": total.cpu(), "outer": outer.cpu(), "n": torch.tensor(int(starts[-1])), "kid": kid.contiguous()}


@torch.no_grad()
def _features(extractor: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return extractor(images.to(device)).float()


def _rank_blocks(n: int, batch: int, rank: int, world: int) -> list[tuple[int, int]]:
    """(block index, images) of the blocks this rank generates: block b holds images [b*batch, ...)."""
    blocks = [(b, min(batch, n - b * batch)) for b in range((n + batch - 1) // batch)]
    return blocks[rank::world]


@torch.no_grad()
def generated_features(generator: nn.Module, extractors, n: int, seed: int, dist: Dist, batch: int = 250):
    """Features of this rank's share of ``n`` generated images (eval mode; images rounded to uint8 as saved).
    ``extractors``: one extractor (returns its features) or a list (returns a list; each image generated once)."""
    many = isinstance(extractors, (list, tuple))
    extractors = list(extractors) if many else [extractors]
    was_training = generator.training
    generator.eval()
    latent = generator.latent
    out = [[] for _ in extractors]
    for block, size in _rank_blocks(n, batch, dist.rank, dist.world):
        z = torch.randn(size, latent, generator=torch.Generator().manual_seed(seed * 1_000_003 + block))
        images = generator(z.to(dist.device)).float()
        images = ((images + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
        for o, extractor in zip(out, extractors):
            o.append(extractor(images).float())
    generator.train(was_training)
    feats = [torch.cat(o) if o else torch.zeros(0, e.num_features, device=dist.device) for o, e in zip(out, extractors)]
    return feats if many else feats[0]


@torch.no_grad()
def image_features(images: torch.Tensor, extractors: list, dist: Dist, batch: int = 250) -> list[torch.Tensor]:
    """Features of this rank's share of given images (uint8 N x C x H x W), dealt in blocks as generated images
    are, for each extractor."""
    out = [[] for _ in extractors]
    for block, size in _rank_blocks(len(images), batch, dist.rank, dist.world):
        x = images[block * batch: block * batch + size].to(dist.device)
        for o, extractor in zip(out, extractors):
            o.append(extractor(x).float())
    return [torch.cat(o) if o else torch.zeros(0, e.num_features, device=dist.device) for o, e in zip(out, extractors)]


def fid_kid(ref: dict, fake: torch.Tensor, dist: Dist, kid_subsets: int = 100, kid_subset_size: int = 1000,
            seed: int = 0) -> dict:
    """FID and KID between the reference statistics and every rank's ``fake`` features (a collective: every
    rank calls it and gets the same values)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    d = fake.shape[1]
    fid = FrechetInceptionDistance(feature=_Given(d), reset_real_features=False).to(dist.device)
    # the real sums go in once (on rank 0): torchmetrics adds every rank's states at compute()
    if dist.rank == 0:
        fid.real_features_sum = ref["sum"].to(dist.device)
        fid.real_features_cov_sum = ref["outer"].to(dist.device)
        fid.real_features_num_samples = ref["n"].to(dist.device)
    fid.update(fake, real=False)                                     # also when empty: every rank takes part
    n_fake = int(dist.reduce_sum(torch.tensor(len(fake), device=dist.device))) if dist.world > 1 else len(fake)
    subset = min(kid_subset_size, n_fake, len(ref["kid"]))
    warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer")  # we know
    kid = KernelInceptionDistance(feature=_Given(d), subsets=kid_subsets, subset_size=subset,
                                  reset_real_features=False).to(dist.device)
    real_share = ref["kid"][dist.rank::dist.world].to(dist.device)     # each rank a share: gathered at compute()
    kid.update(real_share, real=True)
    kid.update(fake, real=False)
    fid_value = float(fid.compute())
    with torch.random.fork_rng(devices=[]):   # KID draws its subsets from the global RNG: keep training's intact
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": fid_value, "kid": float(kid_mean), "kid_std": float(kid_std), "n_fake": n_fake,
            "n_real": int(ref["n"]), "kid_subset_size": subset}
