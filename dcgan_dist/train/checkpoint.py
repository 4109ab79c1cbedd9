"""Checkpoints: Accelerate's state saving plus our own small files, written under a temporary name and
renamed when complete.

    run_dir/checkpoints/step_00001000/       complete: what resume picks
    run_dir/checkpoints/step_00001000.tmp/   being written, or left by a kill: never picked, removed

Loading never unpickles arbitrary objects: models are safetensors, optimizers and RNG states go through
Accelerate's weights-only ``torch.load``, and our own state (step, loader position, fixed noise, loss
scalers, W&B id) is JSON + safetensors instead of Accelerate's pickled ``custom_checkpoint_*.pkl``.

Integrity: ``checksums.json`` (written last) holds the sha256 of every other file; a missing, truncated or
altered file (an RNG state included, which Accelerate itself would skip with an info-level log) is damage.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..data.shards import sha256_file, write_json_atomic
from ..errors import UserError, disk_error, write_failure
from ..models import EMA_FILE
from ..runtime import injected_fault

log = logging.getLogger("dcgan_dist")
PATTERN = re.compile(r"^step_(\d{8})$")
STATE_FILE = "train_state.json"
NOISE_FILE = "fixed_noise.safetensors"
CHECKSUMS = "checksums.json"


class TrainState:
    """Everything besides models/optimizers/RNG that a resume needs."""

    def __init__(self, fixed_noise: torch.Tensor) -> None:
        self.step = 0
        self.loader_batches = 0
        self.skipped_d = 0            # fp16 steps skipped; a device tensor while training (read at sync points)
        self.skipped_g = 0
        self.fixed_noise = fixed_noise
        self.wandb_id = ""
        self.world_size = 1
        self.data = ""                # fingerprint of the shard set (shards.fingerprint)
        self.data_order = 1           # the loader's epoch plan (loader.DATA_ORDER); 1 in checkpoints from before it
        self.precision = ""           # train.precision as the run resolved it ("" in checkpoints from before it)
        self.best_fid = float("inf")  # the lowest FID measured so far (eval.every), and its step
        self.best_step = 0

    def to_json(self) -> dict:
        return {"step": self.step, "loader_batches": self.loader_batches, "skipped_d": int(self.skipped_d),
                "skipped_g": int(self.skipped_g), "wandb_id": self.wandb_id, "world_size": self.world_size,
                "data": self.data, "data_order": self.data_order, "precision": self.precision,
                "best_fid": self.best_fid if self.best_step else None, "best_step": self.best_step}

    def load_json(self, d: dict) -> None:
        self.step, self.loader_batches = int(d["step"]), int(d["loader_batches"])
        self.skipped_d, self.skipped_g = int(d["skipped_d"]), int(d["skipped_g"])
        self.wandb_id = str(d["wandb_id"])
        self.world_size, self.data = int(d.get("world_size", 0)), str(d.get("data", ""))
        self.data_order = int(d.get("data_order", 1))
        self.precision = str(d.get("precision", ""))
        self.best_step = int(d.get("best_step") or 0)
        self.best_fid = float(d["best_fid"]) if self.best_step else float("inf")


def step_of(path: Path) -> int:
    return int(PATTERN.match(path.name).group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name))


def save(acc, nets, state: TrainState, root: Path, config_toml: str, keep: int, milestone_every: int) -> Path:
    """All ranks save into ``step_N.tmp`` (each its own RNG state); rank 0 adds our files and the checksums,
    renames, prunes. A full disk removes the partial folder and leaves every complete checkpoint as it was."""
    final = root / f"step_{state.step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    try:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        fault = injected_fault(acc.process_index)
        if fault == ("enospc", state.step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.safetensors"))
        if fault == ("slowsave", state.step):        # a write that takes long: time to lose a node meanwhile
            time.sleep(8)
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "config.toml").write_text(config_toml)    # lets sample.py rebuild G without the run dir
            save_file({"fixed_noise": state.fixed_noise.contiguous()}, str(tmp / NOISE_FILE))
            if nets.ema is not None:
                save_file(nets.ema.state_dict(), str(tmp / EMA_FILE))
            scalers = {"scaler_g": nets.scaler_g.state_dict(), "scaler_d": nets.scaler_d.state_dict()}
            (tmp / STATE_FILE).write_text(json.dumps({**state.to_json(), **scalers}, indent=1))
            sums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
            (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
    except (OSError, SafetensorError, RuntimeError) as e:    # the libraries' own types for a failed write too
        cause = write_failure(e, root)
        shutil.rmtree(tmp, ignore_errors=True)
        prev = complete_checkpoints(root)
        err = cause and disk_error(cause, f"checkpoint {tmp}", f"the newest complete checkpoint "
                                   f"({prev[-1] if prev else 'none'}) is untouched; free space and run the same "
                                   f"command to resume from it")
        if err is None:
            raise
        raise err from None
    if acc.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep]:
            # milestones, and the best-FID checkpoint (eval.every), are kept whatever `keep` says
            if not (milestone_every and step_of(old) % milestone_every == 0) and step_of(old) != state.best_step:
                shutil.rmtree(old, ignore_errors=True)
        if state.best_step:
            write_best(root, state)
    acc.wait_for_everyone()
    return final


def write_best(root: Path, state: TrainState) -> None:
    """checkpoints/best.json: which checkpoint has the lowest FID so far."""
    write_json_atomic(root / "best.json", {"step": state.best_step, "fid": state.best_fid,
                                           "checkpoint": str(root / f"step_{state.best_step:08d}")})


def verify(path: Path) -> None:
    """Raise ValueError naming the first file that is missing or differs from checksums.json (checkpoints
    written before checksums existed are not verified)."""
    if not (path / CHECKSUMS).is_file():
        log.warning("%s has no %s (written by an older version): its files are not verified", path, CHECKSUMS)
        return
    sums = json.loads((path / CHECKSUMS).read_text())
    for name, digest in sums.items():
        if not (path / name).is_file():
            raise ValueError(f"{name} missing")
        if sha256_file(path / name) != digest:
            raise ValueError(f"{name} differs from its checksum (truncated or altered)")


def _check_shapes(path: Path, acc, nets) -> None:
    """A checkpoint of another model size or architecture is a config mistake, not damage: say which tensor
    differs."""
    for name, model in (("model.safetensors", nets.G), ("model_1.safetensors", nets.D), (EMA_FILE, nets.G)):
        plain = acc.unwrap_model(model, keep_torch_compile=False)          # keys as saved: no _orig_mod. prefix
        expected = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
        if not (path / name).is_file():
            continue
        net = "discriminator" if name == "model_1.safetensors" else "generator"
        fix = (f"resume with the config the run was started with (see {path / 'config.toml'}) or set "
               f"checkpoint.resume = \"never\"")
        with safe_open(str(path / name), "pt") as f:
            keys = set(f.keys())
            if keys != set(expected):             # another architecture, e.g. model.d_norm changed
                odd = sorted(keys ^ set(expected))[0]
                where = "the checkpoint has" if odd in keys else "the config builds"
                raise UserError(f"{path}: {net} tensor {odd}: only {where} it (another architecture, e.g. "
                                f"model.d_norm); {fix}")
            for key in sorted(keys):
                got = tuple(f.get_slice(key).get_shape())
                if got != expected[key]:
                    raise UserError(f"{path}: {net} tensor {key} has shape {got} but the config builds "
                                    f"{expected[key]}; {fix}")


def load(path: Path, acc, nets, state: TrainState) -> None:
    """Restore models, optimizers, every rank's RNG states, the scalers and our state from ``path``.

    A checkpoint of fewer processes has no RNG state for the extra ranks: that is a world-size change (which
    the caller reports, or applies with checkpoint.allow_changes: those ranks keep the seed's streams), not damage.
    """
    for name in ("model.safetensors", "model_1.safetensors", STATE_FILE, NOISE_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{name} missing")
    saved_world = int(json.loads((path / STATE_FILE).read_text()).get("world_size") or acc.num_processes)
    for i in range(min(saved_world, acc.num_processes)):
        if not (path / f"random_states_{i}.pkl").is_file():
            raise FileNotFoundError(f"random_states_{i}.pkl missing")
    verify(path)
    _check_shapes(path, acc, nets)
    acc.load_state(str(path))
    saved = json.loads((path / STATE_FILE).read_text())
    state.load_json(saved)
    state.fixed_noise = load_file(str(path / NOISE_FILE))["fixed_noise"]
    if nets.ema is not None:
        if (path / EMA_FILE).is_file():
            nets.ema.load_state_dict(load_file(str(path / EMA_FILE), device=str(next(nets.ema.model.parameters()).device)))
        else:   # a checkpoint from before model.ema, or of a run that had it off
            nets.ema.load_state_dict(acc.unwrap_model(nets.G).state_dict())
            log.warning("%s holds no %s: G_ema starts as a copy of G at step %d", path, EMA_FILE, state.step)
    for name, scaler in (("scaler_g", nets.scaler_g), ("scaler_d", nets.scaler_d)):
        # A disabled scaler (fp32/bf16) saves {}: resuming such a checkpoint in fp16 starts a fresh loss scale
        # (and an fp16 checkpoint resumed in fp32/bf16 has no scale to restore).
        if saved[name] and scaler.is_enabled():
            scaler.load_state_dict(saved[name])
        elif saved[name] or scaler.is_enabled():
            log.info("precision changed since %s: %s starts with a fresh loss-scaler state", path, name)


def resume(resume: str, root: Path, acc, nets, state: TrainState) -> Path | None:
    """``auto``: the newest complete checkpoint that loads, warning about damaged newer ones (and failing
    rather than silently starting over when none loads); ``never``: none; else that checkpoint path."""
    if resume == "never":
        return None
    explicit = resume != "auto"
    candidates = [Path(resume)] if explicit else complete_checkpoints(root)
    if explicit and not candidates[0].is_dir():
        raise UserError(f"checkpoint.resume = {resume!r}: no such checkpoint folder")
    for path in reversed(candidates):
        try:
            load(path, acc, nets, state)
            return path
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read is damage
            if explicit:
                raise UserError(f"checkpoint {path} is damaged ({type(e).__name__}: {e})") from None
            if acc.is_main_process:
                log.warning("checkpoint %s is damaged (%s: %s); trying the previous one", path, type(e).__name__,
                            str(e)[:200])
    if candidates:
        raise UserError(f"none of the {len(candidates)} checkpoints in {root} could be loaded (see the warnings); "
                        f"move them away or set checkpoint.resume = \"never\" to start over")
    return None


def planned_loader_batches(resume: str, root: Path) -> int:
    """The loader position (``loader_batches``) of the checkpoint that :func:`resume` tries first, 0 for none:
    read before the process group exists, so that the loader can fork its workers first (train/loop.py). When
    that checkpoint turns out damaged, resume() loads an older one and the trainer restarts the loader there."""
    if resume == "never":
        return 0
    candidates = [Path(resume)] if resume != "auto" else complete_checkpoints(root)
    try:
        return int(json.loads((candidates[-1] / STATE_FILE).read_text())["loader_batches"]) if candidates else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def remove_partial(root: Path) -> None:
    """Drop ``*.tmp`` folders a killed save left behind (rank 0, before training)."""
    if root.is_dir():
        for p in root.glob("step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
