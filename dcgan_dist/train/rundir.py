"""One run directory, one run, one timeline: the lock, checks before the process group starts, rolling back
to an older checkpoint, and what a resume may change.

    runs/<name>/.lock                  held (flock) by rank 0 for the whole run; the kernel drops it on kill -9
    runs/<name>/abandoned/<time>/      what a rollback moved aside: newer checkpoints, their metrics and grids
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path

from ..config import Config
from ..errors import UserError

log = logging.getLogger("dcgan_dist")


class RunLock:
    """An exclusive flock on ``run_dir/.lock``; a second run on the same directory is refused, naming the holder."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.fd = None
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"run directory {run_dir}: cannot write ({e.strerror or e}); choose another "
                            f"runs_dir or name") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 300).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise UserError(f"run directory {run_dir} is in use by another run ({holder}); wait for it to end, "
                            f"or choose another name (--set name=...)") from None
        except OSError as e:                  # a file system without locks (some Lustre mounts)
            log.warning("cannot lock %s (%s): nothing stops a second run on this directory", self.path, e.strerror)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{datetime.datetime.now().isoformat(timespec='seconds')}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)                 # the file stays: a later run reuses it
            self.fd = None


def preflight(cfg: Config, world_size: int) -> dict:
    """Checks that need no process group, run identically on every rank before it starts (so a user error
    ends the job before any rank waits on another): the shards, and whether they fill one batch per rank
    and loader worker. Returns the manifest."""
    from ..data import load_manifest
    from ..data.loader import check_fills
    from ..eval import reference_set
    from ..eval.features import check_features

    m = load_manifest(cfg.data.shards, cfg.data.verify, cfg.data.resolution, cfg.data.channels)
    check_fills(cfg.data.shards, m["num_images"], cfg.train.batch_size, world_size)
    if cfg.eval.every:      # the Inception weights file, or labels for the classifier features
        check_features(cfg.eval.features, cfg.data.shards, m, cfg.eval.inception_weights, cfg.eval.cache_dir)
        reference_set(cfg.eval, cfg.data.shards, m, cfg.data.verify)
    return m


def roll_back(run_dir: Path, checkpoint: Path, step: int, complete: list[Path]) -> Path | None:
    """Resuming from an older checkpoint of this run: move the newer checkpoints (and their metrics rows and
    grids) into ``abandoned/<time>/`` so that pruning and a later ``resume = "auto"`` follow the new timeline.
    Nothing is deleted. Returns the folder, or None when nothing was newer."""
    from .checkpoint import step_of

    newer = [p for p in complete if step_of(p) > step and p.resolve() != checkpoint.resolve()]
    if not newer:
        return None
    dest = run_dir / "abandoned" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (dest / "checkpoints").mkdir(parents=True, exist_ok=True)
    for p in newer:
        shutil.move(str(p), dest / "checkpoints" / p.name)
    grids = [g for g in (run_dir / "samples").glob("step_*.png") if int(g.stem[5:]) > step]
    if grids:
        (dest / "samples").mkdir(exist_ok=True)
        for g in grids:
            shutil.move(str(g), dest / "samples" / g.name)
    if (run_dir / "metrics.jsonl").exists():
        shutil.copy2(run_dir / "metrics.jsonl", dest / "metrics.jsonl")     # the whole abandoned history
    return dest


# What a resume may change. Safe: applied (the optimizers' lr and betas are set again after loading, which
# would otherwise restore the saved ones) and logged. Breaking: the run would no longer be the one it
# continues (another data order, other images, another batch); refused unless checkpoint.allow_changes.
BREAKING = {"train.batch_size": "the loader position means other batches",
            "train.seed": "the data order and the z stream change",
            "data.shuffle_window": "the data order changes",
            "world_size": "the loader position and the per-rank RNG streams mean other data",
            "data": "the shards hold other images"}


def compare(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """``saved``/``now``: flat ``{key: value}`` of the checkpoint's and this run's settings, plus ``world_size``
    and ``data`` (a fingerprint of the shard set), and ``data_order`` (the loader's epoch plan, see
    loader.DATA_ORDER; 1 when the checkpoint predates it). Returns (safe changes, breaking changes) as readable
    lines."""
    ignore = {"name", "runs_dir", "checkpoint.resume", "checkpoint.allow_changes", "data.shards", "data_order"}
    saved, now = _as_run(saved), _as_run(now)
    safe, breaking = [], []
    old_workers = max(1, saved.get("data.workers", 1))
    if saved.get("data_order", 1) != now.get("data_order", 1) and old_workers > 1:
        breaking.append(f"data order: the checkpoint's loader cut each epoch into one part per worker "
                        f"(data.workers = {old_workers}, dcgan_dist before 2026-12-01); this version's order does not "
                        f"depend on the worker count, so the batches after the resume differ (an exact continuation needs the "
                        f"dcgan_dist that wrote the checkpoint: git checkout 82ea1d6)")
    for key in sorted(set(saved) | set(now)):
        if key in ignore or saved.get(key) == now.get(key) or key not in saved:
            continue
        if key == "data.workers":
            safe.append(f"{key}: {saved[key]!r} -> {now.get(key)!r} (the data order does not depend on it)")
            continue
        line = f"{key}: {saved.get(key)!r} -> {now.get(key)!r}"
        if key == "data":
            line = "data: the shard set differs from the one the checkpoint was trained on"
        (breaking if key in BREAKING else safe).append(line + (f" ({BREAKING[key]})" if key in BREAKING else ""))
    return safe, breaking


def _as_run(flat: dict) -> dict:
    """The precision compared is the one the run used (``precision``: the checkpoint's train_state, or
    ``train.precision_resolved`` in an older config.toml): "auto" that became fp32 equals an explicit fp32."""
    flat = dict(flat)
    resolved = flat.pop("precision", "") or flat.pop("train.precision_resolved", "")
    flat.pop("train.precision_resolved", None)
    if resolved:
        flat["train.precision"] = resolved
    return flat
