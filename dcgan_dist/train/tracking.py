"""Rank-0 outputs: W&B through Accelerate's tracker, metrics.jsonl, fixed-noise grids and progress.gif."""

from __future__ import annotations

import json
import logging
import netrc
import os
import threading
import uuid
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.utils import make_grid, save_image

from ..atomic import write_bytes_atomic
from ..errors import UserError, brief

log = logging.getLogger("dcgan_dist")


PROBE_TIMEOUT_S = 5.0     # how long "auto" and "online" wait for W&B to answer before training starts


def wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")


def wandb_credentials(base: str) -> bool:
    """W&B's own places: WANDB_API_KEY, or a ~/.netrc entry for the server's host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(netrc.netrc().authenticators(urlparse(base).hostname or ""))
    except (OSError, netrc.NetrcParseError):
        return False


def probe(base: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the W&B server answers within ``timeout`` seconds, else why not. Any HTTP answer below 500
    counts (the network and the server are up; credentials are W&B's to check). The request runs in a
    thread so that a hanging DNS lookup, which the socket timeout does not cover, is bounded too."""
    result: list = []

    def ask() -> None:
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=timeout).close()
            result.append(None)
        except urllib.error.HTTPError as e:
            result.append(None if e.code < 500 else f"HTTP {e.code}")
        except Exception as e:  # noqa: BLE001 - URLError, timeouts, SSL errors: all mean "not reachable"
            result.append(f"{type(e).__name__}: {getattr(e, 'reason', e)}")

    t = threading.Thread(target=ask, daemon=True, name="wandb-probe")
    t.start()
    t.join(timeout + 0.5)
    return result[0] if result else f"no answer within {timeout:g} s"


def wandb_mode(mode: str, main: bool = True, timeout: float = PROBE_TIMEOUT_S) -> str:
    """The W&B mode to run in, decided before training starts (UserError for an "online" that cannot work).

    ``auto``: online when credentials exist and the server answers within ``timeout`` seconds, otherwise
    offline (with a warning when credentials exist: a compute node without network); the run's summary then
    names the ``wandb sync`` command. Only the main process logs, so only it probes. ``online``: missing
    credentials or no answer is an error on every rank, before any process group exists.
    """
    if mode in ("offline", "disabled"):
        return mode
    base = wandb_base_url()
    has_key = wandb_credentials(base)
    if mode == "auto":
        if not has_key:
            return "offline"
        if not main:
            return "online"
        reason = probe(base, timeout)
        if reason is not None:
            log.warning("W&B: credentials found but %s did not answer (%s); logging offline into the run "
                        "directory instead (the sync command is printed at the end)", base, reason)
            return "offline"
        return "online"
    if not has_key:
        raise UserError(f'log.wandb = "online" but no W&B credentials (WANDB_API_KEY, or ~/.netrc for '
                        f'{urlparse(base).hostname}); run `wandb login`, or set log.wandb = "offline" or "auto"')
    reason = probe(base, timeout)
    if reason is not None:
        raise UserError(f'log.wandb = "online" but W&B at {base} did not answer ({reason}); check the network, '
                        f'or set log.wandb = "offline" (upload later with wandb sync) or "auto" (offline when '
                        f'W&B cannot be reached)')
    return "online"


def run_wandb_mode(log_cfg, main: bool = True) -> str:
    """The W&B mode of a run: ``wandb_mode(log.wandb)`` (which may wait for W&B to answer), or "disabled" when
    W&B is not among ``log.trackers``."""
    return wandb_mode(log_cfg.wandb, main) if "wandb" in log_cfg.trackers else "disabled"


def trackers(log_cfg, wandb: str) -> list[str]:
    """The Accelerate trackers of a run: ``log.trackers``, less W&B when its mode is "disabled"."""
    return [t for t in log_cfg.trackers if t != "wandb" or wandb != "disabled"]


def check_trackers(log_cfg) -> None:
    if "tensorboard" in log_cfg.trackers:
        try:
            import torch.utils.tensorboard  # noqa: F401 - needs the tensorboard package
        except ImportError:
            raise UserError('log.trackers includes "tensorboard" but the tensorboard package is not installed; '
                            'run pip install -e ".[tensorboard]" (or pip install tensorboard)') from None


def start_trackers(acc, cfg, state, wandb: str) -> "Trackers":
    """Start the run's trackers through Accelerate (rank 0 only); returns them behind the Trackers guard.
    W&B's run id lives in the checkpoint, so a resume continues the same W&B run; TensorBoard writes under
    <run_dir>/tensorboard/<project>/."""
    from ..config import flatten

    names = trackers(cfg.log, wandb)
    if not names:
        return Trackers(acc)
    if acc.is_main_process and "wandb" in names and not state.wandb_id:
        state.wandb_id = uuid.uuid4().hex[:12]
    kwargs = {"wandb": {"name": cfg.name, "id": state.wandb_id or None, "resume": "allow", "dir": str(cfg.run_dir),
                        "mode": wandb, "entity": cfg.log.entity or None, "group": os.environ.get("SLURM_JOB_ID")},
              # TensorBoard keeps every event written: steps after the checkpoint's are redone, so the reader is
              # told to drop the earlier events from that step on (accelerate passes these to SummaryWriter)
              "tensorboard": {"purge_step": state.step + 1}}
    try:
        acc.init_trackers(cfg.log.project, config=None, init_kwargs=kwargs)
    except Exception as e:  # noqa: BLE001 - wandb raises its own types (CommError, UsageError, AuthenticationError)
        if not type(e).__module__.startswith("wandb"):
            raise
        raise UserError(f"W&B could not start in {wandb} mode ({type(e).__name__}: {brief(e)}); fix it or set "
                        f'log.wandb = "offline" (upload later with wandb sync) or "disabled"') from None
    if acc.is_main_process:
        if "wandb" in names:
            config = cfg.to_dict()
            config["train"]["precision_resolved"] = state.precision        # what "auto" became on this device
            acc.get_tracker("wandb").store_init_configuration(config)
        if "tensorboard" in names:     # TensorBoard's hparams take flat scalars
            acc.get_tracker("tensorboard").store_init_configuration(
                {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(cfg.to_dict()).items()})
    return Trackers(acc)


class Trackers:
    """Rank 0's Accelerate trackers behind one guard: a tracker that fails is dropped with one warning that
    names the step and what the tracker lost, and training goes on (metrics.jsonl and samples/ keep every
    step). On a cluster this is the usual case, not a corner: SLURM signals every process of a job, and
    W&B's service process (wandb-core, a Go program that dies of SIGTERM even when its parent ignores it)
    goes with them; the next ``log`` raises ConnectionResetError. On other ranks there are no trackers."""

    def __init__(self, acc) -> None:
        self.acc = acc
        self.last_ok: dict[str, int] = {}

    def log(self, values: dict, step: int) -> None:
        for t in list(self.acc.trackers):
            self._call(t, step, t.log, values, step=step)

    def image(self, name: str, path: Path, step: int) -> None:
        """A saved grid PNG to each tracker, at ``step``."""
        for t in list(self.acc.trackers):
            if t.name == "wandb":
                import wandb
                self._call(t, step, t.log, {name: wandb.Image(str(path))}, step=step)
            elif t.name == "tensorboard":
                import numpy as np
                from PIL import Image
                image = np.asarray(Image.open(path).convert("RGB"))[None]
                self._call(t, step, t.log_images, {name: image}, step=step, dataformats="NHWC")

    def finish(self) -> None:
        """Finish every tracker that still works (W&B writes its summary and closes its offline file)."""
        for t in list(self.acc.trackers):
            self._call(t, None, t.finish)
        self.acc.trackers.clear()          # Accelerate's end_training would finish them a second time

    def _call(self, tracker, at: int | None, fn, *args, **kwargs) -> None:
        """``fn(*args, **kwargs)``, a call of ``tracker`` for step ``at`` (None: finishing)."""
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any tracker failure: W&B's ConnectionResetError, a full disk...
            self._drop(tracker, at, e)
            return
        if at is not None:
            self.last_ok[tracker.name] = at

    def _drop(self, tracker, step: int | None, e: Exception) -> None:
        self.acc.trackers.remove(tracker)
        held = self.last_ok.get(tracker.name)
        log.warning("%s failed %s (%s: %s) and is off for the rest of this run: it holds %s; metrics.jsonl and "
                    "samples/ hold every step", tracker.name, f"at step {step}" if step is not None else
                    "while finishing", type(e).__name__, brief(e, 120),
                    f"steps up to {held}" if held is not None else "no step of this run segment")
        if tracker.name == "wandb":
            try:        # close W&B's side now, or its exit hook prints the same failure as a traceback
                import wandb
                wandb.teardown()
            except Exception:  # noqa: BLE001 - the service is gone: nothing more to close
                pass


class MetricsFile:
    """metrics.jsonl: one JSON object per logged step, the same scalars as W&B."""

    def __init__(self, path: Path, keep_until: int = 0) -> None:
        """``keep_until``: on a resume from step N, rows past N (steps that will be redone) are dropped."""
        self.path = path
        if path.exists():
            rows = [line for line in self._rows(path) if json.loads(line)["step"] <= keep_until]
            write_bytes_atomic(path, "".join(r + "\n" for r in rows).encode())

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
