"""FID and KID of a checkpoint's generator (G_ema by default) against its training shards.

  python launch/evaluate.py --checkpoint runs/digits/checkpoints/step_00001500 [--n 50000] [--json fid.json]
  accelerate launch --multi_gpu --num_processes 8 launch/evaluate.py --checkpoint CKPT     # shared across GPUs

Settings come from the checkpoint's config.toml ([eval], data.shards); --shards and --set override them.
The first evaluation of a shard set computes its reference statistics and caches them (eval.cache_dir).
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
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--shards", help="shard folder (default: the run's data.shards)")
    p.add_argument("--n", type=int, help="generated images (default: eval.n, 50000)")
    p.add_argument("--raw", action="store_true", help="evaluate the raw G, not G_ema")
    p.add_argument("--json", type=Path, help="also write the result as JSON")
    p.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override an [eval] setting, e.g. --set eval.features=inception")
    a = p.parse_args(argv)
    setup_logging()
    if "LOCAL_RANK" in os.environ:
        die_with_parent()
    try:
        from dcgan_dist.data import load_manifest
        from dcgan_dist.eval import Dist, Evaluator
        from dcgan_dist.models import load_generator

        bad = [s for s in a.set if not s.startswith("eval.")]
        if bad:
            raise UserError(f"--set {bad[0]}: only eval.* settings can be changed here")
        if a.n is not None and a.n < 2:
            raise UserError(f"--n must be >= 2, not {a.n}")
        acc = new_accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        g, which, cfg = load_generator(a.checkpoint, acc.device, a.raw)
        cfg = load_config(a.checkpoint / "config.toml", a.set)
        shards = a.shards or cfg.data.shards
        manifest = load_manifest(shards, cfg.data.verify, cfg.data.resolution, cfg.data.channels)
        evaluator = Evaluator(cfg.eval, shards, manifest, Dist.from_accelerator(acc))
        result = {"checkpoint": str(a.checkpoint), "generator": which, "shards": str(shards),
                  **evaluator(g, a.n)}
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code = 0
    if acc.is_main_process:
        print(f"FID {result['fid']:.4f}  KID {result['kid']:.6f} +- {result['kid_std']:.6f}  ({which}, "
              f"{result['n_fake']} generated vs {result['n_real']} real images, features {result['features']}, "
              f"{result['eval_s']:.1f} s: {result['eval_s_per_1k']:.2f} s per 1,000 images)")
        res = cfg.eval.native_resolution
        if res:
            print(f"at the data's native {res}x{res} pixels: Frechet distance {result[f'fd_pixels{res}']:.4f}, "
                  f"precision {result[f'precision_pixels{res}']:.3f}, recall {result[f'recall_pixels{res}']:.3f} "
                  f"(k=3), pixel std {result[f'std_ratio_pixels{res}']:.3f} x the real images'")
        if "class_fractions" in result:
            print("classes of the generated images (digit classifier): " +
                  ", ".join(f"{i}: {f:.1%}" for i, f in enumerate(result["class_fractions"])))
        print(json.dumps(result))
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


if __name__ == "__main__":
    sys.exit(main())
