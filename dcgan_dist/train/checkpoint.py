"""Checkpoints through Accelerate's state saving, written under a temporary name and renamed when complete.

    run_dir/checkpoints/step_00001000/   complete (what resume picks)
    run_dir/checkpoints/step_00001000.tmp/   being written, or left by a crash (never picked; removed)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from ..errors import UserError

PATTERN = re.compile(r"^step_(\d{8})$")


class TrainState:
    """Everything besides models/optimizers/scalers/RNG that a resume needs; registered for checkpointing."""

    def __init__(self, fixed_noise: torch.Tensor) -> None:
        self.step = 0
        self.loader_batches = 0
        self.skipped_d = 0
        self.skipped_g = 0
        self.fixed_noise = fixed_noise
        self.wandb_id = ""

    def state_dict(self) -> dict:
        return {"step": self.step, "loader_batches": self.loader_batches, "skipped_d": self.skipped_d,
                "skipped_g": self.skipped_g, "fixed_noise": self.fixed_noise, "wandb_id": self.wandb_id}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.loader_batches = int(d["step"]), int(d["loader_batches"])
        self.skipped_d, self.skipped_g = int(d["skipped_d"]), int(d["skipped_g"])
        self.fixed_noise, self.wandb_id = d["fixed_noise"], str(d["wandb_id"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name))


def save(accelerator, root: Path, step: int, config_toml: str, keep: int) -> Path:
    """Save on all ranks into ``step_N.tmp``, then rank 0 renames it and prunes old ones."""
    final = root / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "config.toml").write_text(config_toml)   # lets sample.py rebuild G without the run dir
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str, root: Path) -> Path | None:
    """``auto``: newest complete checkpoint or None; ``never``: None; otherwise a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "model.safetensors").is_file():
        raise UserError(f"checkpoint.resume = {resume!r}: not a complete checkpoint folder (no model.safetensors)")
    return path
