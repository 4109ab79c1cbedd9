"""How a training process ends and tells its launcher: exit codes, the outcome file, dying with the parent.

A rank's non-zero exit makes torchrun print a failure report and `accelerate launch` exit 1, whatever
the cause. So every rank records *why* it ended in the outcome file named by ``DCGAN_DIST_OUTCOME``
(``launch/run.py`` and the SLURM scripts set it): the first rank to record an outcome wins, and only
it prints its line; the launcher-level wrapper turns the file into the right exit code and message.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

from .errors import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USER_ERROR  # noqa: F401 - re-exported

EXIT_OK = 0
EXIT_FAILED = 1            # a crash (a bug, or a failure we did not anticipate): the traceback is kept
EXIT_INTERRUPTED = 130     # a second Ctrl-C: stopped at once, without a checkpoint
OUTCOME_ENV = "DCGAN_DIST_OUTCOME"


def record_outcome(code: int, message: str) -> bool:
    """Record this process's outcome unless another rank already did; True when this call recorded it
    (then the caller prints the message) or when no outcome file is in use."""
    path = os.environ.get(OUTCOME_ENV)
    if not path:
        return True
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump({"exit_code": code, "message": message, "rank": int(os.environ.get("RANK", 0))}, f)
        os.link(tmp, path)            # atomic, and fails if another rank got there first
        return True
    except FileExistsError:
        return False
    except OSError:                   # cannot record (disk full...): say it ourselves
        return True
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def read_outcome(path: str) -> dict | None:
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) and isinstance(d.get("exit_code"), int) else None
    except (OSError, ValueError):
        return None


def outcome_recorded() -> bool:
    """Whether some rank has already recorded an outcome (then this rank's error is a consequence)."""
    path = os.environ.get(OUTCOME_ENV)
    return bool(path) and os.path.exists(path)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: ask the kernel to send ``sig`` to this process when its parent dies, so that no rank outlives
    its launcher (a ``kill -USR1`` of ``accelerate launch`` kills the launcher and would orphan the ranks).
    SIGTERM is a stop request to the trainer: it checkpoints at the next sync point and exits."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)              # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:                         # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def injected_fault(rank: int) -> tuple[str, int] | None:
    """DCGAN_DIST_FAULT=KIND@STEP[@RANK] (tests): ``(kind, step)`` when it applies to this rank, else None.
    Kinds: ``nan`` (that batch becomes NaN), ``raise`` (the step raises), ``enospc`` (the checkpoint at STEP
    fails as on a full disk)."""
    kind, *rest = os.environ.get("DCGAN_DIST_FAULT", "").split("@")
    if kind and rest and (len(rest) < 2 or int(rest[1]) == rank):
        return kind, int(rest[0])
    return None
