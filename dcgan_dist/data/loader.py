"""Streaming loader: shards -> uint8 batches, split across ranks, equal and resumable, on torch's DataLoader.

How an epoch is planned (a pure function of seed, epoch and world size; the worker count changes nothing):

1. The chunks of every shard (``chunk_size`` images each, see shards.py) are permuted with
   ``rng(seed, epoch)`` and laid end to end: one sequence of all N images.
2. The sequence is cut into one *slot* per rank of ``L = N // (world_size * B) * B`` images (B = batch size
   per rank); rank r reads slot r. The last ``N - world_size*L`` images of the sequence (fewer than
   ``world_size*B``) are left out this epoch; the permutation changes them every epoch. When N is a multiple
   of world_size*B every image is seen exactly once.
3. A slot is read in *windows* of ``k*B`` images (``k = shuffle_window // B``, the last window of an epoch
   shorter); each window is gathered from the ~``shuffle_window / chunk_size`` chunks it overlaps (random
   places in the dataset) and permuted with ``rng(seed, epoch, rank, window)``; batches are consecutive
   slices of it.

So every rank yields exactly ``L / B`` batches per epoch, and batch ``g`` of a rank is determined by
``(seed, g)``: a run restarted at batch ``g`` continues with the very batch it would have seen.

The machinery is torch's: :class:`ShardWindows` is a map-style dataset whose item ``m`` is window ``m`` of
the rank's plan (counted across epochs), and a stock ``DataLoader`` (``batch_size=None``) is fed the window
numbers from the one holding ``start_batch`` on. It hands the items back in index order with any number of
workers, and prefetches (``prefetch_factor`` windows per worker). Workers are forked (never a fork server,
so a script needs no ``__main__`` guard) when the loader starts: the trainer starts it before its process
group, trackers or any thread of its own exist (train/loop.py), so no lock is copied mid-use.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..errors import StoppedWaiting, UserError, brief
from ..runtime import die_with_parent
from .shards import fingerprint, load_manifest, read_chunk
from .store import Store

log = logging.getLogger(__name__)

# The epoch plan's version, kept in checkpoints (TrainState.data_order): 1 cut each rank's share into one slot
# per worker (dcgan_dist before 2026-12-01; the same order as 2 for workers 0 and 1); 2 is the plan above.
DATA_ORDER = 2
POLL_S = 0.25        # how often a wait for a window looks at the stop request and at batch_timeout_s
STOP_GRACE_S = 1.0   # how long it still waits for the window after a stop request (a slow loader reaches a step)
EXIT_GRACE_S = 1.0   # a worker told to end by its trainer (SIGTERM) has this long to leave torch's loop itself
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
_RAISE_LIMIT = "raise the limit of open files with ulimit -n (e.g. ulimit -n 4096) or set fewer data.workers"


class ShardWindows(Dataset):
    """Item ``m``: window ``m`` of one rank's plan (see the module docstring), counted across epochs, as
    ``(images uint8 n x H x W x C, labels int64 n, index of its first rank batch, skipped)``, n = its batches x B;
    ``skipped``: ``(where, warning)`` per corrupt chunk, whose places are filled with repeats from the window.
    A user's error (a shard it cannot read) comes back as ``(None, None, first, message)``: raised in a worker,
    the DataLoader would wrap it in a traceback. In a worker process the tensors are in shared memory."""

    def __init__(self, store: Store, manifest: dict, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle_window: int, check: bool, concurrency: int) -> None:
        self.store, self.check, self.concurrency = store, check, concurrency
        self.shape = (manifest["resolution"], manifest["resolution"], manifest["channels"])
        self.chunks = [(s["name"], c) for s in manifest["shards"] for c in s["chunks"]]
        self.sizes = np.array([c["n"] for _, c in self.chunks], dtype=np.int64)
        self.B, self.rank, self.seed = batch_size, rank, seed
        self.batches_per_epoch = int(self.sizes.sum()) // (world_size * batch_size)
        self.window_batches = max(1, min(shuffle_window // batch_size, self.batches_per_epoch))
        self.windows_per_epoch = -(-self.batches_per_epoch // self.window_batches)
        self._pool = None                   # (pid, thread pool) for the range requests of remote shards

    def window_of(self, g: int) -> int:
        """The window (counted across epochs) that holds rank batch ``g``."""
        epoch, i = divmod(g, self.batches_per_epoch)
        return epoch * self.windows_per_epoch + i // self.window_batches

    def __getitem__(self, m: int):
        epoch, w = divmod(m, self.windows_per_epoch)
        first = epoch * self.batches_per_epoch + w * self.window_batches
        try:
            spans, chunks = self._read(epoch, w)
        except UserError as e:
            return None, None, first, str(e)
        rng = np.random.default_rng([self.seed, epoch, self.rank, w])
        skipped = tuple(c for c in chunks if isinstance(c[0], str))
        pieces = [(c[0][a:z], c[1][a:z]) if not isinstance(c[0], str) else z - a for (_, a, z), c in zip(spans, chunks)]
        if skipped:
            pieces = self._fill_corrupt(pieces, rng)
        n = sum(len(p[0]) for p in pieces)
        x, y = np.empty((n, *self.shape), dtype=np.uint8), np.empty(n, dtype=np.int64)   # numpy's: huge pages
        _shuffle_into(pieces, rng, x, y)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if get_worker_info() is not None:
            try:   # here, not in the worker's queue thread, where a full /dev/shm would leave the trainer waiting
                x.share_memory_(), y.share_memory_()
            except RuntimeError as e:
                return None, None, first, shm_full(e)
        return x, y, first, skipped

    def _read(self, epoch: int, w: int):
        """The chunk pieces of window ``w`` of ``epoch``: ``(chunk, first, last image)`` each, and their chunks."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        ends = np.cumsum(self.sizes[order])
        slot_len = self.batches_per_epoch * self.B
        lo = self.rank * slot_len + w * self.window_batches * self.B
        hi = min(lo + self.window_batches * self.B, (self.rank + 1) * slot_len)
        spans = []
        for pos in range(int(np.searchsorted(ends, lo, side="right")), len(order)):
            start = int(ends[pos] - self.sizes[order[pos]])
            if start >= hi:
                break
            spans.append((int(order[pos]), max(lo, start) - start, min(hi, int(ends[pos])) - start))
        indices = [i for i, _, _ in spans]
        if not self.store.remote or len(indices) < 2:
            return spans, [self._chunk(i) for i in indices]
        if self._pool is None or self._pool[0] != os.getpid():      # a forked worker starts its own threads
            from concurrent.futures import ThreadPoolExecutor
            self._pool = (os.getpid(), ThreadPoolExecutor(self.concurrency, thread_name_prefix="range-read"))
        return spans, list(self._pool[1].map(self._chunk, indices))   # about one round trip per window

    def _chunk(self, index: int):
        """A chunk's (images, labels), or ``(where, warning)`` when it is corrupt (remote: after a second fetch)."""
        name, chunk = self.chunks[index]
        for fresh in (False, True):
            try:
                return read_chunk(self.store, name, chunk, self.shape, self.check, fresh=fresh)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):            # not the chunk's fault: never skip it
                    raise UserError(f"{self.store.url(name)}: {e.strerror} while reading it; {_RAISE_LIMIT}") from None
                error = e
            except ValueError as e:
                error = e
            if not self.store.remote or isinstance(error, OSError):
                break
        where = f"{chunk['key']} in {self.store.url(name)}"
        return where, f"skipping corrupt chunk {where} ({chunk['n']} images): {error}"

    def _fill_corrupt(self, pieces: list, rng) -> list:
        """Keep the batch count exact: a corrupt chunk's places are filled with repeats from the window."""
        good = [p for p in pieces if not isinstance(p, int)]
        if not good:
            raise RuntimeError(f"{self.store}: every chunk of a loader window is corrupt; "
                               f"re-create the shards (see the warnings above)")
        pool_x, pool_y = np.concatenate([x for x, _ in good]), np.concatenate([y for _, y in good])
        picks = [rng.integers(0, len(pool_x), size=p) if isinstance(p, int) else None for p in pieces]
        return [(pool_x[k], pool_y[k]) if k is not None else p for p, k in zip(pieces, picks)]


def _shuffle_into(pieces: list, rng, x: np.ndarray, y: np.ndarray) -> None:
    """``x, y = concatenate(pieces)[rng.permutation(n)]`` in one copy: each piece is scattered straight to its
    places (``inverse[j]`` is where image j of the concatenation goes)."""
    inverse = np.empty(len(x), dtype=np.int64)
    inverse[rng.permutation(len(x))] = np.arange(len(x))
    at = 0
    for px, py in pieces:
        x[inverse[at:at + len(px)]], y[inverse[at:at + len(px)]] = px, py
        at += len(px)


class ShardLoader:
    """Infinite iterator of ``(uint8 images B x H x W x C, int64 labels B)`` for one rank.

    Not meant for ``accelerator.prepare`` (which would dispatch or re-shard it): move batches to the device with
    :func:`to_device`. ``batches`` (``state_dict()``) counts the batches consumed; a loader built with
    ``start_batch`` equal to it continues exactly there. Works from any script (no ``__main__`` guard needed).
    """

    def __init__(self, root: str | Path, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, shuffle_window: int = 4096, start_batch: int = 0,
                 verify: str = "size", resolution: int | None = None, channels: int | None = None,
                 pin_memory: bool = False, prefetch_factor: int = 2, manifest: dict | None = None,
                 concurrency: int = 16, cache_dir: str = "", cache_gb: float = 0.0,
                 stop: Callable[[], str | None] | None = None, batch_timeout_s: float = 600.0) -> None:
        """``root``: a folder or an s3:// gs:// http(s):// URL. ``manifest``: one already returned by
        ``load_manifest`` for this root and these checks (the trainer's pre-flight). ``concurrency``: chunk range
        requests in flight per worker (remote shards). ``cache_dir``/``cache_gb``: keep fetched remote chunks on
        local disk (see store.ChunkCache). ``stop``: returns a reason ("signal") once the process was asked to
        stop; a wait for a window that outlasts it by STOP_GRACE_S raises errors.StoppedWaiting.
        ``batch_timeout_s``: a wait for one window longer than this raises UserError naming the workers (0: no
        bound). Raises UserError for shards that fail the checks, too few images for one batch per rank, and an
        open-file limit too low for the workers."""
        if batch_size < 1 or num_workers < 0:
            raise UserError(f"batch size must be >= 1 and workers >= 0 (got {batch_size}, {num_workers})")
        self.store = Store(root)
        self.root = self.store.root
        self.manifest = manifest or load_manifest(root, verify, resolution, channels)
        self.store.use_cache(cache_dir, cache_gb, fingerprint(self.manifest))
        check_fills(self.root, self.manifest["num_images"], batch_size, world_size)
        self.windows = ShardWindows(self.store, self.manifest, batch_size, rank, world_size, seed, shuffle_window,
                                    check=verify != "none", concurrency=max(1, concurrency))
        self.batch_size, self.batches, self.num_workers = batch_size, start_batch, num_workers
        self.corrupt_chunks = 0             # corrupt chunks skipped in the windows used so far
        self.stop, self.batch_timeout_s = stop, batch_timeout_s
        self._warned: set = set()
        self._window = None                 # (images, labels, first batch) of the window being used
        self._it, self._workers, self._ahead = None, [], None   # _ahead: 0 workers, (window, thread, result)
        if num_workers:
            _enough_open_files(num_workers, prefetch_factor)
            _warn_oversubscribed(num_workers)
        self._dl = DataLoader(self.windows, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                              prefetch_factor=prefetch_factor if num_workers else None, timeout=POLL_S if num_workers else 0,
                              sampler=range(self.windows.window_of(start_batch), 2**62),
                              multiprocessing_context="fork" if num_workers else None,
                              worker_init_fn=_worker_init,
                              # its own generator: starting the iterator must not draw from the global RNG,
                              # or a resumed run's z would drift from the uninterrupted run's
                              generator=torch.Generator().manual_seed(seed))

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch (identical on every rank)."""
        return self.windows.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.batches // self.batches_per_epoch

    @property
    def images_per_epoch(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def start(self) -> "ShardLoader":
        """Fork the workers now (else the first batch does): the trainer does it before any thread exists."""
        if self.num_workers and self._it is None:
            before = set(multiprocessing.active_children())
            gc.freeze()          # workers never collect (or copy the pages of) what the trainer allocated so far
            # stop signals held back meanwhile: the workers start with them blocked (see _worker_init), and one
            # that arrives now reaches this process when the workers exist
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                self._it = iter(self._dl)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                gc.unfreeze()
            self._workers = [p for p in multiprocessing.active_children() if p not in before]
        return self

    def __iter__(self):
        B = self.batch_size
        while True:
            if self._window is None:
                x, y, first, skipped = self._wait()
                if x is None:
                    raise UserError(skipped)
                self._window = (x, y, first)
                self._count_skips(skipped)
            x, y, first = self._window
            i = self.batches - first
            if (i + 1) * B > len(x):
                self._window = None
                continue
            self.batches += 1
            yield x[i * B:(i + 1) * B], y[i * B:(i + 1) * B]

    def _count_skips(self, skipped) -> None:
        """Corrupt chunks of the window about to be used: counted, and warned about once per chunk here."""
        for where, warning in skipped:
            self.corrupt_chunks += 1
            if where not in self._warned:
                self._warned.add(where)
                log.warning("%s", warning)

    def _wait(self):
        """The window holding batch ``self.batches``: from the workers, or (0 workers) read in a thread of this
        process, one window ahead, so that this thread sees a stop request, and batch_timeout_s, while no window
        comes."""
        t0, asked = time.monotonic(), None
        if self.num_workers:
            self.start()
        else:
            m = self.windows.window_of(self.batches)
            if self._ahead is None or self._ahead[0] != m:
                self._ahead = self._read_ahead(m)
        while True:
            if self.num_workers:
                item = self._next_item()
            else:
                _, thread, box = self._ahead
                thread.join(POLL_S)
                item = box[0] if box else None
                if item is not None:
                    self._ahead = self._read_ahead(m + 1)
            if isinstance(item, BaseException):
                raise item
            if item is not None:
                return item
            now = time.monotonic()
            if self.batch_timeout_s and now - t0 > self.batch_timeout_s:
                raise UserError(self._silent())
            reason = self.stop() if self.stop is not None else None
            asked = asked or (now if reason else None)
            if reason and now - asked >= STOP_GRACE_S:
                raise StoppedWaiting(reason, str(self.root))

    def _read_ahead(self, m: int) -> tuple:
        box: list = []
        thread = threading.Thread(target=lambda: box.append(_call(self.windows.__getitem__, m)), name="window-read",
                                  daemon=True)
        thread.start()
        return m, thread, box

    def _next_item(self):
        """The DataLoader's next window, or None after POLL_S without one (its ``timeout``)."""
        try:
            return next(self._it)
        except RuntimeError as e:
            if str(e).startswith("DataLoader timed out"):
                return None
            if "Too many open files" in str(e):     # torch lost a batch's file descriptor
                message = f"{self.root}: Too many open files while receiving a batch from a loader worker; {_RAISE_LIMIT}"
            else:
                raise
        raise UserError(message)

    def _silent(self) -> str:
        """The error for a loader that sent no window for batch_timeout_s: which processes to look at."""
        alive = [str(p.pid) for p in self._workers if p.is_alive()]
        who = (f"its worker(s) (pid {', '.join(alive)}) are alive and sent nothing" if alive else
               f"the reads in this process (pid {os.getpid()}) returned nothing")
        return (f"{self.root}: no batch for {self.batch_timeout_s:g} s (data.batch_timeout_s) at batch "
                f"{self.batches}: {who}; `py-spy dump --pid PID` shows where they wait; if the storage is this "
                f"slow, raise data.batch_timeout_s")

    def close(self) -> None:
        """End the workers and reads now (call it in a ``finally``). The workers are told by SIGTERM (which
        cancels their reads; see _worker_init); torch's own shutdown of the iterator then ends them, in a thread
        bounded in time (a worker killed while holding the lock of torch's done event would block it for ever);
        a worker still alive after that is killed."""
        self.store.cancel()
        it, self._it = self._it, None
        for p in self._workers:
            if p.is_alive():
                p.terminate()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)          # a stopped worker could not act on it
        if it is not None:
            holder = [it]
            del it
            ender = threading.Thread(target=holder.clear, name="loader-shutdown", daemon=True)
            ender.start()
            ender.join(5 * len(self._workers) + 2)       # torch waits up to 5 s per worker before its SIGTERM
        for p in self._workers:
            p.join(EXIT_GRACE_S + 1)
            if p.is_alive():                             # deaf to it all (a read the kernel never returns from)
                p.kill()
                p.join(5)
        if self._ahead is not None:           # 0 workers: a window being read (remote reads end on cancel)
            self._ahead[1].join(10)
            self._ahead = None
        self._window = None


def _call(fn, *args):
    """fn(*args), or the exception it raised (handed to the waiting thread)."""
    try:
        return fn(*args)
    except BaseException as e:  # noqa: BLE001 - re-raised by ShardLoader._wait
        return e


def _worker_init(worker_id: int) -> None:
    """First thing in a worker. SLURM signals every process of a job (SIGTERM, SIGUSR1) and a terminal Ctrl-C
    reaches the whole process group: a worker that died of one would crash its trainer before it can
    checkpoint, so the trainer alone decides; a SIGTERM sent by the trainer itself (close(), multiprocessing's
    exit) ends the worker. The worker dies with its trainer, even by kill -9."""
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


def _warn_oversubscribed(workers: int) -> None:
    """One line for more workers than this process may use cores, in place of torch's warning (printed twice per
    loader, from two places)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and workers > cores:
        warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes",
                                category=UserWarning)
        log.warning("data.workers = %d loader workers on %d CPU core(s) that this process may use: they compete "
                    "with the trainer for them; fewer workers are likely faster", workers, cores)


def _enough_open_files(workers: int, prefetch: int) -> None:
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
                        f"{workers} loader worker(s) need about {need}; {_RAISE_LIMIT}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def shm_full(e: Exception) -> str:
    """The one line for a worker that cannot put a window into shared memory."""
    return (f"shared memory (/dev/shm) is full: loader workers hand batches to the trainer through it ({brief(e, 160)}); "
            f"free /dev/shm, give the container more (docker run --shm-size=2g), or set data.workers = 0")


def check_fills(root, num_images: int, batch_size: int, world_size: int) -> None:
    """Every rank needs at least one batch per epoch (see the epoch plan above)."""
    if num_images // (world_size * batch_size) == 0:
        raise UserError(f"{root}: {num_images} images cannot fill one batch of {batch_size} for each of "
                        f"{world_size} rank{'s' * (world_size != 1)}; lower the batch size (train.batch_size)")


def to_device(images: torch.Tensor, device: torch.device | str, channels_last: bool = True) -> torch.Tensor:
    """uint8 B x H x W x C -> float B x C x H x W in [-1, 1], converted on the device.

    The permute of an NHWC tensor *is* channels_last memory; ``contiguous()`` gives plain NCHW.
    """
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2)
    x = x.float().mul_(2.0 / 255.0).sub_(1.0)
    return x if channels_last else x.contiguous()
