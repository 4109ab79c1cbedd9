"""Quality measurement: FID and KID of a generator (G_ema by default) against its training shards."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from torch import nn

from ..rng import isolated_rng
from .features import DigitClassifier, build_extractor, cache_dir
from .metrics import Dist, fid_kid, generated_features, reference
from .native import NativePixels, precision_recall, std_ratio

__all__ = ["Dist", "Evaluator"]


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
        self.ref = reference(self.extractor, self.shards, manifest, ecfg.n, cache_dir(ecfg.cache_dir), dist,
                             ecfg.batch_size)
        # eval.native_resolution: the second measure, in the data's own pixel space (eval/native.py)
        self.native = NativePixels(ecfg.native_resolution, manifest["channels"]) if ecfg.native_resolution else None
        self.ref_native = reference(self.native, self.shards, manifest, ecfg.n, cache_dir(ecfg.cache_dir), dist,
                                    ecfg.batch_size) if self.native else None

    @isolated_rng()
    def __call__(self, generator: nn.Module, n: int | None = None) -> dict:
        n = n or self.cfg.n
        t0 = time.perf_counter()
        fake, *native = generated_features(generator, [self.extractor, *([self.native] if self.native else [])], n,
                                           self.cfg.seed, self.dist, self.cfg.batch_size)
        result = fid_kid(self.ref, fake, self.dist, self.cfg.kid_subsets, self.cfg.kid_subset_size, self.cfg.seed)
        if native:
            result.update(self._native(native[0]))
        if isinstance(self.extractor, DigitClassifier):
            result["class_fractions"] = self._class_fractions(fake)
        seconds = time.perf_counter() - t0
        return {**result, "features": self.extractor.key, "eval_s": seconds,
                "eval_s_per_1k": seconds / n * 1000}

    def _native(self, fake: torch.Tensor) -> dict:
        """Frechet distance, improved precision/recall and the pixel-std ratio at the native resolution, against
        the real images the reference keeps (``eval.n`` of them at most). Every rank gets the same values."""
        res = self.cfg.native_resolution
        fd = fid_kid(self.ref_native, fake, self.dist, 1, 2)["fid"]
        if self.dist.world > 1:
            fake = torch.cat([f.to(self.dist.device) for f in self.dist.gather_object([fake.cpu()])])
        real = self.ref_native["kid"].to(fake.device)
        precision, recall = precision_recall(real, fake)
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
