"""How sharp a checkpoint's D is on real images: its mean logit on training and on held-out images, and the mean
squared norm of its input gradient ||grad_x D(x)||^2 (the quantity the R1 penalty, loss.r1_gamma, holds down).
D runs in training mode (BatchNorm on batch statistics), in batches of train.batch_size, as in training.

Usage: python docs/d_gradient.py CKPT [CKPT ...] [--train data/fashion] [--test data/fashion-test] [--n 512]
(defaults: the run's data.shards and eval.reference)."""

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from dcgan_dist.config import load_config
from dcgan_dist.data.shards import read_shards
from dcgan_dist.models import build_models


def images(root: str, n: int) -> torch.Tensor:
    """The first n images of a shard folder as float32 N x C x H x W in [-1, 1], as the loader gives them."""
    x = np.stack([a for a, _ in itertools.islice(read_shards(root), n)])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def sharpness(d: torch.nn.Module, x: torch.Tensor, batch: int) -> tuple[float, float]:
    """(mean logit, mean ||grad_x D(x)||^2) over x, batch by batch."""
    logits, norms = [], []
    for i in range(0, len(x), batch):
        xi = x[i:i + batch].clone().requires_grad_(True)
        out = d(xi)
        (grad,) = torch.autograd.grad(out.sum(), xi)
        logits.append(out.detach())
        norms.append(grad.square().flatten(1).sum(1))
    return torch.cat(logits).mean().item(), torch.cat(norms).mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--train", help="training shards (default: the run's data.shards)")
    p.add_argument("--test", help="held-out shards (default: the run's eval.reference)")
    p.add_argument("--n", type=int, default=512)
    a = p.parse_args()
    torch.manual_seed(0)
    print("| checkpoint | D logit, train | D logit, held out | ||grad_x D||^2, train | ||grad_x D||^2, held out |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for ckpt in a.checkpoints:
        cfg = load_config(ckpt / "config.toml")
        _, d = build_models(cfg)
        d.load_state_dict(load_file(ckpt / "model_1.safetensors"))    # Accelerate saves D as the second model
        d.train()
        train = sharpness(d, images(a.train or cfg.data.shards, a.n), cfg.train.batch_size)
        test = sharpness(d, images(a.test or cfg.eval.reference, a.n), cfg.train.batch_size)
        print(f"| {ckpt} | {train[0]:.3f} | {test[0]:.3f} | {train[1]:.1f} | {test[1]:.1f} |")


if __name__ == "__main__":
    main()
