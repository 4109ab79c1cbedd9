"""The trainer: rank agreement, reproducibility, gradient sync, W&B on rank 0, fp16 skips, config, sampling."""

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import launch_ranks
from dcgan_dist.config import load_config
from dcgan_dist.errors import UserError
from dcgan_dist.train import train

SCRIPT = Path(__file__).parent / "dist" / "train_ranks.py"


def launch(mode, out, config, *overrides):
    return launch_ranks(SCRIPT, mode, out, config, *overrides, out=out)


def test_two_ranks_hold_bitwise_equal_weights_and_runs_reproduce(tiny, tmp_path, classifier_cache):
    runs = tmp_path / "runs"
    a = launch("train", tmp_path / "a", tiny, f'runs_dir="{runs}"', 'name="a"')
    assert [r["num_processes"] for r in a] == [2, 2]
    assert a[0]["params"] == a[1]["params"]                        # every G, D and G_ema parameter, bitwise
    assert len(a[0]["params"]) == 2 * (4 + 3 * 2) + (4 + 2 * 2)    # G, G_ema: 4 convT + 3 BN; D: 4 conv + 2 BN
    g_ema = [k for k in a[0]["params"] if k.startswith("E.")]
    assert all(a[0]["params"][k] != a[0]["params"]["G." + k[2:]] for k in g_ema)   # an average, not a copy
    # BatchNorm statistics: G's (and so G_ema's) are their mean over the ranks, identical on every rank; D's
    # stay each rank's own (D is only used in training mode, DDP does not broadcast them)
    stats = [k for k in a[0]["buffers"] if k[0] in "GE" and "num_batches" not in k]
    assert len(stats) == 12 and all(a[0]["buffers"][k] == a[1]["buffers"][k] for k in stats)
    assert all(a[0]["buffers"][k] == a[0]["buffers"]["G." + k[2:]] for k in stats if k[0] == "E")
    assert any(a[0]["buffers"][k] != a[1]["buffers"][k] for k in a[0]["buffers"] if k.startswith("D."))
    b = launch("train", tmp_path / "b", tiny, f'runs_dir="{runs}"', 'name="b"')
    assert b[0]["params"] == a[0]["params"]                        # same seed, same world size: same weights
    c = launch("train", tmp_path / "c", tiny, f'runs_dir="{runs}"', 'name="c"', "train.seed=1", "eval.every=3",
               "eval.n=64", "eval.batch_size=32", "eval.kid_subset_size=32", f'eval.cache_dir="{classifier_cache}"',
               "loss.r1_gamma=1.0", "loss.r1_every=2")
    assert c[0]["params"] != a[0]["params"]
    assert c[0]["params"] == c[1]["params"]        # the R1 penalty's double backward stays in sync under DDP
    # gloo's threads ended with the process group (with and without evaluation: torchmetrics imports torch._dynamo)
    assert [r["gloo_threads"] for r in a + c] == [[]] * 4


def test_g_step_does_not_all_reduce_or_compute_d_gradients(tiny, tmp_path):
    r = launch("collectives", tmp_path / "x", tiny)
    assert r[0]["num_processes"] == 2
    for rank in r:
        # one bucket each: D's gradients are all-reduced once per step (D step), G's once (G step)
        assert rank["per_step"] == [{"G": 1, "D": 1}] * 3
        assert rank["d_grad_unchanged"] == [True] * 3              # the G step leaves D's .grad untouched


def test_corrupt_chunks_skipped_by_every_rank_are_summed_in_the_logged_row(tiny, tmp_path):
    """Issue 16: the row's corrupt_chunks was rank 0's own count (0 while rank 1's worker skipped a chunk)."""
    from dcgan_dist.data import load_manifest

    shards = tmp_path / "shards"
    shutil.copytree(load_config(tiny).data.shards, shards)
    tar = shards / "shard-000000.tar"
    chunks = load_manifest(shards)["shards"][0]["chunks"]
    with open(tar, "r+b") as f:
        for chunk in chunks[::2]:                                   # 4 of the 8 chunks: both ranks meet some
            f.seek(chunk["images"][0])
            f.write(b"garbage!")                                    # the npy header: the chunk cannot be read
    r = launch("train", tmp_path / "c", tiny, f'runs_dir="{tmp_path}"', 'name="c"', f'data.shards="{shards}"',
               "data.workers=1", "train.max_steps=60", "log.every=20", "log.sample_every=100")
    assert [x["num_processes"] for x in r] == [2, 2]
    assert r[0]["corrupt_chunks"] > 0 and r[1]["corrupt_chunks"] > 0      # each rank skipped its own
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [20, 40, 60]
    assert rows[-1]["corrupt_chunks"] == r[0]["corrupt_chunks"] + r[1]["corrupt_chunks"]
    assert [x["corrupt_chunks"] for x in rows] == sorted(x["corrupt_chunks"] for x in rows)


def test_two_process_offline_run_makes_one_wandb_run_and_rank0_outputs(tiny, tmp_path):
    runs = tmp_path / "runs"
    launch("train", tmp_path / "w", tiny, f'runs_dir="{runs}"', 'name="w"', 'log.wandb="offline"', "log.every=1",
           'log.trackers=["wandb", "tensorboard"]')
    run = runs / "w"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert len(list(offline[0].glob("run-*.wandb"))) == 1
    media = sorted(int(p.name.split("_")[1]) for p in (offline[0] / "files" / "media" / "images").glob("samples_*.png"))
    # the grids reached W&B at their steps (W&B names a media file by its history step; a grid logged at
    # a step with no scalars was seen named after the previous step, hence log.every=1 here)
    assert media == [3, 6]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "progress.gif", "step_00000003.png", "step_00000006.png"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]        # written once, by rank 0
    # TensorBoard beside W&B: one event file (rank 0), the same scalars at the same steps, the grids
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))    # the run's, and its hparams' subdir
    assert len({e.name.split(".")[4] for e in events}) == 1                  # one process (pid) wrote them
    assert [e.parent.name for e in events].count("dcgan_dist") == 1
    tb = EventAccumulator(str(run / "tensorboard" / "dcgan_dist"), size_guidance={"images": 0}).Reload()
    assert [(e.step, round(e.value, 5)) for e in tb.Scalars("loss_d")] == [(r["step"], round(r["loss_d"], 5)) for r in rows]
    assert [e.step for e in tb.Images("samples")] == [3, 6]
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "scale_d", "skipped_d", "images_per_s", "s_per_step"):
        assert key in rows[0]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000006"]
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000006").iterdir()) == [
        "checksums.json", "config.toml", "ema.safetensors", "fixed_noise.safetensors", "model.safetensors",
        "model_1.safetensors", "optimizer.bin",
        "optimizer_1.bin", "random_states_0.pkl", "random_states_1.pkl", "train_state.json"]
    grid = np.asarray(Image.open(run / "samples" / "step_00000006.png"))
    assert grid.shape[:2] == (2 * 34 + 2, 8 * 34 + 2)              # 16 samples, 8 per row, 2-px padding


def test_a_two_process_run_under_plain_accelerate_launch_is_quiet(tiny, tmp_path):
    from conftest import ROOT, accelerate_launch

    p = accelerate_launch(ROOT / "launch" / "train.py", "--config", tiny, "--set", f'runs_dir="{tmp_path}"',
                          "--set", "checkpoint.every=2", "--set", "train.max_steps=4")
    assert sorted(q.name for q in (tmp_path / "tiny" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert "INFO dcgan_dist: precision: fp32 (train.precision = 'auto' on cpu)" in p.stderr
    assert "INFO accelerate" not in p.stderr                  # ~20 lines per checkpoint before
    assert "FutureWarning" not in p.stderr and "broadcast_buffers" not in p.stderr   # DDP's deprecated argument
    assert p.stdout.splitlines()[-1] == f"done: step 4, epoch 0, run in {tmp_path / 'tiny'}"


def test_fp16_overflow_is_skipped_counted_and_training_goes_on(tiny, tmp_path):
    cfg = load_config(tiny, [f'runs_dir="{tmp_path}"', 'train.precision="fp16"', "train.fp16_init_scale=1099511627776.0",
                             "train.max_steps=30", "log.every=1", "log.sample_every=30"])
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["skipped_d"] == 1 and rows[0]["scale_d"] == 2.0 ** 39       # overflow: skipped, scale halved
    assert 1 <= summary["skipped_d"] < 30 and summary["step"] == 30       # then it trains on
    assert rows[-1]["skipped_d"] == rows[-2]["skipped_d"]                   # no more skips at the end
    assert all(np.isfinite(r["loss_d"]) and np.isfinite(r["loss_g"]) for r in rows)


def test_fp16_skips_in_extra_d_steps_are_counted(tiny, tmp_path):
    """loss.d_steps = 2: every halving of D's loss scale (no growth this early) is a counted skip, whether it
    happened in the extra D step or in the GAN step's."""
    init = 2.0 ** 40
    cfg = load_config(tiny, [f'runs_dir="{tmp_path}"', 'train.precision="fp16"', f"train.fp16_init_scale={init}",
                             "loss.d_steps=2", "train.max_steps=3", "log.every=1", "log.sample_every=30"])
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["skipped_d"] >= 2                            # step 1: the extra D step and the GAN step's
    assert [r["scale_d"] for r in rows] == [init / 2 ** r["skipped_d"] for r in rows]
    assert summary["skipped_d"] == rows[-1]["skipped_d"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_r1_and_plain_steps_run_d_in_the_configured_dtype(tiny, tmp_path, precision):
    """D's convolutions output float32 in fp32 runs on every step; in bf16 runs bfloat16, except D's forward on
    the reals of an R1 step (float32, see gan_step). One step each, in process, without DDP."""
    from accelerate import Accelerator

    from dcgan_dist.models import build_models
    from dcgan_dist.train.step import Nets, gan_step, make_optimizers, make_scalers

    cfg = load_config(tiny, [f'train.precision="{precision}"'])
    g, d = build_models(cfg)
    nets = Nets(g, d, *make_optimizers(g, d, cfg.optim, cuda=False), *make_scalers(precision, "cpu", 1.0),
                precision=precision)
    seen = []
    d.net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))     # D's first conv, every forward
    real = torch.rand(16, 1, 32, 32) * 2 - 1
    low = torch.float32 if precision == "fp32" else torch.bfloat16
    gan_step(Accelerator(cpu=True), nets, real, cfg, 0.0)
    assert seen == [low] * 3                                   # reals, fakes (D step), fakes (G step)
    seen.clear()
    gan_step(Accelerator(cpu=True), nets, real, cfg, 0.0, r1_weight=1.0)
    assert seen == [torch.float32, low, low]


def test_d_gradient_reports_d_on_real_images(tiny, tmp_path):
    """docs/d_gradient.py (quality.md's measure of D's steepness) on a checkpoint: one row, finite, positive norms."""
    import subprocess
    import sys

    train(load_config(tiny, [f'runs_dir="{tmp_path}"', "train.max_steps=2", "log.sample_every=2"]))
    ckpt = tmp_path / "tiny" / "checkpoints" / "step_00000002"
    shards = load_config(tiny).data.shards
    out = subprocess.run([sys.executable, "docs/d_gradient.py", str(ckpt), "--test", shards, "--n", "40"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True).stdout
    row = out.strip().splitlines()[-1].split("|")
    assert row[1].strip() == str(ckpt)
    logit_train, logit_test, norm_train, norm_test = map(float, row[2:6])
    assert logit_train == logit_test                   # the same images (both the training shards here)
    assert norm_train == norm_test and norm_train > 0


def test_r1_steps_train_in_fp16(tiny, tmp_path):
    """BatchNorm's double backward returns NaN in fp16: without the fp32 forward of D on the reals on R1 steps
    every D step of this run is skipped, at any loss scale ([1, 2, 3, 4]); with it none is (a scale low enough
    that no step overflows otherwise)."""
    cfg = load_config(tiny, [f'runs_dir="{tmp_path}"', 'train.precision="fp16"', "train.fp16_init_scale=1024",
                             "loss.r1_gamma=0.1", "loss.r1_every=1", "train.max_steps=4", "log.every=1",
                             "log.sample_every=4"])
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_d"] for r in rows] == [0, 0, 0, 0] and summary["skipped_d"] == 0
    assert all(np.isfinite(r["loss_d"]) for r in rows)


def test_bf16_trains_and_resume_auto_continues_from_the_checkpoint(tiny, tmp_path):
    cfg = load_config(tiny, [f'runs_dir="{tmp_path}"', 'train.precision="bf16"', "checkpoint.every=3"])
    assert train(cfg)["step"] == 6
    cfg = load_config(tiny, [f'runs_dir="{tmp_path}"', 'train.precision="bf16"', "train.max_steps=8"])
    summary = train(cfg)
    assert summary["step"] == 8
    rows = [json.loads(line)["step"] for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [2, 4, 6, 8]                                               # resumed at 6, not from 0
    assert sorted(p.name for p in (tmp_path / "tiny" / "checkpoints").iterdir()) == [
        "step_00000003", "step_00000006", "step_00000008"]


def test_auto_precision_is_fp32_on_a_cpu_bf16_on_ampere_fp16_on_older_gpus(monkeypatch):
    from dcgan_dist.train.loop import resolve_precision

    assert load_config(None).train.precision == "auto"
    assert load_config("configs/lsun.toml").train.precision == "auto"         # the headline command
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, expected in (((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert resolve_precision("auto", torch.device("cuda", 0)) == expected
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"           # an explicit setting stays


def test_auto_precision_runs_fp32_on_a_cpu_logs_it_and_resumes_an_fp32_checkpoint_unchanged(tiny, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    base = [f'runs_dir="{tmp_path}"', "checkpoint.every=2"]
    train(load_config(tiny, base + ["train.max_steps=2", 'train.precision="fp32"']))
    caplog.clear()
    summary = train(load_config(tiny, base + ["train.max_steps=4"]))           # the default, "auto"
    assert summary["step"] == 4
    assert "precision: fp32 (train.precision = 'auto' on cpu)" in caplog.text
    assert "train.precision:" not in caplog.text                               # auto -> fp32 is no change
    saved = (tmp_path / "tiny" / "config.toml").read_text()
    assert 'precision = "auto"\n' in saved and "precision_resolved" not in saved      # the config as given
    ckpt = tmp_path / "tiny" / "checkpoints" / "step_00000004"
    assert saved in (ckpt / "config.toml").read_text()
    assert json.loads((ckpt / "train_state.json").read_text())["precision"] == "fp32"  # what auto became
    old = ckpt / "config.toml"             # a checkpoint from before, with the key the trainer wrote into its config
    old.write_text(old.read_text().replace('precision = "auto"\n', 'precision = "auto"\nprecision_resolved = "fp32"\n'))
    assert load_config(old).train.precision == "auto"
    caplog.clear()
    train(load_config(tiny, base + ["train.max_steps=6", 'train.precision="fp16"']))
    assert "train.precision: 'fp32' -> 'fp16'" in caplog.text                 # a real change is still logged


@pytest.mark.parametrize("override, message", [
    ("train.batchsize=3", "unknown key 'train.batchsize'; did you mean 'train.batch_size'?"),
    ("trian.lr=1", "unknown key 'trian.lr'"),
    ("train.batch_size=1.5", "train.batch_size must be int, got float 1.5"),
    ("train.batch_size=0", "train.batch_size = 0: must be > 0"),
    ("train.precision=fp8", "train.precision = 'fp8': must be one of auto, fp32, bf16, fp16"),
    ("loss.real_label=1.2", "loss.real_label = 1.2: must be between 0 and 1"),
    ("model.init_g=1", "model.init_g must be bool, got int 1"),
    ("train.seed", "expected section.key=value"),
    ("loss.augment=translation,flip", "loss.augment = 'translation,flip': unknown augmentation 'flip'; use a "
                                      "comma-separated subset of color, translation, cutout"),
    ("optim.lr_g=nan", "optim.lr_g = nan: must be a finite number"),
    ("loss.instance_noise=inf", "loss.instance_noise = inf: must be a finite number"),
    ("train.fp16_init_scale=-inf", "train.fp16_init_scale = -inf: must be a finite number"),
    ("train.seed=-1", "train.seed = -1: must be >= 0"),
    ("name='..'", "name = '..': must be a folder name (not . or .., no / or \\)"),
    ("name='.'", "name = '.': must be a folder name"),
    ("model.latent=100000000", "model.latent = 100000000: must be <= 16384"),
    ("eval.standing_stats=-1", "eval.standing_stats = -1: must be >= 0"),
    ("loss.r1_gamma=-0.1", "loss.r1_gamma = -0.1: must be >= 0"),
    ("loss.r1_every=0", "loss.r1_every = 0: must be > 0"),
])
def test_config_mistakes_name_the_key(override, message):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_train_without_config_prints_usage_and_exits_2(cli):
    p = cli("train.py", check=False)
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.splitlines()
    assert lines[0].startswith("usage: train.py [-h] [--config CONFIG]")
    assert lines[-1] == ("error: no --config given; name one of configs/*.toml, e.g. "
                         "python launch/train.py --config configs/digits.toml")


def test_entry_points_without_the_packages_say_in_one_line_how_to_get_them(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    root = Path(__file__).resolve().parents[1]
    for script in ("train.py", "sample.py", "evaluate.py", "export.py", "prepare_data.py", "bench.py"):
        p = subprocess.run([str(tmp_path / "bare" / "bin" / "python"), f"launch/{script}", "--config", "configs/digits.toml"],
                           capture_output=True, text=True, cwd=root, env=env, timeout=60)
        assert (p.returncode, p.stdout, p.stderr.count("\n")) == (2, "", 1), (script, p.stderr)
        assert p.stderr == (f"error: {tmp_path / 'bare' / 'bin' / 'python'} cannot import dcgan_dist, torch, torchvision "
                            f"and 12 more (the project's packages): activate the project's virtual env (source "
                            f".venv/bin/activate) or install the project into this Python (pip install -e .)\n")


def test_config_file_unknown_key_and_cli_errors(tmp_path, cli):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nnfg = 64\n")
    p = cli("train.py", "--config", bad, check=False)
    assert p.returncode == 2 and p.stderr.strip() == f"error: {bad}: unknown key 'model.nfg'; did you mean 'model.ngf'?"
    p = cli("train.py", "--config", tmp_path / "missing.toml", check=False)
    assert p.returncode == 2 and "no such config file" in p.stderr
    p = cli("train.py", "--config", tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.strip() == f"error: {tmp_path}: is a folder, not a config file (e.g. configs/digits.toml)"
    (tmp_path / "latin1.toml").write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    p = cli("train.py", "--config", tmp_path / "latin1.toml", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not UTF-8 text" in p.stderr


def test_dry_run_prints_config_data_and_parameter_counts(tiny, cli, tmp_path):
    p = cli("train.py", "--config", tiny, "--dry-run", "--set", f'runs_dir="{tmp_path}"')
    assert 'batch_size = 16' in p.stdout and "1797 images, 32 px, 1 ch" in p.stdout
    # G: 16*32*16 + 64 + 32*16*16 + 32 + 16*8*16 + 16 + 8*16;  D: 16*8 + 8*16*16 + 32 + 16*32*16 + 64 + 32*16
    assert "# generator: 18,672 parameters; discriminator: 10,976 parameters" in p.stdout
    assert 'precision = "auto"\n' in p.stdout and "precision_resolved" not in p.stdout   # the config as given
    assert "# precision: fp32 (train.precision = 'auto' on cpu)" in p.stdout
    assert not (tmp_path / "tiny").exists()                                   # nothing trained or written
    p = cli("train.py", "--config", tiny, "--dry-run", "--set", "data.resolution=64", check=False)
    assert p.returncode == 2 and "resolution 32 but the run asks for 64" in p.stderr
    assert "[data]\nshards = " in p.stdout and "resolution = 64\n" in p.stdout    # the config, before the error
    assert p.stdout.endswith("# precision: fp32 (train.precision = 'auto' on cpu)\n")
    assert p.stderr.splitlines()[-1].startswith("error: ") and "resolution 32 but the run asks for 64" in p.stderr.splitlines()[-1]
    p = cli("train.py", "--config", tiny, "--dry-run", "--set", "train.batch_size=1000", check=False,
            env={"WORLD_SIZE": "2"})
    assert p.returncode == 2 and "1797 images cannot fill one batch of 1000 for each of 2 ranks; lower the batch" in p.stderr


def test_sample_writes_n_images_and_a_grid(tiny, tmp_path, cli):
    train(load_config(tiny, [f'runs_dir="{tmp_path}"', "train.max_steps=2"]))
    ckpt = tmp_path / "tiny" / "checkpoints" / "step_00000002"
    cli("sample.py", "--checkpoint", ckpt, "--n", 5, "--out", tmp_path / "s", "--grid", tmp_path / "g.png")
    files = sorted((tmp_path / "s").glob("*.png"))
    assert len(files) == 5
    x = np.stack([np.asarray(Image.open(f)) for f in files])
    assert x.shape[1:3] == (32, 32) and x.dtype == np.uint8 and x.max() > x.min()
    assert Image.open(tmp_path / "g.png").size == (3 * 34 + 2, 2 * 34 + 2)
    p = cli("sample.py", "--checkpoint", ckpt, "--n", 4, "--out", tmp_path / "s2", "--grid", "grid.png")  # cwd: ROOT
    assert Image.open(tmp_path / "s2" / "grid.png").size == (2 * 34 + 2, 2 * 34 + 2)        # beside the samples
    assert p.stdout.strip().endswith(f"and a grid to {tmp_path / 's2' / 'grid.png'}")
    p = cli("sample.py", "--checkpoint", tmp_path, "--n", 1, "--out", tmp_path / "t", check=False)
    assert p.returncode == 2 and "not a complete checkpoint" in p.stderr


def test_models_match_the_paper_shapes_and_init():
    from dcgan_dist.models import Discriminator, Generator, count_parameters, dcgan_init
    g, d = Generator(100, 64, 3, 64), Discriminator(64, 3, 64)
    assert (count_parameters(g), count_parameters(d)) == (3_576_704, 2_765_568)   # pytorch/examples dcgan
    dcgan_init(g)
    w = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)])
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    for res in (32, 64, 128):
        x = Generator(16, 8, 1, res)(torch.randn(2, 16))
        assert x.shape == (2, 1, res, res) and x.abs().max() <= 1
        assert Discriminator(8, 1, res)(x).shape == (2,)


def test_spectral_norm_discriminator_has_unit_spectral_norms_and_no_batchnorm():
    from dcgan_dist.models import Discriminator, count_parameters, dcgan_init
    d = Discriminator(64, 3, 64, norm="spectral")
    dcgan_init(d)
    d.spectral_norm_()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    assert count_parameters(d) == 2_765_568 - 2 * (128 + 256 + 512) + (64 + 128 + 256 + 512 + 1)   # biases, no BN
    x = torch.randn(8, 3, 64, 64)
    for _ in range(30):                                 # one power iteration per training-mode forward
        d(x)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    sigma = [torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item() for m in convs]
    assert sigma == pytest.approx([1.0] * 5, abs=0.02)          # every weight divided by its largest singular value
    raw = [torch.linalg.matrix_norm(m.parametrizations.weight.original.flatten(1), ord=2).item() for m in convs]
    assert raw[0] < 0.5 and raw[-1] > 1.5             # N(0, 0.02) weights: the first conv's far below 1, the last's above
    with pytest.raises(ValueError, match="norm must be 'batch' or 'spectral', not 'layer'"):
        Discriminator(64, 3, 64, norm="layer")


def test_loss_values_on_known_logits():
    import math
    from dcgan_dist.losses import d_loss, d_targets, g_loss
    zero = torch.zeros(4)
    t_real, t_fake = d_targets(4, 1.0, 0.0, "cpu")
    assert d_loss("bce", zero, zero, t_real, t_fake).item() == pytest.approx(2 * math.log(2))
    assert g_loss("bce", zero).item() == pytest.approx(math.log(2))
    assert d_loss("hinge", torch.ones(4), -torch.ones(4), t_real, t_fake).item() == 0.0
    assert g_loss("hinge", torch.full((4,), 3.0)).item() == -3.0
    assert d_loss("lsgan", torch.ones(4), zero, t_real, t_fake).item() == 0.0
    assert g_loss("lsgan", zero).item() == 0.5


def test_label_smoothing_and_flips():
    from dcgan_dist.losses import d_targets
    t_real, t_fake = d_targets(1000, 0.9, 0.0, "cpu")
    assert (t_real == 0.9).all() and (t_fake == 0).all()
    t_real, t_fake = d_targets(1000, 0.9, 1.0, "cpu")
    assert (t_real == 0).all() and (t_fake == 0.9).all()
    torch.manual_seed(0)
    t_real, _ = d_targets(10000, 1.0, 0.1, "cpu")
    assert 800 < (t_real == 0).sum() < 1200


def test_diff_augment_shifts_and_cuts_each_image_and_passes_gradients():
    """DiffAugment (Zhao et al. 2020): translation is an integer shift of at most 1/8 of the side with a zero
    border; cutout zeroes one half-side square (clipped at the edges), its centre anywhere; color is per image."""
    from dcgan_dist.augment import diff_augment
    torch.manual_seed(0)
    x = torch.rand(64, 2, 32, 32) + 1                                   # > 0 everywhere: zeros are the border
    t = diff_augment(x, "translation")
    shifts = []
    for a, b in zip(x, t):
        pad = torch.nn.functional.pad(a, [4, 4, 4, 4])
        found = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                 if torch.equal(pad[:, 4 + dy:36 + dy, 4 + dx:36 + dx], b)]
        assert len(found) == 1
        shifts.append(found[0])
    assert len(set(shifts)) > 20 and {s for d in shifts for s in d} == set(range(-4, 5))
    c = diff_augment(x, "cutout")
    for a, b in zip(x, c):
        cut = (b == 0).all(0)
        rows, cols = cut.any(1).nonzero().flatten(), cut.any(0).nonzero().flatten()
        assert cut.sum() == len(rows) * len(cols) and 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16
        assert torch.equal(b[:, ~cut], a[:, ~cut])                         # the rest untouched
    y = x.clone().requires_grad_(True)
    out = diff_augment(y, "color,translation,cutout")
    assert out.shape == x.shape and out.dtype == x.dtype
    out.sum().backward()
    assert y.grad.abs().sum() > 0                                        # G learns through it
    assert torch.equal(diff_augment(x, ""), x)


def test_r1_penalty_of_a_linear_d_is_its_squared_weight_norm_and_trains_through():
    """D(x) = <w, x>: grad_x D = w for every image, so the penalty is ||w||^2 and its gradient 2w."""
    from dcgan_dist.train.step import r1_penalty
    w = torch.randn(1, 2, 3, 3, requires_grad=True)
    x = torch.randn(5, 2, 3, 3, requires_grad=True)
    p = r1_penalty((x * w).flatten(1).sum(1), x)
    assert p.dtype == torch.float32 and p.shape == ()
    assert torch.equal(p, (w.detach().float() ** 2).sum())
    p.backward()
    assert torch.allclose(w.grad, 2 * w.detach(), rtol=1e-6, atol=0)


def test_tricks_train_and_instance_noise_anneals(tiny, tmp_path):
    cfg = load_config(tiny, [f'runs_dir="{tmp_path}"', 'loss.kind="hinge"', "loss.real_label=0.9", "loss.flip_prob=0.1",
                             "loss.instance_noise=0.2", "loss.instance_noise_steps=4", "loss.d_steps=2",
                             'loss.augment="color,translation,cutout"', "loss.r1_gamma=0.5", "loss.r1_every=3",
                             "log.every=1"])
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["instance_noise"] for r in rows] == pytest.approx([0.2, 0.15, 0.1, 0.05, 0.0, 0.0])
    assert all(np.isfinite(r["loss_d"]) for r in rows)
    assert summary["step"] == 6 and rows[-1]["epoch"] == 0
    # two D batches per step: the loader advanced 12 batches for 6 steps
    state = json.loads((tmp_path / "tiny" / "checkpoints" / "step_00000006" / "train_state.json").read_text())
    assert state["loader_batches"] == 12


def test_max_epochs_stops_at_the_epoch_boundary(tiny, tmp_path):
    summary = train(load_config(tiny, [f'runs_dir="{tmp_path}"', "train.max_steps=1000", "train.max_epochs=1",
                                       "log.every=50"]))
    assert summary["step"] == 1797 // 16 and summary["epoch"] == 1


def test_sample_on_a_damaged_checkpoint_or_missing_cuda_is_one_line(tiny, tmp_path, cli):
    train(load_config(tiny, [f'runs_dir="{tmp_path}"', "train.max_steps=2"]))
    ckpt = tmp_path / "tiny" / "checkpoints" / "step_00000002"
    if not torch.cuda.is_available():
        p = cli("sample.py", "--checkpoint", ckpt, "--out", tmp_path / "s", "--device", "cuda", check=False)
        assert p.returncode == 2
        assert p.stderr.strip() == "error: --device cuda: CUDA is not available on this machine; use --device cpu"
    for weights, flag in ((ckpt / "ema.safetensors", []), (ckpt / "model.safetensors", ["--raw"])):
        weights.write_bytes(weights.read_bytes()[:100])
        p = cli("sample.py", "--checkpoint", ckpt, "--out", tmp_path / "s", "--device", "cpu", *flag, check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1
        assert p.stderr.startswith(f"error: {weights}: cannot be read (") and "damaged" in p.stderr


def test_sample_uses_g_ema_raw_uses_g_and_old_checkpoints_still_sample(tiny, tmp_path, cli):
    from safetensors.torch import load_file

    from dcgan_dist.models import Generator, standing_stats
    train(load_config(tiny, [f'runs_dir="{tmp_path}"', "train.max_steps=4"]))
    ckpt = tmp_path / "tiny" / "checkpoints" / "step_00000004"

    def expected(file):      # the first sample, computed here from the weights file and standing statistics
        g = Generator(16, 8, 1, 32)
        g.load_state_dict(load_file(ckpt / file))
        g = standing_stats(g, 16384)                     # eval.standing_stats' default
        z = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return ((g.eval()(z)[0, 0] + 1) / 2).mul(255).add(0.5).clamp(0, 255).byte().numpy()

    def first_sample(*flags):
        p = cli("sample.py", "--checkpoint", ckpt, "--n", 1, "--out", tmp_path / "s", "--device", "cpu", *flags)
        return np.asarray(Image.open(tmp_path / "s" / "sample_00000.png"))[..., 0], p     # grey saved as RGB

    ema, p = first_sample()
    assert "from G_ema" in p.stdout and np.array_equal(ema, expected("ema.safetensors"))
    raw, p = first_sample("--raw")
    assert "from G " in p.stdout and np.array_equal(raw, expected("model.safetensors"))
    assert not np.array_equal(ema, raw)
    (ckpt / "ema.safetensors").unlink()                  # a checkpoint from before G_ema
    old, p = first_sample()
    assert np.array_equal(old, raw) and "holds no G_ema" in p.stderr


def test_latent_walks_are_slerp_rows_deterministic_for_a_seed(tiny, tmp_path, cli):
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "launch"))
    from sample import slerp
    a, b = torch.randn(3, 16), torch.randn(3, 16)
    z = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(z[:, 0], a, atol=1e-6) and torch.allclose(z[:, -1], b, atol=1e-6)
    b = b / b.norm(dim=1, keepdim=True) * a.norm(dim=1, keepdim=True)     # on one sphere: a great circle
    z = slerp(a, b, torch.linspace(0, 1, 5))
    cos = torch.nn.functional.cosine_similarity(z[:, 1:], z[:, :-1], dim=-1)
    assert torch.allclose(cos, cos[:, :1].expand_as(cos), atol=1e-5)   # equal angular steps
    assert torch.allclose(z.norm(dim=-1), a.norm(dim=1, keepdim=True).expand(3, 5), atol=1e-4)   # on the sphere
    assert torch.allclose(slerp(a, a, torch.tensor([0.5]))[:, 0], a, atol=1e-6)   # a == b: no division by 0
    train(load_config(tiny, [f'runs_dir="{tmp_path}"', "train.max_steps=2"]))
    ckpt = tmp_path / "tiny" / "checkpoints" / "step_00000002"
    outs = []
    for run in ("w1", "w2"):
        p = cli("sample.py", "--checkpoint", ckpt, "--interpolate", 6, "--n", 4, "--out", tmp_path / run,
                "--device", "cpu", "--seed", 3)
        assert "wrote 4 walks of 6 images from G_ema" in p.stdout
        outs.append([(tmp_path / run / f).read_bytes() for f in ("interpolation.png", "interpolation.gif")])
    assert outs[0] == outs[1]
    assert Image.open(tmp_path / "w1" / "interpolation.png").size == (6 * 34 + 2, 4 * 34 + 2)
    assert Image.open(tmp_path / "w1" / "interpolation.gif").n_frames == 6 + 4   # forth and back
    p = cli("sample.py", "--checkpoint", ckpt, "--interpolate", 1, "--out", tmp_path / "w3", check=False)
    assert p.returncode == 2 and "--interpolate must be between 2 and 256" in p.stderr


def test_progress_gif_plays_at_four_frames_per_second(tiny, tmp_path):
    train(load_config(tiny, [f'runs_dir="{tmp_path}"']))
    gif = Image.open(tmp_path / "tiny" / "samples" / "progress.gif")
    assert gif.n_frames == 2 and gif.info["duration"] == 250               # milliseconds


def test_the_gan_step_returns_device_tensors_and_never_reads_the_loss_scale(tiny, tmp_path, monkeypatch):
    """No host read inside the step (on CUDA tests/gpu checks it with set_sync_debug_mode): the skip flags are
    tensors, and GradScaler.get_scale(), a host synchronisation on CUDA, is not called."""
    from accelerate import Accelerator

    from dcgan_dist.data import to_device
    from dcgan_dist.train.loop import build
    from dcgan_dist.train.step import gan_step
    cfg = load_config(tiny, [f'runs_dir="{tmp_path}"', 'train.precision="fp16"', "train.fp16_init_scale=1099511627776.0"])
    acc = Accelerator(cpu=True)
    nets = build(acc, cfg)
    real = to_device(torch.randint(0, 256, (16, 32, 32, 1), dtype=torch.uint8), "cpu")

    def no_host_read(self):
        raise AssertionError("GradScaler.get_scale() inside the step")
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", no_host_read)
    out = gan_step(acc, nets, real, cfg, 0.0)
    monkeypatch.undo()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.values())
    assert bool(out["skipped_d"]) and nets.scaler_d.get_scale() == 2.0 ** 39     # the overflow still counted


def test_lr_decays_linearly_to_zero_from_decay_from():
    from dcgan_dist.config import OptimConfig
    from dcgan_dist.train.loop import lr_factor
    assert [lr_factor(OptimConfig(decay_from=0.6), s, 100) for s in (0, 59, 60, 80, 99, 100)] == \
        [1.0, 1.0, 1.0, 0.5, 1 / 40, 0.0]
    assert {lr_factor(OptimConfig(), s, 100) for s in range(101)} == {1.0}     # the default: constant
