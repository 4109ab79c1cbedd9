"""Write generated images from a checkpoint, on CPU or GPU, without accelerate launch.

  python launch/sample.py --checkpoint runs/digits/checkpoints/step_00001500 --n 64 --out samples/ --grid grid.png
  python launch/sample.py --checkpoint CKPT --interpolate 10 --n 8 --out walks/   # latent walks: PNG grid + GIF

G_ema (the moving average of G, model.ema) is used when the checkpoint has it; --raw samples the raw G.
"""

if __name__ == "__main__":
    import _deps  # noqa: F401 - first: without the project's packages, one line on how to get them

import argparse
import sys
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from dcgan_dist.errors import UserError
from dcgan_dist.models import Generator, load_generator


def check_device(name: str) -> str:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu") from None
    return name


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of ``a`` and ``b`` (B x D) at fractions ``t`` (K) -> B x K x D.
    The path a Gaussian latent's norm expects (White, 2016), as the DCGAN paper's walks; linear when a ~ b."""
    a_n, b_n = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    omega = torch.acos((a_n * b_n).sum(1).clamp(-1, 1))[:, None, None]           # B x 1 x 1
    t = t[None, :, None]
    so = torch.sin(omega)
    linear = so.abs() < 1e-6
    wa = torch.where(linear, 1 - t, torch.sin((1 - t) * omega) / torch.where(linear, 1, so))
    wb = torch.where(linear, t, torch.sin(t * omega) / torch.where(linear, 1, so))
    return wa * a[:, None] + wb * b[:, None]


def interpolate(g: Generator, rows: int, steps: int, seed: int, device: str, out: Path) -> tuple[Path, Path]:
    """``rows`` walks of ``steps`` images each between random latent pairs: a grid PNG (one walk per row) and a
    GIF that walks all rows together, forth and back."""
    import imageio.v2 as imageio

    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rows, g.latent, generator=gen), torch.randn(rows, g.latent, generator=gen)
    z = slerp(a, b, torch.linspace(0, 1, steps)).reshape(rows * steps, g.latent).to(device)
    with torch.no_grad():
        images = ((g(z).float().cpu() + 1) / 2).clamp(0, 1)
    images = images.reshape(rows, steps, *images.shape[1:])
    out.mkdir(parents=True, exist_ok=True)
    png, gif = out / "interpolation.png", out / "interpolation.gif"
    save_image(images.flatten(0, 1), png, nrow=steps)
    frames = [(make_grid(images[:, k], nrow=int(rows ** 0.5 + 0.999)).permute(1, 2, 0) * 255).round().byte().numpy()
              for k in [*range(steps), *range(steps - 2, 0, -1)]]
    imageio.mimsave(gif, frames, duration=100, loop=0)                  # ms per frame (pillow plugin)
    return png, gif


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--n", type=int, default=64, help="images (with --interpolate: walks, one per grid row)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    p.add_argument("--grid", type=Path, help="also write all samples as one grid image; a relative path is "
                                              "inside --out (--grid grid.png: OUT/grid.png)")
    p.add_argument("--interpolate", type=int, metavar="K", help="latent walks of K images each (slerp), PNG + GIF")
    p.add_argument("--raw", action="store_true", help="sample the raw G, not G_ema")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    try:
        if a.n < 1:
            raise UserError(f"--n must be >= 1, not {a.n}")
        if a.interpolate is not None and not 2 <= a.interpolate <= 256:
            raise UserError(f"--interpolate must be between 2 and 256 images per walk, not {a.interpolate}")
        g, which, _ = load_generator(a.checkpoint, check_device(a.device), a.raw)
        if which == "G" and not a.raw:
            print(f"note: {a.checkpoint} holds no G_ema (an older run, or model.ema off): sampling G",
                  file=sys.stderr)
        if a.interpolate:
            png, gif = interpolate(g, a.n, a.interpolate, a.seed, a.device, a.out)
            print(f"wrote {a.n} walks of {a.interpolate} images from {which} to {png} and {gif}")
            return 0
        z = torch.randn(a.n, g.latent, generator=torch.Generator().manual_seed(a.seed)).to(a.device)
        with torch.no_grad():
            images = (g(z).float().cpu() + 1) / 2          # [-1, 1] -> [0, 1]
        a.out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            save_image(img, a.out / f"sample_{i:05d}.png")
        if a.grid:
            a.grid = a.out / a.grid                      # an absolute --grid stays as it is
            save_image(images, a.grid, nrow=int(a.n ** 0.5 + 0.999))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:           # an unwritable or full --out / --grid
        print(f"error: cannot write {e.filename or a.out} ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {a.n} images from {which} to {a.out}" + (f" and a grid to {a.grid}" if a.grid else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
