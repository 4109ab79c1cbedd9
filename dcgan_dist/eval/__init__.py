"""Quality measurement: FID, KID and improved precision/recall of a generator (G_ema by default) against a
reference set: the held-out split named by ``eval.reference`` (the published protocol: generated images against the
*test* images), else the training shards. The features come from the training shards (Inception, or a classifier
trained on them), never from the reference."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from torch import nn

from ..models import standing_stats
from ..rng import isolated_rng
from .features import DigitClassifier, build_extractor, cache_dir
from .metrics import Dist, fid_kid, generated_features, image_features, reference
from .native import NativePixels, precision_recall, std_ratio

__all__ = ["Dist", "Evaluator", "reference_set"]

PR_MAX = 10_000      # precision/recall on at most this many real and generated images (an N x M distance matrix)


def reference_set(ecfg, shards, manifest: dict, verify: str = "size") -> tuple[str | Path, dict]:
    """(shards, manifest) the measures compare with: ``eval.reference`` when set (checked: it exists and holds
    images of the training shards' resolution and channels; a UserError otherwise), else the training shards."""
    from ..data import load_manifest
    from ..errors import UserError

    if not ecfg.reference:
        return shards, manifest
    try:
        return ecfg.reference, load_manifest(ecfg.reference, verify, manifest["resolution"], manifest["channels"])
    except UserError as e:
        raise UserError(f"eval.reference: {e}") from None


class Evaluator:
    """Built once per run (the extractor, and the reference statistics: cached on disk); called per evaluation.
    A collective when ``dist.world > 1``: every rank builds it and calls it at the same point. Neither building
    nor calling it draws from the global RNG streams training uses (see dcgan_dist.rng)."""

    @isolated_rng()
    def __init__(self, ecfg, shards: str | Path, manifest: dict, dist: Dist) -> None:
        self.cfg, self.dist, self.shards = ecfg, dist, shards
        with _main_first(dist):    # rank 0 trains/caches the classifier or computes nothing; the others load it
            self.extractor = build_extractor(ecfg.features, self.shards, manifest, ecfg.inception_weights,
                                             ecfg.cache_dir, dist.device)
        self.ref_shards, ref_manifest = reference_set(ecfg, shards, manifest)
        self.ref = reference(self.extractor, self.ref_shards, ref_manifest, ecfg.n, cache_dir(ecfg.cache_dir), dist,
                             ecfg.batch_size)
        # eval.native_resolution: the second measure, in the data's own pixel space (eval/native.py)
        self.native = NativePixels(ecfg.native_resolution, manifest["channels"]) if ecfg.native_resolution else None
        self.ref_native = reference(self.native, self.ref_shards, ref_manifest, ecfg.n, cache_dir(ecfg.cache_dir),
                                    dist, ecfg.batch_size) if self.native else None

    @isolated_rng()
    def __call__(self, generator: nn.Module, n: int | None = None) -> dict:
        """The measures of ``n`` (default ``eval.n``) images of ``generator``: a dict with fid, kid, kid_std,
        precision, recall, the counts, the features' key and description, and the seconds it took. Measured with
        standing BatchNorm statistics from ``eval.standing_stats`` latents (models.standing_stats, on a copy)
        unless the generator already has them."""
        n = n or self.cfg.n
        t0 = time.perf_counter()
        if getattr(generator, "standing_stats", 0) != self.cfg.standing_stats:
            d = self.dist
            generator = standing_stats(generator, self.cfg.standing_stats, d.rank, d.world, d.reduce_sum)
        fake, *native = generated_features(generator, [self.extractor, *([self.native] if self.native else [])], n,
                                           self.cfg.seed, self.dist, self.cfg.batch_size)
        return {**self._measures(fake, native[0] if native else None, n, t0), "standing_stats": self.cfg.standing_stats}

    @isolated_rng()
    def images(self, images: torch.Tensor) -> dict:
        """The same measures of given images (uint8 N x C x H x W, on the CPU; e.g. real training images for the
        floor, or another program's samples) instead of a generator's."""
        t0 = time.perf_counter()
        fake, *native = image_features(images, [self.extractor, *([self.native] if self.native else [])],
                                       self.dist, self.cfg.batch_size)
        return self._measures(fake, native[0] if native else None, len(images), t0)

    def _measures(self, fake: torch.Tensor, native: torch.Tensor | None, n: int, t0: float) -> dict:
        result = fid_kid(self.ref, fake, self.dist, self.cfg.kid_subsets, self.cfg.kid_subset_size, self.cfg.seed)
        result.update(zip(("precision", "recall"), self._precision_recall(self.ref, self._gather(fake))))
        if native is not None:
            result.update(self._native(native))
        if isinstance(self.extractor, DigitClassifier):
            result["class_fractions"] = self._class_fractions(fake)
        seconds = time.perf_counter() - t0
        return {**result, "reference": str(self.ref_shards), "features": self.extractor.key,
                "features_description": self.extractor.description, "eval_s": seconds,
                "eval_s_per_1k": seconds / n * 1000}

    def _gather(self, features: torch.Tensor) -> torch.Tensor:
        """Every rank's features, in rank order (a collective when world > 1)."""
        if self.dist.world == 1:
            return features
        return torch.cat([f.to(self.dist.device) for f in self.dist.gather_object([features.cpu()])])

    @staticmethod
    def _precision_recall(ref: dict, fake: torch.Tensor) -> tuple[float, float]:
        """Improved precision/recall (k=3) of the first PR_MAX of ``fake`` (all ranks' features) against the first
        PR_MAX real images the reference keeps."""
        return precision_recall(ref["kid"][:PR_MAX].to(fake.device), fake[:PR_MAX])

    def _native(self, fake: torch.Tensor) -> dict:
        """Frechet distance, improved precision/recall and the pixel-std ratio at the native resolution, against
        the real images the reference keeps (``eval.n`` of them at most). Every rank gets the same values."""
        res = self.cfg.native_resolution
        fd = fid_kid(self.ref_native, fake, self.dist, 1, 2)["fid"]
        fake = self._gather(fake)
        precision, recall = self._precision_recall(self.ref_native, fake)
        real = self.ref_native["kid"].to(fake.device)
        return {f"fd_pixels{res}": fd, f"precision_pixels{res}": precision, f"recall_pixels{res}": recall,
                f"std_ratio_pixels{res}": std_ratio(real, fake)}

    @torch.no_grad()
    def _class_fractions(self, fake: torch.Tensor) -> list[float]:
        """The classifier's verdict on the generated images: the fraction of each class (mode coverage)."""
        net = self.extractor
        counts = torch.bincount(net.head(fake * net.scale).argmax(1), minlength=net.head.out_features).double()
        if self.dist.world > 1:
            counts = self.dist.reduce_sum(counts)
        return (counts / counts.sum().clamp(min=1)).tolist()


@contextlib.contextmanager
def _main_first(dist: Dist):
    if dist.rank != 0 and dist.barrier:
        dist.barrier()
    yield
    if dist.rank == 0 and dist.barrier:
        dist.barrier()
