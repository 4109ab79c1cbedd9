"""How a training process ends and tells its launcher: exit codes, the outcome file, dying with the parent.

A rank's non-zero exit makes torchrun print a failure report and `accelerate launch` exit 1, whatever
the cause. So every rank records *why* it ended in the outcome file named by ``DCGAN_DIST_OUTCOME``
(``launch/run.py`` and the SLURM scripts set it): the first rank to record an outcome wins, and only
it prints its line; the launcher-level wrapper turns the file into the right exit code and message.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

from .errors import EXIT_DIVERGED, EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_USER_ERROR  # noqa: F401 - re-exported

EXIT_OK = 0
EXIT_FAILED = 1            # a crash (a bug, or a failure we did not anticipate): the traceback is kept
EXIT_INTERRUPTED = 130     # a second Ctrl-C: stopped at once, without a checkpoint
OUTCOME_ENV = "DCGAN_DIST_OUTCOME"


JOB_OUTCOME_ENV = "DCGAN_DIST_JOB_OUTCOME"     # the SLURM scripts' file: the first node's outcome is the job's


def record_outcome(code: int, message: str, path: str | None = None) -> bool:
    """Record this process's outcome (in ``path``, by default the file ``DCGAN_DIST_OUTCOME`` names) unless
    another rank already did; True when this call recorded it (then the caller prints the message) or when no
    outcome file is in use."""
    path = path or os.environ.get(OUTCOME_ENV)
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


class LauncherGone(RuntimeError):
    """This rank's launcher died (killed, or its node's supervisor was): the rank stops after the step in
    progress, without a checkpoint, so that no rank outlives its launcher by more than one step."""


class StopRequest:
    """A request to checkpoint and stop: SIGUSR1, SIGTERM or SIGINT to this process, or a STOP file (what the
    SLURM scripts write when the batch shell gets its warning signal). A second SIGINT (Ctrl-C twice) stops at
    once: KeyboardInterrupt, no checkpoint.

    ``launch/train.py`` installs the process's one instance, ``STOP``, in its first lines, so that a request
    that arrives during start-up (imports, resume, W&B, the evaluator's caches) is kept, not fatal; the trainer
    honours it at its next check. Under a launcher it also tells whether the launcher is gone (``orphaned``).
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signalled: str | None = None          # the first stop signal's name
        self.stop_file: Path | None = None
        self.parent: int | None = None             # the launcher's pid, under a launcher
        self._old: dict = {}

    def install(self) -> bool:
        """Handle the stop signals from now on; False when they already were (nothing changed)."""
        if self._old:
            return False
        self.signalled = None
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        if "LOCAL_RANK" in os.environ:
            self.parent = os.getppid()
        return True

    def uninstall(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def ignore(self) -> None:
        """Ignore the stop signals from now on: for a process that is ending anyway. Python's finalisation
        resets a Python-level handler to the default (death by the signal), but keeps SIG_IGN; a stop signal
        during the exit would make the launcher report a crash and skip its exit barrier with the other nodes."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signalled == "SIGINT":
            raise KeyboardInterrupt
        self.signalled = self.signalled or signal.Signals(signum).name

    def reason(self) -> str | None:
        """"signal", "STOP file" or None: what this process knows (the ranks agree through an all-reduce)."""
        if self.signalled:
            return "signal"
        return "STOP file" if self.stop_file is not None and self.stop_file.exists() else None

    def orphaned(self) -> bool:
        """True when this rank's launcher has died (the rank was re-parented): it must not train on."""
        return self.parent is not None and os.getppid() != self.parent


STOP = StopRequest()


# What gloo says when a peer is gone: its process died (the kernel reset the connection) or it stopped answering
# (a node down, a cut link: no reset comes; the collective waits train.dist_timeout_s).
_PEER_LOST = re.compile(r"Connection (?:reset|closed) by peer|Broken pipe|Timed out waiting \d+ms|[Ss]ocket [Tt]imeout")
_ADDRESS = re.compile(r"\[([0-9a-fA-F:.]+)\]:\d+")


def peer_lost(e: BaseException, timeout_s: float | None = None) -> str | None:
    """The one line for a collective that failed because another rank is gone (None: some other error). Names
    the peer's host (and address) when gloo's message has it (a connection reset); after a timeout it cannot."""
    import socket
    text = str(e)
    if not _PEER_LOST.search(text):
        return None
    address = _ADDRESS.search(text)
    if address and not address.group(1).startswith("127."):
        ip = address.group(1)
        try:
            who = f"the rank(s) on {socket.gethostbyaddr(ip)[0]} ({ip})"
        except OSError:
            who = f"the rank(s) at {ip}"
        how = "their connection was reset (their processes died)"
    elif address:
        who, how = "another rank on this node", "its connection was reset (its process died)"
    else:
        who = "another rank"
        how = (f"no answer within train.dist_timeout_s = {timeout_s:g} s" if timeout_s else "no answer in time") + \
            " (a node down, a network link cut, or a rank stuck)"
    return f"rank {os.environ.get('RANK', 0)} lost contact with {who}: {how}"


def injected_fault(rank: int) -> tuple[str, int] | None:
    """DCGAN_DIST_FAULT=KIND@STEP[@RANK] (tests): ``(kind, step)`` when it applies to this rank, else None.
    Kinds: ``nan`` (that batch becomes NaN), ``raise`` (the step raises), ``enospc`` (the checkpoint at STEP
    fails as on a full disk), ``slowsave`` (the checkpoint at STEP takes 8 s longer on this rank, while its
    ``.tmp`` folder is being written), ``slow`` (every step takes STEP milliseconds longer: a slow GPU or fp16 on
    a CPU)."""
    kind, *rest = os.environ.get("DCGAN_DIST_FAULT", "").split("@")
    if kind and rest and (len(rest) < 2 or int(rest[1]) == rank):
        return kind, int(rest[0])
    return None


def fault_injector(rank: int):
    """``inject(real, step) -> real`` for the training loop: what DCGAN_DIST_FAULT asks of step ``step`` on this
    rank (a NaN batch, a raise, a slow step), or the batch unchanged."""
    fault = injected_fault(rank)

    def inject(real, step: int):
        if fault == ("nan", step):
            return real * float("nan")
        if fault == ("raise", step):
            raise RuntimeError(f"injected failure at step {step} (DCGAN_DIST_FAULT)")
        if fault and fault[0] == "slow":
            time.sleep(fault[1] / 1000)
        return real
    return inject


def setup_logging() -> None:
    """INFO lines as "LEVEL logger: message", for the entry points and the loader's workers; accelerate's own
    INFO lines (~84 in the demo) only when ACCELERATE_LOG_LEVEL asks for them. A no-op where logging is set up."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not os.environ.get("ACCELERATE_LOG_LEVEL"):
        logging.getLogger("accelerate").setLevel(logging.WARNING)


def new_accelerator(**kwargs):
    """``accelerate.Accelerator(**kwargs)``, which creates the process group under a launcher, with torch._dynamo
    imported first. Imported after the group exists (torchmetrics imports it, lazily), torch._dynamo keeps
    references to the group that ``destroy_process_group`` cannot drop (measured with torch 2.14: the default
    group's reference count 10 -> 20; tests/test_eval.py checks the threads): gloo's threads then outlive
    ``Accelerator.end_training()``, and one that still runs when the interpreter finalizes aborts the process
    (SIGABRT, "terminate called without an active exception": launch/evaluate.py's rank 0 in CI, after it had
    printed its result). Costs nothing where torch._dynamo is imported anyway (the trainer, the evaluator)."""
    import torch._dynamo  # noqa: F401
    from accelerate import Accelerator

    return Accelerator(**kwargs)
