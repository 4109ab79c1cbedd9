"""`accelerate launch`, with the run's own outcome: python launch/run.py [accelerate launch options] launch/train.py ...

  python launch/run.py --multi_gpu --num_processes 8 launch/train.py --config configs/lsun.toml

What it adds to `accelerate launch` (which it runs, with the same arguments):
  - the run's one-line outcome is the last thing printed, and the exit code says what happened:
    0 done, 75 stopped after a checkpoint (run again to continue), 2 user error, 3 diverged,
    76 a rank was lost (another node died or could not be reached; run again to resume),
    130 stopped at once by a second Ctrl-C, 1 crash (tracebacks kept). torchrun's failure report
    and the peers' tracebacks that follow a rank's clear error are not shown;
  - Ctrl-C, SIGTERM, SIGUSR1 or SIGHUP, to this process or to every process of the job at once (as SLURM
    sends them), at any moment, start-up included: every rank stops at the same step after a checkpoint
    (before its first step: at once, nothing to save); a second Ctrl-C stops everything at once;
  - the launcher ignores those signals (it would die of SIGUSR1, and kill the ranks 30 s after a SIGTERM):
    this process tells the ranks, and waits for them as long as they live;
  - the launcher and the ranks die with this process (no orphans, whatever is killed): a rank whose launcher
    is gone stops after the step in progress.
"""

import signal

_EARLY: list[int] = []          # stop signals that arrive before the supervisor runs: kept, then handled
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
for _sig in STOP_SIGNALS:
    signal.signal(_sig, lambda signum, frame: _EARLY.append(signum))

if __name__ == "__main__":
    import _deps  # noqa: F401,E402 - without the project's packages, one line on how to get them


import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import psutil  # noqa: E402

from dcgan_dist.runtime import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PREEMPTED, JOB_OUTCOME_ENV,  # noqa: E402
                                OUTCOME_ENV, die_with_parent, read_outcome, record_outcome)

FORWARD_EVERY_S = 1.0           # a stop request is re-sent to the ranks until they end: one that was starting
                                # (and ignored it, as the launcher's child) gets it once its handler is in place


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


def _kill_tree(launcher: subprocess.Popen, ranks: list[psutil.Process]) -> None:
    try:
        procs = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    except psutil.Error:
        procs = []
    for r in ranks:
        try:
            procs += [r, *r.children(recursive=True)]
        except psutil.Error:
            pass
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
        self.stop_signal: str | None = None
        self.forwarded_at = 0.0
        self.ranks: dict[int, psutil.Process] = {}       # every rank seen, by pid: waited for at the end
        # Its own session: a terminal's Ctrl-C reaches only us, and we decide what the ranks get.
        self.launcher = subprocess.Popen([sys.executable, "-m", "dcgan_dist.launcher", *argv], env=env,
                                         stderr=subprocess.PIPE, preexec_fn=self._child_setup)

    @staticmethod
    def _child_setup() -> None:
        os.setsid()
        die_with_parent(signal.SIGKILL)      # the launcher ignores the stop signals (dcgan_dist/launcher.py)

    def on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= 2:
                print("\nrun.py: second Ctrl-C: stopping everything now, without a checkpoint", file=sys.stderr,
                      flush=True)
                _kill_tree(self.launcher, list(self.ranks.values()))
                return
        if self.stop_signal is None:
            self.stop_signal = signal.Signals(signum).name
            print(f"\nrun.py: {self.stop_signal}: every rank stops at its next sync point after a checkpoint"
                  + (" (Ctrl-C again to stop now)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)
        self.forward()

    def forward(self) -> None:
        """Tell every rank to stop (SIGUSR1: a stop request to the trainer, never a second Ctrl-C)."""
        self.forwarded_at = time.monotonic()
        for rank in self.ranks.values():
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

    def watch(self) -> None:
        """Until the launcher ends: learn the ranks' pids, re-send a stop request while one is pending."""
        while self.launcher.poll() is None:
            for r in _ranks(self.launcher):
                self.ranks.setdefault(r.pid, r)
            if (self.stop_signal and time.monotonic() - self.forwarded_at >= FORWARD_EVERY_S
                    and read_outcome(self.outcome_path) is None):
                self.forward()
            time.sleep(0.2)                  # the main thread stays free for signal handlers

    def wait_for_ranks(self) -> None:
        """The launcher is gone; its ranks may live on for a step (or a checkpoint): wait for them, as long
        as they live, so that their outcome is the run's."""
        alive = [r for r in self.ranks.values() if r.is_running()]
        t0 = time.monotonic()
        while alive:
            _, alive = psutil.wait_procs(alive, timeout=30)
            if alive:
                print(f"run.py: the launcher has exited; waiting for rank pid(s) {[r.pid for r in alive]} to "
                      f"end ({time.monotonic() - t0:.0f} s so far)", file=sys.stderr, flush=True)

    def run(self) -> int:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.on_signal)
        for sig in _EARLY:
            self.on_signal(sig, None)
        pump = threading.Thread(target=self.pump_stderr, daemon=True)
        pump.start()
        self.watch()
        self.wait_for_ranks()
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
        if os.environ.get(JOB_OUTCOME_ENV):     # a multi-node job: the first node to know why it ended tells the job
            record_outcome(outcome["exit_code"], outcome["message"], os.environ[JOB_OUTCOME_ENV])
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
