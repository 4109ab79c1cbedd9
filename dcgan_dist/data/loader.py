"""Streaming loader: shards -> uint8 batches for one rank, equal on every rank and resumable at any batch.

What each rank reads is the epoch plan (windows.py). The machinery is torch's: :class:`ShardWindows` is a
map-style dataset whose item ``m`` is window ``m`` of the rank's plan (counted across epochs); a stock
``DataLoader`` (``batch_size=None``), fed the window numbers from the one holding ``start_batch`` on, hands them
back in index order with any number of workers and prefetches; :class:`ShardLoader` cuts them into batches.
Workers are forked (worker.py), so a script needs no ``__main__`` guard; the trainer forks them before its process
group, trackers or any thread of its own exist (train/loop.py), so no lock is copied mid-use.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from ..errors import StoppedWaiting, UserError
from .shards import fingerprint, load_manifest
from .store import Store
from .windows import DATA_ORDER, ShardWindows  # noqa: F401 - DATA_ORDER: re-exported (checkpoints, tests)
from .worker import EXIT_GRACE_S, RAISE_LIMIT, STOP_SIGNALS, enough_open_files, warn_oversubscribed, worker_init

log = logging.getLogger(__name__)

POLL_S = 0.25        # how often a wait for a window looks at the stop request and at batch_timeout_s
STOP_GRACE_S = 1.0   # how long it still waits for the window after a stop request (a slow loader reaches a step)


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
        """``root``: a folder or an s3:// gs:// http(s):// URL. ``manifest``: ``load_manifest``'s for this root
        (the trainer's pre-flight). ``concurrency``: range requests in flight per worker (remote shards).
        ``cache_dir``/``cache_gb``: see store.ChunkCache. ``stop``: returns a reason ("signal") once the process
        was asked to stop; a wait for a window that outlasts it by STOP_GRACE_S raises errors.StoppedWaiting.
        ``batch_timeout_s``: a longer wait for one window raises UserError naming the workers (0: no bound).
        Raises UserError for shards that fail the checks, too few images for one batch per rank, and an open-file
        limit too low for the workers."""
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
        self._seed, self._pin_memory, self._prefetch = seed, pin_memory, prefetch_factor
        if num_workers:
            enough_open_files(num_workers, prefetch_factor)
            warn_oversubscribed(num_workers)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch (identical on every rank)."""
        return self.windows.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.batches // self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def start(self) -> "ShardLoader":
        """Fork the workers now (else the first batch does): the trainer does it before any thread exists. They
        serve the windows from the one holding batch ``self.batches`` on (after a close(), from there too)."""
        if self.num_workers and self._it is None:
            # its own generator: starting the iterator must not draw from the global RNG (a resumed z would drift)
            dl = DataLoader(self.windows, batch_size=None, sampler=range(self.windows.window_of(self.batches), 2**62),
                            num_workers=self.num_workers, prefetch_factor=self._prefetch, timeout=POLL_S,
                            pin_memory=self._pin_memory, worker_init_fn=worker_init, multiprocessing_context="fork",
                            generator=torch.Generator().manual_seed(self._seed))
            before = set(multiprocessing.active_children())
            gc.freeze()          # workers never collect (or copy the pages of) what the trainer allocated so far
            # stop signals held back meanwhile: the workers start with them blocked (see worker_init), and one
            # that arrives now reaches this process when the workers exist
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                self._it = iter(dl)
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
                message = f"{self.root}: Too many open files while receiving a batch from a loader worker; {RAISE_LIMIT}"
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
        cancels their reads; see worker.py); torch's own shutdown of the iterator then ends them, in a thread
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
