"""Write N generated PNGs (and optionally one grid) from a checkpoint, on CPU or GPU, without accelerate launch.

  python launch/sample.py --checkpoint runs/digits/checkpoints/step_00001500 --n 64 --out samples/ --grid grid.png
"""

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torchvision.utils import save_image

from dcgan_dist.config import load_config
from dcgan_dist.errors import UserError
from dcgan_dist.models import Generator


def load_generator(checkpoint: Path, device: str) -> Generator:
    """G from a checkpoint folder: its config.toml gives the architecture, model.safetensors the weights
    (safetensors: loading never unpickles anything)."""
    if not (checkpoint / "model.safetensors").is_file() or not (checkpoint / "config.toml").is_file():
        raise UserError(f"{checkpoint}: not a complete checkpoint (needs model.safetensors and config.toml)")
    cfg = load_config(checkpoint / "config.toml")
    g = Generator(cfg.model.latent, cfg.model.ngf, cfg.data.channels, cfg.data.resolution)
    try:
        weights = load_file(checkpoint / "model.safetensors")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise UserError(f"{checkpoint / 'model.safetensors'}: cannot be read ({str(e)[:120]}); the file is "
                        f"damaged: use another checkpoint") from None
    try:
        g.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{checkpoint}: weights do not fit the generator its config.toml describes "
                        f"({str(e).splitlines()[0][:160]})") from None
    return g.to(device).eval()


def check_device(name: str) -> str:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu") from None
    return name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    p.add_argument("--grid", type=Path, help="also write all samples as one grid image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    try:
        if a.n < 1:
            raise UserError(f"--n must be >= 1, not {a.n}")
        g = load_generator(a.checkpoint, check_device(a.device))
        z = torch.randn(a.n, g.latent, generator=torch.Generator().manual_seed(a.seed)).to(a.device)
        with torch.no_grad():
            images = (g(z).float().cpu() + 1) / 2          # [-1, 1] -> [0, 1]
        a.out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            save_image(img, a.out / f"sample_{i:05d}.png")
        if a.grid:
            save_image(images, a.grid, nrow=int(a.n ** 0.5 + 0.999))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.n} images to {a.out}" + (f" and a grid to {a.grid}" if a.grid else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
