"""`accelerate launch` that stop signals do not reach: what launch/run.py starts (python -m dcgan_dist.launcher
ARGS is `accelerate launch ARGS`). Not meant to be run by hand.

SLURM signals every process of a job step at once. Left alone, the launcher dies of SIGUSR1 (it has no handler)
and answers SIGTERM by terminating the ranks and killing them 30 s later (torchrun's PContext), whether or not
they have finished their checkpoint. Here SIGINT, SIGTERM, SIGUSR1 and SIGHUP are ignored, and torchrun's
attempt to install its own handlers for them is ignored too: run.py alone decides what the ranks get (a stop
request), and the launcher stays until they end. It still dies with run.py (PR_SET_PDEATHSIG, SIGKILL).
"""

from __future__ import annotations

import runpy
import signal
import sys

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


def main() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    install = signal.signal

    def keep_ignored(sig, handler):
        return signal.SIG_IGN if sig in STOP_SIGNALS else install(sig, handler)

    signal.signal = keep_ignored
    sys.argv = ["accelerate launch", *sys.argv[1:]]
    runpy.run_module("accelerate.commands.launch", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
