"""Run a launch script as ``__main__`` (under a launcher), then print the gloo threads this process still has: the
threads the interpreter's finalization would meet. One left running aborts the process at exit (SIGABRT,
"terminate called without an active exception"; see dcgan_dist.runtime.new_accelerator).

  accelerate launch ... tests/dist/threads_at_exit.py launch/evaluate.py --checkpoint CKPT ...
"""

import os
import runpy
import sys


def gloo_threads() -> list[str]:
    """Names (Linux's /proc/self/task/*/comm) of this process's threads that belong to gloo."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:                 # the thread ended meanwhile
            pass
    return sorted(n for n in names if "gloo" in n)


if __name__ == "__main__":
    script = sys.argv.pop(1)
    sys.argv[0] = script
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    print(f"gloo threads at exit, rank {os.environ.get('RANK')}: {gloo_threads()}", file=sys.stderr, flush=True)
    sys.exit(code)
