"""`accelerate launch`, with the run's own outcome: python launch/run.py [accelerate launch options] launch/train.py ...

  python launch/run.py --multi_gpu --num_processes 8 launch/train.py --config configs/lsun.toml

What it adds to `accelerate launch` (which it runs, with the same arguments):
  - the run's one-line outcome is the last thing printed, and the exit code says what happened:
    0 done, 75 stopped after a checkpoint (run again to continue), 2 user error, 3 diverged,
    130 stopped at once by a second Ctrl-C, 1 crash (tracebacks kept). torchrun's failure report
    and the peers' tracebacks that follow a rank's clear error are not shown;
  - Ctrl-C, SIGTERM, SIGUSR1 or SIGHUP: every rank stops at the same step after a checkpoint;
    a second Ctrl-C stops everything at once;
  - the launcher and the ranks die with this process (no orphans, whatever is killed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from dcgan_dist.runtime import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PREEMPTED, OUTCOME_ENV, die_with_parent,
                                read_outcome)


def _ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The training processes: the launcher's children that torchrun gave a LOCAL_RANK."""
    try:
        children = psutil.Process(launcher.pid).children()
    except psutil.Error:
        return []
    ranks = []
    for c in children:
        try:
            if "LOCAL_RANK" in c.environ():
                ranks.append(c)
        except psutil.Error:
            pass
    return ranks


def _kill_tree(launcher: subprocess.Popen) -> None:
    try:
        procs = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


class Supervisor:
    def __init__(self, argv: list[str]) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="dcgan-run-")
        self.outcome_path = os.path.join(self.tmp.name, "outcome.json")
        env = {**os.environ, OUTCOME_ENV: self.outcome_path}
        self.interrupts = 0
        # Its own session: a terminal's Ctrl-C reaches only us, and we decide what the ranks get.
        self.launcher = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *argv], env=env,
                                         stderr=subprocess.PIPE, preexec_fn=self._child_setup)

    @staticmethod
    def _child_setup() -> None:
        os.setsid()
        die_with_parent(signal.SIGTERM)

    def on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= 2:
                print("\nrun.py: second Ctrl-C: stopping everything now, without a checkpoint", file=sys.stderr,
                      flush=True)
                _kill_tree(self.launcher)
                return
        print(f"\nrun.py: {signal.Signals(signum).name}: every rank stops at its next sync point after a "
              f"checkpoint" + (" (Ctrl-C again to stop now)" if signum == signal.SIGINT else ""),
              file=sys.stderr, flush=True)
        for rank in _ranks(self.launcher):
            try:
                rank.send_signal(signal.SIGUSR1)
            except psutil.Error:
                pass

    def pump_stderr(self) -> None:
        """Forward the launcher's stderr until a rank has recorded a clean outcome; after that, what the
        launcher and the other ranks print is the consequence (failure report, peer tracebacks)."""
        out = sys.stderr.buffer
        while chunk := self.launcher.stderr.read1(65536):
            outcome = read_outcome(self.outcome_path)
            if outcome is None or outcome["exit_code"] == EXIT_FAILED:
                out.write(chunk)
                out.flush()

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        pump = threading.Thread(target=self.pump_stderr, daemon=True)
        pump.start()
        while self.launcher.poll() is None:
            time.sleep(0.1)                      # the main thread stays free for signal handlers
        pump.join(timeout=5)
        outcome = read_outcome(self.outcome_path)
        self.tmp.cleanup()
        if self.interrupts >= 2:
            return EXIT_INTERRUPTED
        if outcome is None:
            rc = self.launcher.returncode
            if rc != 0:
                print(f"error: the launcher exited with {rc} and no rank recorded why (killed? out of memory? "
                      f"see above)", file=sys.stderr)
            return rc if rc >= 0 else 128 - rc
        if outcome["exit_code"] not in (0, EXIT_PREEMPTED):    # those rank 0 printed on stdout already
            print(outcome["message"], file=sys.stderr)
        return outcome["exit_code"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    die_with_parent(signal.SIGTERM)              # under srun / a shell that is killed: take everything along
    return Supervisor(argv).run()


if __name__ == "__main__":
    sys.exit(main())
