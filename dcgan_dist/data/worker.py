"""A loader worker process: how it starts, whom it obeys, when it ends (see loader.py for what it computes).

Workers are forked from the process that iterates the loader. SLURM signals every process of a job (SIGTERM,
SIGUSR1) and a terminal's Ctrl-C reaches the whole process group: a worker that died of one would crash its
trainer before the trainer can checkpoint, so the trainer alone decides. A SIGTERM from the trainer itself
(ShardLoader.close(), multiprocessing's exit) ends the worker, and the kernel ends it with its trainer (kill -9).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings

import torch
from torch.utils.data import get_worker_info

from ..errors import UserError
from ..runtime import die_with_parent

log = logging.getLogger("dcgan_dist.data.loader")
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}   # blocked while the workers are forked (loader.start)
EXIT_GRACE_S = 1.0   # a worker told to end by its trainer has this long to leave torch's loop itself
RAISE_LIMIT = "raise the limit of open files with ulimit -n (e.g. ulimit -n 4096) or set fewer data.workers"


def worker_init(worker_id: int) -> None:
    """The DataLoader's ``worker_init_fn``: first thing in a worker (see the module docstring)."""
    trainer = os.getppid()
    torch.set_num_threads(1)
    # Windows travel as shared-memory files that the trainer opens by name (torch's "file_system" strategy; this
    # process's setting, the trainer keeps its own), not as descriptors fetched from this worker at each window
    # ("file_descriptor"): a worker that stops (SIGSTOP, a hang holding the GIL) would hold the trainer in that
    # fetch, where no timeout reaches it.
    torch.multiprocessing.set_sharing_strategy("file_system")
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGUSR1})   # blocked since the fork (start)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})      # threads started from here inherit it
    threading.Thread(target=_obey_trainer, args=(trainer,), name="sigterm", daemon=True).start()
    die_with_parent(signal.SIGKILL)
    if os.getppid() != trainer:            # it died before the line above took effect
        os._exit(0)
    _keep_freed_buffers()


def _keep_freed_buffers() -> None:
    """glibc: keep freed buffers of up to 32 MiB (a window's chunk reads, ~3 MiB each at 64 px) for reuse instead
    of handing each back to the kernel and page-faulting the next one in. A worker is forked before the trainer's
    malloc has raised its own thresholds: 45,000-47,000 64-px img/s per worker without this, 59,000-62,000 with it
    (the same A/B run, 2026-12-05, docs/benchmarks.md). Elsewhere (no glibc) a no-op."""
    import ctypes
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)          # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)         # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _obey_trainer(trainer: int) -> None:
    """Wait for a SIGTERM from the trainer; then cancel the reads in flight, give torch's loop EXIT_GRACE_S to
    end this worker (the trainer's shutdown of the iterator), and end it."""
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != trainer:
        pass
    get_worker_info().dataset.store.cancel()
    time.sleep(EXIT_GRACE_S)
    os._exit(0)


def warn_oversubscribed(workers: int) -> None:
    """One line for more workers than cores, in place of torch's warning (a paragraph, printed twice)."""
    cores = len(os.sched_getaffinity(0))
    if workers > cores:
        warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes",
                                category=UserWarning)
        log.warning("data.workers = %d loader workers on %d CPU core(s) that this process may use: they compete "
                    "with the trainer for them; fewer workers are likely faster", workers, cores)


def enough_open_files(workers: int, prefetch: int) -> None:
    """Workers hand windows over as file descriptors (torch's sharing strategy), and each process keeps up to 32
    shards open: with a low limit of open files a worker's window is lost in its queue thread ("Too many open
    files", again and again) and the trainer waits for it. Raise the soft limit towards the hard one; raise
    UserError when even the hard limit is too low."""
    import resource
    need = 128 + 8 * workers * prefetch
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = max(need, 4096) if hard == resource.RLIM_INFINITY else min(hard, max(need, 4096))
    if target < need:
        raise UserError(f"Too many open files would follow: the limit of open files (ulimit -n) is {hard}, and "
                        f"{workers} loader worker(s) need about {need}; {RAISE_LIMIT}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
