"""FID, KID and improved precision/recall of a checkpoint's generator (G_ema by default), or of given images,
against the reference set (eval.reference: a held-out test split; else the training shards).

  python launch/evaluate.py --checkpoint runs/fashion/checkpoints/step_00004000 --n 10000
  python launch/evaluate.py --config configs/fashion.toml --images data/fashion --n 10000      # the floor
  python launch/evaluate.py --config configs/fashion.toml --images samples.npy                 # another program's
  accelerate launch --multi_gpu --num_processes 8 launch/evaluate.py --checkpoint CKPT     # shared across GPUs

Settings come from the checkpoint's config.toml (or --config): [eval], data.shards (the features' training set);
--shards and --set override them. --images: a shard folder (its first --n images) or a .npy file of uint8 images
N x H x W x C at the training resolution. The first evaluation against a shard set computes its reference
statistics and caches them (eval.cache_dir).
"""

if __name__ == "__main__":
    import _deps  # noqa: F401 - first: without the project's packages, one line on how to get them

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from dcgan_dist.config import load_config
from dcgan_dist.errors import UserError
from dcgan_dist.runtime import die_with_parent, new_accelerator, setup_logging


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="a checkpoint folder: its generator and its config")
    which.add_argument("--config", type=Path, help="a config file (with --images: no generator needed)")
    p.add_argument("--images", type=Path, help="measure these images instead of a generator: a shard folder or "
                                               "a .npy file (uint8 N x H x W x C)")
    p.add_argument("--shuffle-pixels", action="store_true",
                   help="with --images: shuffle each image's pixels first (a sanity row: no structure left)")
    p.add_argument("--shards", help="shard folder the features are trained on (default: the run's data.shards)")
    p.add_argument("--n", type=int, help="generated (or --images) images (default: eval.n)")
    p.add_argument("--raw", action="store_true", help="evaluate the raw G, not G_ema")
    p.add_argument("--json", type=Path, help="also write the result as JSON")
    p.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override an [eval] setting, e.g. --set eval.reference=data/fashion-test")
    a = p.parse_args(argv)
    setup_logging()
    if "LOCAL_RANK" in os.environ:
        die_with_parent()
    try:
        from dcgan_dist.data import load_manifest
        from dcgan_dist.eval import Dist, Evaluator

        bad = [s for s in a.set if not s.startswith("eval.")]
        if bad:
            raise UserError(f"--set {bad[0]}: only eval.* settings can be changed here")
        if a.n is not None and a.n < 2:
            raise UserError(f"--n must be >= 2, not {a.n}")
        if a.config and not a.images:
            raise UserError("--config measures --images; to measure a generator, give --checkpoint")
        if a.shuffle_pixels and not a.images:
            raise UserError("--shuffle-pixels needs --images")
        acc = new_accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        cfg = load_config((a.checkpoint / "config.toml") if a.checkpoint else a.config, a.set)
        shards = a.shards or cfg.data.shards
        manifest = load_manifest(shards, cfg.data.verify, cfg.data.resolution, cfg.data.channels)
        images = _images(a.images, a.n or cfg.eval.n, manifest, a.shuffle_pixels) if a.images else None
        evaluator = Evaluator(cfg.eval, shards, manifest, Dist.from_accelerator(acc))
        if images is not None:
            what = f"{a.images}" + (", pixels shuffled" if a.shuffle_pixels else "")
            result = {"images": what, **evaluator.images(images)}
        else:
            from dcgan_dist.models import load_generator

            g, what, _ = load_generator(a.checkpoint, acc.device, a.raw, standing=0)   # the Evaluator's, split
            result = {"checkpoint": str(a.checkpoint), "generator": what, **evaluator(g, a.n)}
        result["shards"] = str(shards)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code = 0
    if acc.is_main_process:
        _report(result, what, cfg.eval.native_resolution)
        if a.json:
            try:
                a.json.write_text(json.dumps(result, indent=1))
            except OSError as e:
                print(f"error: --json {a.json}: cannot write ({e.strerror or e}); the result is printed above",
                      file=sys.stderr)
                code = 2
    # every rank leaves the process group together; gloo's threads end with it (runtime.new_accelerator)
    acc.wait_for_everyone()
    acc.end_training()
    return code


def _images(path: Path, n: int, manifest: dict, shuffle: bool) -> torch.Tensor:
    """The first ``n`` images of a shard folder or a .npy file -> uint8 N x C x H x W, checked against the
    training shards' resolution and channels."""
    import itertools

    import numpy as np

    from dcgan_dist.data import load_manifest, read_shards

    want = (manifest["resolution"], manifest["resolution"], manifest["channels"])
    if path.suffix == ".npy":
        try:
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"--images {path}: not a readable .npy file ({e})") from None
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != want:
            raise UserError(f"--images {path}: holds {x.dtype} {x.shape}; expected uint8 N x {' x '.join(map(str, want))}"
                            f" (the training shards' resolution and channels)")
        x = np.array(x[:n])
    else:
        try:
            load_manifest(path, "size", want[0], want[2])
        except UserError as e:
            raise UserError(f"--images: {e}") from None
        x = np.stack([img for img, _ in itertools.islice(read_shards(path), n)])
    if len(x) < 2:
        raise UserError(f"--images {path}: holds {len(x)} image(s); at least 2 are needed")
    if shuffle:            # each image's pixels in its own random order: the intensities stay, the shapes go
        rng = np.random.default_rng(0)
        flat = x.reshape(len(x), -1, x.shape[-1])
        x = np.stack([img[rng.permutation(len(img))] for img in flat]).reshape(x.shape)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _report(result: dict, which: str, native_res: int) -> None:
    print(f"FID {result['fid']:.4f}  KID {result['kid']:.6f} +- {result['kid_std']:.6f}  precision "
          f"{result['precision']:.3f}  recall {result['recall']:.3f}  ({which}, {result['n_fake']} images vs "
          f"{result['n_real']} of {result['reference']}, {result['eval_s']:.1f} s)")
    print(f"features: {result['features_description']}")
    if "standing_stats" in result:
        print(f"BatchNorm: standing statistics of {result['standing_stats']} latents" if result["standing_stats"]
              else "BatchNorm: the running statistics training left (eval.standing_stats = 0)")
    if native_res:
        print(f"at the data's native {native_res}x{native_res} pixels: Frechet distance "
              f"{result[f'fd_pixels{native_res}']:.4f}, precision {result[f'precision_pixels{native_res}']:.3f}, "
              f"recall {result[f'recall_pixels{native_res}']:.3f} (k=3), pixel std "
              f"{result[f'std_ratio_pixels{native_res}']:.3f} x the real images'")
    if "class_fractions" in result:
        print("classes of the images (the feature classifier's verdict): " +
              ", ".join(f"{i}: {f:.1%}" for i, f in enumerate(result["class_fractions"])))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
