"""Streaming loader: shards -> uint8 batches, split across ranks and workers, equal and resumable.

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

So every rank yields exactly ``L / B`` batches per epoch, whatever the shard count, and batch ``g`` of a
rank is determined by ``(seed, g)``: a run restarted at batch ``g`` continues with the very batch it would
have seen (``start_batch``), with any number of workers.

The W loader workers share the windows out: counting a rank's windows across epochs from the one holding
``start_batch``, worker k builds windows k, k+W, k+2W, ... and hands each over as exactly ``parts`` items of
up to ``group`` consecutive batches (empty items pad a short window). The DataLoader takes one item from each
worker in turn, so item i is part ``i // W % parts`` of window ``i % W + i // (W * parts) * W``; the trainer
puts the batches back in order, holding at most about W - 1 windows meanwhile.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import concurrent.futures.thread  # noqa: F401 - registers its exit hook before ours (see _cancel_live_reads)
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import StoppedWaiting, UserError, brief
from ..runtime import setup_logging
from .shards import fingerprint, load_manifest, read_chunk
from .store import Store

log = logging.getLogger(__name__)

# The epoch plan's version, kept in checkpoints (TrainState.data_order): 1 cut each rank's share into one slot
# per worker (dcgan_dist before 2026-12-01; the same order as 2 for workers 0 and 1); 2 is the plan above.
DATA_ORDER = 2


class _ShardStream(IterableDataset):
    """The per-worker producer. Yields ``(images, labels, first_batch_index, skipped)`` forever; ``images`` holds
    up to ``group`` consecutive batches of one window, rank batches g, g+1, ... (none in an item that pads a
    window to ``parts`` items); ``skipped``: ``(chunk, warning)`` for each corrupt chunk of the window, with the
    window's first piece (the trainer counts and warns when it uses that batch: the same step for any worker
    count, one warning per chunk whichever worker read it); ``images`` None: ``skipped`` is a UserError's text."""

    def __init__(self, store: Store, manifest: dict, batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int, shuffle_window: int, start_batch: int, check: bool,
                 concurrency: int) -> None:
        self.store = store
        self.check = check
        self.concurrency = concurrency          # chunk reads in flight per worker (remote shards)
        self._pool = self._prefetcher = self._ahead = None
        self.shape = (manifest["resolution"], manifest["resolution"], manifest["channels"])
        self.chunks = [(s["name"], c) for s in manifest["shards"] for c in s["chunks"]]
        self.sizes = np.array([c["n"] for _, c in self.chunks], dtype=np.int64)
        n = int(self.sizes.sum())
        self.B, self.rank, self.W, self.seed = batch_size, rank, max(1, num_workers), seed
        self.batches_per_epoch = n // (world_size * batch_size)
        self.slot_len = self.batches_per_epoch * batch_size
        self.window_batches = max(1, min(shuffle_window // batch_size, self.batches_per_epoch))
        self.windows_per_epoch = -(-self.batches_per_epoch // self.window_batches)
        # Ship up to `group` consecutive batches at once (one contiguous slice of the window): IPC costs per
        # message, and one batch per message caps a worker near 20k img/s.
        self.group = max(1, 512 // batch_size)
        self.parts = -(-self.window_batches // self.group)
        self.start_batch = start_batch

    def window_of(self, g: int) -> int:
        """The rank's window (counted across epochs) that holds rank batch ``g``."""
        epoch, i = divmod(g, self.batches_per_epoch)
        return epoch * self.windows_per_epoch + i // self.window_batches

    def __iter__(self):
        info = get_worker_info()
        k = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        empty = (torch.empty((0, *self.shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
        m = self.window_of(self.start_batch) + k
        while True:
            epoch, w = divmod(m, self.windows_per_epoch)
            first = epoch * self.batches_per_epoch + w * self.window_batches      # its first batch's index
            n = min(self.window_batches, self.batches_per_epoch - w * self.window_batches)
            skip = max(0, self.start_batch - first)                  # a restart inside this window
            window = None
            for p in range(self.parts):
                lo, hi = max(p * self.group, skip), min((p + 1) * self.group, n)
                if hi <= lo:
                    yield (*empty, first, ())
                    continue
                if window is None:
                    try:
                        window, skipped = self._window(m)
                    except UserError as e:   # handed over as its message: the DataLoader would wrap it in a traceback
                        yield None, None, first, str(e)
                        return
                x = torch.from_numpy(window[0][lo * self.B:hi * self.B])
                y = torch.from_numpy(window[1][lo * self.B:hi * self.B])
                if info is not None:
                    try:      # here, not in the queue's feeder thread, where a full /dev/shm would hang the trainer
                        x.share_memory_(), y.share_memory_()
                    except RuntimeError as e:
                        yield None, None, first, shm_full(e)
                        return
                yield x, y, first + lo, skipped
                skipped = ()
            m += self.W

    def _window(self, m: int):
        """Window ``m`` (counted across epochs), and for remote shards this worker's next one (m + W) fetched in
        the background meanwhile (a window is a pure function of its index, so prefetching changes no batch): a
        worker then waits for one round trip per window at most once, instead of once per window."""
        if not self.store.remote:
            return self._load_window(*divmod(m, self.windows_per_epoch))
        ahead = self._ahead
        window = ahead[1].result() if ahead is not None and ahead[0] == m else \
            self._load_window(*divmod(m, self.windows_per_epoch))
        nxt = m + self.W
        self._ahead = (nxt, self._threads("_prefetcher", 1).submit(self._load_window,
                                                                    *divmod(nxt, self.windows_per_epoch)))
        return window

    def _threads(self, attr: str, n: int):
        """The thread pool kept in ``attr``, created on first use in this process (a forked worker starts its own:
        the parent's threads do not exist in it)."""
        pool = getattr(self, attr)
        if pool is None or pool[0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor
            pool = (os.getpid(), ThreadPoolExecutor(n, thread_name_prefix=attr.strip("_")))
            setattr(self, attr, pool)
        return pool[1]

    def _load_window(self, epoch: int, w: int):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        ends = np.cumsum(self.sizes[order])
        slot = self.rank
        lo = slot * self.slot_len + w * self.window_batches * self.B
        hi = min(lo + self.window_batches * self.B, (slot + 1) * self.slot_len)
        spans = []                         # (chunk index, first, last image of it in this window)
        first = int(np.searchsorted(ends, lo, side="right"))
        for pos in range(first, len(order)):
            start = int(ends[pos] - self.sizes[order[pos]])
            if start >= hi:
                break
            spans.append((int(order[pos]), max(lo, start) - start, min(hi, int(ends[pos])) - start))
        chunks = self._read_all([index for index, _, _ in spans])
        pieces: list = []                  # (images, labels) per chunk piece, or an int: places of a corrupt one
        for (_, a, z), chunk in zip(spans, chunks):
            pieces.append(z - a if isinstance(chunk[0], str) else (chunk[0][a:z], chunk[1][a:z]))
        rng = np.random.default_rng([self.seed, epoch, slot, w])
        skipped = tuple(chunk for chunk in chunks if isinstance(chunk[0], str))
        if skipped:
            pieces = self._fill_corrupt(pieces, rng)
        return self._shuffled(pieces, rng), skipped

    @staticmethod
    def _shuffled(pieces: list, rng) -> tuple[np.ndarray, np.ndarray]:
        """``concatenate(pieces)[rng.permutation(n)]`` in one copy instead of two: each piece is scattered
        straight to its places (``inverse[j]`` is where image j of the concatenation goes)."""
        n = sum(len(x) for x, _ in pieces)
        inverse = np.empty(n, dtype=np.int64)
        inverse[rng.permutation(n)] = np.arange(n)
        x = np.empty((n, *pieces[0][0].shape[1:]), dtype=pieces[0][0].dtype)
        y = np.empty(n, dtype=np.int64)
        at = 0
        for px, py in pieces:
            x[inverse[at:at + len(px)]], y[inverse[at:at + len(px)]] = px, py
            at += len(px)
        return x, y

    def _fill_corrupt(self, pieces: list, rng) -> list:
        """Keep the batch count exact: a corrupt chunk's places are filled with repeats from the window."""
        good = [p for p in pieces if not isinstance(p, int)]
        if not good:
            raise RuntimeError(f"{self.store}: every chunk of a loader window is corrupt; "
                               f"re-create the shards (see the warnings above)")
        pool_x, pool_y = np.concatenate([x for x, _ in good]), np.concatenate([y for _, y in good])
        filled = []
        for p in pieces:
            if isinstance(p, int):
                pick = rng.integers(0, len(pool_x), size=p)
                p = (pool_x[pick], pool_y[pick])
            filled.append(p)
        return filled

    def _read_all(self, indices: list[int]) -> list:
        """The chunks of a window; remote ones with ``concurrency`` range requests in flight, so a window costs
        about one round trip rather than one per chunk."""
        if not self.store.remote or len(indices) < 2:
            return [self._read(i) for i in indices]
        return list(self._threads("_pool", self.concurrency).map(self._read, indices))

    def _read(self, index: int):
        name, chunk = self.chunks[index]
        try:
            return read_chunk(self.store, name, chunk, self.shape, self.check)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):             # not the chunk's fault: never skip it
                raise UserError(f"{self.store.url(name)}: {e.strerror} while reading it; {_RAISE_LIMIT}") from None
            return self._skip(name, chunk, e)
        except ValueError as e:
            if not self.store.remote:
                return self._skip(name, chunk, e)
        try:                                 # remote: fetched once more before it is called corrupt (a bad transfer)
            return read_chunk(self.store, name, chunk, self.shape, self.check, fresh=True)
        except ValueError as e:
            return self._skip(name, chunk, e)

    def _skip(self, name: str, chunk: dict, e: Exception) -> tuple[str, str]:
        """A corrupt chunk: ``(its name, the warning)`` in place of its images (ShardLoader warns)."""
        where = f"{chunk['key']} in {self.store.url(name)}"
        return where, f"skipping corrupt chunk {where} ({chunk['n']} images): {e}"

    def __getstate__(self):                # a worker gets its own threads
        return {**self.__dict__, "_pool": None, "_prefetcher": None, "_ahead": None}


def _warn_oversubscribed(workers: int) -> None:
    """One line for more workers than this process may use cores, in place of torch's warning (printed twice per
    loader, from two places)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and workers > cores:
        warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes",
                                category=UserWarning)
        log.warning("data.workers = %d loader workers on %d CPU core(s) that this process may use: they compete "
                    "with the trainer for them; fewer workers are likely faster", workers, cores)


def shm_full(e: Exception) -> str:
    """The one line for a worker that cannot put a batch into shared memory."""
    return (f"shared memory (/dev/shm) is full: loader workers hand batches to the trainer through it ({brief(e, 160)}); "
            f"free /dev/shm, give the container more (docker run --shm-size=2g), or set data.workers = 0")


def check_fills(root, num_images: int, batch_size: int, world_size: int) -> None:
    """Every rank needs at least one batch per epoch (see the epoch plan above)."""
    if num_images // (world_size * batch_size) == 0:
        raise UserError(f"{root}: {num_images} images cannot fill one batch of {batch_size} for each of "
                        f"{world_size} rank{'s' * (world_size != 1)}; lower the batch size (train.batch_size)")


class ShardLoader:
    """Infinite iterator of ``(uint8 images B x H x W x C, int64 labels B)`` for one rank.

    Not meant for ``accelerator.prepare`` (which would dispatch or re-shard it): move batches to
    the device with :func:`to_device`. ``state_dict()`` is the number of batches consumed; a loader
    built with ``start_batch`` equal to it continues exactly there.
    """

    def __init__(self, root: str | Path, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, shuffle_window: int = 4096, start_batch: int = 0,
                 verify: str = "size", resolution: int | None = None, channels: int | None = None,
                 pin_memory: bool = False, prefetch_factor: int = 4, manifest: dict | None = None,
                 concurrency: int = 16, cache_dir: str = "", cache_gb: float = 0.0,
                 stop: Callable[[], str | None] | None = None, batch_timeout_s: float = 600.0) -> None:
        """``root``: a folder or an s3:// gs:// http(s):// URL. ``manifest``: one already returned by
        ``load_manifest`` for this root and these checks (the trainer's pre-flight), so the shards are not
        verified twice. ``concurrency``: chunk range requests in flight per worker for remote shards.
        ``cache_dir``/``cache_gb``: keep fetched remote chunks on local disk (see store.ChunkCache).
        ``stop``: returns a reason ("signal") when the process was asked to stop; a wait for a batch that outlasts
        such a request by ``STOP_GRACE_S`` raises errors.StoppedWaiting (see _next_item). ``batch_timeout_s``: a
        wait for one batch longer than this raises UserError naming the workers (0: no bound)."""
        self.store = Store(root)
        self.root = self.store.root
        self.manifest = manifest or load_manifest(root, verify, resolution, channels)
        self.store.use_cache(cache_dir, cache_gb, fingerprint(self.manifest))
        if batch_size < 1 or num_workers < 0:
            raise UserError(f"batch size must be >= 1 and workers >= 0 (got {batch_size}, {num_workers})")
        check_fills(self.root, self.manifest["num_images"], batch_size, world_size)
        self.stream = _ShardStream(self.store, self.manifest, batch_size, rank, world_size, num_workers,
                                   seed, shuffle_window, start_batch, check=verify != "none",
                                   concurrency=max(1, concurrency))
        self.batches = start_batch
        self.corrupt_chunks = 0             # corrupt chunks skipped in the windows used so far
        self._warned: set = set()
        self.stop = stop
        self.batch_timeout_s = batch_timeout_s
        _warn_oversubscribed(num_workers)
        self._it = self._feeder = self._items = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        _LIVE.add(self)
        self._dl = DataLoader(self.stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                              prefetch_factor=prefetch_factor if num_workers else None,
                              multiprocessing_context=worker_context(num_workers, prefetch_factor) if num_workers else None,
                              persistent_workers=False,
                              # its own generator: starting the iterator must not draw from the global RNG,
                              # or a resumed run's z would drift from the uninterrupted run's
                              generator=torch.Generator().manual_seed(seed))

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch (identical on every rank)."""
        return self.stream.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.batches // self.batches_per_epoch

    @property
    def images_per_epoch(self) -> int:
        return self.batches_per_epoch * self.stream.B

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def close(self) -> None:
        """Stop the worker processes and threads now. Call it in a ``finally``: the workers ignore SIGTERM (see
        _ignore_stop_signals), so multiprocessing's exit handler, which terminates and joins them, would wait
        forever for a loader still referenced by a traceback. Workers are killed, not asked: one stuck in a read
        of a silent server would not answer (torch would wait 10 s for it, then leave it running)."""
        self._closed.set()
        self.store.cancel()                 # reads in flight in this process end (workers=0, remote shards)
        with self._lock:                    # the feeder thread may be starting the workers right now (_feed)
            it, self._it = self._it, None
        _stop_workers(it)
        self._end_feeder()

    def _end_feeder(self) -> None:
        """Wait for the feeder thread to end, its queue emptied so that a put it waits in returns. Left running, it
        could be inside a torch op when the interpreter finalizes, and a daemon thread that takes the GIL back
        then exits from inside C++: "terminate called without an active exception", SIGABRT (CPython ends such
        threads with pthread_exit). With 0 workers it decodes windows itself: up to FEEDER_JOIN_S. With workers
        (killed by now) it is waiting in the DataLoader's queue read, C code that such an exit does not abort,
        for up to torch's 5-s status check, or rebuilding a batch it just received: up to FEEDER_JOIN_WORKERS_S."""
        feeder = self._feeder
        if feeder is None or feeder is threading.current_thread():
            return
        deadline = time.monotonic() + (FEEDER_JOIN_S if self._dl.num_workers == 0 else FEEDER_JOIN_WORKERS_S)
        while feeder.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                while True:
                    self._items.get_nowait()
            feeder.join(timeout=0.05)

    def __iter__(self):
        B, most = self.stream.B, 2 * self.stream.W * self.stream.parts * self.stream.group
        pending: dict = {}                 # batch index -> batch, to restore the rank's order (module docstring)
        self._dl.worker_init_fn = functools.partial(_worker_init, dict(os.environ), os.getpid())  # this process's, now
        items: queue.Queue = queue.Queue(maxsize=2)
        self._items = items
        self._feeder = threading.Thread(target=self._feed, args=(items,), name="loader-feeder", daemon=True)
        self._feeder.start()
        while True:
            x, y, g, skipped = self._next_item(items)
            if x is None:                                 # a worker's UserError
                raise UserError(skipped)
            for i in range(len(x) // B):
                pending[g + i] = (x[i * B:(i + 1) * B], y[i * B:(i + 1) * B], skipped if i == 0 else ())
            if len(pending) > most:
                raise RuntimeError(f"loader out of order: waiting for batch {self.batches}")
            while self.batches in pending:
                *batch, skipped = pending.pop(self.batches)
                self._count_skips(skipped)
                self.batches += 1
                yield tuple(batch)

    def _count_skips(self, skipped) -> None:
        """The corrupt chunks of the window whose first batch is about to be used: counted, and warned about
        once per chunk in this process."""
        for where, warning in skipped:
            self.corrupt_chunks += 1
            if where not in self._warned:
                self._warned.add(where)
                log.warning("%s", warning)

    def _feed(self, items: queue.Queue) -> None:
        """The feeder thread: starts the DataLoader's workers, then puts its items (or the exception that ended
        them) into ``items``. The main thread waits on ``items`` with a timeout, so it sees a stop request, or
        passes batch_timeout_s, while no batch comes: a hung read, or workers that never start."""
        try:
            it = iter(self._dl)
            with self._lock:
                if self._closed.is_set():                 # closed while the workers started: stop them here
                    _stop_workers(it)
                    return
                self._it = it
            for item in it:
                while not self._closed.is_set():
                    try:
                        items.put((item, None), timeout=0.5)
                        break
                    except queue.Full:
                        pass
                if self._closed.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            if not self._closed.is_set():
                items.put((None, e))
            return
        items.put((None, RuntimeError("loader ended")))      # its workers never end: not reached

    def _next_item(self, items: queue.Queue):
        """The next item of the DataLoader. Raises what the feeder caught, or StoppedWaiting when a stop request
        (``self.stop()``) is older than STOP_GRACE_S and no item came meanwhile."""
        asked, t0 = None, time.monotonic()
        while True:
            try:
                item, error = items.get(timeout=POLL_S)
                break
            except queue.Empty:
                if self.batch_timeout_s and time.monotonic() - t0 > self.batch_timeout_s:
                    raise UserError(self._silent()) from None
                reason = self.stop() if self.stop is not None else None
                if reason is None:
                    continue
                if asked is None:
                    asked = time.monotonic()
                elif time.monotonic() - asked >= STOP_GRACE_S:
                    raise StoppedWaiting(reason, str(self.root)) from None
        if error is not None:
            if not isinstance(error, UserError) and "Too many open files" in str(error):   # torch lost a batch
                raise UserError(f"{self.root}: Too many open files while receiving a batch from a loader worker; "
                                f"{_RAISE_LIMIT}") from None
            raise error
        return item

    def _silent(self) -> str:
        """The error for a loader that sent no batch for batch_timeout_s: which processes to look at."""
        workers = [w for w in getattr(self._it, "_workers", []) if w.is_alive()]
        if workers:
            who = f"its worker(s) (pid {', '.join(str(w.pid) for w in workers)}) are alive and sent nothing"
        elif self._it is None and self._dl.num_workers:
            who = f"its {self._dl.num_workers} worker(s) have not started (multiprocessing's fork server did not answer)"
        else:
            who = f"the reads in this process (pid {os.getpid()}) returned nothing"
        return (f"{self.root}: no batch for {self.batch_timeout_s:g} s (data.batch_timeout_s) at batch "
                f"{self.batches}: {who}; `py-spy dump --pid PID` shows where they wait; if the storage is this "
                f"slow, raise data.batch_timeout_s")


# How often a main thread waiting for a batch looks at the stop request, and how long it still waits for the batch
# after one (a slow but working loader then reaches the trainer's next sync point: a checkpoint), in seconds.
POLL_S = 0.25
STOP_GRACE_S = 1.0
# How long close() waits for the feeder thread to end, in seconds: with 0 workers it finishes the item in hand (one
# window's decode, or a remote read, which close() has cancelled); with workers, see ShardLoader._end_feeder.
FEEDER_JOIN_S = 10.0
FEEDER_JOIN_WORKERS_S = 0.5

# Loaders whose workers may still run. At exit, multiprocessing terminates (SIGTERM, ignored by our workers) and
# joins every worker, which would wait forever; this hook, registered after multiprocessing's own (atexit runs
# last-registered first), stops them first, whoever forgot to close the loader.
_LIVE: "weakref.WeakSet[ShardLoader]" = weakref.WeakSet()


@atexit.register
def _close_live_loaders() -> None:
    for loader in list(_LIVE):
        loader.close()


def _cancel_live_reads() -> None:
    """Before the interpreter joins its thread pools at exit (threading's own exit hooks, which run before atexit's):
    end the remote reads in flight of unclosed loaders, or the exit would wait for them to time out."""
    for loader in list(_LIVE):
        loader.store.cancel()


threading._register_atexit(_cancel_live_reads)       # after concurrent.futures' hook, so run before it


_RAISE_LIMIT = "raise the limit of open files with ulimit -n (e.g. ulimit -n 4096) or set fewer data.workers"


def _enough_open_files(workers: int, prefetch: int) -> None:
    """Loader workers hand batches over as file descriptors (torch's sharing strategy), and each process keeps up
    to 32 shards open: with a low limit of open files (``ulimit -n``) a worker's batch is lost in its queue thread
    ("Too many open files", printed again and again) and the trainer waits for it forever. Raise the soft limit
    towards the hard one; raise UserError when even the hard limit is too low."""
    import resource
    need = 128 + 8 * workers * prefetch
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = max(need, 4096) if hard == resource.RLIM_INFINITY else min(hard, max(need, 4096))
    if target >= need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return
    raise UserError(f"Too many open files would follow: the limit of open files (ulimit -n) is {hard}, and "
                    f"{workers} loader worker(s) need about {need}; {_RAISE_LIMIT}")


# glibc malloc settings of the fork server and so of the workers (their own, the trainer keeps its defaults). A fresh
# process hands every read buffer of a chunk (3 MiB at 64 px) back to the kernel when it is freed and page-faults
# the next one in: one worker made 52-62k 64-px img/s against 85-92k for a worker forked from the trainer, whose
# malloc had long raised those thresholds (2026-12-01, docs/benchmarks.md). With these, a worker keeps the memory
# of its largest window's chunks for reuse (what it holds at its peak anyway). A value set in the environment wins.
_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(512 << 20)}


def worker_context(workers: int, prefetch_factor: int = 4):
    """The workers' start method: a fork server, never a fork of this process. A fork copies the process as its
    other threads left it, locks included. A worker forked while another thread was making or dropping its
    Python thread state (gloo's run loop had one at that instant; so do new threads) hung in CPython 3.11's
    after-fork clean-up (_PyThreadState_DeleteExcept, waiting for a lock held by a thread that does not exist in
    the child): its rank waited for its first batch forever (the test suite, 2026-12-01, found with gdb). Python
    3.12 warns about fork in a threaded process; 3.14 made forkserver Linux's default. Scripts that build a
    loader with workers need the usual `if __name__ == "__main__":` guard: each worker imports the main script.

    The fork server is a fresh single-threaded interpreter, one per process, started by the first loader; it
    imports what a worker needs once (data/_forkserver.py) and ignores stop signals, and each worker forks from
    it in milliseconds. A worker never collects the trainer's garbage (an fsspec client's finalizer in a forked
    worker waited 1 s for an event loop that only the parent has). The trainer calls this first thing, so the
    server's imports overlap its start-up; a loader's own call then finds it running. The open-file limit is
    checked (and raised) first: the server inherits it, and one started under a low limit lost the descriptors
    of every worker it forked. Raises UserError when the hard limit is too low for ``workers``."""
    from multiprocessing import forkserver
    _enough_open_files(workers, prefetch_factor)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["dcgan_dist.data._forkserver"])
    # The fork server starts multiprocessing's resource tracker too; at exit after killed workers it warned about
    # their queues' semaphores (which it then removes) below the run's one-line outcome. Its warnings are off.
    # It imports modules as this process does: CPython 3.11's forkserver.main takes sys.path but never applies it,
    # so a script that put another checkout first on sys.path had workers running the installed copy's code
    # (an A/B benchmark of two trees here, 2026-12-01), or failing to find a module only that path holds.
    quiet = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:resource_tracker:UserWarning"]))
    with _environ(PYTHONWARNINGS=quiet, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path),
                  **{k: os.environ.get(k, v) for k, v in _MALLOC.items()}):
        forkserver.ensure_running()
    return ctx


@contextlib.contextmanager
def _environ(**values: str):
    """These environment variables set for the duration of the block (for a child started in it), then restored."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop_workers(it) -> None:
    """Kill a DataLoader iterator's workers and release its queues (see ShardLoader.close); None: nothing to do.

    Not torch's _shutdown_workers: it first sets the workers' done event, a multiprocessing Event whose lock
    each worker takes between batches; a worker killed while holding it left the trainer blocked in
    Event.set() for ever, at its exit (a 2-rank launch in the clean clone's suite, 2026-12-01, found alive
    42 minutes later with py-spy). The workers are dead here; nothing needs that event."""
    if it is None or not hasattr(it, "_shutdown_workers"):
        return
    if getattr(it, "_worker_pids_set", False):        # torch's SIGCHLD check would call a killed worker a crash
        from torch.utils.data import _utils
        _utils.signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
    it._shutdown = True                                # its __del__ must not run _shutdown_workers either
    for w in it._workers:
        if w.is_alive():
            w.kill()
    for w in it._workers:
        w.join(timeout=5)
    if hasattr(it, "_pin_memory_thread"):              # a thread: it sees its (threading) done event within 5 s
        it._pin_memory_thread_done_event.set()
        it._pin_memory_thread.join(timeout=10)
    for q in (*it._index_queues, it._worker_result_queue):
        q.cancel_join_thread()
        q.close()


def _worker_init(env: dict, trainer: int, worker_id: int) -> None:
    """First thing in a worker: this process's environment as it is when the loader starts (a fork would have
    copied it; the fork server holds the one of its own start, without e.g. credentials set since), the stop
    signals ignored, the trainer's log format (the fork server configured no logging), and an end of its own
    when the trainer (pid ``trainer``) ends."""
    os.environ.clear()
    os.environ.update(env)
    _ignore_stop_signals(worker_id)
    setup_logging()
    _exit_with(trainer)


def _exit_with(pid: int) -> None:
    """End this process as soon as process ``pid`` ends, whatever ends it (kill -9, the OOM killer). torch's worker
    watchdog watches the worker's parent, which is the fork server, and the fork server lives as long as any worker
    holds its pipe: after a kill -9 of the trainer, its workers and fork server waited for ever (a clean clone's
    suite, 2026-12-01). A pidfd (Linux 5.3+) wakes a thread the moment the trainer ends; elsewhere it polls."""
    import select
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:              # gone already
        os._exit(0)
    except (AttributeError, OSError):       # no pidfd here
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(pid, 0)
                except OSError:             # gone (PermissionError: its pid now belongs to another user)
                    break
        os._exit(0)

    threading.Thread(target=watch, name="trainer-watchdog", daemon=True).start()


def _ignore_stop_signals(worker_id: int) -> None:
    """SLURM signals every process of a job step; a loader worker that died of SIGTERM/SIGUSR1 would crash
    the trainer before it can checkpoint. The trainer handles those signals and stops its workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def to_device(images: torch.Tensor, device: torch.device | str, channels_last: bool = True) -> torch.Tensor:
    """uint8 B x H x W x C -> float B x C x H x W in [-1, 1], converted on the device.

    The permute of an NHWC tensor *is* channels_last memory; ``contiguous()`` gives plain NCHW.
    """
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2)
    x = x.float().mul_(2.0 / 255.0).sub_(1.0)
    return x if channels_last else x.contiguous()
