"""Feature extractors for FID/KID: the standard Inception-v3 (from a local weights file) and, for data where
Inception features say little (1-channel digits), a small classifier trained on the shards themselves.

Each extractor maps uint8 images N x C x H x W to float features N x D and has a ``key`` that names it in
cache file names (the Inception weights' checksum, or the classifier's training data and recipe).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.shards import fingerprint, sha256_file
from ..errors import UserError, brief
from . import cache as cached

log = logging.getLogger("dcgan_dist")

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def cache_dir(configured: str = "") -> Path:
    """``eval.cache_dir``, else $XDG_CACHE_HOME/dcgan_dist (~/.cache/dcgan_dist)."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dcgan_dist"


def inception_path(configured: str = "", cache: str = "") -> Path:
    return Path(configured).expanduser() if configured else cache_dir(cache) / INCEPTION_FILE


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 (2048-d) with the 2015-12-05 FID weights, through torchmetrics' wrapper of
    torch-fidelity's extractor, resized to 299 px the way torch-fidelity and pytorch-fid do (TensorFlow 1.x
    bilinear, antialias off): the protocol FID papers report. Grey images are repeated to 3 channels."""

    num_features = 2048

    def __init__(self, weights: Path) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        check_inception_file(weights)
        try:   # torch-fidelity loads it with weights_only=False (a pickle); make sure it holds only tensors first
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure: not a plain state dict
            raise UserError(f"eval.inception_weights: {weights} is not a PyTorch weights file holding only "
                            f"tensors ({type(e).__name__}); use {INCEPTION_URL}") from None
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(weights), antialias=False)
        except RuntimeError as e:
            raise UserError(f"eval.inception_weights: {weights} does not fit Inception-v3 "
                            f"({brief(e, 120)}); use {INCEPTION_URL}") from None
        self.key = f"inception-{sha256_file(weights)[:12]}"
        self.description = "Inception-v3 pool3, the 2015-12-05 FID weights (the features papers report)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images.contiguous())


class DigitClassifier(nn.Module):
    """A small CNN classifier; its 64-d penultimate activations, divided by their RMS over the training
    images (so they are O(1) like Inception's pool3 and KID's cubic kernel stays in range), are the features."""

    num_features = 64

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, num_classes)
        self.register_buffer("scale", torch.ones(()))
        self.key = self.description = ""

    def activations(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() * (2 / 255) - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.activations(images) / self.scale


# In the cache key. Version 2 trains on one thread (version 1's weights depended on the thread count); version 3
# trains for max(steps, epochs over the training part) steps: the 500 steps of before for small sets (the digits:
# the same weights), 2,532 on Fashion-MNIST's 54,000 (held-out accuracy 0.75 after 500 steps, 0.85 after 2,532).
CLASSIFIER_RECIPE = {"version": 3, "steps": 500, "epochs": 6, "batch": 128, "lr": 3e-3, "holdout": 0.1, "seed": 0,
                     "threads": 1}


def classifier(shards: Path, manifest: dict, cache: Path, device: torch.device) -> DigitClassifier:
    """The classifier for these shards: loaded from the cache, or trained on them (labels needed) and cached.
    Training (at least 500 steps of batch 128, else 6 epochs) takes ~20 s on a 2-core CPU at 32 px for the
    digits, ~90 s for Fashion-MNIST; the held-out accuracy is logged.
    A damaged cached entry is trained again (with a warning); an unwritable cache is a UserError."""
    from ..data import read_shards

    check_features("classifier", shards, manifest, cache=str(cache))
    classes = manifest["class_names"]
    recipe = json.dumps(CLASSIFIER_RECIPE, sort_keys=True)
    key = "classifier-" + hashlib.sha256(f"{fingerprint(manifest)}|{recipe}".encode()).hexdigest()[:16]
    path = cache / f"{key}.safetensors"
    net = DigitClassifier(manifest["channels"], len(classes))
    entry = cached.load(path)
    accuracy = entry[1].get("heldout_accuracy", "?") if entry is not None else "?"
    if entry is not None:
        try:
            net.load_state_dict(entry[0])
        except RuntimeError as e:                 # a sound file of another architecture: train it again
            log.warning("evaluation cache file %s does not fit the classifier (%s); training it again", path,
                        brief(e, 200))
            entry = None
    if entry is None:
        t0 = time.perf_counter()
        pairs = list(read_shards(shards))
        x = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor([p[1] for p in pairs])
        acc = _train_classifier(net, x, y)
        accuracy = f"{acc:.4f}"
        cached.save(path, net.state_dict(), {"heldout_accuracy": accuracy, "recipe": recipe})
        log.info("trained the FID feature classifier on %d images of %s in %.1f s: held-out accuracy %.3f; "
                 "cached as %s", len(x), shards, time.perf_counter() - t0, acc, path)
    net.key = key
    net.description = (f"a classifier trained on {shards} ({manifest['num_images']} images, held-out accuracy "
                       f"{accuracy}), not Inception: compare only with figures of the same features")
    return net.to(device).eval().requires_grad_(False)


def _train_classifier(net: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    """Train ``net`` (on the CPU) and set its feature scale; returns the held-out accuracy. On one thread,
    whatever the process has: CPU float results depend on the thread count (reduction order), and torchrun runs
    each rank with OMP_NUM_THREADS=1 while a plain process uses every core, so the classifier (and every FID
    measured with it) would depend on which process trained it first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(net, x, y)
    finally:
        torch.set_num_threads(threads)


def _fit(net: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    r = CLASSIFIER_RECIPE
    gen = torch.Generator().manual_seed(r["seed"])
    perm = torch.randperm(len(x), generator=gen)
    n_test = max(1, int(len(x) * r["holdout"]))
    test, train = perm[:n_test], perm[n_test:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r["seed"])                    # the initial weights too: same data, same classifier
        for m in net.modules():
            if m is not net and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        opt = torch.optim.Adam(net.parameters(), lr=r["lr"])
        net.train()
        for _ in range(max(r["steps"], -(-r["epochs"] * len(train) // r["batch"]))):
            idx = train[torch.randint(len(train), (r["batch"],), generator=gen)]
            loss = nn.functional.cross_entropy(net.head(net.activations(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net.head(net.activations(x[test[i:i + 512]])).argmax(1) for i in range(0, len(test), 512)])
        sq = sum(float(net.activations(x[train[i:i + 512]]).square().sum()) for i in range(0, len(train), 512))
        net.scale.fill_((sq / (len(train) * net.num_features)) ** 0.5)
    return float((pred == y[test]).float().mean())


def check_inception_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"eval.inception_weights: {path} does not exist; FID/KID need the 2015-12-05 Inception "
                        f"weights ({INCEPTION_FILE}, 91 MB): download {INCEPTION_URL} where there is internet and "
                        f"copy it to {path}, or set eval.inception_weights to its path")


def check_features(kind: str, shards, manifest: dict, weights: str = "", cache: str = "") -> str:
    """Resolve ``auto`` (classifier for 1-channel shards, else inception) and check what that extractor needs
    (the trainer's pre-flight calls this before any step); returns the kind."""
    if kind == "auto":
        kind = "classifier" if manifest["channels"] == 1 else "inception"
    if kind == "inception":
        check_inception_file(inception_path(weights, cache))
    elif len(manifest.get("class_names") or []) < 2:
        raise UserError(f"{shards}: eval.features = \"classifier\" needs labelled shards with at least 2 "
                        f"classes (these have {len(manifest.get('class_names') or [])}); use "
                        f"eval.features = \"inception\"")
    cached.check_writable(cache_dir(cache))
    return kind


def build_extractor(kind: str, shards: Path, manifest: dict, weights: str, cache: str,
                    device: torch.device) -> nn.Module:
    """``kind``: inception | classifier | auto (classifier for 1-channel shards, else inception)."""
    if check_features(kind, shards, manifest, weights, cache) == "classifier":
        return classifier(shards, manifest, cache_dir(cache), device)
    return InceptionFeatures(inception_path(weights, cache)).to(device)
