"""Train a DCGAN: accelerate launch launch/train.py --config configs/lsun.toml [--set key=value ...]."""

import argparse
import logging
import os
import sys

from dcgan_dist.config import load_config
from dcgan_dist.errors import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USER_ERROR, TrainingDiverged, UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", help="TOML file (see configs/); defaults fill what it leaves out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.batch_size=64 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, data and model sizes; exit")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(a.config, a.set)
        if a.dry_run:
            from dcgan_dist.train import describe
            print(describe(cfg), end="")
            return 0
        from dcgan_dist.train import train
        summary = train(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if summary["stopped_by"]:
        if summary["main"]:
            print(f"stopped by {summary['stopped_by']} at step {summary['step']} after a checkpoint; "
                  f"run the same command again to continue")
        # Under a launcher (torchrun / accelerate launch) a non-zero exit reads as a crashed worker and the
        # launcher exits 1 with a traceback, so ranks exit 0 there; run directly, the stop is exit code 75.
        return 0 if "LOCAL_RANK" in os.environ else EXIT_PREEMPTED
    if not summary["main"]:
        return 0
    if summary.get("sync_command"):
        print(f"W&B ran offline; upload with: {summary['sync_command']}")
    print(f"done: step {summary['step']}, epoch {summary['epoch']}, run in {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
