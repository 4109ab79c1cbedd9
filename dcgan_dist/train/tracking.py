"""Rank-0 outputs: W&B through Accelerate's tracker, metrics.jsonl, fixed-noise grids and progress.gif."""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from ..errors import UserError

log = logging.getLogger("dcgan_dist")


def wandb_mode(mode: str) -> str:
    """``auto`` -> online when W&B credentials exist (WANDB_API_KEY or ~/.netrc), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class MetricsFile:
    """metrics.jsonl: one JSON object per logged step, the same scalars as W&B."""

    def __init__(self, path: Path, keep_until: int = 0) -> None:
        """``keep_until``: on a resume from step N, rows past N (steps that will be redone) are dropped."""
        self.path = path
        if path.exists():
            rows = [line for line in self._rows(path) if json.loads(line)["step"] <= keep_until]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(r + "\n" for r in rows))
            os.replace(tmp, path)

    @staticmethod
    def _rows(path: Path) -> list[str]:
        """The file's rows; a torn final line (a kill or a full disk during an append) is dropped with a warning,
        a damaged line elsewhere is an error naming it."""
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                ok = isinstance(json.loads(line).get("step"), int)
            except (ValueError, AttributeError):
                ok = False
            if ok:
                rows.append(line)
            elif i == len(lines) - 1:
                log.warning("%s: dropping a torn last line (%d bytes): %.60s", path, len(line), line)
            else:
                raise UserError(f"{path}:{i + 1}: not a metrics row; repair or remove that line to resume")
        return rows

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


@torch.no_grad()
def sample_grid(generator: torch.nn.Module, noise: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """The unwrapped G (never the DDP wrapper) in eval mode on the fixed noise -> grid in [0, 1]."""
    was_training = generator.training
    generator.eval()
    images = generator(noise.to(next(generator.parameters()).device)).float().cpu()
    generator.train(was_training)
    return make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1))


def save_grid(grid: torch.Tensor, samples_dir: Path, step: int) -> Path:
    samples_dir.mkdir(parents=True, exist_ok=True)
    path = samples_dir / f"step_{step:08d}.png"
    save_image(grid, path)
    return path


def write_gif(samples_dir: Path, fps: float = 4.0) -> Path | None:
    """progress.gif from every grid in samples/, in step order."""
    import imageio.v2 as imageio

    frames = sorted(samples_dir.glob("step_*.png"))
    if not frames:
        return None
    out = samples_dir / "progress.gif"
    # imageio v2 with the pillow plugin takes the frame duration in milliseconds
    imageio.mimsave(out, [imageio.imread(f) for f in frames], duration=1000.0 / fps, loop=0)
    return out
