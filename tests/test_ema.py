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


def test_standing_statistics_are_the_mean_of_batch_statistics_of_fixed_latents():
    from dcgan_dist.models import STANDING_SEED, standing_stats
    torch.manual_seed(0)
    g = Generator(latent=8, ngf=4, channels=1, resolution=32)
    g.train()(torch.randn(16, 8))                                   # running statistics of one training batch
    before = {k: v.clone() for k, v in g.state_dict().items()}
    rng = torch.get_rng_state()
    s = standing_stats(g, 600)                                      # 3 forwards: 256, 256 and 88 latents
    assert torch.equal(torch.get_rng_state(), rng) and not s.training and s.standing_stats == 600
    assert all(torch.equal(v, before[k]) for k, v in g.state_dict().items())      # g itself unchanged
    z = torch.randn(600, 8, generator=torch.Generator().manual_seed(STANDING_SEED))
    with torch.no_grad():
        h = g.net[0](z.view(600, 8, 1, 1))                          # the first BatchNorm's input
    chunks = h.split(256)
    mean = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    var = torch.stack([c.transpose(0, 1).flatten(1).var(1) for c in chunks]).mean(0)
    bn = s.net[1]
    assert torch.allclose(bn.running_mean, mean, atol=1e-6) and torch.allclose(bn.running_var, var, rtol=1e-5)
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3
    assert not torch.allclose(bn.running_mean, g.net[1].running_mean, atol=1e-3)
    again = standing_stats(s, 600)                                  # a function of the weights alone
    assert all(torch.equal(v, s.state_dict()[k]) for k, v in again.state_dict().items())
    assert standing_stats(g, 0) is g
    # dealt to 2 ranks (batches 0, 2 and batch 1) and added: the statistics of one process
    sent = []
    standing_stats(g, 600, rank=1, world=2, reduce_sum=lambda t: sent.append(t) or t)
    assert len(sent) == 1                                           # every layer's sums in one collective
    two = standing_stats(g, 600, rank=0, world=2, reduce_sum=lambda t: t + sent.pop(0))
    for k, v in s.state_dict().items():
        assert torch.allclose(v.float(), two.state_dict()[k].float(), rtol=1e-6, atol=1e-7), k
