"""The training loop: setup, the step loop, logging, sampling, checkpoints. Read top to bottom."""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm import tqdm

from ..config import Config, to_toml
from ..data import ShardLoader, load_manifest, to_device
from ..errors import TrainingDiverged, UserError
from ..models import build_models, count_parameters
from . import checkpoint
from .checkpoint import TrainState
from .step import Nets, d_only_step, gan_step, make_scalers
from .tracking import MetricsFile, sample_grid, save_grid, wandb_mode, write_gif

log = logging.getLogger("dcgan_dist")


def describe(cfg: Config) -> str:
    """What --dry-run prints: resolved config, data summary, parameter counts."""
    m = load_manifest(cfg.data.shards, "size", cfg.data.resolution, cfg.data.channels)
    g, d = build_models(cfg)
    return (f"{to_toml(cfg)}\n# data: {cfg.data.shards}: {m['num_images']} images, {m['resolution']} px, "
            f"{m['channels']} ch, {len(m['shards'])} shards, source {m.get('source')}, "
            f"classes {m.get('class_names')}\n"
            f"# generator: {count_parameters(g):,} parameters; discriminator: {count_parameters(d):,} parameters\n")


def _accelerator(cfg: Config) -> Accelerator:
    use_wandb = wandb_mode(cfg.log.wandb) != "disabled"
    return Accelerator(
        cpu=not torch.cuda.is_available(),       # without it a CPU-only --multi_gpu launch runs undistributed
        mixed_precision="no",                    # precision is ours: per-network scalers, see step.py
        log_with="wandb" if use_wandb else None,
        project_dir=str(cfg.run_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=cfg.train.broadcast_buffers)],
    )


def build(acc: Accelerator, cfg: Config) -> Nets:
    """G, D, their optimizers (prepared by Accelerate) and loss scalers; identical weights on every rank."""
    set_seed(cfg.train.seed)
    G, D = build_models(cfg)
    if cfg.model.sync_bn and acc.num_processes > 1 and acc.device.type == "cuda":
        D = torch.nn.SyncBatchNorm.convert_sync_batchnorm(D)
        G = torch.nn.SyncBatchNorm.convert_sync_batchnorm(G)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    G, D = G.to(memory_format=fmt), D.to(memory_format=fmt)  # before prepare: DDP fixes bucket strides
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.optim.lr_g, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr_d, betas=betas)
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)       # order fixed: checkpoint files by position
    if cfg.train.compile:
        G, D = torch.compile(G), torch.compile(D)
    scaler_g, scaler_d = make_scalers(cfg.train.precision, acc.device.type, cfg.train.fp16_init_scale)
    return Nets(G, D, opt_g, opt_d, scaler_g, scaler_d)


class StopRequest:
    """SIGUSR1/SIGTERM to a training process, or a STOP file in the run directory (what the SLURM
    scripts write when the batch shell gets its warning signal), request a checkpoint and a clean exit."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, stop_file) -> None:
        self.stop_file = stop_file
        self.signalled = None
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signalled = signal.Signals(signum).name


def _injected_fault(rank: int) -> int:
    """DCGAN_DIST_FAULT=nan@STEP[@RANK]: make that rank's D loss NaN at STEP (tests of the NaN guard)."""
    spec = os.environ.get("DCGAN_DIST_FAULT", "")
    parts = spec.split("@")
    if parts[0] == "nan" and (len(parts) < 3 or int(parts[2]) == rank):
        return int(parts[1])
    return -1


def train(cfg: Config) -> dict:
    """Train until max_steps (or max_epochs, or a stop request); returns a summary of the run.

    Raises TrainingDiverged (on every rank, at the same step) when a loss or weight becomes non-finite.
    """
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    acc = _accelerator(cfg)
    main = acc.is_main_process
    if main and launcher_precision not in ("no", cfg.train.precision):
        log.warning("accelerate launch asked for mixed_precision=%s; the config's train.precision=%s wins",
                    launcher_precision, cfg.train.precision)
    if cfg.train.precision == "fp16" and acc.device.type == "cpu":
        log.warning("fp16 on CPU works (for tests) but is slow; use bf16 or fp32 on CPU")
    run_dir = cfg.run_dir
    ckpt_root = run_dir / "checkpoints"
    if main:
        try:
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
            (run_dir / "config.toml").write_text(to_toml(cfg))
        except OSError as e:
            raise UserError(f"run directory {run_dir}: cannot write ({e.strerror or e})") from None
        checkpoint.remove_partial(ckpt_root)

    nets = build(acc, cfg)
    fixed = torch.randn(cfg.log.n_samples, cfg.model.latent, generator=torch.Generator().manual_seed(cfg.train.seed))
    state = TrainState(fixed)
    resumed = checkpoint.resume(cfg.checkpoint.resume, ckpt_root, acc, nets, state)  # + every rank's RNG
    if resumed is None:
        torch.manual_seed(cfg.train.seed + 1 + acc.process_index)  # each rank draws its own z
    elif main:
        log.info("resumed from %s (step %d)", resumed, state.step)

    loader = ShardLoader(cfg.data.shards, cfg.train.batch_size, acc.process_index, acc.num_processes,
                         cfg.data.workers, cfg.train.seed, cfg.data.shuffle_window, state.loader_batches,
                         cfg.data.verify, cfg.data.resolution, cfg.data.channels,
                         pin_memory=acc.device.type == "cuda")

    # --- trackers and files (rank 0 only; Accelerate makes the trackers no-ops elsewhere)
    mode = wandb_mode(cfg.log.wandb)
    if mode != "disabled":
        if main and not state.wandb_id:
            state.wandb_id = uuid.uuid4().hex[:12]             # kept in checkpoints: a resume continues the run
        acc.init_trackers(cfg.log.project, config=cfg.to_dict(), init_kwargs={"wandb": {
            "name": cfg.name, "id": state.wandb_id or None, "resume": "allow", "dir": str(run_dir), "mode": mode,
            "entity": cfg.log.entity or None, "group": os.environ.get("SLURM_JOB_ID")}})
    metrics = MetricsFile(run_dir / "metrics.jsonl", keep_until=state.step) if main else None
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not (main and cfg.log.progress_bar),
               unit="step", dynamic_ncols=True)

    sums: dict[str, torch.Tensor] = {}
    nonfinite = torch.zeros((), dtype=torch.bool, device=acc.device)
    t_last, steps_since = time.perf_counter(), 0
    unwrapped_g = acc.unwrap_model(nets.G)
    per_step_images = cfg.train.batch_size * acc.num_processes
    fault_step = _injected_fault(acc.process_index)
    batches = iter(loader)
    stopped_by = None
    last = state.step >= cfg.train.max_steps
    with StopRequest(Path(os.environ.get("DCGAN_DIST_STOP_FILE", run_dir / "STOP"))) as stop:
        while not last:
            noise_std = cfg.loss.instance_noise * (
                max(0.0, 1 - state.step / cfg.loss.instance_noise_steps) if cfg.loss.instance_noise_steps else 1.0)
            for _ in range(cfg.loss.d_steps - 1):
                real = to_device(next(batches)[0], acc.device, cfg.train.channels_last)
                d_only_step(acc, nets, real, cfg, noise_std)
            real = to_device(next(batches)[0], acc.device, cfg.train.channels_last)
            if state.step + 1 == fault_step:
                real = real * float("nan")
            out = gan_step(acc, nets, real, cfg, noise_std)
            state.step += 1
            state.loader_batches = loader.batches
            state.skipped_d += out["skipped_d"]
            state.skipped_g += out["skipped_g"]
            # An fp16 overflow is skipped by the scaler and is not divergence; anything else non-finite is.
            for loss, skipped in ((out["loss_d"], out["skipped_d"]), (out["loss_g"], out["skipped_g"])):
                if not skipped:
                    nonfinite |= ~torch.isfinite(loss)
            for k in ("loss_d", "loss_g", "d_real", "d_fake"):       # summed on device: no sync per step
                sums[k] = sums.get(k, 0) + out[k]
            steps_since += 1
            bar.update(1)
            last = state.step >= cfg.train.max_steps or bool(
                cfg.train.max_epochs and loader.epoch >= cfg.train.max_epochs)
            will_save = last or state.step % cfg.checkpoint.every == 0

            # --- sync point: every rank learns, at the same step, whether any rank diverged or was told to stop.
            if will_save or state.step % cfg.train.sync_every == 0:
                params = [*nets.G.parameters(), *nets.D.parameters()]
                weights_ok = torch.stack([torch.isfinite(p).all() for p in params]).all()   # no host sync
                flags = torch.stack([nonfinite | ~weights_ok, torch.tensor(stop.signalled is not None,
                                     device=acc.device), torch.tensor(stop.stop_file.exists(), device=acc.device)])
                diverged, signalled, stop_file = (acc.reduce(flags.float(), "sum") > 0).tolist()
                if diverged:
                    good = checkpoint.complete_checkpoints(ckpt_root)
                    acc.end_training()
                    raise TrainingDiverged(
                        f"non-finite loss or weights by step {state.step} (checked every {cfg.train.sync_every} "
                        f"steps); last good checkpoint: {good[-1] if good else 'none'}; nothing was saved after it")
                if (signalled or stop_file) and not last:
                    stopped_by = "signal" if signalled else "STOP file"
                    last = will_save = True

            if state.step % cfg.log.every == 0 or last:
                means = acc.reduce(torch.stack([sums[k] for k in sorted(sums)]) / steps_since, "mean")  # every rank
                elapsed = time.perf_counter() - t_last
                row = {"step": state.step, "epoch": loader.epoch, **dict(zip(sorted(sums), means.tolist())),
                       "scale_d": nets.scaler_d.get_scale(), "scale_g": nets.scaler_g.get_scale(),
                       "skipped_d": state.skipped_d, "skipped_g": state.skipped_g,
                       "images_per_s": steps_since * per_step_images / elapsed, "s_per_step": elapsed / steps_since,
                       "instance_noise": noise_std, "corrupt_chunks": loader.corrupt_chunks}
                if main:
                    metrics.write(row)
                    acc.log({k: v for k, v in row.items() if k != "step"}, step=state.step)
                    bar.set_postfix(d=f"{row['loss_d']:.3f}", g=f"{row['loss_g']:.3f}",
                                    img_s=f"{row['images_per_s']:.0f}")
                sums, steps_since, t_last = {}, 0, time.perf_counter()

            if main and (state.step % cfg.log.sample_every == 0 or last):
                path = save_grid(sample_grid(unwrapped_g, state.fixed_noise), run_dir / "samples", state.step)
                if mode != "disabled":
                    import wandb
                    acc.log({"samples": wandb.Image(str(path))}, step=state.step)

            if will_save:
                checkpoint.save(acc, nets, state, ckpt_root, to_toml(cfg), cfg.checkpoint.keep,
                                cfg.checkpoint.milestone_every)
    bar.close()

    summary = {"step": state.step, "epoch": loader.epoch, "skipped_d": state.skipped_d,
               "skipped_g": state.skipped_g, "run_dir": str(run_dir), "wandb_mode": mode,
               "num_processes": acc.num_processes, "rank": acc.process_index, "main": main,
               "stopped_by": stopped_by, "models": (acc.unwrap_model(nets.G), acc.unwrap_model(nets.D))}
    if main:
        stop.stop_file.unlink(missing_ok=True)
        write_gif(run_dir / "samples")
        offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
        if mode == "offline" and offline_runs:
            summary["sync_command"] = f"wandb sync {offline_runs[-1]}"
    acc.end_training()
    return summary
