"""CUDA correctness (pytest -m gpu; skipped without CUDA): precisions, fp16 overflow per network, no host
synchronisation inside the step, channels_last / compile / CUDA graph capture, grids from the unwrapped G,
a CUDA checkpoint that resumes on CUDA and samples on a CPU, SyncBatchNorm in one process.

One GPU cannot test NCCL across ranks ("Duplicate GPU detected" with two ranks on one device): multi-rank
behaviour stays tested with gloo on CPU (tests/test_train.py, tests/test_resume.py, tests/test_signals.py)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from dcgan_dist.config import load_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def nets_for(tiny, tmp_path, *overrides):
    from accelerate import Accelerator

    from dcgan_dist.train.loop import build, resolve_precision
    cfg = load_config(tiny, [f'runs_dir="{tmp_path}"', *overrides])
    acc = Accelerator()
    cfg.train.precision = resolve_precision(cfg.train.precision, acc.device)     # as the loop hands it to gan_step
    return acc, cfg, build(acc, cfg)


def real_batch(cfg, channels_last: bool):
    from dcgan_dist.data import to_device
    images = torch.randint(0, 256, (cfg.train.batch_size, cfg.data.resolution, cfg.data.resolution,
                                    cfg.data.channels), dtype=torch.uint8).pin_memory()
    return lambda: to_device(images, "cuda", channels_last)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_trains_tens_of_steps_with_finite_losses(tiny, tmp_path, precision):
    from dcgan_dist.train import train
    cfg = load_config(tiny, [f'runs_dir="{tmp_path}"', f'train.precision="{precision}"', "train.max_steps=40",
                             "log.every=5", "log.sample_every=40"])
    summary = train(cfg)
    got = rows(tmp_path / "tiny")
    assert summary["step"] == 40 and [r["step"] for r in got] == list(range(5, 45, 5))
    assert all(torch.isfinite(torch.tensor([r["loss_d"], r["loss_g"]])).all() for r in got)
    assert got[-1]["gpu_mem_gb"] > 0


def test_fp16_overflow_skips_counts_and_halves_the_overflowing_network_only(tiny, tmp_path):
    from dcgan_dist.train.step import gan_step
    acc, cfg, nets = nets_for(tiny, tmp_path, 'train.precision="fp16"')
    nets.scaler_d._scale.fill_(2.0 ** 60)           # D's gradients overflow fp16 at this scale; G's scale is sane
    before_g = nets.scaler_g.get_scale()
    out = gan_step(acc, nets, real_batch(cfg, True)(), cfg, 0.0)
    assert bool(out["skipped_d"]) and not bool(out["skipped_g"])
    assert nets.scaler_d.get_scale() == 2.0 ** 59 and nets.scaler_g.get_scale() == before_g


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_step_reads_no_value_back_to_the_host(tiny, tmp_path, precision):
    """Steady-state steps under torch.cuda.set_sync_debug_mode("error"): any host synchronisation (an .item(),
    GradScaler.get_scale(), a Python bool of a tensor, a blocking copy) raises. The loop's per-step work is
    included: the pinned-memory batch copy, the NaN guard, the interval sums, G_ema."""
    from dcgan_dist.train.step import gan_step
    acc, cfg, nets = nets_for(tiny, tmp_path, f'train.precision="{precision}"')
    get = real_batch(cfg, True)
    nonfinite, sums = torch.zeros((), dtype=torch.bool, device="cuda"), {}
    unwrapped = acc.unwrap_model(nets.G)

    def step():
        out = gan_step(acc, nets, get(), cfg, 0.0)
        for loss, skipped in ((out["loss_d"], out["skipped_d"]), (out["loss_g"], out["skipped_g"])):
            nonlocal nonfinite
            nonfinite |= ~torch.isfinite(loss) & ~skipped
        for k in ("loss_d", "loss_g", "d_real", "d_fake"):
            sums[k] = sums.get(k, 0) + out[k]
        nets.ema.update(unwrapped, 1000, 16)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not bool(nonfinite)


@pytest.mark.parametrize("channels_last, mode", [(True, "eager"), (False, "eager"), (True, "compile"),
                                                 (True, "graph")])
def test_channels_last_compile_and_cuda_graph_steps_train(tiny, tmp_path, channels_last, mode):
    from dcgan_dist.train.step import capture_step, gan_step, make_optimizers
    acc, cfg, nets = nets_for(tiny, tmp_path, 'train.precision="bf16"', f"train.channels_last={str(channels_last).lower()}",
                              f"train.compile={str(mode == 'compile').lower()}")
    get = real_batch(cfg, channels_last)
    if mode == "graph":
        nets.opt_g, nets.opt_d = make_optimizers(nets.G, nets.D, cfg.optim, cuda=True, capturable=True)
        static = get()
        out = {}
        replay = capture_step(lambda: out.update(gan_step(acc, nets, static, cfg, 0.0)))
        before = [p.detach().clone() for p in nets.G.parameters()]
        for _ in range(5):
            replay()
        torch.cuda.synchronize()
        assert any(not torch.equal(a, p) for a, p in zip(before, nets.G.parameters()))   # replays update G
    else:
        for _ in range(5):
            out = gan_step(acc, nets, get(), cfg, 0.0)
    assert torch.isfinite(out["loss_d"]) and torch.isfinite(out["loss_g"])


def test_grid_comes_from_the_unwrapped_g_in_eval_mode(tiny, tmp_path):
    from dcgan_dist.train.tracking import sample_grid
    acc, cfg, nets = nets_for(tiny, tmp_path)
    g = acc.unwrap_model(nets.G).train()
    grid = sample_grid(g, torch.randn(16, cfg.model.latent))
    assert grid.device.type == "cpu" and grid.shape == (3, 2 * 34 + 2, 8 * 34 + 2) and g.training


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_cuda_checkpoint_resumes_on_cuda_as_the_uninterrupted_run(tiny, tmp_path, deterministic):
    """Bitwise with cuDNN deterministic algorithms (cudnn.deterministic, no benchmark); with cuDNN's defaults
    the runs may differ in the last bits (atomics in convolution backward): then only close, and the figure
    says by how much."""
    from safetensors.torch import load_file
    from dcgan_dist.train import train
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, False
    try:
        common = ["train.max_steps=20", "checkpoint.every=10", "log.every=5", "log.sample_every=100",
                  'train.precision="bf16"']
        train(load_config(tiny, [f'runs_dir="{tmp_path / "ref"}"', *common]))
        train(load_config(tiny, [f'runs_dir="{tmp_path / "cut"}"', *common[1:], "train.max_steps=10"]))
        train(load_config(tiny, [f'runs_dir="{tmp_path / "cut"}"', *common]))
    finally:
        torch.backends.cudnn.deterministic = False
    a = load_file(tmp_path / "ref" / "tiny" / "checkpoints" / "step_00000020" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "tiny" / "checkpoints" / "step_00000020" / "model.safetensors")
    worst = max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())
    print(f"cudnn.deterministic={deterministic}: largest difference in G after the resume {worst:.3g}")
    if deterministic:
        assert worst == 0
    else:
        assert worst < 1e-2

    p = subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), "--checkpoint",
                        str(tmp_path / "cut" / "tiny" / "checkpoints" / "step_00000020"), "--out",
                        str(tmp_path / "samples"), "--n", "8"], capture_output=True, text=True,
                       env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(list((tmp_path / "samples").glob("*.png"))) >= 8


def test_sync_batchnorm_builds_and_steps_in_one_process(tiny, tmp_path):
    from dcgan_dist.train.step import gan_step
    acc, cfg, nets = nets_for(tiny, tmp_path)
    nets.G = torch.nn.SyncBatchNorm.convert_sync_batchnorm(nets.G)
    nets.D = torch.nn.SyncBatchNorm.convert_sync_batchnorm(nets.D)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in nets.D.modules())
    get = real_batch(cfg, True)
    for _ in range(3):
        out = gan_step(acc, nets, get(), cfg, 0.0)
    assert torch.isfinite(out["loss_d"])
