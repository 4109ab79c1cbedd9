"""The training loop: setup, the step loop, logging, sampling, checkpoints. Read top to bottom."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from tqdm import tqdm

from ..config import Config, flatten, to_toml
from ..data import ShardLoader, to_device
from ..data.loader import DATA_ORDER
from ..atomic import write_bytes_atomic
from ..data.shards import fingerprint
from ..data.store import set_limits
from ..errors import TrainingDiverged, UserError
from ..eval import Dist, Evaluator
from ..rng import isolated_rng
from ..runtime import STOP, LauncherGone, StopRequest, fault_injector, new_accelerator
from ..models import build_models, count_parameters
from . import checkpoint
from .checkpoint import TrainState
from .rundir import RunLock, compare, preflight, roll_back
from .ema import EMA
from .step import Nets, d_only_step, gan_step, make_optimizers, make_scalers, mean_bn_stats
from .tracking import (MetricsFile, Trackers, check_trackers, run_wandb_mode, sample_grid, save_grid,
                       start_trackers, trackers, write_gif)

log = logging.getLogger("dcgan_dist")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` as it runs on ``device``: "auto" is bf16 on a GPU with bf16 units (compute capability
    8.0+, Ampere on; ROCm GPUs), fp16 with loss scaling on older GPUs, and fp32 on a CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def _precision_line(cfg: Config, precision: str, device: torch.device) -> str:
    return f"precision: {precision} (train.precision = {cfg.train.precision!r} on {device.type})"


def _device() -> torch.device:
    """The device a rank of this launch trains on (what the Accelerator picks; see _accelerator)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def describe(cfg: Config) -> Iterator[str]:
    """What --dry-run prints, in two parts: the resolved config (always), then the data summary, parameter counts
    and trackers, whose checks may raise a UserError (so the config is shown before a data error)."""
    device = _device()
    yield f"{to_toml(cfg)}\n# {_precision_line(cfg, resolve_precision(cfg.train.precision, device), device)}\n"
    m = preflight(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    g, d = build_models(cfg)
    wandb = run_wandb_mode(cfg.log)                  # once: it may wait for W&B to answer
    yield (f"# data: {cfg.data.shards}: {m['num_images']} images, {m['resolution']} px, {m['channels']} ch, "
           f"{len(m['shards'])} shards, source {m.get('source')}, classes {m.get('class_names')}\n"
           f"# generator: {count_parameters(g):,} parameters; discriminator: {count_parameters(d):,} parameters\n"
           f"# trackers: {', '.join(trackers(cfg.log, wandb)) or 'none'} (W&B mode {wandb}, "
           f"log.wandb = {cfg.log.wandb!r})\n")


def _accelerator(cfg: Config, wandb: str) -> Accelerator:
    return new_accelerator(
        cpu=not torch.cuda.is_available(),       # without it a CPU-only --multi_gpu launch runs undistributed
        mixed_precision="no",                    # precision is ours: per-network scalers, see step.py
        # a collective's bound: a rank on a lost node (killed, link down) ends the survivors after this long
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))],
        log_with=trackers(cfg.log, wandb) or None,
        project_config=ProjectConfiguration(project_dir=str(cfg.run_dir),
                                            logging_dir=str(cfg.run_dir / "tensorboard")),
    )


def _buffer_sync(net: torch.nn.Module, on: bool) -> None:
    """DDP's buffer broadcast before each forward (train.broadcast_buffers; off: D's BatchNorm sees two forwards
    before one backward and an in-place broadcast between them breaks autograd, StyleGAN2-ADA's choice). Set on
    the wrapper: DDP's broadcast_buffers argument is deprecated (torch 2.13) and its replacement,
    forward_sync_buffers, is not among Accelerate's DDP kwargs. Unlike broadcast_buffers=False, buffers are still
    broadcast once when wrapped: harmless, every rank has just built the same models from the same seed."""
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        setattr(net, "forward_sync_buffers" if hasattr(net, "forward_sync_buffers") else "broadcast_buffers", on)


def build(acc: Accelerator, cfg: Config, precision: str | None = None) -> Nets:
    """G, D, their optimizers (prepared by Accelerate) and loss scalers; identical weights on every rank.
    ``precision``: what the steps run in (default: train.precision resolved on the accelerator's device)."""
    set_seed(cfg.train.seed)
    G, D = build_models(cfg)
    if cfg.model.sync_bn and acc.num_processes > 1 and acc.device.type == "cuda":
        D = torch.nn.SyncBatchNorm.convert_sync_batchnorm(D)
        G = torch.nn.SyncBatchNorm.convert_sync_batchnorm(G)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    G, D = G.to(memory_format=fmt), D.to(memory_format=fmt)  # before prepare: DDP fixes bucket strides
    opt_g, opt_d = make_optimizers(G, D, cfg.optim, cuda=acc.device.type == "cuda")
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)       # order fixed: checkpoint files by position
    for net in (G, D):
        _buffer_sync(net, cfg.train.broadcast_buffers)
    ema = EMA(acc.unwrap_model(G), cfg.model.ema_kimg, cfg.model.ema_rampup) if cfg.model.ema else None
    if cfg.train.compile:
        G, D = torch.compile(G), torch.compile(D)
    precision = precision or resolve_precision(cfg.train.precision, acc.device)
    scaler_g, scaler_d = make_scalers(precision, acc.device.type, cfg.train.fp16_init_scale)
    return Nets(G, D, opt_g, opt_d, scaler_g, scaler_d, ema, precision)


def train(cfg: Config) -> dict:
    """Train until max_steps (or max_epochs, or a stop request); returns a summary of the run.

    Raises UserError before the process group starts for what can be checked without it (shards, data too
    small for the world size, a run directory in use), TrainingDiverged (on every rank, at the same step)
    when a loss or weight becomes non-finite, and LauncherGone when this rank's launcher died. A stop request
    (``runtime.STOP``) during start-up ends the run before its first step, with ``stopped_by`` set. The
    loader's workers are stopped whatever happens.
    """
    installed = STOP.install()                       # launch/train.py installs it first thing; tests call us
    STOP.stop_file = Path(os.environ.get("DCGAN_DIST_STOP_FILE", cfg.run_dir / "STOP"))
    try:
        summary = _train(cfg, STOP)
        if summary["main"]:
            STOP.stop_file.unlink(missing_ok=True)       # honoured: the next run must not stop at once
        return summary
    finally:
        if installed:
            STOP.uninstall()


def _train(cfg: Config, stop: StopRequest) -> dict:
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    set_limits(cfg.data.timeout_s, cfg.data.deadline_s)       # every remote read of this run is bounded
    manifest = preflight(cfg, world)
    loader = lock = None
    try:
        # First, while this process has no thread of ours, the process group's or W&B's: the loader forks its
        # workers now (see data/loader.py), at the position of the checkpoint that _resume will load.
        planned = checkpoint.planned_loader_batches(cfg.checkpoint.resume, cfg.run_dir / "checkpoints")
        loader = _loader(cfg, manifest, rank, world, planned, stop).start()
        check_trackers(cfg.log)
        wandb = run_wandb_mode(cfg.log, rank == 0)            # may wait PROBE_TIMEOUT_S for W&B to answer
        lock_error = None
        if rank == 0:
            try:
                lock = RunLock(cfg.run_dir)
            except UserError as e:
                lock_error = str(e)
        acc = _accelerator(cfg, wandb)
        _raise_everywhere(acc, lock_error)
        _raise_everywhere(acc, _unshared(acc, cfg.run_dir))
        precision = resolve_precision(cfg.train.precision, acc.device)
        if acc.is_main_process:
            log.info(_precision_line(cfg, precision, acc.device))
        _warn_precision(acc, cfg, precision)
        if acc.is_main_process:
            _prepare_run_dir(cfg)
        nets = build(acc, cfg, precision)
        state = _resume(acc, nets, cfg, manifest)
        if state.step >= cfg.train.max_steps:            # finished already: touch nothing, not W&B either
            acc.end_training()
            return _summary(acc, cfg, nets, state, None, already_complete=True)
        if (reason := _stop_requested(acc, stop)) is not None:     # before the evaluator's (long) caches
            acc.end_training()
            return _summary(acc, cfg, nets, state, reason, during_startup=True)
        if state.loader_batches != loader.batches:     # the planned checkpoint was damaged: an older one loaded
            loader.close()
            loader = _loader(cfg, manifest, rank, world, state.loader_batches, stop)
        evaluator = Evaluator(cfg.eval, cfg.data.shards, manifest, Dist.from_accelerator(acc)) \
            if cfg.eval.every else None
        if evaluator is not None and acc.is_main_process:
            log.info("every %d steps: FID, KID, precision and recall of %d generated images against %s; features: "
                     "%s", cfg.eval.every, cfg.eval.n, evaluator.ref_shards, evaluator.extractor.description)
        return _loop(acc, cfg, nets, state, loader, stop, wandb, evaluator)
    except UserError:
        _leave_group()
        raise
    finally:
        if loader is not None:
            loader.close()
        if lock is not None:
            lock.release()


def _loader(cfg: Config, manifest: dict, rank: int, world: int, start_batch: int, stop: StopRequest) -> ShardLoader:
    return ShardLoader(cfg.data.shards, cfg.train.batch_size, rank, world, cfg.data.workers, cfg.train.seed,
                       cfg.data.shuffle_window, start_batch, cfg.data.verify, cfg.data.resolution, cfg.data.channels,
                       pin_memory=torch.cuda.is_available(), manifest=manifest, cache_dir=cfg.data.cache_dir,
                       cache_gb=cfg.data.cache_gb, stop=stop.reason, batch_timeout_s=cfg.data.batch_timeout_s)


def _raise_everywhere(acc: Accelerator, error: str | None) -> None:
    """Rank 0's start-up error (its run directory: in use, not writable) raised as a UserError on every rank.
    Raised by rank 0 alone, it left the others waiting in the rendezvous until torchrun killed them (30 s)."""
    if acc.num_processes > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        acc.end_training()            # every rank is here: the group (any backend) ends together, no trackers yet
        raise UserError(error)


def _unshared(acc: Accelerator, run_dir: Path) -> str | None:
    """Why the ranks do not all see the run directory as rank 0 writes it (None: they do). Checkpoints, the
    STOP file and the lock live there: a node-local path on a multi-node job would resume every node from
    another state, or wait for a file that never appears. Rank 0 writes a fresh token; each rank reads it
    (for up to 5 s: a network file system may show it late)."""
    if acc.num_processes == 1:
        return None
    import socket
    import uuid
    token = run_dir / ".shared-check"
    box = [uuid.uuid4().hex]
    if acc.is_main_process:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(token, box[0].encode())
        except OSError as e:
            box[0] = f"run directory {run_dir}: cannot write ({e.strerror or e})"
    torch.distributed.broadcast_object_list(box, src=0)
    deadline = time.monotonic() + 5
    while True:
        try:
            seen = token.read_text() == box[0]
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    views = [None] * acc.num_processes
    torch.distributed.all_gather_object(views, (acc.process_index, socket.gethostname(), seen))
    blind = [(rank, host) for rank, host, ok in views if not ok]
    if not blind or " cannot write " in box[0]:
        return box[0] if blind else None
    hosts = sorted({host for _, host in blind})
    return (f"run directory {run_dir} is not shared: rank(s) {', '.join(str(r) for r, _ in blind)} on "
            f"{', '.join(hosts)} cannot see what rank 0 on {views[0][1]} wrote there; put runs_dir on a file "
            f"system that every node mounts (NFS, Lustre, GPFS...), not on a node-local disk")


def _leave_group() -> None:
    """Destroy the process group before a user error ends the process. Gloo's worker threads, left to the
    interpreter's teardown, can abort it (SIGABRT, "terminate called without an active exception"; pytorch
    issue 190489, PR 179291): CI saw rank 0's exit 2 become -6. Gloo's destroy is local, so it runs whatever
    the other ranks do; NCCL's aborts communicators collectively and can hang on a rank still in a collective
    (torchtitan PR 1342), so there only errors every rank raises together leave (see _raise_everywhere)."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo":
        torch.distributed.destroy_process_group()


def _summary(acc: Accelerator, cfg: Config, nets: Nets, state: TrainState, stopped_by: str | None, **extra) -> dict:
    """What train() returns on every rank; ``models`` are (G, D, G_ema or None), unwrapped (tests, scripts)."""
    return {"step": state.step, "skipped_d": int(state.skipped_d), "skipped_g": int(state.skipped_g),
            "run_dir": str(cfg.run_dir),
            "num_processes": acc.num_processes, "rank": acc.process_index, "main": acc.is_main_process,
            "stopped_by": stopped_by, "models": (acc.unwrap_model(nets.G), acc.unwrap_model(nets.D),
                                                 nets.ema.model if nets.ema is not None else None), **extra}


def _agree(acc: Accelerator, stop: StopRequest, diverged: torch.Tensor | None = None) -> tuple[bool, str | None]:
    """One all-reduce: whether any rank diverged (``diverged``, a 0-dim bool tensor) and whether any was asked to
    stop ("signal", "STOP file" or None). Every rank gets the same answer."""
    dev = acc.device
    flags = torch.stack([diverged if diverged is not None else torch.zeros((), dtype=torch.bool, device=dev),
                         torch.tensor(stop.signalled is not None, device=dev),
                         torch.tensor(stop.reason() == "STOP file", device=dev)])
    any_diverged, signalled, stop_file = (acc.reduce(flags.float(), "sum") > 0).tolist()
    return any_diverged, "signal" if signalled else "STOP file" if stop_file else None


def _stop_requested(acc: Accelerator, stop: StopRequest) -> str | None:
    """Whether any rank was asked to stop (every rank gets the same answer)."""
    return _agree(acc, stop)[1]


def _warn_precision(acc: Accelerator, cfg: Config, precision: str) -> None:
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if acc.is_main_process and launcher_precision not in ("no", precision):
        log.warning("accelerate launch asked for mixed_precision=%s; the config's train.precision=%s wins",
                    launcher_precision, precision)
    if precision != "fp32" and acc.device.type == "cpu" and acc.is_main_process:
        if precision == "bf16" and cpu_has_bf16():
            log.info("train.precision = bf16 on a CPU with native bf16 units (avx512_bf16/amx_bf16): measured 1.35x "
                     "fp32's images/s at 32 px on a 2-core AMD EPYC (docs/quality.md); near, not equal, fp32's results")
        else:
            log.warning("train.precision = %s on a CPU: without native %s units it is far slower than fp32 (measured "
                        "on a 2-core AVX2 VM: bf16 ~27x, fp16 ~500x slower); for CPU runs set train.precision = "
                        "\"auto\" or \"fp32\"", precision, precision)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (the avx512_bf16 or amx_bf16 flag of /proc/cpuinfo; False where
    that file does not exist)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _prepare_run_dir(cfg: Config) -> None:
    try:
        (cfg.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        resolved, path = to_toml(cfg), cfg.run_dir / "config.toml"
        if not path.exists() or path.read_text() != resolved:
            path.write_text(resolved)
    except OSError as e:
        raise UserError(f"run directory {cfg.run_dir}: cannot write ({e.strerror or e})") from None
    checkpoint.remove_partial(cfg.run_dir / "checkpoints")


def _resume(acc: Accelerator, nets: Nets, cfg: Config, manifest: dict) -> TrainState:
    """Fresh state, or the checkpoint's; a changed config is applied (safe changes) or refused (breaking ones)."""
    fixed = torch.randn(cfg.log.n_samples, cfg.model.latent, generator=torch.Generator().manual_seed(cfg.train.seed))
    state = TrainState(fixed)
    root = cfg.run_dir / "checkpoints"
    complete = checkpoint.complete_checkpoints(root)
    resumed = checkpoint.resume(cfg.checkpoint.resume, root, acc, nets, state)  # + every rank's RNG
    now_data, now_world = fingerprint(manifest), acc.num_processes
    if resumed is None:
        torch.manual_seed(cfg.train.seed + 1 + acc.process_index)  # each rank draws its own z
    else:
        saved = flatten(tomllib.loads((resumed / "config.toml").read_text()))
        saved.update(world_size=state.world_size or now_world, data=state.data or now_data,
                     data_order=state.data_order, precision=state.precision)
        now = {**flatten(cfg.to_dict()), "world_size": now_world, "data": now_data, "data_order": DATA_ORDER,
               "precision": nets.precision}
        safe, breaking = compare(saved, now)
        if breaking and not cfg.checkpoint.allow_changes:
            raise UserError(f"resuming {resumed} with changes that break an exact continuation: "
                            f"{'; '.join(breaking)}; restore them, start a new run (another name), or set "
                            f"checkpoint.allow_changes = true to continue anyway")
        for group, lr in ((nets.opt_g.param_groups, cfg.optim.lr_g), (nets.opt_d.param_groups, cfg.optim.lr_d)):
            for g in group:        # load_state restored the saved lr and betas; the config's are the ones meant
                g["lr"], g["betas"] = lr, (cfg.optim.beta1, cfg.optim.beta2)
        if acc.is_main_process:
            log.info("resumed from %s (step %d)", resumed, state.step)
            for line in safe:
                log.info("changed since the checkpoint, applied: %s", line)
            for line in breaking:
                log.warning("changed since the checkpoint (checkpoint.allow_changes): %s; this run is no longer "
                            "an exact continuation", line)
            moved = roll_back(cfg.run_dir, resumed, state.step, complete)
            if moved:
                log.warning("resumed from step %d, older than the newest checkpoint: the newer checkpoints, "
                            "their grids and the metrics history were moved to %s", state.step, moved)
        acc.wait_for_everyone()
    state.world_size, state.data, state.data_order, state.precision = now_world, now_data, DATA_ORDER, nets.precision
    return state


def _loop(acc: Accelerator, cfg: Config, nets: Nets, state: TrainState, loader: ShardLoader, stop: StopRequest,
          wandb: str, evaluator: Evaluator | None):
    main, run_dir = acc.is_main_process, cfg.run_dir
    ckpt_root = run_dir / "checkpoints"
    tracked = start_trackers(acc, cfg, state, wandb)
    if (reason := _stop_requested(acc, stop)) is not None:      # asked during start-up: nothing to checkpoint
        tracked.finish()
        acc.end_training()
        return _summary(acc, cfg, nets, state, reason, during_startup=True)
    metrics = MetricsFile(run_dir / "metrics.jsonl", keep_until=state.step) if main else None
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not (main and cfg.log.progress_bar),
               unit="step", dynamic_ncols=True)
    sums: dict[str, torch.Tensor] = {}
    nonfinite = torch.zeros((), dtype=torch.bool, device=acc.device)
    t_last, steps_since = time.perf_counter(), 0
    unwrapped_g = acc.unwrap_model(nets.G, keep_torch_compile=False)    # eager G: grids, G_ema, standing stats
    images_per_step = cfg.train.batch_size * acc.num_processes
    inject = fault_injector(acc.process_index)     # tests: DCGAN_DIST_FAULT, else nothing
    batches = iter(loader)
    timing: dict[str, float] = {}        # seconds of the last grid and checkpoint, logged with the next row
    stopped_by = None
    last = state.step >= cfg.train.max_steps
    while not last:
        noise_std = cfg.loss.instance_noise * (
            max(0.0, 1 - state.step / cfg.loss.instance_noise_steps) if cfg.loss.instance_noise_steps else 1.0)
        _set_lr(nets, cfg, state.step)
        for _ in range(cfg.loss.d_steps - 1):
            state.skipped_d += d_only_step(acc, nets, to_device(next(batches)[0], acc.device, cfg.train.channels_last),
                                           cfg, noise_std)
        real = to_device(next(batches)[0], acc.device, cfg.train.channels_last)
        real = inject(real, state.step + 1)
        r1 = cfg.loss.r1_gamma * cfg.loss.r1_every if state.step % cfg.loss.r1_every == 0 else 0.0
        out = gan_step(acc, nets, real, cfg, noise_std, r1)
        state.step += 1
        if stop.orphaned():         # no agreement is possible without the launcher (it holds the rendezvous)
            raise LauncherGone(f"rank {acc.process_index}: the launcher (pid {stop.parent}) is gone; stopped after "
                               f"step {state.step} without a checkpoint; run the same command again to resume "
                               f"from the newest one")
        mean_bn_stats(acc, unwrapped_g)
        if nets.ema is not None:
            nets.ema.update(unwrapped_g, state.step * images_per_step, images_per_step)
        state.loader_batches = loader.batches
        state.skipped_d += out["skipped_d"]
        state.skipped_g += out["skipped_g"]
        # An fp16 overflow is skipped by the scaler and is not divergence; anything else non-finite is.
        for loss, skipped in ((out["loss_d"], out["skipped_d"]), (out["loss_g"], out["skipped_g"])):
            nonfinite |= ~torch.isfinite(loss) & ~skipped          # on the device: no host read per step
        for k in ("loss_d", "loss_g", "d_real", "d_fake"):       # summed on device: no sync per step
            sums[k] = sums.get(k, 0) + out[k]
        steps_since += 1
        bar.update(1)
        last = state.step >= cfg.train.max_steps or bool(cfg.train.max_epochs and loader.epoch >= cfg.train.max_epochs)
        will_save = last or state.step % cfg.checkpoint.every == 0

        if will_save or state.step % cfg.train.sync_every == 0:
            stop_reason = _sync_point(acc, cfg, nets, state, nonfinite, stop)
            if stop_reason and not last:
                stopped_by, last, will_save = stop_reason, True, True

        if state.step % cfg.log.every == 0 or last:
            row = {**_scalars(acc, nets, state, loader, sums, steps_since, time.perf_counter() - t_last, noise_std),
                   **timing}
            if main:
                metrics.write(row)
                tracked.log({k: v for k, v in row.items() if k != "step"}, step=state.step)
                bar.set_postfix(d=f"{row['loss_d']:.3f}", g=f"{row['loss_g']:.3f}", img_s=f"{row['images_per_s']:.0f}")
            sums, steps_since, t_last = {}, 0, time.perf_counter()

        if main and (state.step % cfg.log.sample_every == 0 or last):
            t = time.perf_counter()
            _log_grids(cfg, nets, state, unwrapped_g, tracked)
            timing["grid_s"] = time.perf_counter() - t

        if evaluator is not None and (state.step % cfg.eval.every == 0 or (last and not stopped_by)):
            will_save |= _evaluate(nets, state, evaluator, unwrapped_g, metrics, tracked)
            t_last = time.perf_counter()                  # the evaluation is not training time

        if will_save:
            t = time.perf_counter()
            checkpoint.save(acc, nets, state, ckpt_root, to_toml(cfg), cfg.checkpoint.keep,
                            cfg.checkpoint.milestone_every)
            timing["checkpoint_s"] = time.perf_counter() - t
    bar.close()

    summary = _summary(acc, cfg, nets, state, stopped_by, epoch=loader.epoch, wandb_mode=wandb,
                       corrupt_chunks=loader.corrupt_chunks)
    if main:
        write_gif(run_dir / "samples")
        # Every job segment of the run wrote its own offline-run-<time>-<id> folder, all with the run's one id
        # (kept in the checkpoint): the command names them all (wandb sync uploads one id's in start-time order).
        # A segment that started within the same second as another got wandb's suffix: offline-run-<time>-<id>-1.
        if wandb == "offline" and state.wandb_id and list((run_dir / "wandb").glob(f"offline-run-*-{state.wandb_id}*")):
            summary["sync_command"] = f"wandb sync {shlex.quote(str(run_dir / 'wandb'))}/offline-run-*-{state.wandb_id}*"
    tracked.finish()
    acc.end_training()
    return summary


@isolated_rng()
def _evaluate(nets: Nets, state: TrainState, evaluator: Evaluator, unwrapped_g, metrics: MetricsFile | None,
              tracked: Trackers) -> bool:
    """FID/KID of G_ema (G without model.ema) on every rank; rank 0 logs them. True when the FID is the best so
    far: that step is then checkpointed and kept whatever checkpoint.keep says."""
    result = evaluator(nets.ema.model if nets.ema is not None else unwrapped_g)
    row = {"step": state.step, **{k: v for k, v in result.items() if k in ("fid", "kid", "kid_std", "precision", "recall", "eval_s")
                                  or k.endswith("_pixels" + str(evaluator.cfg.native_resolution))}}
    if metrics is not None:
        metrics.write(row)
        tracked.log({k: v for k, v in row.items() if k != "step"}, step=state.step)
        log.info("step %d: FID %.4f, KID %.5f, precision %.3f, recall %.3f (%d images against %s, %.1f s)",
                 state.step, result["fid"], result["kid"], result["precision"], result["recall"], result["n_fake"],
                 result["reference"], result["eval_s"])
    if result["fid"] < state.best_fid:
        state.best_fid, state.best_step = result["fid"], state.step
        return True
    return False


@isolated_rng()
def _log_grids(cfg: Config, nets: Nets, state: TrainState, unwrapped_g, tracked: Trackers) -> None:
    """The fixed-noise grid of G_ema (of G without model.ema) to samples/ and the trackers; G's own with
    log.raw_grid."""
    grids = {"samples": (nets.ema.model if nets.ema is not None else unwrapped_g, cfg.run_dir / "samples")}
    if nets.ema is not None and cfg.log.raw_grid:
        grids["samples_raw"] = (unwrapped_g, cfg.run_dir / "samples" / "raw")
    for name, (generator, folder) in grids.items():
        path = save_grid(sample_grid(generator, state.fixed_noise), folder, state.step)
        tracked.image(name, path, state.step)


def lr_factor(optim, step: int, max_steps: int) -> float:
    """The lr multiplier of the step after ``step``: 1 until ``optim.decay_from`` x max_steps, then linear to 0."""
    start = optim.decay_from * max_steps
    return 1.0 if step < start or start >= max_steps else max(0.0, (max_steps - step) / (max_steps - start))


def _set_lr(nets: Nets, cfg: Config, step: int) -> None:
    """Both optimizers' lr for the next step; a function of the step alone, so a resume continues exactly."""
    f = lr_factor(cfg.optim, step, cfg.train.max_steps)
    for groups, lr in ((nets.opt_g.param_groups, cfg.optim.lr_g), (nets.opt_d.param_groups, cfg.optim.lr_d)):
        for g in groups:
            g["lr"] = lr * f


def _sync_point(acc, cfg: Config, nets: Nets, state: TrainState, nonfinite: torch.Tensor, stop: StopRequest):
    """Every rank learns, at the same step, whether any rank diverged or was told to stop (one all-reduce).
    Returns the stop reason or None; raises TrainingDiverged on every rank."""
    params = [*nets.G.parameters(), *nets.D.parameters()]
    weights_ok = torch.stack([torch.isfinite(p).all() for p in params]).all()   # no host sync per parameter
    diverged, reason = _agree(acc, stop, nonfinite | ~weights_ok)
    if diverged:
        good = checkpoint.complete_checkpoints(cfg.run_dir / "checkpoints")
        acc.end_training()
        raise TrainingDiverged(
            f"non-finite loss or weights by step {state.step} (checked every {cfg.train.sync_every} "
            f"steps); last good checkpoint: {good[-1] if good else 'none'}; nothing was saved after it")
    return reason


def _scalars(acc, nets: Nets, state: TrainState, loader: ShardLoader, sums: dict, steps: int, elapsed: float,
             noise_std: float) -> dict:
    """The logged row: interval means reduced across ranks (computed on every rank: it is a collective), and
    ``corrupt_chunks``, the chunk skips of every rank since this launch (one all-reduce: a sum, then the means
    divided by the world size, as accelerate's reduce "mean" does)."""
    local = torch.stack([sums[k] for k in sorted(sums)]) / steps
    totals = acc.reduce(torch.cat([local, local.new_tensor([loader.corrupt_chunks])]), "sum")
    means, corrupt = totals[:-1] / acc.num_processes, int(totals[-1])
    return {"step": state.step, "epoch": loader.epoch, **dict(zip(sorted(sums), means.tolist())),
            "scale_d": nets.scaler_d.get_scale(), "scale_g": nets.scaler_g.get_scale(),
            "skipped_d": int(state.skipped_d), "skipped_g": int(state.skipped_g),
            "images_per_s": steps * loader.batch_size * acc.num_processes / elapsed, "s_per_step": elapsed / steps,
            "instance_noise": noise_std, "corrupt_chunks": corrupt,
            **({"gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30} if acc.device.type == "cuda" else {})}
