"""G_ema: the update rule and its half-life, BatchNorm statistics copied, and a run's grids drawn from it."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dcgan_dist.config import load_config
from dcgan_dist.models import Generator
from dcgan_dist.train import train
from dcgan_dist.train.ema import EMA


def test_half_life_and_rampup_follow_stylegan2_ada():
    ema = EMA(torch.nn.Linear(2, 2), kimg=10, rampup=0.05)
    assert ema.beta(images_seen=10**6, images_per_step=10_000) == pytest.approx(0.5)   # one half-life per step
    assert ema.beta(10**6, 100) == pytest.approx(0.5 ** 0.01)
    assert ema.beta(1000, 100) == pytest.approx(0.5 ** (100 / 50))   # early: half-life 5% of the 1,000 images seen
    assert EMA(torch.nn.Linear(2, 2), kimg=10, rampup=0).beta(1000, 100) == pytest.approx(0.5 ** 0.01)


def test_update_averages_parameters_and_copies_batchnorm_statistics():
    torch.manual_seed(0)
    g = Generator(latent=8, ngf=4, channels=1, resolution=32)
    ema = EMA(g, kimg=0.1, rampup=0)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
    g.train()(torch.randn(16, 8))                                   # moves G's BatchNorm running statistics
    ema.update(g, images_seen=1000, images_per_step=100)           # beta = 0.5 ** (100 / 100) = 0.5
    for (k, p_ema), p in zip(ema.model.named_parameters(), g.parameters()):
        assert torch.allclose(p_ema, 0.5 * before[k] + 0.5 * p, atol=1e-6), k
        assert not p_ema.requires_grad
    for (k, b_ema), b in zip(ema.model.named_buffers(), g.buffers()):
        assert torch.equal(b_ema, b) and not torch.equal(b_ema, before[k]) or "num_batches" in k, k
    assert not ema.model.training


def test_grids_come_from_g_ema_and_the_raw_grid_is_optional(tiny, tmp_path):
    from dcgan_dist.train.tracking import sample_grid
    summary = train(load_config(tiny, [f'runs_dir="{tmp_path}"', "log.raw_grid=true"]))
    G, _, G_ema = summary["models"]
    samples = tmp_path / "tiny" / "samples"
    noise = load_file(tmp_path / "tiny" / "checkpoints" / "step_00000006" / "fixed_noise.safetensors")["fixed_noise"]
    for generator, png in ((G_ema, samples / "step_00000006.png"), (G, samples / "raw" / "step_00000006.png")):
        grid = (sample_grid(generator, noise).mul(255).add(0.5).clamp(0, 255).byte().permute(1, 2, 0).numpy())
        assert np.array_equal(np.asarray(Image.open(png)), grid), png
    assert not np.array_equal(np.asarray(Image.open(samples / "step_00000006.png")),
                              np.asarray(Image.open(samples / "raw" / "step_00000006.png")))
    summary = train(load_config(tiny, [f'runs_dir="{tmp_path / "off"}"', "model.ema=false"]))
    assert summary["models"][2] is None
    assert not (tmp_path / "off" / "tiny" / "checkpoints" / "step_00000006" / "ema.safetensors").exists()
