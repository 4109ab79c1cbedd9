"""Train a DCGAN: accelerate launch launch/train.py --config configs/lsun.toml [--set key=value ...].

For a clean one-line outcome and a meaningful exit code under a launcher, use launch/run.py in place of
`accelerate launch` (same arguments). Exit codes: 0 done, 2 user error, 3 diverged, 75 stopped after a
checkpoint (run again to continue; 0 under a launcher, whose wrapper reads the outcome file), 76 another rank
was lost (its node died or could not be reached; run again to resume), 1 crash.
"""

if __name__ == "__main__":
    import _deps  # noqa: F401 - first: without the project's packages, one line on how to get them

from dcgan_dist.runtime import STOP  # noqa: I001 - first: a stop signal during the imports below is kept

if __name__ == "__main__":      # not when a loader worker imports this file as __mp_main__ (loader.worker_context)
    STOP.install()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from dcgan_dist.config import load_config  # noqa: E402
from dcgan_dist.errors import StoppedWaiting, TrainingDiverged, UserError, disk_error  # noqa: E402
from dcgan_dist.runtime import (EXIT_DIVERGED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PEER_LOST,  # noqa: E402
                                EXIT_PREEMPTED, EXIT_USER_ERROR, LauncherGone, die_with_parent, outcome_recorded,
                                peer_lost, record_outcome, setup_logging)

UNDER_LAUNCHER = "LOCAL_RANK" in os.environ
MAIN = int(os.environ.get("RANK", 0)) == 0


def finish(code: int, message: str, quiet: bool | None = None) -> int:
    """Record the outcome in this node's outcome file and return this process's exit code. Who prints the
    message: the first rank to record it (an error), or, for an outcome every rank shares, the ranks that are
    not ``quiet`` (rank 0)."""
    first = record_outcome(code, message)
    if (first if quiet is None else not quiet):
        print(message, file=sys.stdout if code in (0, EXIT_PREEMPTED) else sys.stderr, flush=True)
    if code == EXIT_PREEMPTED and UNDER_LAUNCHER:
        return 0          # torchrun reports any non-zero exit as a crash; the outcome file says "stopped"
    return code


def launcher_gone(e: Exception | None = None) -> int:
    message = str(e) if isinstance(e, LauncherGone) else (
        f"rank {os.environ.get('RANK')}: the launcher (pid {STOP.parent}) is gone; stopped without a checkpoint; "
        f"run the same command again to resume from the newest one")
    return finish(EXIT_FAILED, f"error: {message}")


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are outcomes like any user error: recorded (so run.py reports this line, not the
    launcher's traceback), usage on rank 0 only, exit 2."""

    def error(self, message: str):
        if MAIN:
            self.print_usage(sys.stderr)
        hint = "; give each setting its own --set: --set a.b=1 --set c.d=2" if (
            "unrecognized arguments" in message and "=" in message) else ""
        raise SystemExit(finish(EXIT_USER_ERROR, f"error: {message}{hint}"))


def main(argv=None) -> int:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file (see configs/; required); defaults fill what it leaves out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.batch_size=64 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, data and model sizes; exit")
    a = p.parse_args(argv)
    if a.config is None:                  # the built-in defaults alone are no run anyone means (64 px, data/digits)
        if MAIN:
            p.print_usage(sys.stderr)
        return finish(EXIT_USER_ERROR, "error: no --config given; name one of configs/*.toml, e.g. "
                                       "python launch/train.py --config configs/digits.toml")
    setup_logging()
    if UNDER_LAUNCHER:
        die_with_parent()                     # the launcher's death is a stop request; see also STOP.orphaned
    cfg = None
    try:
        cfg = load_config(a.config, a.set)
        if a.dry_run:
            from dcgan_dist.train import describe
            for part in describe(cfg):        # the config first: a data error comes after it, last
                print(part, end="", flush=True)
            return 0
        from dcgan_dist.train import train
        summary = train(cfg)
    except LauncherGone as e:
        return launcher_gone(e)
    except StoppedWaiting as e:               # a hung shard server: no step to checkpoint at
        from dcgan_dist.train.checkpoint import complete_checkpoints, step_of
        done = complete_checkpoints(cfg.run_dir / "checkpoints")
        return finish(EXIT_PREEMPTED, f"{e}; run the same command again to resume from the newest checkpoint "
                                      f"({f'step {step_of(done[-1])}' if done else 'none yet: from the start'})")
    except TrainingDiverged as e:
        return finish(EXIT_DIVERGED, f"error: {e}")
    except UserError as e:
        return finish(EXIT_USER_ERROR, f"error: {e}")
    except KeyboardInterrupt:
        return finish(EXIT_INTERRUPTED, "interrupted: stopped at once, without a checkpoint; run the same "
                                        "command again to resume from the last one")
    except OSError as e:
        err = disk_error(e, e.filename or "a file", "free space and run the same command again to resume")
        if err is None:
            raise
        return finish(EXIT_USER_ERROR, f"error: {err}")
    except Exception as e:  # noqa: BLE001 - a crash: keep the traceback, unless it follows another failure
        if STOP.orphaned():                   # a peer left the collective because our launcher died
            return launcher_gone()
        lost = peer_lost(e, cfg.train.dist_timeout_s if cfg is not None else None)
        if lost and not outcome_recorded():   # another rank's recorded failure explains it otherwise
            return finish(EXIT_PEER_LOST, f"error: {lost}; nothing after the newest complete checkpoint was "
                                          f"kept: run the same command again (or requeue the job) to resume")
        if UNDER_LAUNCHER and outcome_recorded():
            print(f"rank {os.environ.get('RANK')}: stopped because another rank failed ({type(e).__name__})",
                  file=sys.stderr)
            return EXIT_FAILED
        record_outcome(EXIT_FAILED, f"error: crashed with {type(e).__name__}: {e} (traceback above)")
        raise
    quiet = not summary["main"]               # rank 0 reports; every rank records (one outcome file per node)
    if summary["stopped_by"]:
        when = (f"during start-up, before step {summary['step'] + 1} (nothing new to checkpoint)"
                if summary.get("during_startup") else f"at step {summary['step']} after a checkpoint")
        return finish(EXIT_PREEMPTED, f"stopped by {summary['stopped_by']} {when}; run the same command again "
                                      f"to continue", quiet)
    if summary.get("already_complete"):
        return finish(0, f"already complete: step {summary['step']} reached train.max_steps; nothing to do "
                         f"(raise train.max_steps to train on), run in {summary['run_dir']}", quiet)
    if summary.get("sync_command") and not quiet:
        print(f"W&B ran offline; upload with: {summary['sync_command']}")
    return finish(0, f"done: step {summary['step']}, epoch {summary['epoch']}, run in {summary['run_dir']}", quiet)


if __name__ == "__main__":
    code = main()
    STOP.ignore()             # the outcome is recorded: a late stop signal must not kill the exit (see ignore)
    sys.exit(code)
